//! QEMU's channels: it connects to sockets the agent owns, and each
//! connection is carried on a new stream to the destination.

use convoy_protocol::message::Message;
use convoy_protocol::names::MigrationId;
use convoy_protocol::stream::{ChannelKind, ChannelOpen};
use quinn::Connection;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::engine::qemu::common::{carry, ChanEvent, ChannelError, Fail};
use crate::transport::write_message;

pub(super) fn listen(path: &std::path::Path) -> Result<tokio::net::UnixListener, Fail> {
    let _ = std::fs::remove_file(path);
    tokio::net::UnixListener::bind(path)
        .map_err(|e| Fail::local(format!("cannot listen on {}: {e}", path.display())))
}

/// Accepts QEMU's connections on `listener`, one per kind in order, and
/// carries each on a new stream to the peer.
pub(super) async fn accept_channels(
    listener: tokio::net::UnixListener,
    conn: Connection,
    migration: MigrationId,
    kinds: Vec<ChannelKind>,
    events: mpsc::UnboundedSender<ChanEvent>,
) {
    let mut tasks = JoinSet::new();
    for kind in kinds {
        let local = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                let _ = events.send(ChanEvent::Done(kind, Err(ChannelError::Accept(e))));
                break;
            }
        };
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
        carry(&mut tasks, &events, kind, local, send, recv);
    }
    // The splices live as long as this task: aborting it cuts them all.
    while tasks.join_next().await.is_some() {}
}
