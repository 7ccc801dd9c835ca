//! The migration journal: what this agent has decided about each migration
//! in progress, on disk (`STATE_DIR/journal.redb`, `0600`) before it acts
//! on it.
//!
//! One record per migration and role ([`JournalRecord`]; its rules, the
//! phases and the ownership epoch, are `convoy_protocol::journal`'s). Each
//! change is one redb write transaction committed with
//! [`redb::Durability::Immediate`] (fsync) before the decision it records
//! is carried out: the claim at the source before it dials the
//! destination, the commit before `Handover` or `PostcopySwitch` leaves,
//! the destination's receipt of the handover before its VM runs,
//! `Started` on both sides before the source's copy is wiped or the
//! destination says it, a give-back before the source resumes a VM it had
//! handed over. A change that cannot be committed is not acted on (see
//! the engines). Outcomes are recorded after the audit log has them.
//!
//! Bounded: settled records (completed, failed, rolled back) are kept up
//! to [`KEEP_SETTLED`], the oldest removed first; unfinished ones (in
//! progress, or in doubt) are kept until resolved ([`Journal::unfinished`]
//! lists them, at start-up and for the resolution that comes later).
//!
//! Test hooks ([`crate::config::DangerousOptions`]): pausing for ever at a
//! named point ([`JournalPoint`]) right after its record is committed, so
//! that a test can kill the agent there, and a storage failure injected
//! at a point, from which every later write fails as on a dead disk.

use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use convoy_protocol::journal::JournalPoint;
use convoy_protocol::journal::{
    JournalRecord, JournalRole, JournalStep, RecordDecodeError, TransitionError,
};
use convoy_protocol::names::MigrationId;
use convoy_protocol::ticket::SignedTicket;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};
use thiserror::Error;

/// Settled records kept (the newest); older ones are removed.
pub const KEEP_SETTLED: usize = 256;

/// Records by migration id and role (17 bytes) → encoded record.
const RECORDS: redb::TableDefinition<'_, &[u8], &[u8]> = redb::TableDefinition::new("migrations");
/// Settled records in the order they settled → their key in [`RECORDS`].
const SETTLED: redb::TableDefinition<'_, u64, &[u8]> = redb::TableDefinition::new("settled");
/// A source's unfinished migrations (16-byte id) → the operator's signed
/// ticket (postcard), kept so that a restarted source can take a
/// post-copy migration up again; removed when the record settles.
const TICKETS: redb::TableDefinition<'_, &[u8], &[u8]> = redb::TableDefinition::new("tickets");

/// Why the journal could not be read or written.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum JournalError {
    /// The file could not be created or opened.
    #[error("journal file: {0}")]
    File(#[source] std::io::Error),
    /// redb failed (a commit that fails is not durable: nothing was
    /// decided).
    #[error("journal storage: {0}")]
    Storage(#[from] redb::Error),
    /// A stored record does not decode.
    #[error(transparent)]
    Record(#[from] RecordDecodeError),
    /// The decision may not follow the record's phase.
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// No record to advance.
    #[error("the journal has no {role} record of migration {migration}")]
    Missing {
        /// Migration.
        migration: MigrationId,
        /// Role.
        role: JournalRole,
    },
    /// A kept ticket that does not encode or decode.
    #[error("journal ticket: {0}")]
    Ticket(#[from] TicketError),
    /// A first record for a migration that has one.
    #[error("the journal already has a {role} record of migration {migration}")]
    Exists {
        /// Migration.
        migration: MigrationId,
        /// Role.
        role: JournalRole,
    },
}

/// Why a kept ticket could not be stored or read back.
#[derive(Debug, Error)]
pub enum TicketError {
    /// It does not encode (postcard).
    #[error("cannot encode: {0}")]
    Encode(#[source] postcard::Error),
    /// The stored bytes do not decode.
    #[error("stored bytes do not decode: {0}")]
    Decode(#[source] postcard::Error),
}

fn storage(e: impl Into<redb::Error>) -> JournalError {
    JournalError::Storage(e.into())
}

/// A change to the journal.
#[derive(Debug, Clone)]
pub enum JournalChange {
    /// A migration's first record: a source's claim, a destination's
    /// handover.
    Begin(JournalRecord),
    /// A source's claim, with the operator's ticket kept beside it until
    /// the migration settles.
    Claim(JournalRecord, Box<SignedTicket>),
    /// A decision about a migration recorded before.
    Advance {
        /// Migration.
        migration: MigrationId,
        /// Our side.
        role: JournalRole,
        /// The decision.
        step: JournalStep,
    },
}

/// A test's failure: from `at` on, every write of the file fails.
#[derive(Debug)]
struct Fault {
    at: JournalPoint,
    dead: Arc<AtomicBool>,
}

/// The journal (see the module docs).
pub struct Journal {
    db: redb::Database,
    keep_settled: usize,
    fault: Option<Fault>,
    /// How long the last [`COMMITS_KEPT`] commits took, oldest first.
    commits: std::sync::Mutex<std::collections::VecDeque<Duration>>,
}

/// Commits [`Journal::commit_estimate`] looks at.
const COMMITS_KEPT: usize = 16;

/// Durable records inside a pre-copy pause ([`Journal::pause_records`]).
const PAUSE_RECORDS: u32 = 3;

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("keep_settled", &self.keep_settled)
            .field("fault", &self.fault)
            .finish()
    }
}

/// The middle of `times` (the upper one of an even count; zero when
/// there are none).
fn median(times: impl Iterator<Item = Duration>) -> Duration {
    let mut sorted: Vec<Duration> = times.collect();
    sorted.sort_unstable();
    sorted
        .get(sorted.len() / 2)
        .copied()
        .unwrap_or(Duration::ZERO)
}

/// The key of a migration's record for `role`.
fn key(migration: MigrationId, role: JournalRole) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[..16].copy_from_slice(&migration.0);
    k[16] = match role {
        JournalRole::Source => 0,
        JournalRole::Destination => 1,
    };
    k
}

impl Journal {
    /// Opens (or creates, `0600`) the journal at `path`.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        Journal::open_with(path, KEEP_SETTLED, None)
    }

    /// Opens the journal keeping `keep_settled` settled records; with
    /// `fail_at`, every write fails from that point on (tests).
    pub fn open_with(
        path: &Path,
        keep_settled: usize,
        fail_at: Option<JournalPoint>,
    ) -> Result<Journal, JournalError> {
        let file = crate::private::open_or_create(path).map_err(JournalError::File)?;
        let inner = redb::backends::FileBackend::new(file).map_err(storage)?;
        let dead = Arc::new(AtomicBool::new(false));
        let backend = Backend {
            inner,
            dead: dead.clone(),
        };
        let db = redb::Database::builder()
            .create_with_backend(backend)
            .map_err(storage)?;
        let journal = Journal {
            db,
            keep_settled: keep_settled.max(1),
            fault: fail_at.map(|at| Fault { at, dead }),
            commits: std::sync::Mutex::new(std::collections::VecDeque::new()),
        };
        // The tables exist from the start: readers need not care.
        let tx = journal.db.begin_write().map_err(storage)?;
        tx.open_table(RECORDS).map_err(storage)?;
        tx.open_table(SETTLED).map_err(storage)?;
        tx.open_table(TICKETS).map_err(storage)?;
        tx.commit().map_err(storage)?;
        Ok(journal)
    }

    /// Commits `change` durably and returns the record as it now stands.
    /// On error nothing was recorded: the decision must not be acted on.
    pub fn apply(&self, change: JournalChange) -> Result<JournalRecord, JournalError> {
        self.apply_and_tell(change).map(|(r, _)| r)
    }

    /// [`Journal::apply`], and whether anything was written (a repeat of
    /// the decision that ended a record writes nothing).
    pub(crate) fn apply_and_tell(
        &self,
        change: JournalChange,
    ) -> Result<(JournalRecord, bool), JournalError> {
        let now = crate::trust::authz::now_unix();
        match change {
            JournalChange::Begin(r) => {
                self.write(key(r.migration, r.role), None, &r, None)?;
                Ok((r, true))
            }
            JournalChange::Claim(r, ticket) => {
                let bytes = postcard::to_stdvec(&*ticket).map_err(TicketError::Encode)?;
                self.write(key(r.migration, r.role), None, &r, Some(&bytes))?;
                Ok((r, true))
            }
            JournalChange::Advance {
                migration,
                role,
                step,
            } => {
                let k = key(migration, role);
                let old = self
                    .get(&k)?
                    .ok_or(JournalError::Missing { migration, role })?;
                match old.advance(step, now)? {
                    Some(new) => {
                        self.write(k, Some(&old), &new, None)?;
                        Ok((new, true))
                    }
                    None => Ok((old, false)),
                }
            }
        }
    }

    /// How long a durable commit takes here: the median of the last 16
    /// (zero before the first), what [`Journal::pause_records`] builds
    /// on. The median, so that one slow fsync (this machine's p99 is
    /// ~180 ms) does not hold every migration to it.
    pub fn commit_estimate(&self) -> Duration {
        let commits = self.commits.lock().unwrap_or_else(|p| p.into_inner());
        median(commits.iter().copied())
    }

    /// The durable records of a pre-copy pause, both sides together, as
    /// estimated from this host's own commits: before `Handover` the
    /// source's journal commit and its VM registry's doubt (fsynced too,
    /// see `vmdb::needs_fsync`), and before the VM runs there the
    /// destination's journal record, taken to cost as ours. The
    /// registry's write is the smaller (0.4 ms against 0.8–1.0 ms for
    /// the journal, measured here), so this errs on the long side.
    pub fn pause_records(&self) -> Duration {
        self.commit_estimate().saturating_mul(PAUSE_RECORDS)
    }

    /// The record of `migration` for `role`, if any.
    pub fn record(
        &self,
        migration: MigrationId,
        role: JournalRole,
    ) -> Result<Option<JournalRecord>, JournalError> {
        self.get(&key(migration, role))
    }

    /// The operator's ticket of the source's unfinished migration
    /// `migration`, if its claim kept one.
    pub fn ticket(&self, migration: MigrationId) -> Result<Option<SignedTicket>, JournalError> {
        let tx = self.db.begin_read().map_err(storage)?;
        let table = tx.open_table(TICKETS).map_err(storage)?;
        let v = table.get(migration.0.as_slice()).map_err(storage)?;
        match v {
            Some(v) => {
                let t = postcard::from_bytes(v.value()).map_err(TicketError::Decode)?;
                Ok(Some(t))
            }
            None => Ok(None),
        }
    }

    /// Every record kept, unfinished and settled.
    pub fn records(&self) -> Result<Vec<JournalRecord>, JournalError> {
        let tx = self.db.begin_read().map_err(storage)?;
        let table = tx.open_table(RECORDS).map_err(storage)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(storage)? {
            let (_, v) = row.map_err(storage)?;
            out.push(JournalRecord::decode(v.value())?);
        }
        Ok(out)
    }

    /// The migrations not settled: in progress when the agent stopped, or
    /// in doubt. Never compacted.
    pub fn unfinished(&self) -> Result<Vec<JournalRecord>, JournalError> {
        let mut v = self.records()?;
        v.retain(|r| !r.is_settled());
        Ok(v)
    }

    fn get(&self, k: &[u8; 17]) -> Result<Option<JournalRecord>, JournalError> {
        let tx = self.db.begin_read().map_err(storage)?;
        let table = tx.open_table(RECORDS).map_err(storage)?;
        let v = table.get(k.as_slice()).map_err(storage)?;
        Ok(match v {
            Some(v) => Some(JournalRecord::decode(v.value())?),
            None => None,
        })
    }

    /// Writes `new` under `k` in one durable transaction, if the record
    /// there is still `old`, with a source's `ticket`; a settled record
    /// joins the compaction queue and its ticket goes.
    fn write(
        &self,
        k: [u8; 17],
        old: Option<&JournalRecord>,
        new: &JournalRecord,
        ticket: Option<&[u8]>,
    ) -> Result<(), JournalError> {
        if let Some(f) = &self.fault {
            if JournalPoint::of(new) == Some(f.at) {
                f.dead.store(true, Ordering::SeqCst);
            }
        }
        let began = std::time::Instant::now(); // measured work, not a deadline
        let mut tx = self.db.begin_write().map_err(storage)?;
        tx.set_durability(redb::Durability::Immediate)
            .map_err(storage)?;
        {
            let mut records = tx.open_table(RECORDS).map_err(storage)?;
            let there = match records.get(k.as_slice()).map_err(storage)? {
                Some(v) => Some(JournalRecord::decode(v.value())?),
                None => None,
            };
            if there.as_ref() != old {
                // Another writer got there first (one migration writes
                // its own records only, so this is a double begin).
                return Err(JournalError::Exists {
                    migration: new.migration,
                    role: new.role,
                });
            }
            records
                .insert(k.as_slice(), new.encode().as_slice())
                .map_err(storage)?;
            if new.role == JournalRole::Source {
                let mut tickets = tx.open_table(TICKETS).map_err(storage)?;
                if let Some(t) = ticket {
                    tickets
                        .insert(new.migration.0.as_slice(), t)
                        .map_err(storage)?;
                }
                if new.is_settled() {
                    tickets
                        .remove(new.migration.0.as_slice())
                        .map_err(storage)?;
                }
            }
            if new.is_settled() {
                let mut settled = tx.open_table(SETTLED).map_err(storage)?;
                let next = match settled.last().map_err(storage)? {
                    Some((seq, _)) => seq.value() + 1,
                    None => 0,
                };
                settled.insert(next, k.as_slice()).map_err(storage)?;
                while settled.len().map_err(storage)? > self.keep_settled as u64 {
                    let Some((_, oldest)) = settled.pop_first().map_err(storage)? else {
                        break;
                    };
                    let oldest = oldest.value().to_vec();
                    // Only if still settled (it may have been re-begun).
                    let drop = match records.get(oldest.as_slice()).map_err(storage)? {
                        Some(v) => JournalRecord::decode(v.value())?.is_settled(),
                        None => false,
                    };
                    if drop {
                        records.remove(oldest.as_slice()).map_err(storage)?;
                    }
                }
            }
        }
        tx.commit().map_err(storage)?;
        let mut commits = self.commits.lock().unwrap_or_else(|p| p.into_inner());
        if commits.len() == COMMITS_KEPT {
            commits.pop_front();
        }
        commits.push_back(began.elapsed());
        Ok(())
    }
}

/// The journal's file, which a test may kill (see [`Journal::open_with`]).
#[derive(Debug)]
struct Backend {
    inner: redb::backends::FileBackend,
    dead: Arc<AtomicBool>,
}

impl Backend {
    fn alive(&self) -> std::io::Result<()> {
        if self.dead.load(Ordering::SeqCst) {
            Err(std::io::Error::other("injected journal failure (test)"))
        } else {
            Ok(())
        }
    }
}

impl redb::StorageBackend for Backend {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.alive()?;
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.alive()?;
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.alive()?;
        self.inner.write(offset, data)
    }

    fn close(&self) -> std::io::Result<()> {
        self.inner.close()
    }

    fn try_lock_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::*;
    use convoy_protocol::digest::Digest;
    use convoy_protocol::journal::{Epoch, JournalOutcome, JournalPhase};

    fn claim(n: u8) -> JournalRecord {
        JournalRecord::claimed(
            MigrationId([n; 16]),
            Digest([n; 32]),
            "spiffe://convoy.internal/agent/b".parse().unwrap(),
            "web".parse().unwrap(),
            Some(u64::from(n)),
            1,
        )
    }

    fn advance(j: &Journal, n: u8, step: JournalStep) -> Result<JournalRecord, JournalError> {
        j.apply(JournalChange::Advance {
            migration: MigrationId([n; 16]),
            role: JournalRole::Source,
            step,
        })
    }

    #[test]
    fn the_commit_estimate_is_the_median_of_the_last_commits() {
        let ms = |v: &[u64]| median(v.iter().map(|&m| Duration::from_millis(m)));
        assert_eq!(ms(&[]), Duration::ZERO);
        assert_eq!(ms(&[3, 180, 1]), Duration::from_millis(3), "one slow fsync");
        assert_eq!(ms(&[4, 1, 2, 3]), Duration::from_millis(3));
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.redb")).unwrap();
        assert_eq!(j.commit_estimate(), Duration::ZERO, "nothing committed yet");
        for n in 0..20 {
            j.apply(JournalChange::Begin(claim(n))).unwrap();
        }
        assert!(j.commit_estimate() > Duration::ZERO);
        let kept = j.commits.lock().unwrap().len();
        assert_eq!(kept, COMMITS_KEPT, "only the last ones");
    }

    #[test]
    fn records_survive_a_reopen_and_the_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.redb");
        {
            let j = Journal::open(&path).unwrap();
            j.apply(JournalChange::Begin(claim(1))).unwrap();
            let r = advance(&j, 1, JournalStep::Commit).unwrap();
            assert_eq!((r.phase, r.epoch), (JournalPhase::Committed, Epoch(1)));
        }
        assert_eq!(crate::private::mode_of(&path).unwrap(), 0o600);
        let j = Journal::open(&path).unwrap();
        let u = j.unfinished().unwrap();
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].phase, JournalPhase::Committed);
        assert_eq!(u[0].incarnation, Some(1));
    }

    #[test]
    fn a_claims_ticket_is_kept_until_the_migration_settles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.redb");
        let ticket = SignedTicket::from_parts(vec![1, 2, 3], vec![4; 64], vec![vec![5; 9]]);
        {
            let j = Journal::open(&path).unwrap();
            j.apply(JournalChange::Claim(claim(1), Box::new(ticket.clone())))
                .unwrap();
            j.apply(JournalChange::Begin(claim(2))).unwrap();
            advance(&j, 1, JournalStep::Commit).unwrap();
            advance(&j, 1, JournalStep::Doubt).unwrap();
        }
        // Kept across a restart while unfinished (in doubt here).
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.ticket(MigrationId([1; 16])).unwrap(), Some(ticket));
        assert_eq!(j.ticket(MigrationId([2; 16])).unwrap(), None);
        // Gone once settled.
        advance(&j, 1, JournalStep::Start).unwrap();
        advance(&j, 1, JournalStep::Complete).unwrap();
        assert_eq!(j.ticket(MigrationId([1; 16])).unwrap(), None);
    }

    #[test]
    fn decisions_follow_the_rules_and_a_record_begins_once() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.redb")).unwrap();
        assert!(matches!(
            advance(&j, 2, JournalStep::Commit),
            Err(JournalError::Missing { .. })
        ));
        j.apply(JournalChange::Begin(claim(2))).unwrap();
        assert!(matches!(
            j.apply(JournalChange::Begin(claim(2))),
            Err(JournalError::Exists { .. })
        ));
        assert!(matches!(
            advance(&j, 2, JournalStep::Complete),
            Err(JournalError::Transition(_))
        ));
        advance(&j, 2, JournalStep::Abort).unwrap();
        // A repeat of the decision that ended it changes nothing.
        let r = advance(&j, 2, JournalStep::Abort).unwrap();
        assert_eq!(r.phase, JournalPhase::Ended(JournalOutcome::Failed));
        assert!(j.unfinished().unwrap().is_empty());
    }

    #[test]
    fn settled_records_are_compacted_unfinished_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open_with(&dir.path().join("j.redb"), 3, None).unwrap();
        for n in 0..10 {
            j.apply(JournalChange::Begin(claim(n))).unwrap();
            advance(&j, n, JournalStep::Commit).unwrap();
            match n % 3 {
                // In doubt: unfinished, never compacted.
                0 => advance(&j, n, JournalStep::Doubt),
                1 => advance(&j, n, JournalStep::Start)
                    .and_then(|_| advance(&j, n, JournalStep::Complete)),
                _ => advance(&j, n, JournalStep::Abort),
            }
            .unwrap();
        }
        let records = j.records().unwrap();
        let settled: Vec<u8> = records
            .iter()
            .filter(|r| r.is_settled())
            .map(|r| r.migration.0[0])
            .collect();
        assert_eq!(settled, vec![5, 7, 8], "the newest three");
        let unfinished: Vec<u8> = j
            .unfinished()
            .unwrap()
            .iter()
            .map(|r| r.migration.0[0])
            .collect();
        assert_eq!(unfinished, vec![0, 3, 6, 9]);
    }

    #[test]
    fn an_injected_failure_records_nothing_from_its_point_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.redb");
        {
            let j = Journal::open_with(&path, KEEP_SETTLED, Some(JournalPoint::SourceCommitted))
                .unwrap();
            j.apply(JournalChange::Begin(claim(4))).unwrap();
            let e = advance(&j, 4, JournalStep::Commit).unwrap_err();
            assert!(matches!(e, JournalError::Storage(_)), "{e}");
            // A dead disk stays dead.
            assert!(advance(&j, 4, JournalStep::Abort).is_err());
            assert!(j.apply(JournalChange::Begin(claim(5))).is_err());
        }
        // What reached the disk: the claim, not the commit.
        let j = Journal::open(&path).unwrap();
        let u = j.unfinished().unwrap();
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].phase, JournalPhase::Claimed);
        assert!(u[0].held_here());
    }
}
