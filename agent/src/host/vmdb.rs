//! The VM registry on disk (`STATE_DIR/vms.redb`, `0600`): one record per
//! VM the agent holds (`VmRecord`) — its name, incarnation, state,
//! attributes and what is needed to find and verify it again after a
//! restart (for QEMU, [`QemuVmRecord`]: the runtime directory, the QMP
//! socket, the process's pid and start time, its command line and launch
//! definition).
//!
//! The in-memory registry (`Host::vms`) stays the one the agent works
//! on; this file follows it. Every change made through `Host::vms` is
//! written back when the lock is released, in the same critical section,
//! so the file never lags behind what another task may have seen; a VM
//! creation writes before it is reported (`VmsGuard::commit`). Each write
//! is one redb transaction, fsynced — except a change of state alone, other
//! than into doubt (a migration's pause for its final copy falls inside the
//! downtime; an operator's pause needs no fsync either): committed without
//! one, made durable by the next write. A restarted agent takes a QEMU's
//! state from QEMU's own run status, the migration claim and a recorded
//! doubt (`host::reattach`), all of which are always fsynced.
//!
//! Records are JSON, so that a field added later has a default and an
//! older file still reads; one that does not read is reported at start,
//! never dropped silently.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use convoy_protocol::ctl::VmState;
use convoy_protocol::names::VmName;
use convoy_protocol::vm::VmAttributes;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{VmEntry, VmHandle};
use crate::backend::qemu::vm::QemuVmRecord;

/// One VM as the registry file holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct VmRecord {
    pub name: VmName,
    pub incarnation: u64,
    pub state: VmState,
    /// Claimed by an outgoing migration.
    #[serde(default)]
    pub migrating: bool,
    pub bytes: u64,
    #[serde(default)]
    pub arrived_from: Option<String>,
    #[serde(default)]
    pub counter_at_start: Option<u64>,
    pub attributes: VmAttributes,
    pub guest: Guest,
}

/// What runs the VM, as far as a restarted agent needs to know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Guest {
    /// A place reserved and no VM yet: a VM being created (never reported
    /// created), or the staging of an incoming migration that has not
    /// committed (state `Incoming`).
    Reserved,
    /// A sim VM.
    Sim {
        /// The directory of its disk files, if it has disks.
        disk_dir: Option<PathBuf>,
        /// Its vCPU's helper process, memory and disks; `None`: its memory
        /// and workload live in the agent process.
        #[serde(default)]
        vcpu: Option<crate::backend::sim::VcpuRecord>,
    },
    /// A QEMU VM.
    Qemu(QemuVmRecord),
    /// A VM the agent holds but cannot drive ([`super::LostVm`]).
    Lost {
        /// `sim` or `qemu`.
        backend: String,
        /// Why, for the operator.
        reason: String,
        /// A QEMU's record: tried again at the next start.
        qemu: Option<QemuVmRecord>,
        /// A sim VM's disk directory.
        disk_dir: Option<PathBuf>,
    },
}

impl VmRecord {
    /// The record of `entry`; `disk_root` is where sim VMs' disk
    /// directories live.
    pub(crate) fn of(name: &VmName, entry: &VmEntry, disk_root: Option<&Path>) -> VmRecord {
        let guest = match &entry.handle {
            None => Guest::Reserved,
            Some(VmHandle::Sim(v)) => Guest::Sim {
                disk_dir: (!v.disks().is_empty())
                    .then(|| disk_root.map(|d| d.join(name.as_str())))
                    .flatten(),
                vcpu: v.vcpu_record(),
            },
            Some(VmHandle::Qemu(q)) => Guest::Qemu(q.record()),
            Some(VmHandle::Lost(l)) => Guest::Lost {
                backend: l.backend.clone(),
                reason: l.reason.clone(),
                qemu: l.qemu.clone(),
                disk_dir: l.disk_dir.clone(),
            },
        };
        VmRecord {
            name: name.clone(),
            incarnation: entry.incarnation,
            state: entry.state,
            migrating: entry.cancel.is_some(),
            bytes: entry.bytes,
            arrived_from: entry.arrived_from.clone(),
            counter_at_start: entry.counter_at_start,
            attributes: entry.attributes.clone(),
            guest,
        }
    }
}

/// Why the registry file could not be opened or written.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum VmDbError {
    /// The file could not be created, opened or read (the state
    /// directory's `vms.redb`).
    #[error("VM registry vms.redb: {0}")]
    Open(#[source] redb::Error),
    /// Its mode could not be set.
    #[error("VM registry vms.redb: cannot make it private: {0}")]
    Mode(#[source] std::io::Error),
    /// A read or write failed.
    #[error("VM registry: {0}")]
    Db(#[from] redb::Error),
    /// A record could not be encoded.
    #[error("VM registry record: {0}")]
    Encode(#[source] serde_json::Error),
}

const VMS: redb::TableDefinition<'_, &str, &[u8]> = redb::TableDefinition::new("vms");
const META: redb::TableDefinition<'_, &str, u64> = redb::TableDefinition::new("meta");
const NEXT_INCARNATION: &str = "next_incarnation";

/// What the file held when the agent started.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    /// Every record that reads.
    pub records: Vec<VmRecord>,
    /// Records that do not read: their key and why.
    pub unreadable: Vec<(String, String)>,
    /// Above every incarnation ever recorded.
    pub next_incarnation: u64,
}

/// The registry file.
pub(crate) struct VmDb {
    db: redb::Database,
    /// The records as last committed: a write carries only what changed.
    last: Mutex<HashMap<VmName, VmRecord>>,
    healthy: AtomicBool,
}

impl std::fmt::Debug for VmDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmDb")
            .field("healthy", &self.healthy())
            .finish_non_exhaustive()
    }
}

impl VmDb {
    /// Opens (or creates, `0600`) the registry at `path` and reads it.
    pub(crate) fn open(path: &Path) -> Result<(VmDb, Loaded), VmDbError> {
        let open = VmDbError::Open;
        match crate::private::create_new(path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(open(redb::Error::Io(e))),
        }
        // A file made by someone else's umask before this module existed.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                path,
                std::fs::Permissions::from_mode(crate::private::FILE_MODE),
            )
            .map_err(VmDbError::Mode)?;
        }
        let db = redb::Database::create(path).map_err(|e| open(e.into()))?;
        let mut loaded = Loaded::default();
        let tx = db.begin_write().map_err(|e| open(e.into()))?;
        {
            use redb::ReadableTable;
            let vms = tx.open_table(VMS).map_err(|e| open(e.into()))?;
            for row in vms.iter().map_err(|e| open(e.into()))? {
                let (k, v) = row.map_err(|e| open(e.into()))?;
                match serde_json::from_slice::<VmRecord>(v.value()) {
                    Ok(r) if r.name.as_str() == k.value() => loaded.records.push(r),
                    Ok(r) => loaded.unreadable.push((
                        k.value().to_owned(),
                        format!("the record names another VM ({})", r.name),
                    )),
                    Err(e) => loaded
                        .unreadable
                        .push((k.value().to_owned(), e.to_string())),
                }
            }
            let meta = tx.open_table(META).map_err(|e| open(e.into()))?;
            let next = meta
                .get(NEXT_INCARNATION)
                .map_err(|e| open(e.into()))?
                .map_or(0, |v| v.value());
            let above = loaded
                .records
                .iter()
                .map(|r| r.incarnation.saturating_add(1))
                .max()
                .unwrap_or(0);
            loaded.next_incarnation = next.max(above);
        }
        tx.commit().map_err(|e| open(e.into()))?;
        let last = loaded
            .records
            .iter()
            .map(|r| (r.name.clone(), r.clone()))
            .collect();
        Ok((
            VmDb {
                db,
                last: Mutex::new(last),
                healthy: AtomicBool::new(true),
            },
            loaded,
        ))
    }

    /// False once a write failed (until one succeeds again).
    pub(crate) fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Writes what changed between the last commit and `now`; returns
    /// whether the write was fsynced (or nothing needed writing).
    pub(crate) fn sync(
        &self,
        now: HashMap<VmName, VmRecord>,
        next_incarnation: u64,
    ) -> Result<bool, VmDbError> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let changed: Vec<&VmRecord> = now
            .values()
            .filter(|r| last.get(&r.name) != Some(*r))
            .collect();
        let removed: Vec<&VmName> = last.keys().filter(|n| !now.contains_key(*n)).collect();
        if changed.is_empty() && removed.is_empty() {
            return Ok(true);
        }
        let durable =
            !removed.is_empty() || changed.iter().any(|r| needs_fsync(last.get(&r.name), r));
        let written = self.write(&changed, &removed, next_incarnation, durable);
        self.healthy.store(written.is_ok(), Ordering::Relaxed);
        written?;
        *last = now;
        Ok(durable)
    }

    fn write(
        &self,
        changed: &[&VmRecord],
        removed: &[&VmName],
        next_incarnation: u64,
        durable: bool,
    ) -> Result<(), VmDbError> {
        let mut tx = self.db.begin_write().map_err(redb::Error::from)?;
        if !durable {
            tx.set_durability(redb::Durability::None)
                .map_err(redb::Error::from)?;
        }
        {
            let mut vms = tx.open_table(VMS).map_err(redb::Error::from)?;
            for r in changed {
                let json = serde_json::to_vec(r).map_err(VmDbError::Encode)?;
                vms.insert(r.name.as_str(), json.as_slice())
                    .map_err(redb::Error::from)?;
            }
            for n in removed {
                vms.remove(n.as_str()).map_err(redb::Error::from)?;
            }
            let mut meta = tx.open_table(META).map_err(redb::Error::from)?;
            meta.insert(NEXT_INCARNATION, next_incarnation)
                .map_err(redb::Error::from)?;
        }
        tx.commit().map_err(redb::Error::from)?;
        Ok(())
    }
}

/// Whether the change from `old` to `new` must reach the disk before the
/// agent goes on. A change of state alone may wait for the next write
/// unless it is into doubt: a restarted agent takes a QEMU's state from
/// QEMU's own run status and what the record says of migrations and
/// doubt (a sim VM is lost whatever its state), and the changes of state
/// alone include a migration's pause for its final copy, inside the
/// downtime. A VM's existence, what runs it, its claim by a migration and
/// a doubt are always fsynced.
fn needs_fsync(old: Option<&VmRecord>, new: &VmRecord) -> bool {
    match old {
        Some(o) if new.state != VmState::InDoubt => {
            let mut same = o.clone();
            same.state = new.state;
            same != *new
        }
        _ => true,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::*;

    fn record(name: &str, incarnation: u64, state: VmState) -> VmRecord {
        VmRecord {
            name: name.parse().unwrap(),
            incarnation,
            state,
            migrating: false,
            bytes: 1 << 20,
            arrived_from: None,
            counter_at_start: None,
            attributes: VmAttributes::default(),
            guest: Guest::Sim {
                disk_dir: None,
                vcpu: None,
            },
        }
    }

    fn map(rs: &[VmRecord]) -> HashMap<VmName, VmRecord> {
        rs.iter().map(|r| (r.name.clone(), r.clone())).collect()
    }

    #[test]
    fn records_survive_a_reopen_and_removals_stick() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vms.redb");
        {
            let (db, loaded) = VmDb::open(&path).unwrap();
            assert!(loaded.records.is_empty());
            let a = record("a", 3, VmState::Running);
            let b = record("b", 4, VmState::Paused);
            assert!(db.sync(map(&[a.clone(), b]), 5).unwrap());
            assert!(db.sync(map(&[a]), 7).unwrap());
        }
        assert_eq!(crate::private::mode_of(&path).unwrap(), 0o600);
        let (_db, loaded) = VmDb::open(&path).unwrap();
        assert_eq!(loaded.records, vec![record("a", 3, VmState::Running)]);
        assert_eq!(loaded.next_incarnation, 7);
        assert!(loaded.unreadable.is_empty());
    }

    #[test]
    fn a_record_that_does_not_read_is_reported_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vms.redb");
        {
            let (db, _) = VmDb::open(&path).unwrap();
            db.sync(map(&[record("a", 0, VmState::Running)]), 1)
                .unwrap();
            let tx = db.db.begin_write().unwrap();
            tx.open_table(VMS)
                .unwrap()
                .insert("b", b"{not json".as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        let (_db, loaded) = VmDb::open(&path).unwrap();
        assert_eq!(loaded.records.len(), 1);
        assert_eq!(loaded.unreadable.len(), 1);
        assert_eq!(loaded.unreadable[0].0, "b");
    }

    #[test]
    fn only_changes_of_state_outside_doubt_skip_the_fsync() {
        let running = record("a", 0, VmState::Running);
        let mut claimed = record("a", 0, VmState::MigratingOut);
        claimed.migrating = true;
        // Claimed: written through (a restart must know it was migrating).
        assert!(needs_fsync(Some(&running), &claimed));
        // Paused for the final copy: inside the downtime, no fsync.
        let mut paused = claimed.clone();
        paused.state = VmState::Paused;
        assert!(!needs_fsync(Some(&claimed), &paused));
        // An operator's pause: QEMU's status says it again at restart.
        assert!(!needs_fsync(
            Some(&running),
            &record("a", 0, VmState::Paused)
        ));
        // Into doubt, or anything besides the state: written through.
        let mut doubt = claimed.clone();
        doubt.state = VmState::InDoubt;
        assert!(needs_fsync(Some(&paused), &doubt));
        let mut other = paused.clone();
        other.bytes += 1;
        assert!(needs_fsync(Some(&paused), &other));
        // The migration ends (rolled back): written through.
        assert!(needs_fsync(Some(&paused), &running));
        // A new VM: written through.
        assert!(needs_fsync(None, &running));
    }
}
