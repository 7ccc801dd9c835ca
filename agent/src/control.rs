//! The operator API (`convoy-ctl/1`): one request per bidirectional stream,
//! from an authenticated operator.

use std::sync::Arc;

use convoy_protocol::ctl::{
    AgentStatus, CtlError, CtlErrorKind, CtlRequest, CtlResponse, QemuVmSpec, SimVmSpec, VmState,
    AUDIT_CHUNK,
};
use convoy_protocol::names::{SpiffeId, VmName};
use convoy_protocol::Message;
use quinn::{Connection, RecvStream, SendStream};

use crate::agent::{Inner, ReserveError};
use crate::backend::qemu::vm::QemuVm;
use crate::backend::sim::SimVm;
use crate::policy::{Query, VmFacts};
use crate::transport::{read_message, write_message, Peer};

/// Serves requests on `conn` until the operator closes it.
pub(crate) async fn serve(inner: Arc<Inner>, conn: Connection, peer: Peer) {
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let inner = inner.clone();
        let peer = peer.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(inner, send, recv, &peer).await {
                tracing::info!(operator = %peer.id, "control request failed: {e}");
            }
        });
    }
}

/// One line for the log: the request without its ticket's bytes.
fn summary(req: &CtlRequest) -> String {
    match req {
        CtlRequest::Status => "status".into(),
        CtlRequest::VmList => "vm list".into(),
        CtlRequest::VmCreate(s) => format!("vm create {} ({} bytes)", s.name, s.memory_bytes),
        CtlRequest::VmCreateQemu(s) => format!("vm create {} (qemu, {} MiB)", s.name, s.memory_mib),
        CtlRequest::VmAdoptQemu(s, sock) => format!("vm adopt {} (qemu at {sock})", s.name),
        CtlRequest::VmDelete(n) => format!("vm delete {n}"),
        CtlRequest::VmPause(n, true) => format!("vm pause {n}"),
        CtlRequest::VmPause(n, false) => format!("vm resume {n}"),
        CtlRequest::Migrate(m) => format!("migrate {} to {}", m.vm, m.to),
        CtlRequest::Abort(n) => format!("abort {n}"),
        CtlRequest::AuditRead { offset } => format!("audit read from {offset}"),
        other => format!("{other:?}"),
    }
}

fn error(kind: CtlErrorKind, message: impl Into<String>) -> CtlResponse {
    CtlResponse::Error(CtlError {
        kind,
        message: message.into(),
    })
}

async fn respond(send: &mut SendStream, r: CtlResponse) -> Result<(), crate::transport::WireError> {
    write_message(send, &Message::CtlResponse(Box::new(r))).await?;
    Ok(())
}

async fn handle(
    inner: Arc<Inner>,
    mut send: SendStream,
    mut recv: RecvStream,
    peer: &Peer,
) -> Result<(), crate::transport::WireError> {
    let req = match read_message(&mut recv).await {
        Ok(Some(Message::CtlRequest(r))) => r,
        Ok(Some(other)) => {
            respond(
                &mut send,
                error(
                    CtlErrorKind::BadRequest,
                    format!("expected a control request, got {}", other.kind()),
                ),
            )
            .await?;
            return Ok(());
        }
        Ok(None) => return Ok(()),
        Err(e) => {
            respond(&mut send, error(CtlErrorKind::BadRequest, e.to_string())).await?;
            return Err(e);
        }
    };
    tracing::info!(operator = %peer.id, request = %summary(&req), "control request");
    match req {
        CtlRequest::Status => {
            let status = AgentStatus {
                identity: inner.id.to_string(),
                listen: inner
                    .endpoint
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
                version: env!("CARGO_PKG_VERSION").into(),
                vms: inner.vm_infos(),
                active_migrations: inner.active.load(std::sync::atomic::Ordering::Relaxed),
                recent: inner.recent(),
            };
            respond(&mut send, CtlResponse::Status(status)).await?;
        }
        CtlRequest::VmList => respond(&mut send, CtlResponse::VmList(inner.vm_infos())).await?,
        CtlRequest::VmCreate(spec) => {
            let r = create_vm(&inner, spec, &peer.id).await;
            respond(&mut send, r).await?;
        }
        CtlRequest::Abort(name) => {
            let r = abort(&inner, &name, &peer.id).await;
            respond(&mut send, r).await?;
        }
        CtlRequest::AuditRead { offset } => {
            let r = audit_read(&inner, offset, &peer.id).await;
            respond(&mut send, r).await?;
        }
        CtlRequest::VmDelete(name) => {
            let r = delete_vm(&inner, &name, &peer.id).await;
            respond(&mut send, r).await?;
        }
        CtlRequest::VmPause(name, pause) => {
            let r = pause_vm(&inner, &name, pause, &peer.id).await;
            respond(&mut send, r).await?;
        }
        CtlRequest::VmCreateQemu(spec) => {
            let r = create_qemu_vm(&inner, spec, None, &peer.id).await;
            respond(&mut send, r).await?;
        }
        CtlRequest::VmAdoptQemu(spec, sock) => {
            let r = create_qemu_vm(&inner, spec, Some(sock), &peer.id).await;
            respond(&mut send, r).await?;
        }
        CtlRequest::Migrate(req) => {
            let (tx, mut rx) = tokio::sync::mpsc::channel(64);
            let task = tokio::spawn(crate::engine::source::migrate(
                inner.clone(),
                req,
                peer.id.clone(),
                tx,
            ));
            while let Some(p) = rx.recv().await {
                // The operator may go away; the migration goes on.
                let _ = respond(&mut send, CtlResponse::Progress(p)).await;
            }
            let r = match task.await {
                Ok(Ok(report)) => CtlResponse::Report(report),
                Ok(Err(e)) => error(e.kind(), e.to_string()),
                Err(e) => error(
                    CtlErrorKind::Internal,
                    format!("migration task failed: {e}"),
                ),
            };
            respond(&mut send, r).await?;
        }
        other => {
            respond(
                &mut send,
                error(
                    CtlErrorKind::BadRequest,
                    format!("unsupported request {other:?}"),
                ),
            )
            .await?
        }
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), send.stopped()).await;
    Ok(())
}

async fn delete_vm(
    inner: &Arc<Inner>,
    name: &convoy_protocol::names::VmName,
    operator: &SpiffeId,
) -> CtlResponse {
    if let Some(r) = may_act_on(inner, name, operator, |operator, vm, host| {
        Query::DeleteVm { operator, vm, host }
    }) {
        return r;
    }
    let entry = {
        let mut vms = inner.vms();
        // Never under a migration (its final copy pauses the VM).
        if vms.get(name).is_some_and(|e| e.cancel.is_some()) {
            return error(
                CtlErrorKind::BadRequest,
                format!("VM {name} is migrating; abort the migration first"),
            );
        }
        match vms.get(name).map(|e| e.state) {
            None => return error(CtlErrorKind::NotFound, format!("no VM named {name} here")),
            Some(VmState::Running) | Some(VmState::Paused) | Some(VmState::Exited) => {
                vms.remove(name)
            }
            Some(s) => {
                return error(
                    CtlErrorKind::BadRequest,
                    format!("VM {name} is {s:?}; it cannot be deleted now"),
                )
            }
        }
    };
    if let Some(e) = entry {
        if let Some(vm) = e.vm {
            vm.destroy();
        }
        if let Some(q) = e.qemu {
            q.stop().await;
        }
    }
    CtlResponse::VmDeleted(name.clone())
}

/// Pauses a running VM (`pause`) or resumes a paused one; never one that
/// is migrating. A paused VM keeps its memory and disks (their files can
/// then be read, or checked against a migration's disk roots, while
/// nothing writes them) and cannot migrate until it is resumed.
async fn pause_vm(
    inner: &Arc<Inner>,
    name: &convoy_protocol::names::VmName,
    pause: bool,
    operator: &SpiffeId,
) -> CtlResponse {
    if let Some(r) = may_act_on(inner, name, operator, |operator, vm, host| Query::PauseVm {
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
    let (vm, qemu) = {
        let mut vms = inner.vms();
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
        (e.vm.clone(), e.qemu.clone())
    };
    let done = match (vm, qemu) {
        (Some(vm), _) => if pause { vm.pause() } else { vm.resume() }.map_err(|e| e.to_string()),
        (None, Some(q)) => q
            .execute(if pause { "stop" } else { "cont" }, None)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        (None, None) => Err("the VM has no guest".into()),
    };
    if let Err(e) = done {
        inner.set_state(name, from);
        return error(
            CtlErrorKind::Internal,
            format!(
                "cannot {} VM {name}: {e}",
                if pause { "pause" } else { "resume" }
            ),
        );
    }
    match inner.vm_infos().into_iter().find(|v| &v.name == name) {
        Some(info) => CtlResponse::VmPaused(info),
        None => error(CtlErrorKind::NotFound, format!("VM {name} is gone")),
    }
}

/// Launches a QEMU VM: only binaries and images the agent allows, after the
/// policy permits it and capacity is reserved.
/// Launches the QEMU VM `spec`, or with `adopt` (its QMP socket) takes
/// over one already running that matches it.
async fn create_qemu_vm(
    inner: &Arc<Inner>,
    spec: QemuVmSpec,
    adopt: Option<String>,
    operator: &SpiffeId,
) -> CtlResponse {
    let Some(cfg) = inner.config.qemu.clone() else {
        return error(
            CtlErrorKind::BadRequest,
            "this agent has no QEMU backend (start it with --qemu-binary and --image-dir)",
        );
    };
    if let Some(r) = may_create(inner, &spec.name, &spec.attributes, operator) {
        return r;
    }
    let qspec = match cfg.resolve(&spec) {
        Ok(q) => q,
        Err(e) => return error(CtlErrorKind::BadRequest, e),
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
    let bytes = spec.memory_mib << 20;
    if let Some(r) = reserve_error(inner, &spec.name, bytes) {
        return r;
    }
    let dir = cfg.runtime.join(spec.name.as_str());
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
            if let Some(e) = inner.vms().get_mut(&spec.name) {
                e.qemu = Some(vm.clone());
                e.state = if paused {
                    VmState::Paused
                } else {
                    VmState::Running
                };
                e.attributes = spec.attributes.clone();
            }
            let (watch_inner, name) = (inner.clone(), spec.name.clone());
            tokio::spawn(vm.watch(std::time::Duration::from_millis(500), move || {
                tracing::warn!(vm = %name, "QEMU exited");
                watch_inner.set_state(&name, VmState::Exited);
            }));
            match inner.vm_info(&spec.name) {
                Some(info) => CtlResponse::VmCreated(info),
                None => error(CtlErrorKind::Internal, "VM vanished"),
            }
        }
        Err(e) => {
            inner.remove(&spec.name);
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

/// Checks a new VM's attributes and asks the policy (`CreateVm`); the
/// error response when either says no.
fn may_create(
    inner: &Arc<Inner>,
    name: &VmName,
    attributes: &convoy_protocol::vm::VmAttributes,
    operator: &SpiffeId,
) -> Option<CtlResponse> {
    if let Err(e) = attributes.validate() {
        return Some(error(CtlErrorKind::BadRequest, e.to_string()));
    }
    let d = inner.decide(
        &Query::CreateVm {
            operator,
            vm: VmFacts { name, attributes },
            host: &inner.id,
        },
        None,
    );
    (!d.permitted).then(|| forbidden(&d))
}

/// Reserves capacity for a new VM; the error response when it cannot.
fn reserve_error(inner: &Arc<Inner>, name: &VmName, bytes: u64) -> Option<CtlResponse> {
    match inner.reserve(name, bytes, VmState::Paused) {
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

/// Largest sim VM one request may create (1 TiB).
const MAX_SIM_BYTES: u64 = 1 << 40;

/// Asks the policy whether `operator` may act (the action `query` builds)
/// on VM `name` here; the response to send when the VM is unknown or the
/// policy says no.
fn may_act_on(
    inner: &Arc<Inner>,
    name: &VmName,
    operator: &SpiffeId,
    query: impl for<'a> Fn(&'a SpiffeId, VmFacts<'a>, &'a SpiffeId) -> Query<'a>,
) -> Option<CtlResponse> {
    let Some(attributes) = inner.vms().get(name).map(|e| e.attributes.clone()) else {
        return Some(error(
            CtlErrorKind::NotFound,
            format!("no VM named {name} here"),
        ));
    };
    let vm = VmFacts {
        name,
        attributes: &attributes,
    };
    let d = inner.decide(&query(operator, vm, &inner.id), None);
    (!d.permitted).then(|| forbidden(&d))
}

fn forbidden(d: &crate::policy::Decision) -> CtlResponse {
    error(CtlErrorKind::Forbidden, format!("policy {}", d.explain()))
}

/// Cancels the outgoing migration of `name`, and waits until the VM runs
/// here again (or the cancel came too late: the VM was handed over).
async fn abort(inner: &Arc<Inner>, name: &VmName, operator: &SpiffeId) -> CtlResponse {
    if let Some(r) = may_act_on(inner, name, operator, |operator, vm, host| Query::Abort {
        operator,
        vm,
        host,
    }) {
        return r;
    }
    let Some(cancel) = inner.vms().get(name).and_then(|e| e.cancel.clone()) else {
        return error(
            CtlErrorKind::BadRequest,
            format!("VM {name} is not migrating out of this agent"),
        );
    };
    cancel.notify_one();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let state = inner.vms().get(name).map(|e| (e.state, e.cancel.is_some()));
        match state {
            Some((VmState::Running, false)) => {
                // Running again: by this cancel, or did it end otherwise?
                let ours = inner.recent().iter().rev().find(|r| &r.vm == name).map(|r| {
                    matches!(&r.outcome, convoy_protocol::ctl::Outcome::Aborted(w) if w.contains("cancelled"))
                });
                return match ours {
                    Some(true) | None => CtlResponse::Aborted(name.clone()),
                    Some(false) => error(
                        CtlErrorKind::BadRequest,
                        format!("VM {name}'s migration ended on its own before the cancel; it runs here"),
                    ),
                };
            }
            None => {
                return error(
                    CtlErrorKind::BadRequest,
                    format!("too late: VM {name} was already handed over to its destination"),
                )
            }
            _ if tokio::time::Instant::now() > deadline => {
                return error(
                    CtlErrorKind::Internal,
                    format!("VM {name} did not come back within 30 s; see `convoyctl status`"),
                )
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
}

/// A chunk of the audit log, for operators the policy lets read it.
async fn audit_read(inner: &Arc<Inner>, offset: u64, operator: &SpiffeId) -> CtlResponse {
    let d = inner.decide(
        &Query::ReadAudit {
            operator,
            host: &inner.id,
        },
        None,
    );
    if !d.permitted {
        return forbidden(&d);
    }
    let Some(log) = &inner.audit else {
        return error(
            CtlErrorKind::NotFound,
            "this agent keeps no audit log (no state directory)",
        );
    };
    let path = log.path().to_owned();
    let read = tokio::task::spawn_blocking(move || -> std::io::Result<(u64, Vec<u8>)> {
        use std::io::{Read, Seek};
        let mut f = std::fs::File::open(&path)?;
        let total = f.metadata()?.len();
        let mut bytes = Vec::new();
        if offset < total {
            f.seek(std::io::SeekFrom::Start(offset))?;
            f.take(AUDIT_CHUNK as u64).read_to_end(&mut bytes)?;
        }
        Ok((total, bytes))
    })
    .await;
    match read {
        Ok(Ok((total, bytes))) => CtlResponse::AuditChunk {
            offset,
            total,
            bytes,
        },
        Ok(Err(e)) => error(
            CtlErrorKind::Internal,
            format!("reading the audit log: {e}"),
        ),
        Err(e) => error(CtlErrorKind::Internal, e.to_string()),
    }
}

async fn create_vm(inner: &Arc<Inner>, spec: SimVmSpec, operator: &SpiffeId) -> CtlResponse {
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
    if let Some(r) = may_create(inner, &spec.name, &spec.attributes, operator) {
        return r;
    }
    if let Some(r) = reserve_error(inner, &spec.name, spec.memory_bytes) {
        return r;
    }
    let name = spec.name.clone();
    let attributes = spec.attributes.clone();
    let disk_dir = inner.config.disk_dir();
    let bases = inner.bases.clone();
    let made = tokio::task::spawn_blocking(move || {
        SimVm::create(&spec, disk_dir.as_deref(), bases.as_deref())
    })
    .await;
    match made {
        Ok(Ok(vm)) => {
            {
                let mut vms = inner.vms();
                if let Some(e) = vms.get_mut(&name) {
                    e.vm = Some(vm);
                    e.state = VmState::Running;
                    e.attributes = attributes;
                }
            }
            match inner.vm_info(&name) {
                Some(info) => CtlResponse::VmCreated(info),
                None => error(CtlErrorKind::Internal, "VM vanished"),
            }
        }
        Ok(Err(e)) => {
            inner.remove(&name);
            error(CtlErrorKind::BadRequest, e.to_string())
        }
        Err(e) => {
            inner.remove(&name);
            error(CtlErrorKind::Internal, e.to_string())
        }
    }
}
