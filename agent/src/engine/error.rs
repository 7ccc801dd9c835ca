//! Why an outgoing migration could not even begin ([`MigrateError`]),
//! shared by the engines of every backend.

use convoy_protocol::ctl::{CtlErrorKind, VmState};
use convoy_protocol::names::{AgentName, VmName};
use thiserror::Error;

/// Why a migration could not even begin (the VM was never touched).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// No such VM.
    #[error("no VM named {0} on this agent")]
    NoSuchVm(VmName),
    /// The VM is not running here (arriving, paused, or already leaving).
    #[error("VM {0} is {1:?}, not running")]
    NotRunning(VmName, VmState),
    /// No address for the destination.
    #[error("no address known for agent {0}; pass one (NAME@HOST:PORT)")]
    UnknownPeer(AgentName),
    /// The plan cannot run for this VM, or the request is malformed.
    #[error("invalid options: {0}")]
    Options(#[from] OptionsError),
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
    #[error("policy {}", .0.explain())]
    Forbidden(crate::trust::policy::Decision),
    /// The ticket was issued for another VM under this name (another
    /// size, other disks, other attributes): a stale ticket, or a VM
    /// re-created since.
    #[error("the ticket was issued for {ticket}; VM {vm} here is {here}")]
    WrongSubject {
        /// The VM's name.
        vm: VmName,
        /// What the ticket binds.
        ticket: Box<convoy_protocol::vm::VmSubject>,
        /// What the VM here is.
        here: Box<convoy_protocol::vm::VmSubject>,
    },
    /// The VM was deleted and another created under its name while the
    /// migration was being authorized: the decision was for the other one.
    #[error("VM {0} was replaced while the migration was being authorized; nothing moved")]
    Replaced(VmName),
    /// The migration's bookkeeping (its Merkle tree) would take the
    /// migrations in progress here past `--max-bookkeeping`.
    #[error(transparent)]
    Bookkeeping(#[from] crate::host::bookkeeping::BookkeepingRefused),
    /// The claim could not be recorded in the journal: the VM stays.
    #[error("the migration could not be recorded in the journal; the VM stays here: {0}")]
    Journal(#[source] crate::host::journal::JournalError),
    /// The fleet registry does not name this agent as the VM's owner, or
    /// cannot be reached: nothing moves.
    #[error("registry: {0}; the VM stays here")]
    Registry(#[source] crate::registry::RegistryError),
}

impl MigrateError {
    /// The operator-facing kind.
    pub fn kind(&self) -> CtlErrorKind {
        match self {
            MigrateError::NoSuchVm(_) => CtlErrorKind::NotFound,
            MigrateError::Unauthorized(_) => CtlErrorKind::Unauthorized,
            MigrateError::Forbidden(_) => CtlErrorKind::Forbidden,
            MigrateError::WrongSubject { .. } => CtlErrorKind::Unauthorized,
            MigrateError::Bookkeeping(_) => CtlErrorKind::NoCapacity,
            MigrateError::Journal(_) => CtlErrorKind::Internal,
            MigrateError::Registry(
                crate::registry::RegistryError::OwnedElsewhere { .. }
                | crate::registry::RegistryError::Unregistered(_),
            ) => CtlErrorKind::Forbidden,
            MigrateError::Registry(_) => CtlErrorKind::Internal,
            _ => CtlErrorKind::BadRequest,
        }
    }
}

/// Why the operator's plan cannot run for this VM (nothing was touched).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum OptionsError {
    /// A rule that holds whatever the VM (streams, compression level,
    /// rounds, start-paused, storage post-copy).
    #[error(transparent)]
    Plan(convoy_protocol::model::PlanError),
    /// The destination's address does not parse.
    #[error("bad address {input:?}")]
    Address {
        /// The address as the operator gave it.
        input: String,
        /// Why it does not parse.
        #[source]
        error: std::net::AddrParseError,
    },
    /// Copy-storage asked for a VM without disks.
    #[error("VM {0} has no disks to copy")]
    NoDisks(VmName),
    /// Disks, but no copy-storage (no shared storage is assumed).
    #[error(
        "VM {vm} has {disks} disk(s) and Convoy assumes no shared storage: pass --copy-storage"
    )]
    DisksNeedCopyStorage {
        /// The VM.
        vm: VmName,
        /// How many disks it has.
        disks: usize,
    },
    /// Pure post-copy with disks but without storage post-copy.
    #[error(
        "disk blocks are paged on demand only with --storage-postcopy: with disks, pass it, or use \
         --mode precopy or hybrid (pre-copy rounds move the disks, the blocks left go at the \
         switch, memory is paged on demand)"
    )]
    PostcopyDisksNeedStoragePostcopy,
    /// The owed bitmap would not fit one frame.
    #[error(
        "post-copy and hybrid move guests of up to {0} GiB of memory (and disks, with \
         --storage-postcopy): the owed-page bitmap travels in one frame"
    )]
    TooLargeForPostcopy(u64),
    /// Storage post-copy asked for a QEMU VM.
    #[error(
        "--storage-postcopy is for sim VMs: a QEMU VM's disks are mirrored before the switch \
         (--copy-storage)"
    )]
    StoragePostcopyQemu,
    /// Several connections asked for a QEMU VM.
    #[error(
        "--connections is for sim VMs: a QEMU migration's stream (or its multifd channels) goes \
         over one connection"
    )]
    ConnectionsQemu,
    /// Start-paused asked for a QEMU VM.
    #[error("--start-paused is not supported for QEMU VMs yet")]
    StartPausedQemu,
    /// A QEMU disk image cannot be read.
    #[error("disk {path}: {error}")]
    Disk {
        /// The image.
        path: std::path::PathBuf,
        /// What failed.
        error: std::io::Error,
    },
    /// The QEMU manifest is out of bounds.
    #[error(transparent)]
    QemuManifest(convoy_protocol::stream::ManifestError),
}
