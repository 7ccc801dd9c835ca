//! The agent's audit log: an append-only file in its state directory, in
//! the format of [`convoy_protocol::audit`]. Every record and the tree head
//! after it are signed with the agent's key and fsynced before the step
//! they record goes on. If the log cannot be written the agent refuses new
//! migrations (fail closed).
//!
//! The log is signed with the identity the agent had when it opened the
//! log; a renewed certificate takes effect in the log at the next restart
//! (a log whose header chain no longer matches is refused at start-up).
//!
//! At start the whole log is verified. A torn last append — what a crash
//! in the middle of a write leaves after the last tree head — is cut off,
//! kept next to the log and recorded in a signed `TornTailCut` record
//! (module `torn`); any other damage refuses the start, naming the entry and
//! byte. A new log's header is written under a temporary name and renamed
//! into place, so no crash leaves a log without a whole header.

mod torn;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use convoy_protocol::audit::{
    append, encode_entry, recover_log, AuditEvent, EntryEncodeError, LogEntry, RecoveredLog,
};
use convoy_protocol::digest::Digest;
use convoy_protocol::logtree::LogTree;
use convoy_protocol::names::SpiffeId;
use convoy_protocol::signed::{SignError, Signer};
use thiserror::Error;

use crate::trust::identity::{Identity, TrustBundle};

/// Audit log failures.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AuditLogError {
    /// The file could not be read or written.
    #[error("audit log {path}: {error}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        error: std::io::Error,
    },
    /// The existing log does not verify (and is no log with a torn tail).
    #[error("audit log {path} does not verify: {error}")]
    Invalid {
        /// Path.
        path: PathBuf,
        /// Where and why.
        error: convoy_protocol::audit::AuditError,
    },
    /// The existing log belongs to another identity.
    #[error("audit log {path} belongs to {owner}")]
    Owner {
        /// Path.
        path: PathBuf,
        /// The log's agent.
        owner: SpiffeId,
    },
    /// A torn last append could not be kept and cut off.
    #[error("audit log {path}: cutting off a torn last append: {error}")]
    Cut {
        /// Path.
        path: PathBuf,
        /// Cause.
        error: std::io::Error,
    },
    /// A record or tree head could not be signed.
    #[error("audit record: {0}")]
    Sign(#[source] SignError),
    /// An entry could not be encoded.
    #[error("audit record: {0}")]
    Encode(#[source] EntryEncodeError),
    /// An earlier write failed: the log is closed for good.
    #[error("the audit log failed earlier and is closed")]
    Failed,
}

struct State {
    file: File,
    tree: LogTree,
    seq: u64,
}

/// An open audit log.
pub struct AuditLog {
    path: PathBuf,
    signer: Identity,
    state: Mutex<State>,
    healthy: AtomicBool,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .field("healthy", &self.healthy())
            .finish()
    }
}

impl AuditLog {
    /// Opens the log at `path` (creating it with a header if missing,
    /// verifying it fully if present, a torn last append cut off and
    /// recorded) and records that the agent started.
    pub fn open(
        path: &Path,
        signer: &Identity,
        trust: &TrustBundle,
    ) -> Result<AuditLog, AuditLogError> {
        let io = |error| AuditLogError::Io {
            path: path.into(),
            error,
        };
        let (tree, seq, cuts) = if path.exists() {
            let r = reopen(path, signer, trust)?;
            (r.tree, r.seq, Some(r.cuts))
        } else {
            let header = encode_entry(&LogEntry::Header {
                chain: signer.chain(),
                at_unix: crate::trust::authz::now_unix(),
            })
            .map_err(AuditLogError::Encode)?;
            crate::private::create_durably(path, &header).map_err(io)?;
            (LogTree::new(), 0, None)
        };
        let file = OpenOptions::new().append(true).open(path).map_err(io)?;
        let log = AuditLog {
            path: path.into(),
            signer: signer.clone(),
            state: Mutex::new(State { file, tree, seq }),
            healthy: AtomicBool::new(true),
        };
        if let Some(recorded) = cuts {
            log.record_cuts(&recorded)?;
        }
        log.record(AuditEvent::AgentStarted {
            version: env!("CARGO_PKG_VERSION").into(),
        })?;
        Ok(log)
    }

    /// Records every torn tail kept next to the log that no record names
    /// yet: the one cut at this start, and one cut at a start that stopped
    /// before recording it.
    fn record_cuts(&self, recorded: &[(u64, Digest)]) -> Result<(), AuditLogError> {
        let kept = torn::kept(&self.path).map_err(|error| AuditLogError::Cut {
            path: self.path.clone(),
            error,
        })?;
        for k in kept {
            if recorded.contains(&(k.offset, k.digest)) {
                continue;
            }
            tracing::warn!(
                path = %self.path.display(),
                "recorded the torn last append cut off at byte {} ({} bytes, BLAKE3 {}), kept in {}",
                k.offset,
                k.bytes,
                k.digest,
                k.path.display()
            );
            self.record(AuditEvent::TornTailCut {
                offset: k.offset,
                bytes: k.bytes,
                digest: k.digest,
            })?;
        }
        Ok(())
    }

    /// Whether the log can still be written.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Records in the log.
    pub fn records(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).seq
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a signed record and tree head, fsynced.
    pub fn record(&self, event: AuditEvent) -> Result<(), AuditLogError> {
        if !self.healthy() {
            return Err(AuditLogError::Failed);
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let seq = st.seq;
        let mut tree = st.tree.clone();
        let entries = append(
            &mut tree,
            seq,
            crate::trust::authz::now_unix(),
            event,
            &self.signer,
        )
        .map_err(AuditLogError::Sign)?;
        let mut bytes = Vec::new();
        for e in &entries {
            bytes.extend(encode_entry(e).map_err(AuditLogError::Encode)?);
        }
        let written = st.file.write_all(&bytes).and_then(|()| st.file.sync_data());
        if let Err(error) = written {
            self.healthy.store(false, Ordering::Relaxed);
            tracing::error!(path = %self.path.display(), "audit log write failed, refusing migrations: {error}");
            return Err(AuditLogError::Io {
                path: self.path.clone(),
                error,
            });
        }
        st.tree = tree;
        st.seq = seq + 1;
        Ok(())
    }
}

/// An existing log, verified, a torn last append cut off.
struct Reopened {
    /// Its tree, to append to.
    tree: LogTree,
    /// The next record's number.
    seq: u64,
    /// The cuts (offset, digest) its `TornTailCut` records name.
    cuts: Vec<(u64, Digest)>,
}

/// Verifies the log at `path` and cuts a torn last append off it (kept
/// next to it).
fn reopen(path: &Path, signer: &Identity, trust: &TrustBundle) -> Result<Reopened, AuditLogError> {
    let bytes = std::fs::read(path).map_err(|error| AuditLogError::Io {
        path: path.into(),
        error,
    })?;
    let RecoveredLog { log, torn } =
        recover_log(&bytes, trust).map_err(|error| AuditLogError::Invalid {
            path: path.into(),
            error,
        })?;
    if &log.agent != signer.id() {
        return Err(AuditLogError::Owner {
            path: path.into(),
            owner: log.agent,
        });
    }
    if let Some(t) = torn {
        let copy =
            torn::cut(path, t.offset, &bytes[t.offset..]).map_err(|error| AuditLogError::Cut {
                path: path.into(),
                error,
            })?;
        tracing::warn!(
            path = %path.display(),
            "cut a torn last append off the audit log: {} bytes from byte {} (entry {}), left by a crash in the middle of a write; kept in {}",
            t.len,
            t.offset,
            t.entry,
            copy.display()
        );
    }
    let cuts = log
        .records
        .iter()
        .filter_map(|r| match &r.event {
            AuditEvent::TornTailCut { offset, digest, .. } => Some((*offset, *digest)),
            _ => None,
        })
        .collect();
    // The leaves as written, not re-encoded.
    Ok(Reopened {
        seq: log.records.len() as u64,
        tree: log.tree,
        cuts,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use convoy_protocol::names::{AgentName, Role, TrustDomain};

    use convoy_protocol::audit::{entry_offsets, verify_log};

    use super::*;
    use crate::trust::pki::Pki;

    fn setup() -> (tempfile::TempDir, Identity, TrustBundle) {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(&dir.path().join("pki"), TrustDomain::new("t.test").unwrap()).unwrap();
        let n: AgentName = "a".parse().unwrap();
        pki.issue(Role::Agent, &n, Duration::from_secs(3600))
            .unwrap();
        let id = pki.identity(Role::Agent, &n).unwrap();
        let trust = pki.trust().unwrap();
        (dir, id, trust)
    }

    #[test]
    fn reopening_continues_the_same_verified_log() {
        let (dir, id, trust) = setup();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, &id, &trust).unwrap();
        log.record(AuditEvent::Refused {
            migration: None,
            peer: "x".into(),
            reason: "test".into(),
        })
        .unwrap();
        drop(log);
        let _again = AuditLog::open(&path, &id, &trust).unwrap();
        let v = verify_log(&std::fs::read(&path).unwrap(), &trust).unwrap();
        assert_eq!(v.records.len(), 3, "started, refused, started");
        // A log that does not verify is refused at start-up.
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 5] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(
            AuditLog::open(&path, &id, &trust),
            Err(AuditLogError::Invalid { .. })
        ));
    }

    fn refusal() -> AuditEvent {
        AuditEvent::Refused {
            migration: None,
            peer: "x".into(),
            reason: "test".into(),
        }
    }

    fn set_len(path: &Path, len: usize) {
        OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(len as u64)
            .unwrap();
    }

    fn kept_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains("audit.log.torn-"))
            .collect();
        v.sort();
        v
    }

    /// A log cut inside its last append, as a kill in the middle of a
    /// write leaves it: the agent starts, the torn bytes are cut off, kept
    /// next to the log (0600) and recorded; the log verifies; a second
    /// start records nothing more.
    #[test]
    fn a_torn_tail_is_cut_kept_and_recorded_at_start() {
        let (dir, id, trust) = setup();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, &id, &trust).unwrap();
        log.record(refusal()).unwrap();
        drop(log);
        let whole = std::fs::read(&path).unwrap();
        let at = entry_offsets(&whole);
        // header, started, head, refused, head: cut 10 bytes into the last
        // head, the refusal whole.
        assert_eq!(at.len(), 5);
        let (start, cut) = (at[3].0, at[4].0 + 10);
        let torn = whole[start..cut].to_vec();
        set_len(&path, cut);
        assert!(verify_log(&std::fs::read(&path).unwrap(), &trust).is_err());

        let again = AuditLog::open(&path, &id, &trust).unwrap();
        let v = verify_log(&std::fs::read(&path).unwrap(), &trust).unwrap();
        let events: Vec<_> = v.records.iter().map(|r| r.event.clone()).collect();
        let digest = convoy_protocol::audit::torn_digest(&torn);
        assert!(matches!(events[0], AuditEvent::AgentStarted { .. }));
        assert_eq!(
            events[1],
            AuditEvent::TornTailCut {
                offset: start as u64,
                bytes: torn.len() as u64,
                digest,
            }
        );
        assert!(matches!(events[2], AuditEvent::AgentStarted { .. }));
        assert_eq!(events.len(), 3, "the torn refusal is gone: {events:?}");
        let kept = kept_files(dir.path());
        assert_eq!(
            kept,
            vec![dir
                .path()
                .join(format!("audit.log.torn-{start}-{}", &digest.to_hex()[..16]))]
        );
        assert_eq!(std::fs::read(&kept[0]).unwrap(), torn);
        assert_eq!(crate::private::mode_of(&kept[0]).unwrap(), 0o600);

        drop(again);
        let _third = AuditLog::open(&path, &id, &trust).unwrap();
        let v = verify_log(&std::fs::read(&path).unwrap(), &trust).unwrap();
        assert_eq!(v.records.len(), 4, "started once more, no second cut");
    }

    /// A start that kept and cut the torn bytes but stopped before
    /// recording the cut: the next start records it.
    #[test]
    fn a_cut_left_unrecorded_by_a_crash_is_recorded_at_the_next_start() {
        let (dir, id, trust) = setup();
        let path = dir.path().join("audit.log");
        drop(AuditLog::open(&path, &id, &trust).unwrap());
        let whole = std::fs::read(&path).unwrap();
        let start = entry_offsets(&whole)[1].0;
        set_len(&path, start + 7);
        torn::cut(&path, start, &whole[start..start + 7]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), whole[..start]);
        let _log = AuditLog::open(&path, &id, &trust).unwrap();
        let v = verify_log(&std::fs::read(&path).unwrap(), &trust).unwrap();
        assert!(matches!(
            v.records[0].event,
            AuditEvent::TornTailCut { offset, bytes: 7, .. } if offset == start as u64
        ));
        assert!(matches!(
            v.records[1].event,
            AuditEvent::AgentStarted { .. }
        ));
    }

    /// Damage before the last tree head is no torn tail: the agent does not
    /// start, the error names the entry and byte, and nothing is cut.
    #[test]
    fn damage_before_the_last_head_refuses_the_start_and_names_entry_and_byte() {
        let (dir, id, trust) = setup();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, &id, &trust).unwrap();
        log.record(refusal()).unwrap();
        drop(log);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = entry_offsets(&bytes);
        let (off, len) = at[3];
        bytes[off + len / 2] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let e = AuditLog::open(&path, &id, &trust).unwrap_err();
        match &e {
            AuditLogError::Invalid { error, .. } => {
                assert_eq!((error.entry, error.offset), (3, off), "{e}");
            }
            other => panic!("expected a refusal: {other}"),
        }
        assert!(
            e.to_string().contains(&format!("entry 3 (byte {off})")),
            "{e}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing cut");
        assert!(kept_files(dir.path()).is_empty());
    }

    /// A new log appears whole: no temporary file is left, and one left by
    /// a crash while creating is replaced.
    #[test]
    fn a_new_log_appears_with_its_whole_header() {
        let (dir, id, trust) = setup();
        let path = dir.path().join("audit.log");
        std::fs::write(dir.path().join("audit.log.tmp"), b"half a hea").unwrap();
        drop(AuditLog::open(&path, &id, &trust).unwrap());
        assert!(!dir.path().join("audit.log.tmp").exists());
        assert_eq!(crate::private::mode_of(&path).unwrap(), 0o600);
        assert_eq!(
            verify_log(&std::fs::read(&path).unwrap(), &trust)
                .unwrap()
                .records
                .len(),
            1
        );
    }

    #[test]
    fn a_failed_write_closes_the_log_for_good() {
        let (dir, id, trust) = setup();
        let log = AuditLog::open(&dir.path().join("audit.log"), &id, &trust).unwrap();
        assert!(log.healthy());
        // Every write to /dev/full fails with ENOSPC, like a full disk.
        log.state.lock().unwrap().file = OpenOptions::new().write(true).open("/dev/full").unwrap();
        let event = || AuditEvent::Refused {
            migration: None,
            peer: "x".into(),
            reason: "y".into(),
        };
        assert!(matches!(log.record(event()), Err(AuditLogError::Io { .. })));
        assert!(!log.healthy());
        assert!(matches!(log.record(event()), Err(AuditLogError::Failed)));
    }
}
