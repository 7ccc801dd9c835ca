//! Store-and-forward migration (`convoyctl migrate VM --to B --via URL`):
//! the two agents never connect. The source checks the ticket and the
//! policy as for a live migration, pushes the VM sealed for the
//! destination with the ticket in the signed manifest, keeps it paused,
//! and waits for the handover claim ([`convoy_protocol::snapshot::claim`]).
//! The destination's `snapshot pull` checks the ticket (it must name this
//! agent and the manifest's signer), asks `MigrateIn`, restores the VM
//! paused, and claims it: only a written claim starts it. If no claim
//! comes in time (or the operator aborts), the source claims the VM back;
//! only a written claim resumes it. Exactly one claim is ever written.

use std::sync::Arc;
use std::time::{Duration, Instant};

use convoy_protocol::audit::AuditEvent;
use convoy_protocol::ctl::snapshot::{HandoverReport, SnapshotResponse};
use convoy_protocol::ctl::{CtlErrorKind, CtlResponse, MigrateRequest, Outcome};
use convoy_protocol::names::SpiffeId;
use convoy_protocol::snapshot::claim::{Handover, Verdict};
use convoy_protocol::snapshot::SnapshotBackend;

use super::handback;
use super::hold::{claim_vm, failed, Claimed, Guest};
use super::{error, forbidden};
use crate::host::Host;
use crate::snapshot::pending::PendingHandover;
use crate::snapshot::{self as snap, SnapshotStore};
use crate::trust::authz::now_unix;
use crate::trust::policy::{Query, VmFacts};

/// How often the source looks for the destination's claim.
const POLL: Duration = Duration::from_secs(1);

/// The source's side.
pub(super) async fn migrate_via(
    host: &Arc<Host>,
    store: &SnapshotStore,
    req: MigrateRequest,
    wait_secs: u32,
    operator: &SpiffeId,
) -> Result<SnapshotResponse, CtlResponse> {
    // Its handover is a claim object in the bucket, not a registry commit:
    // with a registry it would leave the registry naming this agent.
    if host.config.registry.is_some() {
        return Err(super::error(
            CtlErrorKind::BadRequest,
            "store-and-forward migrations do not commit through the fleet registry yet: \
             with --registry, migrate the VM live",
        ));
    }
    let ticket = host
        .authority()
        .at_source(operator, &host.id, &req)
        .map_err(|e| {
            host.audit(AuditEvent::Refused {
                migration: None,
                peer: operator.to_string(),
                reason: e.to_string(),
            });
            error(CtlErrorKind::Unauthorized, e.to_string())
        })?;
    let migration = ticket.ticket.id;
    let dest = ticket.ticket.destination.clone();
    let Some((attributes, subject)) = host
        .vms()
        .get(&req.vm)
        .map(|e| (e.attributes.clone(), e.subject()))
    else {
        return Err(error(
            CtlErrorKind::NotFound,
            format!("no VM named {} here", req.vm),
        ));
    };
    // As for a live migration: the ticket is for the VM as it is now.
    if let Some(here) = subject.filter(|s| *s != ticket.ticket.subject) {
        let why = format!(
            "ticket for VM {} as {}, but it is {here} here (another incarnation?)",
            req.vm, ticket.ticket.subject
        );
        host.audit(AuditEvent::Refused {
            migration: Some(migration),
            peer: operator.to_string(),
            reason: why.clone(),
        });
        return Err(error(CtlErrorKind::Unauthorized, why));
    }
    let d = host.decide(
        &Query::MigrateOut {
            operator: &ticket.signer,
            vm: VmFacts {
                name: &req.vm,
                attributes: &attributes,
            },
            source: &host.id,
            destination: &dest,
            ticket: &ticket,
        },
        Some(migration),
    );
    if !d.permitted {
        return Err(forbidden(&d));
    }
    host.audit(AuditEvent::TicketAccepted {
        migration,
        vm: req.vm.clone(),
        operator: ticket.signer.clone(),
        peer: dest.clone(),
        role: "source".into(),
    });
    host.audit(AuditEvent::Ticket(req.ticket.clone()));
    let creds = host.creds();
    let recipient = snap::enroll::recipient(store, &creds.trust, &dest)
        .await
        .map_err(|e| failed("migrate --via", &e))?;
    // The snapshot's id is chosen first: the record below names it.
    let snapshot = snap::push::new_snapshot_id().map_err(|e| failed("migrate --via", &e))?;
    let Claimed {
        vm,
        was_running,
        cancel,
        incarnation,
    } = claim_vm(host, &req.vm)?;
    // Recorded before anything can reach the bucket: a source killed from
    // here on finds the handover at its next start and settles it by the
    // claim, never resuming a VM the destination may run.
    let mut pending = PendingHandover {
        migration,
        vm: req.vm.clone(),
        incarnation,
        url: store.url().to_owned(),
        snapshot,
        manifest: None,
        destination: dest.clone(),
        was_running,
    };
    if let Err(e) = host.snapshots.seen.hold_handover(&pending) {
        handback::give_back(host, &pending).await;
        return Err(error(
            CtlErrorKind::Internal,
            format!("cannot record the handover durably ({e}); nothing was pushed"),
        ));
    }
    // The VM as it is pushed: a sim VM paused; a QEMU VM saved by QEMU
    // (which stops the guest at the end of its save).
    let image = match &vm {
        Guest::Sim(v) => if was_running { v.pause() } else { Ok(()) }
            .map(|()| (v.clone(), SnapshotBackend::Sim))
            .map_err(|e| format!("cannot pause VM {}: {e}", req.vm)),
        Guest::Qemu(q) => snap::qemu::capture(q, &attributes)
            .await
            .map(|c| {
                let c: Arc<dyn crate::backend::VmBackend> = Arc::new(c);
                (c, SnapshotBackend::Qemu)
            })
            .map_err(|e| format!("cannot save VM {}: {e}", req.vm)),
    };
    let (image, backend) = match image {
        Ok(v) => v,
        Err(why) => {
            if let Err(e) = host.snapshots.seen.settle_handover(&migration) {
                tracing::error!(%migration, "cannot forget a handover never pushed: {e}");
            }
            handback::give_back(host, &pending).await;
            return Err(error(CtlErrorKind::Internal, why));
        }
    };
    let pushed = snap::push::push(
        store,
        &creds.trust,
        snap::push::PushRequest {
            name: req.vm.clone(),
            attributes,
            vm: image,
            me: host.id.clone(),
            signer: Arc::new(creds.identity.clone()),
            keys: host.snapshots.sealing.clone(),
            recipients: vec![recipient],
            level: snap::push::DEFAULT_LEVEL,
            now_unix: now_unix(),
            ticket: Some(req.ticket.clone()),
            snapshot: Some(pending.snapshot),
            live: false,
            backend,
            journal: Some(host.snapshots.seen.clone()),
        },
    )
    .await;
    let pushed = match pushed {
        Ok(p) => p,
        Err(e) => {
            // The manifest may be up though the push failed (its answer
            // lost): the VM comes back only by our claim.
            let claim = handback::claim_back(host, store, &pending).await;
            let outcome = handback::conclude(
                host,
                &pending,
                claim,
                format!("the push failed ({e}); the VM runs here"),
            )
            .await;
            if let Outcome::InDoubt(why) = &outcome {
                handback::audit(host, &pending, &outcome);
                handback::spawn_settle(host, pending.clone(), Duration::from_secs(1));
                return Err(error(
                    CtlErrorKind::MigrationFailed,
                    format!("migrate --via of {}: {e}; and {why}", req.vm),
                ));
            }
            return Err(failed(&format!("migrate --via of {}", req.vm), &e));
        }
    };
    pending.manifest = Some(pushed.digest);
    if let Err(e) = host.snapshots.seen.hold_handover(&pending) {
        // The earlier record (without the digest) still holds the VM at a
        // restart; the digest is found again in the bucket then.
        tracing::warn!(%migration, "cannot record the manifest of a handover: {e}");
    }
    host.audit(AuditEvent::Snapshot {
        operation: "push".into(),
        operator: operator.to_string(),
        url: store.url().to_owned(),
        vm: Some(req.vm.clone()),
        object: pushed.object.clone(),
        digest: pushed.digest,
    });
    let h = Handover {
        migration,
        snapshot: pushed.snapshot,
        manifest: pushed.digest,
        source: &host.id,
        destination: &dest,
    };
    // Wait no longer than the destination may accept the ticket.
    let left = ticket
        .ticket
        .expires_at
        .saturating_add(host.config.clock_skew.as_secs())
        .saturating_sub(now_unix());
    let wait = Duration::from_secs(u64::from(wait_secs).min(left));
    let waited = Instant::now();
    let mut claim = None;
    let mut stopping = host.tcp_shutdown.subscribe();
    while claim.is_none() && waited.elapsed() < wait {
        tokio::select! {
            () = tokio::time::sleep(POLL.min(wait.saturating_sub(waited.elapsed()))) => {}
            () = cancel.notified() => break,
            // The agent stops without letting go of its VMs' helpers
            // first: the VM stays held and the record settles the
            // handover at the next start. (`wait_for`, not `changed`: a
            // stop sent before this handler subscribed counts too — it
            // kept the handler, and the agent's state, for the whole
            // wait.)
            _ = stopping.wait_for(|stop| *stop) => {
                return Err(error(
                    CtlErrorKind::Internal,
                    format!("the agent is stopping: migration {migration} is settled when it starts again"),
                ));
            }
        }
        match snap::handover::read(store, &creds.trust, &h).await {
            Ok(c) => claim = c,
            Err(e) => tracing::warn!(%migration, "handover claim: {e}"),
        }
    }
    let claim = match claim {
        Some(c) => Ok(Some(c)),
        None => handback::claim_back(host, store, &pending).await,
    };
    let outcome = handback::conclude(
        host,
        &pending,
        claim,
        format!(
            "{dest} did not claim the VM within {} s; it runs here",
            wait.as_secs()
        ),
    )
    .await;
    if let Outcome::InDoubt(_) = &outcome {
        handback::audit(host, &pending, &outcome);
        // Settled in the background from here on, as after a restart.
        handback::spawn_settle(host, pending.clone(), Duration::from_secs(1));
    }
    Ok(SnapshotResponse::Handed(Box::new(HandoverReport {
        migration,
        summary: snap::summary(
            &pushed.object,
            &pushed.manifest,
            pushed.layout,
            pushed.digest,
        ),
        uploaded: (pushed.uploaded, pushed.uploaded_bytes),
        outcome,
        push_ms: pushed.took.as_secs_f64() * 1e3,
        waited_ms: waited.elapsed().as_secs_f64() * 1e3,
    })))
}

/// The destination's check of a manifest's ticket: it must name this
/// agent as destination, the manifest's signer as source and its VM as
/// `subject` (what the snapshot holds; not used here before).
#[allow(clippy::result_large_err)]
pub(super) fn accept(
    host: &Arc<Host>,
    m: &convoy_protocol::snapshot::SnapshotManifest,
    t: &convoy_protocol::ticket::SignedTicket,
    subject: &convoy_protocol::vm::VmSubject,
) -> Result<convoy_protocol::ticket::VerifiedTicket, CtlResponse> {
    let refuse = |why: String| {
        host.audit(AuditEvent::Refused {
            migration: None,
            peer: m.source.to_string(),
            reason: format!("store-and-forward ticket of snapshot {}: {why}", m.snapshot),
        });
        error(CtlErrorKind::Unauthorized, why)
    };
    let id = postcard::from_bytes::<convoy_protocol::ticket::Ticket>(&t.body)
        .map_err(|e| refuse(format!("the ticket does not decode: {e}")))?
        .id;
    let v = host
        .authority()
        .at_destination(&m.source, &host.id, &m.vm, id, t)
        .map_err(|e| refuse(e.to_string()))?;
    // The ticket binds the VM as its source reported it: a snapshot of
    // another incarnation, or relabelled, is not what was authorized.
    if *subject != v.ticket.subject {
        return Err(refuse(format!(
            "the snapshot holds {subject}, the ticket was issued for {}",
            v.ticket.subject
        )));
    }
    host.audit(AuditEvent::TicketAccepted {
        migration: v.ticket.id,
        vm: m.vm.clone(),
        operator: v.signer.clone(),
        peer: m.source.clone(),
        role: "destination".into(),
    });
    Ok(v)
}

/// The destination's claim, once the VM is restored (paused): written, the
/// VM runs here (resumed unless it is to stay paused); lost, it never
/// runs here.
pub(super) async fn claim_started(
    host: &Arc<Host>,
    store: &SnapshotStore,
    h: &Handover<'_>,
    name: &convoy_protocol::names::VmName,
    vm: &Guest,
    paused: bool,
) -> Result<(), CtlResponse> {
    let creds = host.creds();
    let won = snap::handover::claim(
        store,
        &creds.trust,
        &creds.identity,
        &host.id,
        h,
        Verdict::Started,
        now_unix(),
    )
    .await;
    // Our own claim, written by an earlier try whose answer was lost, is
    // ours: the object store created it once.
    let won = match won {
        Ok(Some(c)) if c.verdict == Verdict::Started && c.by == host.id => Ok(None),
        other => other,
    };
    let outcome = match &won {
        Ok(None) => "started".to_string(),
        Ok(Some(c)) => format!("aborted: {:?} claimed first by {}", c.verdict, c.by),
        Err(e) => format!("failed: {e}"),
    };
    host.audit(AuditEvent::Outcome {
        migration: h.migration,
        vm: name.clone(),
        outcome,
    });
    match won {
        Ok(None) => {
            if !paused {
                vm.resume().await.map_err(|e| {
                    error(
                        CtlErrorKind::Internal,
                        format!("VM {name} was handed over but does not resume: {e}"),
                    )
                })?;
            }
            Ok(())
        }
        Ok(Some(c)) => Err(error(
            CtlErrorKind::MigrationFailed,
            format!(
                "{} claimed VM {name} first ({:?}): it runs there, not here",
                c.by, c.verdict
            ),
        )),
        Err(e) => Err(failed(&format!("the handover claim of {name}"), &e)),
    }
}
