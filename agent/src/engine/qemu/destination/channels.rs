//! The destination's ends of a QEMU migration's channels: each stream the
//! source opens, checked by its header, connected to the waiting QEMU's
//! socket and carried.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use convoy_protocol::message::Message;
use convoy_protocol::model::MigrationMode;
use convoy_protocol::names::MigrationId;
use convoy_protocol::stream::{ChannelKind, QemuManifest};
use tokio::sync::mpsc;

use crate::backend::qemu::tunnel::Pacing;
use crate::engine::qemu::common::{carry, tail_for, BadChannel, ChanEvent, ChannelError};
use crate::engine::qemu::pacing::Reads;
use crate::transport::{read_message, Connection, SendStream};

/// Aborts a task when dropped.
pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Accepts the source's channels in order and connects each to the
/// matching socket of the waiting QEMU (the main migration channel first:
/// QEMU takes the first connection as the main channel).
pub(super) async fn accept_channels(
    conn: Connection,
    migration: MigrationId,
    manifest: QemuManifest,
    dir: PathBuf,
    events: mpsc::UnboundedSender<ChanEvent>,
    reads: Arc<Reads>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    let mut seen: Vec<ChannelKind> = Vec::new();
    for _ in 0..manifest.channels() {
        let Ok((send, mut recv)) = conn.accept_bi().await else {
            break;
        };
        let Some(kind) = channel_header(&mut recv, migration, &events).await else {
            break;
        };
        let valid = match kind {
            ChannelKind::Migration(n) => n <= manifest.multifd_channels,
            ChannelKind::Nbd(n) => usize::from(n) < manifest.disks.len(),
            ChannelKind::Resumed(_) => false,
        };
        if !valid || seen.contains(&kind) {
            let _ = events.send(ChanEvent::Bad(BadChannel::Unexpected(kind)));
            break;
        }
        seen.push(kind);
        let path = match kind {
            ChannelKind::Nbd(_) => dir.join("nbd.sock"),
            _ => dir.join("incoming.sock"),
        };
        let mut pacing = reads.pacing(kind);
        // A pre-copy QEMU closes its multifd channels once it has loaded
        // the stream, perhaps with an empty packet unread
        // ([`Pacing::local_may_close`]). The main channel (with the return
        // path) and post-copy stay strict: there a channel's break is a
        // failure, or a link to recover.
        pacing.local_may_close = manifest.mode == MigrationMode::Precopy
            && matches!(kind, ChannelKind::Migration(n) if n > 0);
        if !to_qemu(
            &mut tasks,
            &events,
            kind,
            &path,
            (send, recv),
            (manifest.mode, pacing),
        )
        .await
        {
            break;
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// Connects channel `kind` to QEMU's socket at `path` and carries it in
/// `tasks`; false (with the reason on `events`) when QEMU would not take
/// the connection.
pub(super) async fn to_qemu(
    tasks: &mut tokio::task::JoinSet<()>,
    events: &mpsc::UnboundedSender<ChanEvent>,
    kind: ChannelKind,
    path: &std::path::Path,
    streams: (SendStream, crate::transport::RecvStream),
    (mode, pacing): (MigrationMode, Pacing),
) -> bool {
    match tokio::net::UnixStream::connect(path).await {
        Ok(local) => {
            carry(
                tasks,
                events,
                kind,
                local,
                streams,
                (tail_for(kind, mode), pacing),
            );
            true
        }
        Err(e) => {
            let _ = events.send(ChanEvent::Done(kind, Err(ChannelError::QemuSocket(e))));
            false
        }
    }
}

/// A channel's header on a stream the source opened: its kind, or `None`
/// (with the reason sent on `events`, unless the stream simply ended).
pub(super) async fn channel_header(
    recv: &mut crate::transport::RecvStream,
    migration: MigrationId,
    events: &mpsc::UnboundedSender<ChanEvent>,
) -> Option<ChannelKind> {
    let bad = match tokio::time::timeout(Duration::from_secs(10), read_message(recv)).await {
        Ok(Ok(Some(Message::ChannelOpen(o)))) if o.migration == migration => return Some(o.kind),
        Ok(Ok(Some(other))) => BadChannel::NotAHeader(other.kind()),
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => BadChannel::Read(e),
        Err(_) => BadChannel::NoHeader,
    };
    let _ = events.send(ChanEvent::Bad(bad));
    None
}
