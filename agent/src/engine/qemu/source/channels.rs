//! QEMU's channels: it connects to sockets the agent owns, and each
//! connection is carried on a new stream to the destination.

use std::sync::Arc;

use crate::backend::qemu::tunnel::Pacing;
use crate::engine::qemu::pacing::Credits;
use crate::transport::Connection;
use convoy_protocol::message::Message;
use convoy_protocol::names::MigrationId;
use convoy_protocol::stream::{ChannelKind, ChannelOpen};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::engine::qemu::common::{carry, tail_for, ChanEvent, ChannelError, Fail};
use crate::transport::write_message;
use convoy_protocol::model::MigrationMode;

pub(super) fn listen(path: &std::path::Path) -> Result<tokio::net::UnixListener, Fail> {
    let _ = std::fs::remove_file(path);
    tokio::net::UnixListener::bind(path)
        .map_err(|e| Fail::local(format!("cannot listen on {}: {e}", path.display())))
}

/// Whether the process at the other end of `s` is the VM's own QEMU
/// (`SO_PEERCRED`): process `qemu`, or, when its pid is unknown, a process
/// of this agent's user. The socket's directory is private to the agent
/// already; this keeps another process of the same user (or a QEMU of
/// another VM) from feeding the migration stream.
pub(super) fn is_vms_qemu(s: &tokio::net::UnixStream, qemu: Option<u32>) -> bool {
    let Ok(cred) = s.peer_cred() else {
        return false;
    };
    match qemu {
        Some(pid) => cred
            .pid()
            .is_some_and(|p| u32::try_from(p).is_ok_and(|p| p == pid)),
        None => cred.uid() == rustix::process::geteuid().as_raw(),
    }
}

/// Accepts QEMU's connections on `listener`, one per kind in order, and
/// carries each on a new stream to the peer (keeping the tail a migration
/// in `mode` may need to recover it). A connection from any other
/// process than `qemu` is dropped and logged, and the channel still waits
/// for QEMU's.
pub(super) async fn accept_channels(
    listener: tokio::net::UnixListener,
    qemu: Option<u32>,
    conn: Connection,
    migration: MigrationId,
    kinds: Vec<ChannelKind>,
    events: mpsc::UnboundedSender<ChanEvent>,
    (mode, credits): (MigrationMode, Arc<Credits>),
) {
    let mut tasks = JoinSet::new();
    for kind in kinds {
        let local = loop {
            match listener.accept().await {
                Ok((s, _)) if is_vms_qemu(&s, qemu) => break Some(s),
                Ok((s, _)) => {
                    tracing::warn!(
                        %migration,
                        peer = ?s.peer_cred().ok(),
                        "refused a connection to the VM's migration socket: not its QEMU"
                    );
                }
                Err(e) => {
                    let _ = events.send(ChanEvent::Done(kind, Err(ChannelError::Accept(e))));
                    break None;
                }
            }
        };
        let Some(local) = local else { break };
        let (mut send, recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                let _ = events.send(ChanEvent::Done(kind, Err(e.into())));
                break;
            }
        };
        let open = Message::ChannelOpen(ChannelOpen { migration, kind });
        if let Err(e) = write_message(&mut send, &open).await {
            let _ = events.send(ChanEvent::Done(kind, Err(e.into())));
            break;
        }
        // What went out is final once the way out ends: `StreamsDone`
        // need not wait for the destination's QEMU to close the way back.
        let ev = events.clone();
        let pacing = Pacing {
            sent: Some(Arc::new(move |c| {
                let _ = ev.send(ChanEvent::Sent(kind, c));
            })),
            ..credits.pacing(kind)
        };
        carry(
            &mut tasks,
            &events,
            kind,
            local,
            (send, recv),
            (tail_for(kind, mode), pacing),
        );
    }
    // The splices live as long as this task: aborting it cuts them all.
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::is_vms_qemu;

    #[tokio::test]
    async fn only_the_vms_qemu_may_use_its_migration_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("migrate-out.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let _client = tokio::net::UnixStream::connect(&path).await.unwrap();
        let (s, _) = listener.accept().await.unwrap();
        let me = std::process::id();
        // The connecting process here is this test: it passes as the
        // expected QEMU, is refused as any other pid, and passes the
        // same-user check when the pid is unknown.
        assert!(is_vms_qemu(&s, Some(me)));
        assert!(!is_vms_qemu(&s, Some(me + 1)));
        assert!(is_vms_qemu(&s, None));
    }
}
