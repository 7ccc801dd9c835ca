//! The actions policies govern, and the questions asked about them.

use std::str::FromStr;

use convoy_protocol::names::{SpiffeId, VmName};
use convoy_protocol::ticket::VerifiedTicket;
use convoy_protocol::vm::VmAttributes;

/// The actions policies govern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Source side of a migration.
    MigrateOut,
    /// Destination side of a migration.
    MigrateIn,
    /// Creating a VM.
    CreateVm,
    /// Deleting a VM (and wiping its memory).
    DeleteVm,
    /// Pausing or resuming a VM.
    PauseVm,
    /// Seeing a VM in the fleet registry (`convoyctl fleet ls`, `where`).
    ViewVm,
    /// Aborting a migration.
    Abort,
    /// Resolving a migration left in doubt (`convoyctl recover`); the
    /// context says whether the operator forces a resume here.
    Recover,
    /// Reading an agent's audit log.
    ReadAudit,
    /// Pushing a VM to object storage.
    PushSnapshot,
    /// Restoring a VM from object storage.
    PullSnapshot,
    /// Enrolling, listing, verifying, deleting snapshots.
    ManageSnapshots,
}

impl Action {
    /// The Cedar action name.
    pub fn name(self) -> &'static str {
        match self {
            Action::MigrateOut => "MigrateOut",
            Action::MigrateIn => "MigrateIn",
            Action::CreateVm => "CreateVm",
            Action::DeleteVm => "DeleteVm",
            Action::PauseVm => "PauseVm",
            Action::ViewVm => "ViewVm",
            Action::Abort => "Abort",
            Action::Recover => "Recover",
            Action::ReadAudit => "ReadAudit",
            Action::PushSnapshot => "PushSnapshot",
            Action::PullSnapshot => "PullSnapshot",
            Action::ManageSnapshots => "ManageSnapshots",
        }
    }
}

/// An action name policies do not govern (the text as given).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown action {0:?} (MigrateOut, MigrateIn, CreateVm, DeleteVm, PauseVm, ViewVm, Abort, Recover, ReadAudit, PushSnapshot, PullSnapshot, ManageSnapshots)"
)]
pub struct UnknownAction(pub String);

impl FromStr for Action {
    type Err = UnknownAction;
    fn from_str(s: &str) -> Result<Self, UnknownAction> {
        Ok(match s {
            "MigrateOut" => Action::MigrateOut,
            "MigrateIn" => Action::MigrateIn,
            "CreateVm" => Action::CreateVm,
            "DeleteVm" => Action::DeleteVm,
            "PauseVm" => Action::PauseVm,
            "ViewVm" => Action::ViewVm,
            "Abort" => Action::Abort,
            "Recover" => Action::Recover,
            "ReadAudit" => Action::ReadAudit,
            "PushSnapshot" => Action::PushSnapshot,
            "PullSnapshot" => Action::PullSnapshot,
            "ManageSnapshots" => Action::ManageSnapshots,
            other => return Err(UnknownAction(other.to_owned())),
        })
    }
}

/// A VM as a policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct VmFacts<'a> {
    /// Name.
    pub name: &'a VmName,
    /// Tenant, level, labels.
    pub attributes: &'a VmAttributes,
}

/// One question for the policy.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Query<'a> {
    /// At the source.
    MigrateOut {
        /// The operator who signed the ticket (and asked).
        operator: &'a SpiffeId,
        /// The VM.
        vm: VmFacts<'a>,
        /// This agent.
        source: &'a SpiffeId,
        /// Where the VM would go.
        destination: &'a SpiffeId,
        /// The verified ticket, with its approvals.
        ticket: &'a VerifiedTicket,
    },
    /// At the destination.
    MigrateIn {
        /// The operator who signed the ticket.
        operator: &'a SpiffeId,
        /// The VM.
        vm: VmFacts<'a>,
        /// The proposing agent.
        source: &'a SpiffeId,
        /// This agent.
        destination: &'a SpiffeId,
        /// The verified ticket, with its approvals.
        ticket: &'a VerifiedTicket,
    },
    /// Creating a VM on `host`.
    CreateVm {
        /// Who asks.
        operator: &'a SpiffeId,
        /// The VM to create.
        vm: VmFacts<'a>,
        /// This agent.
        host: &'a SpiffeId,
    },
    /// Seeing a VM of the fleet registry, asked of `host`.
    ViewVm {
        /// Who asks.
        operator: &'a SpiffeId,
        /// The VM, as the registry describes it.
        vm: VmFacts<'a>,
        /// This agent (the one answering).
        host: &'a SpiffeId,
    },
    /// Deleting a VM on `host`.
    DeleteVm {
        /// Who asks.
        operator: &'a SpiffeId,
        /// The VM.
        vm: VmFacts<'a>,
        /// This agent.
        host: &'a SpiffeId,
    },
    /// Pausing or resuming a VM on `host`.
    PauseVm {
        /// Who asks.
        operator: &'a SpiffeId,
        /// The VM.
        vm: VmFacts<'a>,
        /// This agent.
        host: &'a SpiffeId,
    },
    /// Aborting the migration of a VM on `host`.
    Abort {
        /// Who asks.
        operator: &'a SpiffeId,
        /// The VM.
        vm: VmFacts<'a>,
        /// This agent.
        host: &'a SpiffeId,
    },
    /// Resolving a migration of a VM on `host` left in doubt; `force`:
    /// resuming the VM here without the other side's word.
    Recover {
        /// Who asks.
        operator: &'a SpiffeId,
        /// The VM.
        vm: VmFacts<'a>,
        /// This agent.
        host: &'a SpiffeId,
        /// `--force-resume-here`.
        force: bool,
    },
    /// Reading `host`'s audit log.
    ReadAudit {
        /// Who asks.
        operator: &'a SpiffeId,
        /// This agent.
        host: &'a SpiffeId,
    },
    /// Pushing a VM of `host` to `url`, sealed for `recipients`.
    PushSnapshot {
        /// Who asks.
        operator: &'a SpiffeId,
        /// The VM.
        vm: VmFacts<'a>,
        /// This agent.
        host: &'a SpiffeId,
        /// Where.
        url: &'a str,
        /// The agents that may open it.
        recipients: &'a [SpiffeId],
    },
    /// Restoring on `host` a VM that `source` pushed to `url`.
    PullSnapshot {
        /// Who asks.
        operator: &'a SpiffeId,
        /// The VM, as the verified manifest describes it.
        vm: VmFacts<'a>,
        /// This agent.
        host: &'a SpiffeId,
        /// Where.
        url: &'a str,
        /// The agent that pushed it (its signature checked).
        source: &'a SpiffeId,
    },
    /// Enrolling, listing, verifying or deleting snapshots at `url`.
    ManageSnapshots {
        /// Who asks.
        operator: &'a SpiffeId,
        /// This agent.
        host: &'a SpiffeId,
        /// Where.
        url: &'a str,
        /// `enroll`, `list`, `verify`, `delete`.
        operation: &'a str,
    },
}

impl Query<'_> {
    /// The action asked about.
    pub fn action(&self) -> Action {
        match self {
            Query::MigrateOut { .. } => Action::MigrateOut,
            Query::MigrateIn { .. } => Action::MigrateIn,
            Query::CreateVm { .. } => Action::CreateVm,
            Query::DeleteVm { .. } => Action::DeleteVm,
            Query::ViewVm { .. } => Action::ViewVm,
            Query::PauseVm { .. } => Action::PauseVm,
            Query::Abort { .. } => Action::Abort,
            Query::Recover { .. } => Action::Recover,
            Query::ReadAudit { .. } => Action::ReadAudit,
            Query::PushSnapshot { .. } => Action::PushSnapshot,
            Query::PullSnapshot { .. } => Action::PullSnapshot,
            Query::ManageSnapshots { .. } => Action::ManageSnapshots,
        }
    }

    /// The operator behind the request (asking, or whose ticket it is).
    pub fn operator(&self) -> &SpiffeId {
        match self {
            Query::MigrateIn { operator, .. }
            | Query::MigrateOut { operator, .. }
            | Query::CreateVm { operator, .. }
            | Query::DeleteVm { operator, .. }
            | Query::ViewVm { operator, .. }
            | Query::PauseVm { operator, .. }
            | Query::Abort { operator, .. }
            | Query::Recover { operator, .. }
            | Query::ReadAudit { operator, .. }
            | Query::PushSnapshot { operator, .. }
            | Query::PullSnapshot { operator, .. }
            | Query::ManageSnapshots { operator, .. } => operator,
        }
    }

    /// The principal, as text.
    pub fn principal(&self) -> String {
        match self {
            Query::MigrateIn { source, .. } => source.to_string(),
            _ => self.operator().to_string(),
        }
    }

    /// The resource, as text.
    pub fn resource(&self) -> String {
        match self {
            Query::MigrateOut { vm, .. }
            | Query::MigrateIn { vm, .. }
            | Query::CreateVm { vm, .. }
            | Query::DeleteVm { vm, .. }
            | Query::ViewVm { vm, .. }
            | Query::PauseVm { vm, .. }
            | Query::Abort { vm, .. }
            | Query::Recover { vm, .. }
            | Query::PushSnapshot { vm, .. }
            | Query::PullSnapshot { vm, .. } => format!("vm {}", vm.name),
            Query::ReadAudit { host, .. } => host.to_string(),
            Query::ManageSnapshots {
                host, operation, ..
            } => format!("{host} (snapshot {operation})"),
        }
    }
}
