//! What this agent has seen of each snapshot lineage: the newest
//! generation it pushed or restored, and that manifest's digest. A bucket
//! that later offers an older generation (a rollback) or another manifest
//! of the same generation (a fork) is refused
//! ([`convoy_protocol::snapshot::check_fresh`]). Kept in redb in the state
//! directory, committed before a pull reports success, so a restart does
//! not forget it.

use std::path::Path;

use convoy_protocol::digest::Digest;
use convoy_protocol::snapshot::LineageId;
use redb::ReadableDatabase;

/// lineage → generation (8 bytes, big-endian) ‖ manifest digest (32).
const SEEN: Table = redb::TableDefinition::new("lineages");

/// The record.
pub struct SeenLineages {
    pub(super) db: redb::Database,
}

impl std::fmt::Debug for SeenLineages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SeenLineages")
    }
}

impl SeenLineages {
    /// Opens (or creates) the record at `path`.
    pub fn open(path: &Path) -> Result<SeenLineages, redb::Error> {
        let db = redb::Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(SEEN)?;
        tx.commit()?;
        Ok(SeenLineages { db })
    }

    /// The newest generation seen of `lineage`, and its manifest's digest.
    /// A row that does not decode is an error: the record must not be
    /// able to forget a lineage silently.
    pub fn get(&self, lineage: &LineageId) -> Result<Option<(u64, Digest)>, redb::Error> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SEEN)?;
        let Some(v) = table.get(lineage.0.as_slice())? else {
            return Ok(None);
        };
        let v = v.value();
        match (v.get(..8), v.get(8..40)) {
            (Some(g), Some(d)) if v.len() == 40 => {
                let mut gen = [0u8; 8];
                gen.copy_from_slice(g);
                let mut digest = [0u8; 32];
                digest.copy_from_slice(d);
                Ok(Some((u64::from_be_bytes(gen), Digest(digest))))
            }
            _ => Err(redb::Error::Corrupted(format!(
                "snapshot record of lineage {lineage}: {} bytes, not 40",
                v.len()
            ))),
        }
    }

    /// Records generation `generation` (manifest `digest`) of `lineage`,
    /// unless a newer one is recorded already.
    pub fn record(
        &self,
        lineage: &LineageId,
        generation: u64,
        digest: &Digest,
    ) -> Result<(), redb::Error> {
        if self.get(lineage)?.is_some_and(|(g, _)| g > generation) {
            return Ok(());
        }
        let mut v = Vec::with_capacity(40);
        v.extend_from_slice(&generation.to_be_bytes());
        v.extend_from_slice(&digest.0);
        self.put(SEEN, lineage.0.as_slice(), &v)
    }

    /// Writes row `k` of `table` as `v`, durably.
    pub(super) fn put(&self, table: Table, k: &[u8], v: &[u8]) -> Result<(), redb::Error> {
        let tx = self.db.begin_write()?;
        tx.open_table(table)?.insert(k, v)?;
        tx.commit()?;
        Ok(())
    }

    /// Removes row `k` of `table`, durably.
    pub(super) fn remove(&self, table: Table, k: &[u8]) -> Result<(), redb::Error> {
        let tx = self.db.begin_write()?;
        tx.open_table(table)?.remove(k)?;
        tx.commit()?;
        Ok(())
    }
}

/// A table of `snapshots.redb`: byte keys, byte values.
pub(super) type Table = redb::TableDefinition<'static, &'static [u8], &'static [u8]>;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_newest_generation_survives_a_reopen_and_an_older_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshots.redb");
        let l = LineageId([3; 16]);
        {
            let s = SeenLineages::open(&path).unwrap();
            assert_eq!(s.get(&l).unwrap(), None);
            s.record(&l, 5, &Digest([5; 32])).unwrap();
            s.record(&l, 4, &Digest([4; 32])).unwrap();
        }
        let s = SeenLineages::open(&path).unwrap();
        assert_eq!(s.get(&l).unwrap(), Some((5, Digest([5; 32]))));
        s.record(&l, 6, &Digest([6; 32])).unwrap();
        assert_eq!(s.get(&l).unwrap(), Some((6, Digest([6; 32]))));
        assert_eq!(s.get(&LineageId([4; 16])).unwrap(), None);
    }
}
