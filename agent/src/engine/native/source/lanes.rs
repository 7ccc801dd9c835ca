//! Lanes: the plan's extra connections to the destination, each carrying
//! some of the data streams under its own congestion controller (on a
//! long lossy link one loss-based controller backs off far below the
//! link; several together keep more of it).
//!
//! Each lane is dialled over the transport the first connection won
//! with, introduced by a [`Lane`] on its first bidirectional stream and
//! used once the destination answers with the same message. A lane that
//! cannot be dialled or is refused is left out: its streams go on the
//! first connection, and the migration says so in its phases.

use std::time::Duration;

use convoy_protocol::message::{Lane, Message};
use convoy_protocol::names::SpiffeId;
use futures_util::future::join_all;

use super::Run;
use crate::transport::{read_message, write_message, Connection, Kind};

/// How long a lane has to be dialled and answered.
const JOIN_LIMIT: Duration = Duration::from_secs(10);

impl Run {
    /// Dials lanes `1..connections` to `dest` over `kind`, together;
    /// returns those the destination took, with their numbers.
    pub(super) async fn dial_lanes(
        &mut self,
        dest: &SpiffeId,
        kind: Kind,
        connections: u16,
    ) -> Vec<(u16, Connection)> {
        let attempts = (1..connections).map(|lane| {
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
                        "lane {lane} left out ({e}): its streams go on the first connection"
                    ));
                }
            }
        }
        if !joined.is_empty() {
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
