//! An incoming connection from a source agent: its first control message
//! decides the engine — a `Propose` of a QEMU stream
//! ([`crate::engine::qemu::destination`]), a `Resume` of a post-copy
//! migration waiting here ([`crate::engine::native::destination`]'s
//! recovery), or anything else, the page engine
//! ([`crate::engine::native::destination::serve`], which refuses what is
//! not a `Propose`).

use std::sync::Arc;
use std::time::Duration;

use convoy_protocol::message::Message;
use quinn::Connection;

use crate::engine::{native, qemu};
use crate::host::Host;
use crate::transport::{read_message, Peer};

/// How long a source may take to send its first message.
const FIRST_MESSAGE: Duration = Duration::from_secs(30);

/// Serves one incoming migration on `conn` from agent `peer`.
pub(crate) async fn serve(host: Arc<Host>, conn: Connection, peer: Peer) {
    let (send, mut recv) = match conn.accept_bi().await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(peer = %peer.id, "no control stream: {e}");
            return;
        }
    };
    let first = match tokio::time::timeout(FIRST_MESSAGE, read_message(&mut recv)).await {
        Ok(r) => r,
        Err(_) => {
            host.audit_refusal(peer.id.to_string(), "no proposal in 30 s".into());
            return;
        }
    };
    match first {
        Ok(Some(Message::Propose(p))) if p.manifest.qemu.is_some() => {
            qemu::destination::serve(host, conn, peer, send, recv, p).await;
        }
        Ok(Some(Message::Resume(r))) => {
            native::destination::hand_over_resume(host, conn, peer, send, recv, r).await;
        }
        first => native::destination::serve(host, conn, peer, send, recv, first).await,
    }
}
