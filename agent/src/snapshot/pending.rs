//! Store-and-forward handovers this agent, as their source, has not
//! settled. One is recorded (committed to `snapshots.redb`) before the
//! VM's snapshot can appear in the bucket and removed once a claim decided
//! where the VM runs, so a source killed or restarted in between does not
//! forget that the destination may have the VM: it holds the VM (in doubt)
//! and settles the handover when it starts, by the one create-only claim
//! ([`super::handover`]).

use convoy_protocol::digest::Digest;
use convoy_protocol::names::{MigrationId, SpiffeId, VmName};
use convoy_protocol::snapshot::SnapshotId;
use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};

use super::seen::SeenLineages;

/// migration id → postcard [`PendingHandover`].
const PENDING: super::seen::Table = redb::TableDefinition::new("handovers_pending");

/// One unsettled handover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingHandover {
    /// The migration (the ticket's id).
    pub migration: MigrationId,
    /// The VM, held here.
    pub vm: VmName,
    /// Its incarnation here: a VM re-created under the same name is not
    /// this one, and nothing is done to it.
    pub incarnation: u64,
    /// The snapshot URL.
    pub url: String,
    /// The snapshot pushed (chosen before the push).
    pub snapshot: SnapshotId,
    /// Its manifest's digest, once the push finished.
    pub manifest: Option<Digest>,
    /// The destination agent.
    pub destination: SpiffeId,
    /// Whether the VM ran before it was held (it runs again if it comes
    /// back).
    pub was_running: bool,
}

fn corrupted(what: String) -> redb::Error {
    redb::Error::Corrupted(what)
}

impl SeenLineages {
    /// Records (or updates) `p`, durably.
    pub fn hold_handover(&self, p: &PendingHandover) -> Result<(), redb::Error> {
        let v = postcard::to_stdvec(p)
            .map_err(|e| corrupted(format!("handover {}: {e}", p.migration)))?;
        self.put(PENDING, p.migration.0.as_slice(), &v)
    }

    /// Forgets handover `m`: a claim decided it.
    pub fn settle_handover(&self, m: &MigrationId) -> Result<(), redb::Error> {
        self.remove(PENDING, m.0.as_slice())
    }

    /// The unsettled handovers. A row that does not decode is an error:
    /// the record must not forget a VM the destination may run.
    pub fn pending_handovers(&self) -> Result<Vec<PendingHandover>, redb::Error> {
        let tx = self.db.begin_read()?;
        let table = match tx.open_table(PENDING) {
            // None was ever held.
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            t => t?,
        };
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            let p: PendingHandover = postcard::from_bytes(v.value()).map_err(|e| {
                corrupted(format!(
                    "unsettled handover record ({} bytes of key): {e}",
                    k.value().len()
                ))
            })?;
            out.push(p);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_held_handover_survives_a_reopen_until_it_is_settled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshots.redb");
        let mut p = PendingHandover {
            migration: MigrationId([1; 16]),
            vm: "web".parse().unwrap(),
            incarnation: 7,
            url: "file:///b".into(),
            snapshot: SnapshotId([2; 16]),
            manifest: None,
            destination: "spiffe://t/agent/b".parse().unwrap(),
            was_running: true,
        };
        {
            let s = SeenLineages::open(&path).unwrap();
            s.hold_handover(&p).unwrap();
            p.manifest = Some(Digest([3; 32]));
            s.hold_handover(&p).unwrap();
        }
        let s = SeenLineages::open(&path).unwrap();
        assert_eq!(s.pending_handovers().unwrap(), [p.clone()]);
        s.settle_handover(&p.migration).unwrap();
        assert!(s.pending_handovers().unwrap().is_empty());
    }
}
