//! The operator API (`convoy-ctl/1`): one request per bidirectional stream,
//! from an authenticated operator. This module reads the request and
//! dispatches it; each family of requests has its own file: [`vm`],
//! [`migrate`], [`audit`].

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::transport::{Connection, RecvStream, SendStream};
use convoy_protocol::ctl::{
    AgentStatus, CtlError, CtlErrorKind, CtlMessage, CtlRequest, CtlResponse,
};
use convoy_protocol::message::name_of;
use convoy_protocol::names::{SpiffeId, VmName};
use convoy_protocol::DecodeError;

use crate::host::Host;
use crate::transport::{close, read_ctl, write_ctl, Peer, WireError};
use crate::trust::policy::{Query, VmFacts};

mod admission;
mod audit;
mod fleet;
pub(crate) mod handback;
mod hold;
mod migrate;
mod recover;
mod snapshot;
mod via;
mod vm;

use audit::audit_read;
use migrate::abort;
use vm::{create_qemu_vm, create_vm, delete_vm, pause_vm};

/// Serves requests on `conn` until the operator closes it, or leaves it
/// with no request in flight for `ConnectionLimits::idle` (QUIC
/// keep-alives would otherwise hold it open for good).
pub(crate) async fn serve(host: Arc<Host>, conn: Connection, peer: Peer) {
    let idle = host.connections.limits().idle;
    let in_flight = Arc::new(AtomicU32::new(0));
    loop {
        let (send, recv) = match tokio::time::timeout(idle, conn.accept_bi()).await {
            Ok(Ok(s)) => s,
            Ok(Err(_)) => return,
            // A migration's progress is still streaming: not idle.
            Err(_) if in_flight.load(Ordering::Acquire) > 0 => continue,
            Err(_) => {
                let why = format!("no request for {} s", idle.as_secs());
                host.audit_refusal(peer.id.to_string(), format!("connection closed: {why}"));
                conn.close(close::TIMED_OUT.into(), why.as_bytes());
                return;
            }
        };
        let host = host.clone();
        let peer = peer.clone();
        let busy = InFlight::new(&in_flight);
        tokio::spawn(async move {
            if let Err(e) = handle(host, send, recv, &peer).await {
                tracing::info!(operator = %peer.id, "control request failed: {e}");
            }
            drop(busy);
        });
    }
}

/// One request being served on a connection.
struct InFlight(Arc<AtomicU32>);

impl InFlight {
    fn new(count: &Arc<AtomicU32>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One line for the log: the request without its ticket's bytes.
/// Whether `req` is an action a policy decides (and the audit log records).
/// Migrations check the log themselves, before the ticket is spent.
fn governed(req: &CtlRequest) -> bool {
    match req {
        CtlRequest::Status | CtlRequest::VmList | CtlRequest::Migrate(_) => false,
        CtlRequest::VmCreate(_)
        | CtlRequest::VmCreateQemu(_)
        | CtlRequest::VmAdoptQemu(..)
        | CtlRequest::VmDelete(_)
        | CtlRequest::VmPause(..)
        | CtlRequest::Abort(_)
        | CtlRequest::Recover { .. }
        | CtlRequest::AuditRead { .. }
        | CtlRequest::Snapshot(_) => true,
        // A request this build does not know is refused as such below.
        _ => false,
    }
}

fn summary(req: &CtlRequest) -> String {
    match req {
        CtlRequest::Status => "status".into(),
        CtlRequest::VmList => "vm list".into(),
        CtlRequest::Fleet(q) => match &q.vm {
            Some(vm) => format!("where {vm}"),
            None => "fleet ls".into(),
        },
        CtlRequest::VmCreate(s) => format!("vm create {} ({} bytes)", s.name, s.memory_bytes),
        CtlRequest::VmCreateQemu(s) => format!("vm create {} (qemu, {} MiB)", s.name, s.memory_mib),
        CtlRequest::VmAdoptQemu(s, sock) => format!("vm adopt {} (qemu at {sock})", s.name),
        CtlRequest::VmDelete(n) => format!("vm delete {n}"),
        CtlRequest::VmPause(n, true) => format!("vm pause {n}"),
        CtlRequest::VmPause(n, false) => format!("vm resume {n}"),
        CtlRequest::Migrate(m) => format!("migrate {} to {}", m.vm, m.to),
        CtlRequest::Abort(n) => format!("abort {n}"),
        CtlRequest::AuditRead { offset } => format!("audit read from {offset}"),
        CtlRequest::Recover {
            vm,
            force_resume_here,
        } => format!(
            "recover {}{}",
            vm.as_ref().map_or("--all".into(), ToString::to_string),
            if *force_resume_here {
                " --force-resume-here"
            } else {
                ""
            }
        ),
        CtlRequest::Snapshot(s) => format!("snapshot {} {}", s.operation(), s.url()),
        CtlRequest::Admission(q) => format!("admission ({} bytes)", q.memory_bytes),
        other => format!("{other:?}"),
    }
}

pub(super) fn error(kind: CtlErrorKind, message: impl Into<String>) -> CtlResponse {
    CtlResponse::Error(CtlError {
        kind,
        message: message.into(),
    })
}

pub(super) async fn respond(send: &mut SendStream, r: CtlResponse) -> Result<(), WireError> {
    write_ctl(send, &CtlMessage::Response(Box::new(r))).await?;
    Ok(())
}

/// Refuses (and audits) a stream that opened with a frame of `kind`
/// instead of a request.
async fn not_a_request(
    host: &Host,
    send: &mut SendStream,
    peer: &Peer,
    kind: &str,
) -> Result<(), WireError> {
    let why = format!("expected a control request, got {kind}");
    host.audit_refusal(
        peer.id.to_string(),
        format!("malformed operator request: {why}"),
    );
    respond(send, error(CtlErrorKind::BadRequest, why)).await
}

async fn handle(
    host: Arc<Host>,
    mut send: SendStream,
    mut recv: RecvStream,
    peer: &Peer,
) -> Result<(), WireError> {
    // Only operator frames decode here; a migration message's tag is
    // unknown to this decoder, and is named as what it is.
    let limit = host.connections.limits().first_message;
    let Ok(read) = tokio::time::timeout(limit, read_ctl(&mut recv)).await else {
        let why = format!(
            "no request within {} s of opening the stream",
            limit.as_secs()
        );
        host.audit_refusal(
            peer.id.to_string(),
            format!("malformed operator request: {why}"),
        );
        respond(&mut send, error(CtlErrorKind::BadRequest, why)).await?;
        return Ok(());
    };
    let req = match read {
        Ok(Some(CtlMessage::Request(r))) => r,
        Ok(Some(other)) => return not_a_request(&host, &mut send, peer, other.kind()).await,
        Err(WireError::Decode(DecodeError::UnknownTag(t))) if name_of(t) != "unknown" => {
            return not_a_request(&host, &mut send, peer, name_of(t)).await
        }
        Ok(None) => return Ok(()),
        Err(e) => {
            host.audit_refusal(
                peer.id.to_string(),
                format!("malformed operator request: {e}"),
            );
            respond(&mut send, error(CtlErrorKind::BadRequest, e.to_string())).await?;
            return Err(e);
        }
    };
    tracing::info!(operator = %peer.id, request = %summary(&req), "control request");
    // Fail closed: an action a policy governs is refused, not done
    // unaudited, once the audit log cannot be written.
    if governed(&req) && !host.audit_ok() {
        let r = error(
            CtlErrorKind::Internal,
            format!(
                "the audit log cannot be written; refusing {}",
                summary(&req)
            ),
        );
        respond(&mut send, r).await?;
        let _ = send.finish();
        return Ok(());
    }
    match req {
        CtlRequest::Status => {
            let status = AgentStatus {
                identity: host.id.to_string(),
                listen: host
                    .endpoint
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
                version: env!("CARGO_PKG_VERSION").into(),
                vms: host.vm_infos(),
                active_migrations: host.active.load(std::sync::atomic::Ordering::Relaxed),
                recent: host.recent(),
                capacity_bytes: host.config.capacity_bytes,
                used_bytes: host.used_bytes(),
            };
            respond(&mut send, CtlResponse::Status(status)).await?;
        }
        CtlRequest::VmList => respond(&mut send, CtlResponse::VmList(host.vm_infos())).await?,
        CtlRequest::Fleet(q) => respond(&mut send, fleet::fleet(&host, q, &peer.id).await).await?,
        CtlRequest::Admission(q) => {
            respond(&mut send, admission::admission(&host, &q, &peer.id)).await?;
        }
        CtlRequest::VmCreate(spec) => {
            let r = create_vm(&host, spec, &peer.id).await;
            respond(&mut send, r).await?;
        }
        CtlRequest::Abort(name) => {
            let r = abort(&host, &name, &peer.id).await;
            respond(&mut send, r).await?;
        }
        CtlRequest::AuditRead { offset } => {
            let r = audit_read(&host, offset, &peer.id).await;
            respond(&mut send, r).await?;
        }
        CtlRequest::VmDelete(name) => {
            let r = delete_vm(&host, &name, &peer.id).await;
            respond(&mut send, r).await?;
        }
        CtlRequest::VmPause(name, pause) => {
            let r = pause_vm(&host, &name, pause, &peer.id).await;
            respond(&mut send, r).await?;
        }
        CtlRequest::VmCreateQemu(spec) => {
            let r = create_qemu_vm(&host, spec, None, &peer.id).await;
            respond(&mut send, r).await?;
        }
        CtlRequest::VmAdoptQemu(spec, sock) => {
            let r = create_qemu_vm(&host, spec, Some(sock), &peer.id).await;
            respond(&mut send, r).await?;
        }
        CtlRequest::Migrate(req) => migrate::migrate(&host, req, &peer.id, &mut send).await?,
        CtlRequest::Recover {
            vm,
            force_resume_here,
        } => {
            let r = recover::recover(&host, vm, force_resume_here, &peer.id).await;
            respond(&mut send, r).await?;
        }
        CtlRequest::Snapshot(s) => {
            let r = snapshot::snapshot(&host, s, &peer.id).await;
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

/// Asks the policy whether `operator` may act (the action `query` builds)
/// on VM `name` here; the response to send when the VM is unknown or the
/// policy says no.
pub(super) fn may_act_on(
    host: &Arc<Host>,
    name: &VmName,
    operator: &SpiffeId,
    query: impl for<'a> Fn(&'a SpiffeId, VmFacts<'a>, &'a SpiffeId) -> Query<'a>,
) -> Option<CtlResponse> {
    let Some(attributes) = host.vms().get(name).map(|e| e.attributes.clone()) else {
        return Some(error(
            CtlErrorKind::NotFound,
            format!("no VM named {name} here"),
        ));
    };
    let vm = VmFacts {
        name,
        attributes: &attributes,
    };
    let d = host.decide(&query(operator, vm, &host.id), None);
    (!d.permitted).then(|| forbidden(&d))
}

pub(super) fn forbidden(d: &crate::trust::policy::Decision) -> CtlResponse {
    error(CtlErrorKind::Forbidden, format!("policy {}", d.explain()))
}
