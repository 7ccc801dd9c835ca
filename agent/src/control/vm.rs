//! VM requests: create (sim and QEMU, launched or adopted), delete,
//! pause and resume — each a policy decision, audited.

use std::sync::Arc;

use convoy_protocol::ctl::{
    CtlErrorKind, CtlResponse, QemuVmSpec, SimVmSpec, VmState, MAX_DIRTY_PAGES_PER_SEC,
    MAX_DISK_WRITES_PER_SEC,
};
use convoy_protocol::names::{SpiffeId, VmName};

use super::{error, forbidden, may_act_on};

/// Largest sim VM one request may create (1 TiB).
const MAX_SIM_BYTES: u64 = 1 << 40;
use crate::backend::qemu::vm::QemuVm;
use crate::backend::sim::SimVm;
use crate::host::{Host, ReserveError, VmHandle};
use crate::trust::policy::{Query, VmFacts};

pub(super) async fn delete_vm(
    host: &Arc<Host>,
    name: &convoy_protocol::names::VmName,
    operator: &SpiffeId,
) -> CtlResponse {
    if let Some(r) = may_act_on(host, name, operator, |operator, vm, host| Query::DeleteVm {
        operator,
        vm,
        host,
    }) {
        return r;
    }
    let entry = {
        let mut vms = host.vms();
        // Never under a migration (its final copy pauses the VM).
        if vms.get(name).is_some_and(|e| e.cancel.is_some()) {
            return error(
                CtlErrorKind::BadRequest,
                format!("VM {name} is migrating; abort the migration first"),
            );
        }
        // A place reserved for a VM being created (or arriving) is not a
        // VM yet: deleting it would let the launch finish unregistered.
        if vms.get(name).is_some_and(|e| e.handle.is_none()) {
            return error(
                CtlErrorKind::BadRequest,
                format!("VM {name} is being created; it cannot be deleted yet"),
            );
        }
        match vms.get(name).map(|e| e.state) {
            None => return error(CtlErrorKind::NotFound, format!("no VM named {name} here")),
            Some(VmState::Running)
            | Some(VmState::Paused)
            | Some(VmState::Exited)
            | Some(VmState::Lost) => vms.remove(name),
            Some(s) => {
                return error(
                    CtlErrorKind::BadRequest,
                    format!("VM {name} is {s:?}; it cannot be deleted now"),
                )
            }
        }
    };
    if let Some(h) = entry.and_then(|e| e.handle) {
        h.destroy().await;
    }
    // Its record goes with it; one left behind is reported, not fatal (the
    // VM is gone either way).
    unclaim(host, name).await;
    CtlResponse::VmDeleted(name.clone())
}

/// With a registry, the record of a VM that is not (or no longer) here
/// goes; one that cannot be removed is logged (the next reconciliation
/// reports it).
pub(super) async fn unclaim(host: &Arc<Host>, name: &convoy_protocol::names::VmName) {
    let released = match host.registry() {
        Ok(None) => return,
        Ok(Some(r)) => r.release(name).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = released {
        tracing::warn!("registry: {name} is not here, but its record stays: {e}");
    }
}

/// With a registry, a VM made here is registered as this agent's before
/// it is made: refused when another agent owns a VM of that name, or when
/// the registry cannot be reached (it could not be found nor moved then).
pub(super) async fn claim(
    host: &Arc<Host>,
    name: &convoy_protocol::names::VmName,
    attributes: &convoy_protocol::vm::VmAttributes,
    cause: &str,
) -> Option<CtlResponse> {
    let registry = match host.registry() {
        Ok(None) => return None,
        Ok(Some(r)) => r,
        Err(e) => return Some(error(CtlErrorKind::Internal, e.to_string())),
    };
    match registry.claim(name, attributes, cause).await {
        Ok(_) => None,
        Err(e @ crate::registry::RegistryError::OwnedElsewhere { .. }) => {
            Some(error(CtlErrorKind::Exists, e.to_string()))
        }
        Err(e) => Some(error(CtlErrorKind::Internal, e.to_string())),
    }
}

/// Pauses a running VM (`pause`) or resumes a paused one; never one that
/// is migrating. A paused VM keeps its memory and disks (their files can
/// then be read, or checked against a migration's disk roots, while
/// nothing writes them) and cannot migrate until it is resumed.
pub(super) async fn pause_vm(
    host: &Arc<Host>,
    name: &convoy_protocol::names::VmName,
    pause: bool,
    operator: &SpiffeId,
) -> CtlResponse {
    if let Some(r) = may_act_on(host, name, operator, |operator, vm, host| Query::PauseVm {
        operator,
        vm,
        host,
    }) {
        return r;
    }
    let (from, to) = if pause {
        (VmState::Running, VmState::Paused)
    } else {
        (VmState::Paused, VmState::Running)
    };
    // The state changes under the lock, before the guest does, so that a
    // migration (which claims only running VMs) cannot start in between.
    let handle = {
        let mut vms = host.vms();
        let Some(e) = vms.get_mut(name) else {
            return error(CtlErrorKind::NotFound, format!("no VM named {name} here"));
        };
        if e.cancel.is_some() || e.state != from {
            return error(
                CtlErrorKind::BadRequest,
                format!(
                    "VM {name} is {:?}{}; only a {from:?} VM can be {}",
                    e.state,
                    if e.cancel.is_some() {
                        " and migrating"
                    } else {
                        ""
                    },
                    if pause { "paused" } else { "resumed" }
                ),
            );
        }
        e.state = to;
        e.handle.clone()
    };
    let done = match handle {
        Some(VmHandle::Sim(vm)) => {
            if pause { vm.pause() } else { vm.resume() }.map_err(|e| e.to_string())
        }
        Some(VmHandle::Qemu(q)) => q
            .execute(if pause { "stop" } else { "cont" }, None)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Some(VmHandle::Lost(_)) | None => Err("the VM has no guest".into()),
    };
    if let Err(e) = done {
        host.set_state(name, from);
        return error(
            CtlErrorKind::Internal,
            format!(
                "cannot {} VM {name}: {e}",
                if pause { "pause" } else { "resume" }
            ),
        );
    }
    match host.vm_infos().into_iter().find(|v| &v.name == name) {
        Some(info) => CtlResponse::VmPaused(info),
        None => error(CtlErrorKind::NotFound, format!("VM {name} is gone")),
    }
}

/// Launches a QEMU VM: only binaries and images the agent allows, after the
/// policy permits it and capacity is reserved.
/// Launches the QEMU VM `spec`, or with `adopt` (its QMP socket) takes
/// over one already running that matches it.
pub(super) async fn create_qemu_vm(
    host: &Arc<Host>,
    spec: QemuVmSpec,
    adopt: Option<String>,
    operator: &SpiffeId,
) -> CtlResponse {
    let Some(cfg) = host.config.qemu.clone() else {
        return error(
            CtlErrorKind::BadRequest,
            "this agent has no QEMU backend (start it with --qemu-binary and --image-dir)",
        );
    };
    if let Some(r) = may_create(host, &spec.name, &spec.attributes, operator) {
        return r;
    }
    let qspec = match cfg.resolve(&spec) {
        Ok(q) => q,
        Err(e) => return error(CtlErrorKind::BadRequest, e.to_string()),
    };
    if adopt
        .as_deref()
        .is_some_and(|s| !std::path::Path::new(s).is_absolute())
    {
        return error(
            CtlErrorKind::BadRequest,
            "the QMP socket to adopt must be an absolute path on the agent's host",
        );
    }
    let dir = match crate::private::join_one(&cfg.runtime, spec.name.as_str()) {
        Ok(d) => d,
        Err(e) => return error(CtlErrorKind::BadRequest, e.to_string()),
    };
    let bytes = spec.memory_mib << 20;
    if let Some(r) = reserve_error(host, &spec.name, bytes) {
        return r;
    }
    let cause = if adopt.is_some() {
        "adopted"
    } else {
        "created"
    };
    if let Some(r) = claim(host, &spec.name, &spec.attributes, cause).await {
        host.remove(&spec.name);
        return r;
    }
    let started = match &adopt {
        None => QemuVm::launch(spec.clone(), qspec, &dir)
            .await
            .map(|vm| (vm, false)),
        Some(sock) => {
            QemuVm::adopt_running(spec.clone(), qspec, std::path::Path::new(sock), &dir).await
        }
    };
    match started {
        Ok((vm, paused)) => {
            let state = if paused {
                VmState::Paused
            } else {
                VmState::Running
            };
            let handle = VmHandle::Qemu(vm.clone());
            if let Err(r) = register(host, &spec.name, handle, state, &spec.attributes).await {
                unclaim(host, &spec.name).await;
                return r;
            }
            crate::host::watch_qemu(host, &spec.name, &vm);
            match host.vm_info(&spec.name) {
                Some(info) => CtlResponse::VmCreated(info),
                None => error(CtlErrorKind::Internal, "VM vanished"),
            }
        }
        Err(e) => {
            host.remove(&spec.name);
            unclaim(host, &spec.name).await;
            let _ = std::fs::remove_dir_all(&dir);
            let what = if adopt.is_some() {
                "cannot adopt QEMU"
            } else {
                "cannot start QEMU"
            };
            error(CtlErrorKind::BadRequest, format!("{what}: {e}"))
        }
    }
}

/// Puts a VM just started in the place reserved for it, and records it
/// in the registry file before it is reported created. If its place is
/// gone (the agent is stopping) or it cannot be recorded, the VM is
/// destroyed (no guest runs that a restarted agent would not find) and
/// the error response returned.
pub(super) async fn register(
    host: &Arc<Host>,
    name: &VmName,
    handle: VmHandle,
    state: VmState,
    attributes: &convoy_protocol::vm::VmAttributes,
) -> Result<(), CtlResponse> {
    let recorded = {
        let mut vms = host.vms();
        match vms.get_mut(name) {
            Some(e) if e.handle.is_none() => {
                e.handle = Some(handle.clone());
                e.state = state;
                e.attributes = attributes.clone();
                Some(vms.commit())
            }
            _ => None,
        }
    };
    let why = match recorded {
        Some(Ok(())) => return Ok(()),
        Some(Err(e)) => {
            host.remove(name);
            format!("VM {name} could not be recorded ({e}); stopped")
        }
        None => format!("VM {name} lost its place while it started; stopped"),
    };
    handle.destroy().await;
    Err(error(CtlErrorKind::Internal, why))
}

/// Checks a new VM's attributes and asks the policy (`CreateVm`); the
/// error response when either says no.
pub(super) fn may_create(
    host: &Arc<Host>,
    name: &VmName,
    attributes: &convoy_protocol::vm::VmAttributes,
    operator: &SpiffeId,
) -> Option<CtlResponse> {
    if let Err(e) = attributes.validate() {
        return Some(error(CtlErrorKind::BadRequest, e.to_string()));
    }
    let d = host.decide(
        &Query::CreateVm {
            operator,
            vm: VmFacts { name, attributes },
            host: &host.id,
        },
        None,
    );
    (!d.permitted).then(|| forbidden(&d))
}

/// Reserves capacity for a new VM; the error response when it cannot.
pub(super) fn reserve_error(host: &Arc<Host>, name: &VmName, bytes: u64) -> Option<CtlResponse> {
    match host.reserve(name, bytes, VmState::Paused) {
        Ok(()) => None,
        Err(ReserveError::Exists) => Some(error(
            CtlErrorKind::Exists,
            format!("a VM named {name} already exists here"),
        )),
        Err(ReserveError::NoCapacity) => Some(error(
            CtlErrorKind::NoCapacity,
            format!("{bytes} bytes exceed this agent's free capacity"),
        )),
    }
}

pub(super) async fn create_vm(
    host: &Arc<Host>,
    spec: SimVmSpec,
    operator: &SpiffeId,
) -> CtlResponse {
    if spec.memory_bytes == 0 || spec.memory_bytes % 4096 != 0 || spec.memory_bytes > MAX_SIM_BYTES
    {
        return error(
            CtlErrorKind::BadRequest,
            format!(
                "memory size {} must be a non-zero multiple of 4096 up to 1 TiB",
                spec.memory_bytes
            ),
        );
    }
    if spec.dirty_pages_per_sec > MAX_DIRTY_PAGES_PER_SEC
        || spec
            .disks
            .iter()
            .any(|d| d.writes_per_sec > MAX_DISK_WRITES_PER_SEC)
    {
        return error(
            CtlErrorKind::BadRequest,
            format!(
                "dirty rate up to {MAX_DIRTY_PAGES_PER_SEC} pages/s and disk writes up to \
                 {MAX_DISK_WRITES_PER_SEC} blocks/s"
            ),
        );
    }
    let most = convoy_protocol::ctl::service::MAX_SERVICE_REQUESTS_PER_SEC;
    if spec.service_requests_per_sec > most {
        return error(
            CtlErrorKind::BadRequest,
            format!("a service takes up to {most} requests/s"),
        );
    }
    if let Some(r) = may_create(host, &spec.name, &spec.attributes, operator) {
        return r;
    }
    if let Some(r) = reserve_error(host, &spec.name, spec.memory_bytes) {
        return r;
    }
    if let Some(r) = claim(host, &spec.name, &spec.attributes, "created").await {
        host.remove(&spec.name);
        return r;
    }
    let name = spec.name.clone();
    let attributes = spec.attributes.clone();
    let disk_dir = host.config.disk_dir();
    let bases = host.bases.clone();
    let vcpu = host.config.sim_vcpu.clone();
    let made = tokio::task::spawn_blocking(move || {
        SimVm::create_on(&spec, disk_dir.as_deref(), bases.as_deref(), &vcpu)
    })
    .await;
    match made {
        Ok(Ok(vm)) => {
            let handle = VmHandle::Sim(vm);
            if let Err(r) = register(host, &name, handle, VmState::Running, &attributes).await {
                unclaim(host, &name).await;
                return r;
            }
            match host.vm_info(&name) {
                Some(info) => CtlResponse::VmCreated(info),
                None => error(CtlErrorKind::Internal, "VM vanished"),
            }
        }
        Ok(Err(e)) => {
            host.remove(&name);
            unclaim(host, &name).await;
            error(CtlErrorKind::BadRequest, e.to_string())
        }
        Err(e) => {
            host.remove(&name);
            unclaim(host, &name).await;
            error(CtlErrorKind::Internal, e.to_string())
        }
    }
}
