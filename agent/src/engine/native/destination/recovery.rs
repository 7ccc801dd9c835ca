//! Recovery at the destination (after a post-copy switch, or in a pre-copy
//! round): a `Resume` on a new connection handed to the migration that
//! waits for it (only from its own source, with the same ticket), and the
//! migration taking the new link over.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::transport::{Connection, RecvStream, SendStream};
use convoy_protocol::ctl::VmState;
use convoy_protocol::destination::Destination;
use convoy_protocol::message::{Message, Reason};

use crate::host::Host;
use crate::transport::{write_message, Peer};

use super::{spawn_control_reader, Incoming};

/// Hands a connection whose first message is `resume` to the post-copy
/// migration waiting for it, or refuses it.
pub(crate) async fn hand_over_resume(
    host: Arc<Host>,
    conn: Connection,
    peer: Peer,
    send: SendStream,
    recv: RecvStream,
    resume: convoy_protocol::message::Resume,
) {
    // Only the agent the migration came from reaches it: anyone else is
    // refused here, without touching the migration.
    let waiting = host
        .recoveries
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&resume.migration)
        .filter(|r| r.source == peer.id)
        .map(|r| r.tx.clone());
    let migration = resume.migration;
    let rc = crate::host::Reconnection {
        conn: conn.clone(),
        peer: peer.clone(),
        send,
        recv,
        resume,
    };
    let send = match waiting {
        // The migration's task owns the connection now.
        Some(w) => match w.send(rc) {
            Ok(()) => return,
            // Gone meanwhile: refused below.
            Err(e) => e.0.send,
        },
        None => rc.send,
    };
    refuse_resume(
        &host,
        &peer,
        conn,
        send,
        format!("Resume of migration {migration}: no migration waits for it here"),
        Reason::Unacceptable(format!("no migration {migration} waits to be resumed here")),
    );
}

/// Refuses a `Resume` from `peer`: audited (`audit`), then answered aside
/// with `reason` ([`refuse`]), so a peer that reads nothing stalls nothing.
pub(crate) fn refuse_resume(
    host: &Host,
    peer: &Peer,
    conn: Connection,
    send: SendStream,
    audit: String,
    reason: Reason,
) {
    tracing::warn!(peer = %peer.id, "Resume refused: {audit}");
    host.audit_refusal(peer.id.to_string(), audit);
    crate::engine::spawn(refuse(conn, send, reason));
}

/// Answers a connection with an Abort, then lets it close (bounded: a
/// peer that reads nothing is dropped after 5 s).
pub(super) async fn refuse(conn: Connection, mut send: SendStream, reason: Reason) {
    let answer = async {
        let _ = write_message(
            &mut send,
            &Message::Abort(convoy_protocol::message::Abort { reason }),
        )
        .await;
        let _ = send.finish();
        conn.closed().await;
    };
    if tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .is_err()
    {
        conn.close(crate::transport::close::DONE.into(), b"refused");
    }
}

impl Incoming {
    /// Recovery: the link broke. Its tasks go (decoders finish the batch
    /// in hand, reported as stale), the VM (or the pre-copy staging copy)
    /// stays, and the migration waits for its source to come back.
    pub(super) fn await_resume(&mut self) {
        for t in &self.link_tasks {
            t.abort();
        }
        // An aborted task ends at its next await: the fault stream's,
        // which applies its frames itself, after the frame in hand.
        self.dying_tasks.append(&mut self.link_tasks);
        // Their readers gone, the decoders end after the batch in hand.
        self.dying_threads.append(&mut self.link_threads);
        self.conn.close(
            crate::transport::close::DONE.into(),
            b"link lost, awaiting Resume",
        );
        self.close_lanes(b"link lost, awaiting Resume");
        self.tx.epoch += 1;
        let switched = self.switched.load(Ordering::Acquire);
        if let Some(n) = self.name.as_ref().filter(|_| switched) {
            self.host.set_state(n, VmState::Recovering);
        }
        self.phase(if switched {
            "link lost after the post-copy switch: the VM waits for the source to reconnect".into()
        } else {
            "link lost in a pre-copy round: the staging copy waits for the source to reconnect"
                .into()
        });
        tracing::warn!(peer = %self.peer.id, switched, "link lost, awaiting the source's Resume");
        crate::host::pause::note(
            &self.host,
            crate::host::pause::EnginePoint::DestinationRecovering,
        );
    }

    /// Once pages are received (pre-copy) or after the switch: a new
    /// connection that resumes this migration may come (even before this
    /// side notices the old link broke); only from the agent it came
    /// from.
    pub(super) fn accept_resumes(&mut self) {
        if self.resume_rx.is_some() || self.host.config.recovery_window.is_zero() {
            return;
        }
        if let Some(m) = self.migration {
            let rx = self.host.await_resumes(m, self.peer.id.clone());
            self.resume_rx = Some(rx);
        }
    }

    /// Joins the decoders and tasks of broken links (each ends after the
    /// batch in hand once its reader is gone); false if one is still
    /// running after 10 s.
    pub(super) async fn join_dying(&mut self) -> bool {
        let tasks = std::mem::take(&mut self.dying_tasks);
        let dying = std::mem::take(&mut self.dying_threads);
        if dying.is_empty() && tasks.is_empty() {
            return true;
        }
        let joined = async move {
            for t in tasks {
                let _ = t.await;
            }
            let _ = tokio::task::spawn_blocking(move || {
                for t in dying {
                    let _ = t.join();
                }
            })
            .await;
        };
        if tokio::time::timeout(Duration::from_secs(10), joined)
            .await
            .is_err()
        {
            tracing::warn!(peer = %self.peer.id, "a decoder of the broken link did not end in 10 s");
            return false;
        }
        true
    }

    /// A new connection asks to resume: on the machine's consent it
    /// becomes the link (its control stream is returned), else it is
    /// refused and closed.
    pub(super) async fn reconnect(
        &mut self,
        sm: &mut Destination,
        rc: crate::host::Reconnection,
    ) -> Option<SendStream> {
        let crate::host::Reconnection {
            conn,
            peer,
            send,
            recv,
            resume,
        } = rc;
        if let Err(e) = sm.handle_resume(crate::engine::clock::now(), &peer.id, &resume) {
            refuse_resume(
                &self.host,
                &peer,
                conn,
                send,
                e.to_string(),
                Reason::Unauthorized(e.to_string()),
            );
            return None;
        }
        self.conn = conn;
        self.peer = peer;
        self.link_tasks
            .push(spawn_control_reader(recv, self.tx.clone()));
        self.accept_streams();
        if let Some(n) = self
            .name
            .as_ref()
            .filter(|_| self.switched.load(Ordering::Acquire))
        {
            self.host.set_state(n, VmState::PostcopyIn);
        }
        self.phase(format!(
            "link back: resumed on a new connection (recovery {})",
            sm.recoveries()
        ));
        tracing::info!(peer = %self.peer.id, "post-copy migration resumed");
        Some(send)
    }
}
