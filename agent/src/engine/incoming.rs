//! An incoming connection from a source agent: its first control message
//! decides the engine — a `Propose` of a QEMU stream
//! ([`crate::engine::qemu::destination`]), a `Resume` of a post-copy
//! migration waiting here ([`crate::engine::native::destination`]'s
//! recovery), an `Inquire` about a migration the source holds in doubt
//! ([`crate::host::indoubt::answer`]), a `Lane` of a page migration
//! running here (`native::destination`'s lanes), or anything else, the page engine
//! ([`crate::engine::native::destination::serve`], which refuses what is
//! not a `Propose`).

use std::sync::Arc;
use std::time::Duration;

use crate::transport::Connection;
use convoy_protocol::message::Message;

use crate::engine::{clock, native, qemu};
use crate::host::Host;
use crate::transport::{close, read_message, Peer, WireError};

/// The source's first message, or `None` when it sends none within
/// `limit` (on the engines' clock).
async fn first_message<R>(
    recv: &mut R,
    limit: Duration,
) -> Option<Result<Option<Message>, WireError>>
where
    R: tokio::io::AsyncRead + Unpin,
{
    tokio::time::timeout(limit, read_message(recv)).await.ok()
}

/// Closes a connection that sent nothing in time, with a reason, audited.
fn timed_out(host: &Host, conn: &Connection, peer: &Peer, limit: Duration) {
    let why = format!("no proposal within {} s", limit.as_secs());
    host.audit_refusal(peer.id.to_string(), why.clone());
    conn.close(close::TIMED_OUT.into(), why.as_bytes());
}

/// Serves one incoming migration on `conn` from agent `peer`.
pub(crate) async fn serve(host: Arc<Host>, conn: Connection, peer: Peer) {
    // One deadline for the stream and its first message
    // (`ConnectionLimits::first_message`): a connection that opens
    // nothing must not hold its slot.
    let limit = host.connections.limits().first_message;
    let deadline = clock::now() + limit;
    let (send, mut recv) = match tokio::time::timeout(limit, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(peer = %peer.id, "no control stream: {e}");
            return;
        }
        Err(_) => return timed_out(&host, &conn, &peer, limit),
    };
    let left = deadline.saturating_duration_since(clock::now());
    let Some(first) = first_message(&mut recv, left).await else {
        return timed_out(&host, &conn, &peer, limit);
    };
    // Every line of the migration carries it (`crate::logging`).
    let span = |migration: &dyn std::fmt::Display, vm: Option<&dyn std::fmt::Display>| {
        tracing::info_span!(
            "migration",
            role = "destination",
            peer = %peer.id,
            migration = %migration,
            vm = vm.map(tracing::field::display),
        )
    };
    let span = match &first {
        Ok(Some(Message::Propose(p))) => span(&p.migration, Some(&p.vm)),
        Ok(Some(Message::Resume(r))) => span(&r.migration, None),
        Ok(Some(Message::Lane(l))) => span(&l.migration, None),
        Ok(Some(Message::Inquire(i))) => span(&i.migration, None),
        _ => tracing::Span::none(),
    };
    let serve = async move {
        match first {
            Ok(Some(Message::Propose(p))) if p.manifest.qemu.is_some() => {
                qemu::destination::serve(host, conn, peer, send, recv, p).await;
            }
            Ok(Some(Message::Resume(r))) => {
                native::destination::hand_over_resume(host, conn, peer, send, recv, r).await;
            }
            Ok(Some(Message::Lane(l))) => {
                native::destination::join_lane(host, conn, peer, send, l).await
            }
            Ok(Some(Message::Inquire(i))) => {
                crate::host::indoubt::answer(host, conn, peer, send, i).await;
            }
            first => native::destination::serve(host, conn, peer, send, recv, first).await,
        }
    };
    tracing::Instrument::instrument(serve, span).await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use std::time::Duration;

    use convoy_protocol::message::{Abort, Message, Reason};
    use tokio::io::AsyncWriteExt;

    use super::first_message;
    use crate::host::limits::ConnectionLimits;

    const FIRST_MESSAGE: Duration = Duration::from_secs(30);
    use crate::engine::clock;

    // Paused time: the 30-second wait costs nothing, and the boundary is
    // exact rather than a race with the scheduler.

    #[test]
    fn the_default_limit_is_thirty_seconds() {
        assert_eq!(ConnectionLimits::default().first_message, FIRST_MESSAGE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_source_is_given_up_after_exactly_the_first_message_limit() {
        let (_source, mut destination) = tokio::io::duplex(1024);
        let t0 = clock::now();
        assert!(first_message(&mut destination, FIRST_MESSAGE)
            .await
            .is_none());
        assert_eq!(clock::since(t0), FIRST_MESSAGE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_but_timely_first_message_is_read() {
        let (mut source, mut destination) = tokio::io::duplex(1024);
        let abort = Message::Abort(Abort {
            reason: Reason::Cancelled,
        });
        let bytes = abort.encode().unwrap();
        let sender = crate::engine::spawn(async move {
            tokio::time::sleep(FIRST_MESSAGE - Duration::from_millis(1)).await;
            source.write_all(&bytes).await.unwrap();
            source
        });
        let got = first_message(&mut destination, FIRST_MESSAGE).await;
        assert!(matches!(got, Some(Ok(Some(Message::Abort(_))))), "{got:?}");
        drop(sender.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_that_stops_inside_a_frame_is_a_truncated_frame_not_a_wait() {
        let (mut source, mut destination) = tokio::io::duplex(1024);
        source.write_all(&[0, 0, 0, 9, 1, 2]).await.unwrap();
        drop(source);
        let got = first_message(&mut destination, FIRST_MESSAGE).await;
        assert!(
            matches!(got, Some(Err(crate::transport::WireError::Truncated))),
            "{got:?}"
        );
    }
}
