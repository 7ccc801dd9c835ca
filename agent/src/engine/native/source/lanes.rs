//! Lanes: the plan's extra connections to the destination, each carrying
//! some of the data streams under its own congestion controller (on a
//! long lossy link one loss-based controller backs off far below the
//! link; several together keep more of it). With post-copy in the plan
//! there is one lane more, and the data streams go on the lanes only: the
//! first connection carries the control and fault streams alone
//! ([`MigrationPlan::lanes`](convoy_protocol::model::MigrationPlan::lanes)).
//!
//! Each lane is dialled over the transport the first connection won
//! with, introduced by a [`Lane`] on its first bidirectional stream and
//! used once the destination answers with the same message. A lane that
//! cannot be dialled or is refused is left out: its streams go on the
//! first connection, and the migration says so in its phases.
//!
//! A link resumed after a break before the post-copy switch
//! ([`super::driver`]'s recovery) dials its lanes again, once the
//! destination has answered the `Resume` (a lane reaches a migration only
//! while its link is up), and opens its data streams over them with the
//! next round. After the switch the resumed link stays one connection:
//! the VM runs at the destination, and a fault must not wait for lanes
//! to be dialled.

use std::time::Duration;

use convoy_protocol::message::{Lane, Message};
use convoy_protocol::names::SpiffeId;
use futures_util::future::join_all;

use tokio::sync::mpsc::UnboundedSender;

use super::jobs::{EngineEvent, StreamError};
use super::Run;
use crate::host::budget::{Share, Side};
use crate::transport::{read_message, write_message, Connection, Kind};

/// How long a lane has to be dialled and answered.
const JOIN_LIMIT: Duration = Duration::from_secs(10);

impl Run {
    /// Dials `lanes` lanes beside `first` ([`Run::dial_lanes`]; `apart`:
    /// the data streams go on the lanes only, post-copy's faults alone on
    /// `first`) and
    /// makes each part of the link: its send window a share of the
    /// budget, and its end the link's (reported on `events`: a stream
    /// whose last bytes were written before it broke fails no write).
    pub(super) async fn join_lanes(
        &mut self,
        dest: &SpiffeId,
        first: &Connection,
        (lanes, apart): (u16, bool),
        events: &UnboundedSender<EngineEvent>,
    ) -> Vec<(Connection, Share)> {
        let mut joined = Vec::new();
        for (number, lane) in self.dial_lanes(dest, first.kind(), lanes, apart).await {
            let share = self.host.budget.join(&lane, Side::Send);
            let (watched, events) = (lane.clone(), events.clone());
            crate::engine::spawn(async move {
                let error = watched.closed().await;
                let _ = events.send(EngineEvent::StreamFailed(StreamError::Lane {
                    lane: number,
                    error,
                }));
            });
            joined.push((lane, share));
        }
        joined
    }

    /// Dials lanes `1..=lanes` to `dest` over `kind`, together; returns
    /// those the destination took, with their numbers (`apart`: for the
    /// data streams alone, said so in the phases).
    async fn dial_lanes(
        &mut self,
        dest: &SpiffeId,
        kind: Kind,
        lanes: u16,
        apart: bool,
    ) -> Vec<(u16, Connection)> {
        let attempts = (1..=lanes).map(|lane| {
            let host = self.host.clone();
            let (addr, migration) = (self.addr, self.migration);
            async move {
                let join = async {
                    let conn = host
                        .dial_agent_over(addr, dest, kind)
                        .await
                        .map_err(|e| e.to_string())?;
                    match introduce(&conn, Lane { migration, lane }).await {
                        Ok(()) => Ok(conn),
                        Err(e) => {
                            conn.close(crate::transport::close::DONE.into(), b"lane refused");
                            Err(e)
                        }
                    }
                };
                let r = tokio::time::timeout(JOIN_LIMIT, join)
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer in {} s", JOIN_LIMIT.as_secs())));
                (lane, r)
            }
        });
        let mut joined = Vec::new();
        for (lane, r) in join_all(attempts).await {
            match r {
                Ok(conn) => joined.push((lane, conn)),
                Err(e) => {
                    tracing::warn!(migration = %self.migration, lane, "lane left out: {e}");
                    self.phase(&format!(
                        "lane {lane} left out ({e}): its streams go on the link's other connections"
                    ));
                }
            }
        }
        if apart && !joined.is_empty() {
            self.phase(&format!(
                "data streams over {} {kind} lanes, post-copy's faults alone on the first connection",
                joined.len()
            ));
        } else if !joined.is_empty() {
            self.phase(&format!(
                "data streams over {} {kind} connections",
                joined.len() + 1
            ));
        }
        joined
    }
}

/// Sends `lane` on a new stream of `conn` and reads the answer: the same
/// `Lane` when the destination took it.
async fn introduce(conn: &Connection, lane: Lane) -> Result<(), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_message(&mut send, &Message::Lane(lane.clone()))
        .await
        .map_err(|e| e.to_string())?;
    let _ = send.finish();
    match read_message(&mut recv).await {
        Ok(Some(Message::Lane(l))) if l == lane => Ok(()),
        Ok(Some(Message::Abort(a))) => Err(format!("refused: {}", a.reason)),
        Ok(Some(other)) => Err(format!("answered with {}", other.kind())),
        Ok(None) => Err("closed without an answer".into()),
        Err(e) => Err(e.to_string()),
    }
}
