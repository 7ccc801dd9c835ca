//! First pushes of a VM to a URL that have not finished: the lineage and
//! data key chosen for them, recorded (committed to `snapshots.redb`,
//! the key wrapped to this agent's own sealing key) before any chunk is
//! uploaded and forgotten once the manifest is up. A push cut short (a
//! link down, the agent killed, an abort) and run again takes the same
//! lineage and key, so the chunks already in the bucket keep their names
//! and are not uploaded again: the push resumes where it was cut. Later
//! generations resume the same way without a record (they take the
//! lineage of the newest manifest).

use convoy_protocol::names::VmName;
use convoy_protocol::snapshot::{LineageId, SnapshotId, WrappedKey};
use redb::ReadableDatabase;
use serde::{Deserialize, Serialize};

use super::seen::SeenLineages;

/// URL ‖ 0 ‖ VM name → postcard [`StartedPush`].
const STARTED: super::seen::Table = redb::TableDefinition::new("pushes_started");

/// The lineage of a first push under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartedPush {
    /// The lineage.
    pub lineage: LineageId,
    /// The snapshot id the key is wrapped for (HPKE binds it).
    pub wrapped_for: SnapshotId,
    /// The lineage's data key, wrapped to this agent's sealing key.
    pub key: WrappedKey,
}

fn row(url: &str, vm: &VmName) -> Vec<u8> {
    let mut k = url.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(vm.as_str().as_bytes());
    k
}

impl SeenLineages {
    /// Records the first push of `vm` to `url` under way, durably.
    pub fn start_push(&self, url: &str, vm: &VmName, s: &StartedPush) -> Result<(), redb::Error> {
        let v = postcard::to_stdvec(s)
            .map_err(|e| redb::Error::Corrupted(format!("started push of {vm}: {e}")))?;
        self.put(STARTED, &row(url, vm), &v)
    }

    /// The first push of `vm` to `url` left unfinished, if any. A row that
    /// does not decode is an error (it is not silently replaced).
    pub fn started_push(&self, url: &str, vm: &VmName) -> Result<Option<StartedPush>, redb::Error> {
        let tx = self.db.begin_read()?;
        let table = match tx.open_table(STARTED) {
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            t => t?,
        };
        let Some(v) = table.get(row(url, vm).as_slice())? else {
            return Ok(None);
        };
        postcard::from_bytes(v.value())
            .map(Some)
            .map_err(|e| redb::Error::Corrupted(format!("started push of {vm} to {url}: {e}")))
    }

    /// Forgets the first push of `vm` to `url`: its manifest is up.
    pub fn finish_push(&self, url: &str, vm: &VmName) -> Result<(), redb::Error> {
        self.remove(STARTED, &row(url, vm))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use convoy_protocol::digest::Digest;

    #[test]
    fn a_started_push_survives_a_reopen_until_it_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshots.redb");
        let vm: VmName = "web".parse().unwrap();
        let s = StartedPush {
            lineage: LineageId([1; 16]),
            wrapped_for: SnapshotId([2; 16]),
            key: WrappedKey {
                recipient: "spiffe://lab/agent/a".parse().unwrap(),
                key: Digest([3; 32]),
                enc: [4; 32],
                wrapped: vec![5; 48],
            },
        };
        {
            let db = SeenLineages::open(&path).unwrap();
            assert_eq!(db.started_push("file:///x", &vm).unwrap(), None);
            db.start_push("file:///x", &vm, &s).unwrap();
        }
        let db = SeenLineages::open(&path).unwrap();
        assert_eq!(db.started_push("file:///x", &vm).unwrap(), Some(s));
        assert_eq!(db.started_push("file:///y", &vm).unwrap(), None);
        db.finish_push("file:///x", &vm).unwrap();
        assert_eq!(db.started_push("file:///x", &vm).unwrap(), None);
    }
}
