//! Why an outgoing migration could not even begin ([`MigrateError`]),
//! shared by the engines of every backend.

use convoy_protocol::ctl::{CtlErrorKind, VmState};
use thiserror::Error;

/// Why a migration could not even begin (the VM was never touched).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// No such VM.
    #[error("no VM named {0} on this agent")]
    NoSuchVm(String),
    /// The VM is not running here (arriving, paused, or already leaving).
    #[error("VM {0} is {1:?}, not running")]
    NotRunning(String, VmState),
    /// No address for the destination.
    #[error("no address known for agent {0}; pass one (NAME@HOST:PORT)")]
    UnknownPeer(String),
    /// Bad options.
    #[error("invalid options: {0}")]
    Options(String),
    /// Migrating to ourselves.
    #[error("the destination is this agent")]
    SelfMigration,
    /// The ticket does not authorize this migration.
    #[error("refused: {0}")]
    Unauthorized(#[from] crate::trust::authz::AuthzError),
    /// The audit log cannot be written: no migration may start.
    #[error("the audit log cannot be written; refusing migrations")]
    AuditUnavailable,
    /// The source's policy denies it.
    #[error("policy {0}")]
    Forbidden(String),
}

impl MigrateError {
    /// The operator-facing kind.
    pub fn kind(&self) -> CtlErrorKind {
        match self {
            MigrateError::NoSuchVm(_) => CtlErrorKind::NotFound,
            MigrateError::Unauthorized(_) => CtlErrorKind::Unauthorized,
            MigrateError::Forbidden(_) => CtlErrorKind::Forbidden,
            _ => CtlErrorKind::BadRequest,
        }
    }
}
