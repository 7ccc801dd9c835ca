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

/// A VM taken for a push: the guest, whether it ran, the cancel handle.
pub(super) struct Claimed {
    pub vm: Arc<dyn crate::backend::VmBackend>,
    pub was_running: bool,
    pub cancel: Arc<tokio::sync::Notify>,
    /// Which VM of that name it is.
    pub incarnation: u64,
}

/// Takes sim VM `name` for a push: it must be running or paused and not
/// migrating; it is marked paused and given a cancel handle (so a
/// migration, a delete or a pause cannot act on it meanwhile).
#[allow(clippy::result_large_err)]
pub(super) fn claim_vm(host: &Arc<Host>, name: &VmName) -> Result<Claimed, CtlResponse> {
    let (handle, was_running, cancel, incarnation) = claim(host, name, false)?;
    match handle {
        VmHandle::Sim(vm) => Ok(Claimed {
            vm,
            was_running,
            cancel,
            incarnation,
        }),
        _ => {
            release(host, name, VmState::Paused);
            Err(error(CtlErrorKind::Internal, "not a sim VM"))
        }
    }
}

/// A QEMU VM taken for a push.
pub(super) struct ClaimedQemu {
    pub vm: Arc<crate::backend::qemu::vm::QemuVm>,
    pub was_running: bool,
    pub cancel: Arc<tokio::sync::Notify>,
}

/// Takes QEMU VM `name` for a push, as [`claim_vm`] takes a sim VM.
#[allow(clippy::result_large_err)]
pub(super) fn claim_qemu(host: &Arc<Host>, name: &VmName) -> Result<ClaimedQemu, CtlResponse> {
    let (handle, was_running, cancel, _) = claim(host, name, true)?;
    match handle {
        VmHandle::Qemu(vm) => Ok(ClaimedQemu {
            vm,
            was_running,
            cancel,
        }),
        _ => {
            release(
                host,
                name,
                if was_running {
                    VmState::Running
                } else {
                    VmState::Paused
                },
            );
            Err(error(CtlErrorKind::Internal, "not a QEMU VM"))
        }
    }
}

/// Takes VM `name` (a sim VM; a QEMU VM too if `qemu`): its handle,
/// whether it ran, its cancel handle and incarnation.
#[allow(clippy::result_large_err)]
fn claim(
    host: &Arc<Host>,
    name: &VmName,
    qemu: bool,
) -> Result<(VmHandle, bool, Arc<tokio::sync::Notify>, u64), CtlResponse> {
    let mut vms = host.vms();
    let Some(e) = vms.get_mut(name) else {
        return Err(error(
            CtlErrorKind::NotFound,
            format!("no VM named {name} here"),
        ));
    };
    let handle = match &e.handle {
        Some(h @ VmHandle::Sim(_)) => h.clone(),
        Some(h @ VmHandle::Qemu(_)) if qemu => h.clone(),
        Some(VmHandle::Qemu(_)) => {
            return Err(error(
                CtlErrorKind::BadRequest,
                "store-and-forward (--via) of QEMU VMs is not built; \
                 `snapshot push` and `snapshot pull` move them",
            ))
        }
        _ => {
            return Err(error(
                CtlErrorKind::BadRequest,
                format!("VM {name} has no guest here"),
            ))
        }
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
    Ok((handle, was_running, cancel, e.incarnation))
}

pub(super) fn release(host: &Arc<Host>, name: &VmName, state: VmState) {
    let mut vms = host.vms();
    if let Some(e) = vms.get_mut(name) {
        e.cancel = None;
        e.state = state;
    }
}
