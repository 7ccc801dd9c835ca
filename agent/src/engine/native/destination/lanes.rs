//! Lanes: a page migration's extra connections
//! ([`MigrationPlan::lanes`](convoy_protocol::model::MigrationPlan::lanes):
//! the plan's `connections` beyond the first, and one more with
//! post-copy). Each carries some of the data streams under its own
//! congestion controller; the control stream and the post-copy fault
//! stream stay on the first connection (with post-copy, alone there).
//!
//! A lane is a new mutually authenticated connection whose first message
//! is a [`Lane`]. It reaches the migration it names only from the agent
//! the migration came from, only while that migration's link is up (not
//! while it waits for a `Resume`), and only as many as the signed plan
//! allows, each number once per link (a link resumed after a break takes
//! its lanes again). Anything else is refused with an `Abort`
//! and audited; the migration is not touched. The streams a lane opens
//! are checked like those of the first connection (their index, once
//! each, the migration they name).

use std::sync::Arc;

use convoy_protocol::destination::Destination;
use convoy_protocol::message::{Lane, Message, Reason};
use tokio::sync::mpsc;

use super::{recovery, Incoming};
use crate::host::budget::Side;
use crate::host::{Host, LaneJoin, LaneWaiter};
use crate::transport::{write_message, Connection, Peer, SendStream};

/// Hands a connection whose first message is `lane` to the migration it
/// names, or refuses it. Returns when the lane has ended (or the refusal
/// was delivered), so the connection holds its slot under the agent's
/// connection limits as long as it is open.
pub(crate) async fn join_lane(
    host: Arc<Host>,
    conn: Connection,
    peer: Peer,
    send: SendStream,
    lane: Lane,
) {
    let waiting = host
        .lanes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&lane.migration)
        .filter(|w| w.source == peer.id)
        .map(|w| w.tx.clone());
    let migration = lane.migration;
    let join = LaneJoin {
        conn: conn.clone(),
        peer: peer.clone(),
        send,
        lane,
    };
    let (send, why) = match waiting {
        Some(w) => match w.try_send(join) {
            Ok(()) => {
                conn.closed().await;
                return;
            }
            Err(mpsc::error::TrySendError::Full(j)) => (
                j.send,
                format!("migration {migration} has lanes waiting already"),
            ),
            Err(mpsc::error::TrySendError::Closed(j)) => (
                j.send,
                format!("no migration {migration} from this agent takes lanes here"),
            ),
        },
        None => (
            join.send,
            format!("no migration {migration} from this agent takes lanes here"),
        ),
    };
    refuse_now(&host, &peer, conn, send, why).await;
}

/// Refuses a lane: audited (rate-limited), then answered with an `Abort`
/// (bounded: a peer that reads nothing is dropped after 5 s).
async fn refuse_now(host: &Host, peer: &Peer, conn: Connection, send: SendStream, why: String) {
    host.audit_refusal(peer.id.to_string(), format!("lane refused: {why}"));
    recovery::refuse(conn, send, Reason::Unacceptable(why)).await;
}

impl Incoming {
    /// From the acceptance on: the plan's `lanes` may join.
    pub(super) fn accept_lanes(&mut self, lanes: u16) {
        if lanes == 0 || self.lanes_rx.is_some() {
            return;
        }
        let Some(migration) = self.migration else {
            return;
        };
        let (tx, rx) = mpsc::channel(usize::from(lanes));
        self.host
            .lanes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                migration,
                LaneWaiter {
                    source: self.peer.id.clone(),
                    tx,
                },
            );
        self.lanes_rx = Some(rx);
        self.lanes_allowed = lanes;
    }

    /// A connection asks to be a lane: joined (answered with its `Lane`,
    /// its streams accepted into the current link) or refused.
    pub(super) fn add_lane(&mut self, sm: &Destination, join: LaneJoin) {
        let LaneJoin {
            conn,
            peer,
            mut send,
            lane,
        } = join;
        let why = if sm.is_recovering() || sm.is_finished() {
            Some("the migration's link is not up".to_string())
        } else if lane.lane == 0 || lane.lane > self.lanes_allowed {
            Some(format!(
                "lane {} past the plan's lanes (1..={})",
                lane.lane, self.lanes_allowed
            ))
        } else if self.lanes.iter().any(|l| l.number == lane.lane) {
            Some(format!("lane {} joined already", lane.lane))
        } else {
            None
        };
        if let Some(why) = why {
            let host = self.host.clone();
            crate::engine::spawn(async move { refuse_now(&host, &peer, conn, send, why).await });
            return;
        }
        let share = self.host.budget.join(&conn, Side::Receive);
        self.spawn_acceptor(conn.clone(), Some(lane.lane));
        self.phase(format!("lane {} joined ({})", lane.lane, conn.kind()));
        tracing::info!(peer = %peer.id, lane = lane.lane, "lane joined");
        self.lanes.push(Joined {
            number: lane.lane,
            conn,
            _share: share,
        });
        // The answer goes aside: a source that reads nothing stalls
        // nothing here.
        crate::engine::spawn(async move {
            let number = lane.lane;
            match write_message(&mut send, &Message::Lane(lane)).await {
                Ok(_) => {
                    let _ = send.finish();
                }
                Err(e) => tracing::info!(lane = number, "lane's answer not sent: {e}"),
            }
        });
    }

    /// The lanes of a link that ended (broken, or the migration is over)
    /// close with it.
    pub(super) fn close_lanes(&mut self, why: &'static [u8]) {
        for l in self.lanes.drain(..) {
            l.conn.close(crate::transport::close::DONE.into(), why);
        }
    }

    /// No lane may join any more: the migration ends.
    pub(super) fn stop_lanes(&mut self) {
        if let Some(m) = self.migration.filter(|_| self.lanes_rx.is_some()) {
            self.host
                .lanes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&m);
        }
        self.close_lanes(b"done");
    }
}

/// A lane that joined the current link.
pub(super) struct Joined {
    number: u16,
    conn: Connection,
    /// Its receive window is a share of the agent's budget.
    _share: crate::host::budget::Share,
}
