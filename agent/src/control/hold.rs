//! A VM held for a push or a store-and-forward migration (paused
//! here, nothing else may act on it, an abort cancels), and how snapshot
//! failures reach the operator.

use std::sync::Arc;

use convoy_protocol::ctl::{CtlErrorKind, CtlResponse, VmState};
use convoy_protocol::names::VmName;

use super::error;
use crate::host::{Host, VmHandle};
use crate::snapshot::SnapshotError;

/// A snapshot failure as the operator sees it.
pub(super) fn failed(what: &str, e: &SnapshotError) -> CtlResponse {
    let kind = match e {
        SnapshotError::NotFound { .. } => CtlErrorKind::NotFound,
        SnapshotError::TooLarge { .. } => CtlErrorKind::NoCapacity,
        SnapshotError::Sealing(s)
            if matches!(**s, crate::snapshot::SealingError::NotARecipient { .. }) =>
        {
            CtlErrorKind::Unauthorized
        }
        _ => CtlErrorKind::Internal,
    };
    error(kind, format!("{what}: {e}"))
}

/// The guest of a VM taken for a push.
#[derive(Clone)]
pub(super) enum Guest {
    /// A sim VM.
    Sim(Arc<dyn crate::backend::VmBackend>),
    /// A QEMU VM.
    Qemu(Arc<crate::backend::qemu::vm::QemuVm>),
}

impl Guest {
    /// Runs the guest again (a QEMU stopped by a save: `cont`, unless it
    /// runs).
    pub async fn resume(&self) -> Result<(), String> {
        match self {
            Guest::Sim(vm) => vm.resume().map_err(|e| e.to_string()),
            Guest::Qemu(q) => {
                let running = q
                    .execute("query-status", None)
                    .await
                    .is_ok_and(|s| s["running"].as_bool() == Some(true));
                if running {
                    return Ok(());
                }
                q.execute("cont", None)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// The guest of a registry entry's handle, if it has one.
    pub fn of(handle: Option<&VmHandle>) -> Option<Guest> {
        match handle {
            Some(VmHandle::Sim(vm)) => Some(Guest::Sim(vm.clone())),
            Some(VmHandle::Qemu(q)) => Some(Guest::Qemu(q.clone())),
            _ => None,
        }
    }
}

/// A VM taken for a push: the guest, whether it ran, the cancel handle.
pub(super) struct Claimed {
    pub vm: Guest,
    pub was_running: bool,
    pub cancel: Arc<tokio::sync::Notify>,
    /// Which VM of that name it is.
    pub incarnation: u64,
}

/// Takes VM `name` (sim or QEMU) for a push: it must be running or paused
/// and not migrating; it is marked paused and given a cancel handle (so a
/// migration, a delete or a pause cannot act on it meanwhile).
#[allow(clippy::result_large_err)]
pub(super) fn claim_vm(host: &Arc<Host>, name: &VmName) -> Result<Claimed, CtlResponse> {
    let mut vms = host.vms();
    let Some(e) = vms.get_mut(name) else {
        return Err(error(
            CtlErrorKind::NotFound,
            format!("no VM named {name} here"),
        ));
    };
    let Some(vm) = Guest::of(e.handle.as_ref()) else {
        return Err(error(
            CtlErrorKind::BadRequest,
            format!("VM {name} has no guest here"),
        ));
    };
    if e.cancel.is_some() || !matches!(e.state, VmState::Running | VmState::Paused) {
        return Err(error(
            CtlErrorKind::BadRequest,
            format!(
                "VM {name} is {:?}{}; only a running or paused VM can be pushed",
                e.state,
                if e.cancel.is_some() {
                    " and migrating"
                } else {
                    ""
                }
            ),
        ));
    }
    let was_running = e.state == VmState::Running;
    let cancel = Arc::new(tokio::sync::Notify::new());
    e.state = VmState::Paused;
    e.cancel = Some(cancel.clone());
    Ok(Claimed {
        vm,
        was_running,
        cancel,
        incarnation: e.incarnation,
    })
}

pub(super) fn release(host: &Arc<Host>, name: &VmName, state: VmState) {
    let mut vms = host.vms();
    if let Some(e) = vms.get_mut(name) {
        e.cancel = None;
        e.state = state;
    }
}
