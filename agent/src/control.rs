//! The operator API (`convoy-ctl/1`): one request per bidirectional stream,
//! from an authenticated operator.

use std::sync::Arc;

use convoy_protocol::ctl::{
    AgentStatus, CtlError, CtlErrorKind, CtlRequest, CtlResponse, SimVmSpec, VmState, AUDIT_CHUNK,
};
use convoy_protocol::names::{SpiffeId, VmName};
use convoy_protocol::Message;
use quinn::{Connection, RecvStream, SendStream};

use crate::agent::{Inner, ReserveError};
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
        CtlRequest::VmDelete(n) => format!("vm delete {n}"),
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
            let r = delete_vm(&inner, &name);
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

fn delete_vm(inner: &Arc<Inner>, name: &convoy_protocol::names::VmName) -> CtlResponse {
    let entry = {
        let mut vms = inner.vms();
        match vms.get(name).map(|e| e.state) {
            None => return error(CtlErrorKind::NotFound, format!("no VM named {name} here")),
            Some(VmState::Running) | Some(VmState::Paused) => vms.remove(name),
            Some(s) => {
                return error(
                    CtlErrorKind::BadRequest,
                    format!("VM {name} is {s:?}; it cannot be deleted now"),
                )
            }
        }
    };
    if let Some(vm) = entry.and_then(|e| e.vm) {
        vm.destroy();
    }
    CtlResponse::VmDeleted(name.clone())
}

/// Largest sim VM one request may create (1 TiB).
const MAX_SIM_BYTES: u64 = 1 << 40;

fn forbidden(d: &crate::policy::Decision) -> CtlResponse {
    error(CtlErrorKind::Forbidden, format!("policy {}", d.explain()))
}

/// Cancels the outgoing migration of `name`, and waits until the VM runs
/// here again (or the cancel came too late: the VM was handed over).
async fn abort(inner: &Arc<Inner>, name: &VmName, operator: &SpiffeId) -> CtlResponse {
    let Some((attributes, cancel)) = inner
        .vms()
        .get(name)
        .map(|e| (e.attributes.clone(), e.cancel.clone()))
    else {
        return error(CtlErrorKind::NotFound, format!("no VM named {name} here"));
    };
    let d = inner.decide(
        &Query::Abort {
            operator,
            vm: VmFacts {
                name,
                attributes: &attributes,
            },
            host: &inner.id,
        },
        None,
    );
    if !d.permitted {
        return forbidden(&d);
    }
    let Some(cancel) = cancel else {
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
            Some((VmState::Running, false)) => return CtlResponse::Aborted(name.clone()),
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
    if let Err(e) = spec.attributes.validate() {
        return error(CtlErrorKind::BadRequest, e.to_string());
    }
    let d = inner.decide(
        &Query::CreateVm {
            operator,
            vm: VmFacts {
                name: &spec.name,
                attributes: &spec.attributes,
            },
            host: &inner.id,
        },
        None,
    );
    if !d.permitted {
        return forbidden(&d);
    }
    if let Err(e) = inner.reserve(&spec.name, spec.memory_bytes, VmState::Paused) {
        return match e {
            ReserveError::Exists => error(
                CtlErrorKind::Exists,
                format!("a VM named {} already exists here", spec.name),
            ),
            ReserveError::NoCapacity => error(
                CtlErrorKind::NoCapacity,
                format!(
                    "{} bytes exceed this agent's free capacity",
                    spec.memory_bytes
                ),
            ),
        };
    }
    let name = spec.name.clone();
    let attributes = spec.attributes.clone();
    let made = tokio::task::spawn_blocking(move || SimVm::create(&spec)).await;
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
