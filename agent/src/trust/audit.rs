//! The agent's audit log: an append-only file in its state directory, in
//! the format of [`convoy_protocol::audit`]. Every record and the tree head
//! after it are signed with the agent's key and fsynced before the step
//! they record goes on. If the log cannot be written the agent refuses new
//! migrations (fail closed).
//!
//! The log is signed with the identity the agent had when it opened the
//! log; a renewed certificate takes effect in the log at the next restart
//! (a log whose header chain no longer matches is refused at start-up).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use convoy_protocol::audit::{
    append, encode_entry, verify_log, AuditEvent, EntryEncodeError, LogEntry,
};
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
    /// The existing log does not verify.
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
    /// verifying it fully if present) and records that the agent started.
    pub fn open(
        path: &Path,
        signer: &Identity,
        trust: &TrustBundle,
    ) -> Result<AuditLog, AuditLogError> {
        let io = |error| AuditLogError::Io {
            path: path.into(),
            error,
        };
        let (tree, seq) = if path.exists() {
            let bytes = std::fs::read(path).map_err(io)?;
            let v = verify_log(&bytes, trust).map_err(|error| AuditLogError::Invalid {
                path: path.into(),
                error,
            })?;
            if &v.agent != signer.id() {
                return Err(AuditLogError::Owner {
                    path: path.into(),
                    owner: v.agent,
                });
            }
            // The leaves as written, not re-encoded.
            let seq = v.records.len() as u64;
            (v.tree, seq)
        } else {
            let header = encode_entry(&LogEntry::Header {
                chain: signer.chain(),
                at_unix: crate::trust::authz::now_unix(),
            })
            .map_err(AuditLogError::Encode)?;
            let mut f = OpenOptions::new()
                .create_new(true)
                .write(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            f.write_all(&header).map_err(io)?;
            f.sync_all().map_err(io)?;
            (LogTree::new(), 0)
        };
        let file = OpenOptions::new().append(true).open(path).map_err(io)?;
        let log = AuditLog {
            path: path.into(),
            signer: signer.clone(),
            state: Mutex::new(State { file, tree, seq }),
            healthy: AtomicBool::new(true),
        };
        log.record(AuditEvent::AgentStarted {
            version: env!("CARGO_PKG_VERSION").into(),
        })?;
        Ok(log)
    }

    /// Whether the log can still be written.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use convoy_protocol::names::{AgentName, Role, TrustDomain};

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
