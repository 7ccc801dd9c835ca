//! Post-copy recovery at the destination (see
//! [`crate::engine::qemu::recovery`]): from the switch on, a new
//! connection's `Resume` of this migration reaches it; after a broken
//! link the guest runs on here (waiting on the pages it lacks) for the
//! recovery window, QEMU listens for the recovery, the two link cuts are
//! exchanged and checked, and the source's new channel is carried to it.

use std::time::Duration;

use convoy_protocol::message::{Message, Reason};
use convoy_protocol::model::MigrationMode;
use convoy_protocol::stream::{self, ChannelDigests, ChannelKind, LinkCut};
use serde_json::json;
use tokio::sync::mpsc;

use super::channels::{channel_header, to_qemu, AbortOnDrop};
use super::{Incoming, PEER};
use crate::backend::qemu::tunnel::{Pacing, Spliced};
use crate::backend::qemu::vm::QemuVm;
use crate::engine::clock;
use crate::engine::native::destination::refuse_resume;
use crate::engine::qemu::common::{digests, read_control, ChanEvent, Control, Fail};
use crate::engine::qemu::recovery::{
    broken_channel, is_loss, live_channel, their_view, Broken, MAX_RECOVERIES, PAUSE_TIMEOUT,
};
use crate::host::Reconnection;
use crate::transport::{close, write_message, Connection, SendStream};

/// How long the source may take to state what it received.
const CUT_TIMEOUT: Duration = Duration::from_secs(30);

/// The link being replaced: its control stream both ways and the channel
/// events.
pub(super) type Link<'a> = (
    &'a mut SendStream,
    &'a mut mpsc::Receiver<Control>,
    &'a mut mpsc::UnboundedReceiver<ChanEvent>,
    &'a mpsc::UnboundedSender<ChanEvent>,
);

/// The next `Resume` for this migration; pending for ever when none can
/// come.
pub(super) async fn next_resume(
    rx: &mut Option<mpsc::UnboundedReceiver<Reconnection>>,
) -> Option<Reconnection> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Incoming {
    /// Whether a broken link may be recovered: after the post-copy switch,
    /// with no disks copied, within [`MAX_RECOVERIES`] and a recovery
    /// window.
    pub(super) fn recoverable(&self) -> bool {
        self.switched
            && self.manifest.mode != MigrationMode::Precopy
            && self.manifest.disks.is_empty()
            && self.recoveries < MAX_RECOVERIES
            && !self.host.config.recovery_window.is_zero()
    }

    /// From the switch on, a `Resume` of this migration from its source
    /// reaches it.
    pub(super) fn wait_for_resume(&mut self) {
        if !self.recoverable() || self.resume_rx.is_some() {
            return;
        }
        let rx = self
            .host
            .await_resumes(self.migration, self.peer.id.clone());
        self.resume_rx = Some(rx);
    }

    /// No `Resume` reaches this migration any more.
    pub(super) fn stop_waiting_for_resume(&mut self) {
        if self.resume_rx.take().is_some() {
            self.host
                .recoveries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&self.migration);
        }
    }

    /// Recovers the migration after its link broke (`first`: the broken
    /// channel, when that is how the loss showed; `rc`: the source's new
    /// connection, already [`Incoming::checked`], when it came first). On
    /// success the link is the new one and QEMU receives again. A new link
    /// that fails before both link cuts are exchanged is given up and the
    /// next `Resume` awaited, within the window.
    pub(super) async fn recover(
        &mut self,
        (send, ctl, chans, chan_tx): Link<'_>,
        ours: &mut Vec<ChannelDigests>,
        acceptors: &mut Vec<AbortOnDrop>,
        first: Option<Broken>,
        rc: Option<Reconnection>,
    ) -> Result<(), Fail> {
        let channel = live_channel(self.recoveries);
        let link = self
            .recoveries
            .checked_add(1)
            .filter(|n| *n <= MAX_RECOVERIES)
            .ok_or_else(|| Fail::local("too many recoveries"))?;
        self.phase(
            "link lost after the post-copy switch: the guest runs on, waiting for the source",
        );
        tracing::warn!(migration = %self.migration, "link lost after the post-copy switch, waiting for the source");
        let qvm = self.qemu.clone().ok_or_else(|| Fail::local("no QEMU"))?;
        // The old link goes for good: its splice ends if it has not.
        if let Some(old) = &self.link {
            old.close(close::LINK_LOST.into(), b"link lost");
        }
        let mut opened = 0;
        let broken = match first {
            Some(b) => b,
            None => broken_channel(chans, channel, ours, &mut opened).await?,
        };
        // Ours in the source's terms: out is what arrived here.
        let mine = digests(
            channel,
            &Spliced {
                out: broken.carried.back,
                back: broken.carried.out,
            },
        );
        let sock = qvm.dir().join(format!("recover-{link}.sock"));
        let deadline = clock::now() + self.host.config.recovery_window;
        let mut next = rc;
        let mut listening = false;
        let (conn, new_send, new_ctl, theirs) = loop {
            let rc = match next.take() {
                Some(rc) => rc,
                None => self.await_source(deadline).await?,
            };
            if !listening {
                let _ = std::fs::remove_file(&sock);
                listen_for_recovery(&qvm, &sock).await?;
                listening = true;
            }
            match self.exchange_cuts(rc, link, mine).await {
                Ok(done) => break done,
                // The new link failed in turn: wait for the next one.
                Err(Exchange::LinkLost(e)) => {
                    tracing::info!(migration = %self.migration, "the new link failed: {e}");
                }
                Err(Exchange::Failed(f)) => return Err(f),
            }
        };
        let theirs = their_view(&theirs, self.migration, link, channel)
            .map_err(|e| Fail::violation(PEER, e))?;
        broken
            .check_prefix(theirs.back_bytes, theirs.back.0)
            .map_err(|e| Fail::violation(PEER, e))?;
        let agreed = stream::agreed(&theirs, &mine)
            .ok_or_else(|| Fail::local("the link cuts name different channels"))?;
        ours.push(agreed);
        self.recoveries = link;
        acceptors.push(AbortOnDrop(crate::engine::spawn(accept_resumed(
            conn.clone(),
            self.migration,
            ChannelKind::Resumed(link),
            sock,
            self.manifest.mode,
            chan_tx.clone(),
        ))));
        self.link = Some(conn);
        *send = new_send;
        *ctl = new_ctl;
        // `Resume`s queued meanwhile are the source's earlier attempts: a
        // later one would tear this link down.
        while let Some(stale) = self.resume_rx.as_mut().and_then(|rx| rx.try_recv().ok()) {
            refuse_resume(
                &self.host,
                &stale.peer,
                stale.conn,
                stale.send,
                format!("a stale Resume of migration {}", self.migration),
                Reason::Unacceptable("resumed already".into()),
            );
        }
        self.phase(&format!(
            "link back: QEMU resumes post-copy on a new connection (recovery {link})"
        ));
        Ok(())
    }

    /// On the new link: our [`LinkCut`], then the source's.
    async fn exchange_cuts(
        &self,
        rc: Reconnection,
        link: u16,
        mine: ChannelDigests,
    ) -> Result<(Connection, SendStream, mpsc::Receiver<Control>, LinkCut), Exchange> {
        let Reconnection {
            conn,
            send: mut new_send,
            recv,
            ..
        } = rc;
        let cut = Message::LinkCut(LinkCut {
            migration: self.migration,
            link,
            channels: vec![mine],
        });
        if let Err(e) = write_message(&mut new_send, &cut).await {
            conn.close(close::LINK_LOST.into(), b"link lost");
            return Err(Exchange::LinkLost(e.to_string()));
        }
        let (tx, mut new_ctl) = mpsc::channel(8);
        crate::engine::spawn(read_control(recv, tx, None));
        let c = match tokio::time::timeout(CUT_TIMEOUT, new_ctl.recv()).await {
            Ok(c) if !is_loss(&c) => c,
            // Lost, or silent: this link is given up.
            _ => {
                conn.close(close::LINK_LOST.into(), b"link lost");
                return Err(Exchange::LinkLost("no LinkCut from the source".into()));
            }
        };
        match Fail::from_control(c, PEER).map_err(Exchange::Failed)? {
            Message::LinkCut(theirs) => Ok((conn, new_send, new_ctl, theirs)),
            other => Err(Exchange::Failed(Fail::violation(
                PEER,
                format!("{} instead of LinkCut", other.kind()),
            ))),
        }
    }

    /// A `Resume` that came before this side saw its link break: taken
    /// (and the working link then given up) only when it is for the right
    /// ticket and a recovery may be made; otherwise refused, audited, and
    /// the link kept.
    pub(super) fn resume_first(&self, rc: Reconnection) -> Option<Reconnection> {
        if self.recoverable() {
            return self.checked(rc);
        }
        refuse_resume(
            &self.host,
            &rc.peer,
            rc.conn,
            rc.send,
            format!(
                "Resume of migration {}: no recovery may be made",
                self.migration
            ),
            Reason::Unacceptable("no recovery may be made".into()),
        );
        None
    }

    /// A reconnection for the right ticket, or `None` (refused, audited).
    fn checked(&self, rc: Reconnection) -> Option<Reconnection> {
        if rc.resume.ticket == self.ticket_digest {
            return Some(rc);
        }
        refuse_resume(
            &self.host,
            &rc.peer,
            rc.conn,
            rc.send,
            format!("Resume of migration {} with another ticket", self.migration),
            Reason::Unauthorized("another ticket".into()),
        );
        None
    }

    /// Waits for the source's `Resume` until `deadline` (the recovery
    /// window from the break).
    async fn await_source(&mut self, deadline: std::time::Instant) -> Result<Reconnection, Fail> {
        loop {
            let left = deadline.saturating_duration_since(clock::now());
            match tokio::time::timeout(left, next_resume(&mut self.resume_rx)).await {
                Ok(Some(rc)) => {
                    if let Some(rc) = self.checked(rc) {
                        return Ok(rc);
                    }
                }
                Ok(None) => return Err(Fail::local("no recovery can reach this migration")),
                Err(_) => {
                    return Err(Fail::link(format!(
                        "the source did not come back within the recovery window ({} s)",
                        self.host.config.recovery_window.as_secs()
                    )))
                }
            }
        }
    }
}

/// Why the link cuts could not be exchanged on a new link.
enum Exchange {
    /// The new link failed: another may come.
    LinkLost(String),
    /// The source refused or broke the protocol.
    Failed(Fail),
}

/// Has QEMU listen on `sock` for the recovery (`migrate-recover`) once its
/// migration is paused. Out of band, and without `query-migrate`: the
/// main loop of a post-copy destination may be blocked on a page that
/// cannot arrive, and QEMU refuses `migrate-recover` until it paused.
async fn listen_for_recovery(qvm: &QemuVm, sock: &std::path::Path) -> Result<(), Fail> {
    let end = clock::now() + PAUSE_TIMEOUT;
    let uri = json!({ "uri": format!("unix:{}", sock.display()) });
    loop {
        match qvm.execute_oob("migrate-recover", Some(uri.clone())).await {
            Ok(_) => return Ok(()),
            Err(e) if clock::now() > end => {
                return Err(Fail::local(format!(
                    "QEMU migrate-recover, {} s after the link broke: {e}",
                    PAUSE_TIMEOUT.as_secs()
                )))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Accepts the recovery's channel from the source and carries it to the
/// socket QEMU listens on for it.
async fn accept_resumed(
    conn: crate::transport::Connection,
    migration: convoy_protocol::names::MigrationId,
    expected: ChannelKind,
    sock: std::path::PathBuf,
    mode: MigrationMode,
    events: mpsc::UnboundedSender<ChanEvent>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    let Ok((send, mut recv)) = conn.accept_bi().await else {
        return;
    };
    match channel_header(&mut recv, migration, &events).await {
        Some(kind) if kind == expected => {}
        Some(kind) => {
            let _ = events.send(ChanEvent::Bad(
                crate::engine::qemu::common::BadChannel::Unexpected(kind),
            ));
            return;
        }
        None => return,
    }
    if to_qemu(
        &mut tasks,
        &events,
        expected,
        &sock,
        (send, recv),
        (mode, Pacing::default()),
    )
    .await
    {
        while tasks.join_next().await.is_some() {}
    }
}
