//! What both sides of a QEMU migration share: why a migration stopped
//! ([`Fail`]), the control stream's messages as they arrive
//! ([`read_control`], [`Fail::from_control`]), the channels QEMU's
//! connections are carried on ([`ChanEvent`], [`carry`], [`digests`]),
//! and the migration capabilities both QEMUs must agree on.

use crate::transport::{RecvStream, SendStream};
use convoy_protocol::message::{Message, Reason};
use convoy_protocol::model::MigrationMode;
use convoy_protocol::stream::{ChannelDigests, ChannelKind, ChannelSent, QemuManifest};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::backend::qemu::tunnel::{splice_paced, Carried, Cut, Pacing, Spliced};
use crate::transport::{read_message, WireError};

/// Why a QEMU migration stopped.
pub(crate) struct Fail {
    /// What the peer is told.
    pub reason: Reason,
    /// What the operator (and the audit log) is told.
    pub detail: String,
    /// Whether the peer still needs to be told.
    pub tell: bool,
}

impl Fail {
    /// A refusal or failure the peer is told of.
    pub fn new(reason: Reason, detail: impl Into<String>) -> Fail {
        Fail {
            reason,
            detail: detail.into(),
            tell: true,
        }
    }

    /// A local failure (QEMU, files, signing).
    pub fn local(detail: impl Into<String>) -> Fail {
        let d = detail.into();
        Fail::new(Reason::Internal(d.clone()), d)
    }

    /// The link to the peer broke: nobody left to tell.
    pub fn link(e: impl std::fmt::Display) -> Fail {
        Fail {
            reason: Reason::Internal("link lost".into()),
            detail: format!("link lost: {e}"),
            tell: false,
        }
    }

    /// The `peer` ("source", "destination") broke the protocol.
    pub fn violation(peer: &str, detail: String) -> Fail {
        Fail::new(
            Reason::ProtocolViolation(detail.clone()),
            format!("the {peer} broke the protocol: {detail}"),
        )
    }

    /// The operator cancelled.
    pub fn cancelled() -> Fail {
        Fail::new(Reason::Cancelled, "cancelled by the operator")
    }

    /// The next control message from `peer`, or why there is none: the
    /// peer aborted, the stream ended or failed.
    pub fn from_control(c: Option<Control>, peer: &str) -> Result<Message, Fail> {
        match c {
            Some(Ok(Some(Message::Abort(a)))) => Err(Fail {
                detail: format!("the {peer} aborted: {}", a.reason),
                reason: a.reason,
                tell: false,
            }),
            Some(Ok(Some(m))) => Ok(m),
            Some(Ok(None)) | None => Err(Fail::link("control stream closed")),
            Some(Err(e)) => Err(Fail::link(e)),
        }
    }
}

/// The migration capabilities a manifest needs, on both sides alike.
pub(crate) fn capabilities(m: &QemuManifest) -> Value {
    json!([
        { "capability": "multifd", "state": m.multifd_channels > 0 },
        { "capability": "postcopy-ram", "state": m.mode != MigrationMode::Precopy },
        // A `MIGRATION` event at each change of state: both agents wake
        // on the end of the copy rather than at their next poll, which
        // fell inside the downtime.
        { "capability": "events", "state": true },
    ])
}

/// A QMP event of the migration: a change of its state (`MIGRATION`, with
/// the `events` capability) or a new pass over memory (`MIGRATION_PASS`).
pub(crate) fn is_migration_event(e: &Value) -> bool {
    e["event"] == "MIGRATION" || e["event"] == "MIGRATION_PASS"
}

/// A control message, the end of the stream, or a read error.
pub(crate) type Control = Result<Option<Message>, WireError>;

/// Reads control messages until the stream ends (reads are not
/// cancel-safe, so they never sit in a `select!`). At the source
/// (`credits`), the destination's `ChannelRead` reports move the channels'
/// credit here, whatever the engine is waiting for.
pub(crate) async fn read_control(
    mut recv: RecvStream,
    tx: mpsc::Sender<Control>,
    credits: Option<std::sync::Arc<super::pacing::Credits>>,
) {
    loop {
        let r = read_message(&mut recv).await;
        if let (Ok(Some(Message::ChannelRead(read))), Some(c)) = (&r, &credits) {
            c.read(*read);
            continue;
        }
        let end = !matches!(r, Ok(Some(_)));
        if tx.send(r).await.is_err() || end {
            return;
        }
    }
}

/// What happened to a carried channel.
pub(crate) enum ChanEvent {
    /// QEMU opened it (and the stream to the peer is open).
    Opened,
    /// Its way out ended cleanly: what this side sent on it, final (the
    /// source's channels only).
    Sent(ChannelKind, Carried),
    /// It ended, both ways.
    Done(ChannelKind, Result<Spliced, ChannelError>),
    /// The peer opened something that is not a channel of this migration.
    Bad(BadChannel),
}

/// Why a channel could not be carried.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChannelError {
    /// QEMU's connection could not be accepted.
    #[error("{0}")]
    Accept(#[source] std::io::Error),
    /// No stream to the peer.
    #[error(transparent)]
    Open(#[from] quinn::ConnectionError),
    /// The channel's header could not be sent.
    #[error(transparent)]
    Announce(#[from] WireError),
    /// QEMU's socket would not take the connection.
    #[error("QEMU's socket: {0}")]
    QemuSocket(#[source] std::io::Error),
    /// The splice broke, either way: what it carried until then.
    #[error("{0}")]
    Splice(Box<Cut>),
}

/// Something the peer opened that is not a channel of this migration.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BadChannel {
    /// Another message where a channel header belongs.
    #[error("{0} opening a channel")]
    NotAHeader(&'static str),
    /// The header could not be read.
    #[error("opening a channel: {0}")]
    Read(#[source] WireError),
    /// No header in time.
    #[error("a channel opened without a header")]
    NoHeader,
    /// A channel the manifest does not announce, or one seen before.
    #[error("unexpected channel: {0}")]
    Unexpected(ChannelKind),
}

/// How many of the last bytes sent on a channel that post-copy may
/// recover are kept ([`crate::backend::qemu::tunnel::Tail`]): more than
/// the transport can hold in flight (a stream's receive window, 16 MiB,
/// and the connection's send buffer).
pub(crate) const RECOVERY_TAIL: usize = 64 << 20;

/// The bytes of the tail kept for channel `kind` of a migration in
/// `mode`: only the migration channels of post-copy and hybrid migrations
/// may be recovered after a cut.
pub(crate) fn tail_for(kind: ChannelKind, mode: MigrationMode) -> usize {
    match kind {
        ChannelKind::Migration(0) | ChannelKind::Resumed(_) if mode != MigrationMode::Precopy => {
            RECOVERY_TAIL
        }
        _ => 0,
    }
}

/// Announces channel `kind` as open and splices it in `tasks` (keeping
/// the last `keep` bytes sent out, paced by `pacing`), reporting its end
/// on `events`.
pub(crate) fn carry(
    tasks: &mut JoinSet<()>,
    events: &mpsc::UnboundedSender<ChanEvent>,
    kind: ChannelKind,
    local: tokio::net::UnixStream,
    (send, recv): (SendStream, RecvStream),
    (keep, pacing): (usize, Pacing),
) {
    let _ = events.send(ChanEvent::Opened);
    let ev = events.clone();
    tasks.spawn(async move {
        let r = splice_paced(local, send, recv, keep, pacing)
            .await
            .map_err(ChannelError::Splice);
        let _ = ev.send(ChanEvent::Done(kind, r));
    });
}

/// What went out on channel `kind`: `c`.
pub(crate) fn sent(kind: ChannelKind, c: Carried) -> ChannelSent {
    ChannelSent {
        kind,
        bytes: c.bytes,
        digest: convoy_protocol::digest::Digest(c.digest),
    }
}

pub(crate) fn digests(kind: ChannelKind, sp: &Spliced) -> ChannelDigests {
    ChannelDigests {
        kind,
        out_bytes: sp.out.bytes,
        out: convoy_protocol::digest::Digest(sp.out.digest),
        back_bytes: sp.back.bytes,
        back: convoy_protocol::digest::Digest(sp.back.digest),
    }
}
