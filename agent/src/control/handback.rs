//! The source's end of a store-and-forward handover once the push is up:
//! claiming the VM back, applying whichever claim won, and — after a
//! restart — settling the handovers a killed or stopped source left
//! unsettled ([`crate::snapshot::pending`]): their VMs are held in doubt
//! until one claim decides where they run.

use std::sync::{Arc, Weak};
use std::time::Duration;

use convoy_protocol::audit::AuditEvent;
use convoy_protocol::ctl::{Outcome, RecoveryDecision, RecoveryReport, VmState};
use convoy_protocol::digest::Digest;
use convoy_protocol::names::{SpiffeId, VmName};
use convoy_protocol::signed::ChainVerifier;
use convoy_protocol::snapshot::claim::{Claim, Handover, Verdict};
use convoy_protocol::snapshot::SnapshotId;

use super::hold::{release, Guest};
use crate::host::{Host, VmHandle};
use crate::snapshot::pending::PendingHandover;
use crate::snapshot::{self as snap, SnapshotError, SnapshotStore};
use crate::trust::authz::now_unix;

/// The longest pause between two tries of a handover the store cannot
/// settle.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Claims `p`'s VM back unless the destination's claim is there first:
/// `Ok(None)` when ours was written, `Ok(Some(c))` with the claim that
/// was there (checked).
pub(super) async fn claim_back(
    host: &Arc<Host>,
    store: &SnapshotStore,
    p: &PendingHandover,
) -> Result<Option<Claim>, SnapshotError> {
    let creds = host.creds();
    let known = match p.manifest {
        Some(d) => Some(d),
        None => manifest_of(store, &creds.trust, &host.id, &p.snapshot).await?,
    };
    let h = Handover {
        migration: p.migration,
        snapshot: p.snapshot,
        manifest: known.unwrap_or(Digest([0; 32])),
        source: &host.id,
        destination: &p.destination,
    };
    let claimed = snap::handover::claim(
        store,
        &creds.trust,
        &creds.identity,
        &host.id,
        &h,
        Verdict::Aborted,
        now_unix(),
    )
    .await;
    match claimed {
        // Ours lost to a claim on a manifest we no longer know (gone from
        // the bucket since): the winner, bound by everything else.
        Err(SnapshotError::Claim { object, .. }) if known.is_none() => {
            snap::handover::read_any_manifest(store, &creds.trust, &h)
                .await?
                .map(Some)
                .ok_or_else(|| SnapshotError::Claim {
                    object,
                    why: "the claim that was there first cannot be read (still being written, or removed)"
                        .into(),
                })
        }
        other => other,
    }
}

/// The digest of snapshot `id`'s manifest when the bucket holds it, signed
/// by `me` (a push cut after its manifest went up), else `None`: no
/// destination can claim a snapshot it cannot read, and our claim under
/// zeros then keeps a manifest that lands late from ever being claimed.
async fn manifest_of(
    store: &SnapshotStore,
    verifier: &(dyn ChainVerifier + Sync),
    me: &SpiffeId,
    id: &SnapshotId,
) -> Result<Option<Digest>, SnapshotError> {
    for object in snap::manifest_objects(store).await? {
        if snap::holds_snapshot(&object, id) {
            let f = snap::read_manifest(store, &object, verifier).await?;
            if f.manifest.source == *me {
                return Ok(Some(f.digest));
            }
        }
    }
    Ok(None)
}

/// Whether `p`'s VM is here: the same incarnation, with its guest.
fn held_here(host: &Host, p: &PendingHandover) -> bool {
    host.vms().get(&p.vm).is_some_and(|e| {
        e.incarnation == p.incarnation
            && matches!(e.handle, Some(VmHandle::Sim(_) | VmHandle::Qemu(_)))
    })
}

/// Records `outcome` of handover `p` in the audit log.
pub(super) fn audit(host: &Host, p: &PendingHandover, outcome: &Outcome) {
    host.audit(AuditEvent::Outcome {
        migration: p.migration,
        vm: p.vm.clone(),
        outcome: outcome.to_string(),
    });
}

/// Applies the claim that decided `p` (audited when decided): the destination's
/// `Started` removes the VM here; ours (or our earlier `Aborted`) gives it
/// back, resumed if it ran before (`back`: why, for the outcome); an
/// error holds it in doubt, paused, and keeps the record for another try.
pub(super) async fn conclude(
    host: &Arc<Host>,
    p: &PendingHandover,
    claim: Result<Option<Claim>, SnapshotError>,
    back: String,
) -> Outcome {
    // Only this VM, never another one re-created under its name.
    let ours = held_here(host, p);
    let outcome = match claim {
        Ok(Some(c)) if c.verdict == Verdict::Started => {
            if ours {
                if let Some(e) = host.remove(&p.vm) {
                    if let Some(h) = e.handle {
                        h.destroy().await;
                    }
                }
            }
            Outcome::Completed
        }
        Ok(_) => {
            if ours {
                give_back(host, p).await;
            }
            Outcome::Aborted(back)
        }
        Err(e) => {
            if ours {
                hold_in_doubt(host, p);
            }
            Outcome::InDoubt(format!(
                "the handover claim cannot be settled ({e}); the VM stays paused here"
            ))
        }
    };
    if !matches!(outcome, Outcome::InDoubt(_)) {
        audit(host, p, &outcome);
        // Failing here only means the next start claims again and reads
        // the same winner.
        if let Err(e) = host.snapshots.seen.settle_handover(&p.migration) {
            tracing::error!(migration = %p.migration, "cannot forget a settled handover: {e}");
        }
    }
    outcome
}

/// The VM back here: resumed if it ran before the handover (a QEMU VM
/// stopped by its save runs again).
pub(super) async fn give_back(host: &Arc<Host>, p: &PendingHandover) {
    let guest = Guest::of(host.vms().get(&p.vm).and_then(|e| e.handle.as_ref()));
    let resumed = match guest {
        Some(g) if p.was_running => match g.resume().await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(vm = %p.vm, "claimed back but does not resume: {e}");
                false
            }
        },
        _ => false,
    };
    release(
        host,
        &p.vm,
        if resumed {
            VmState::Running
        } else {
            VmState::Paused
        },
    );
}

/// Held: in doubt, so that nothing (resume, push, migration) acts on it
/// until a claim decides.
fn hold_in_doubt(host: &Host, p: &PendingHandover) {
    let mut vms = host.vms();
    if let Some(e) = vms.get_mut(&p.vm) {
        e.state = VmState::InDoubt;
        e.cancel = None;
    }
}

/// At start: each handover a previous run left unsettled holds its VM in
/// doubt and is settled in the background — the VM claimed back unless
/// the destination's claim is there first — tried again, with growing
/// pauses, while the store cannot say.
pub(crate) fn at_start(host: &Arc<Host>) {
    let pending = match host.snapshots.seen.pending_handovers() {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("the unsettled handovers cannot be read: {e}");
            return;
        }
    };
    for p in pending {
        if !held_here(host, &p) {
            // Its guest is gone (with the host, or deleted): there is
            // nothing here to claim back, and the snapshot in the bucket
            // is its one copy — the destination's to claim.
            let outcome = Outcome::Aborted(format!(
                "VM {} (incarnation {}) is no longer here; the handover is left to {}",
                p.vm, p.incarnation, p.destination
            ));
            tracing::warn!(migration = %p.migration, "{outcome:?}");
            audit(host, &p, &outcome);
            if let Err(e) = host.snapshots.seen.settle_handover(&p.migration) {
                tracing::error!(migration = %p.migration, "cannot forget a handover: {e}");
            }
            continue;
        }
        tracing::warn!(migration = %p.migration, vm = %p.vm, url = %p.url,
            "store-and-forward handover left unsettled by the last run: settling it");
        hold_in_doubt(host, &p);
        spawn_settle(host, p, Duration::ZERO);
    }
}

/// Settles `p` in the background, after `first`, tried again with growing
/// pauses while the store cannot say (the VM held in doubt meanwhile).
pub(super) fn spawn_settle(host: &Arc<Host>, p: PendingHandover, first: Duration) {
    let weak = Arc::downgrade(host);
    host.watchers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .spawn(settle(weak, p, first));
}

async fn settle(weak: Weak<Host>, p: PendingHandover, first: Duration) {
    let mut pause = first;
    let mut audited = false;
    loop {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).clamp(Duration::from_secs(1), RETRY_MAX);
        let Some(host) = weak.upgrade() else {
            return;
        };
        // One at a time with `convoyctl recover`, which may have settled
        // it meanwhile.
        let _one = host.resolving.lock().await;
        if !still_pending(&host, &p) {
            return;
        }
        let claim = match host.config.snapshot_profiles.open(&p.url) {
            Ok(store) => claim_back(&host, &store, &p).await,
            Err(e) => Err(e.into()),
        };
        let outcome = conclude(
            &host,
            &p,
            claim,
            "the source settled the handover without the destination's claim; the VM runs here"
                .into(),
        )
        .await;
        if !matches!(outcome, Outcome::InDoubt(_)) {
            return;
        }
        // Audited once, and again when decided (errors differ at every
        // try: retry counts, request ids).
        if !audited {
            audit(&host, &p, &outcome);
            audited = true;
        }
    }
}

/// Whether handover `p` is still recorded unsettled (an unreadable record
/// counts as pending: nothing is done on a guess).
fn still_pending(host: &Host, p: &PendingHandover) -> bool {
    host.snapshots
        .seen
        .pending_handovers()
        .map_or(true, |all| all.iter().any(|o| o.migration == p.migration))
}

/// `convoyctl recover` for the store-and-forward handovers this agent
/// holds as their source (of `vm`, or all; `may` is the policy): each is
/// settled now by its claim — the VM back here if ours is written, gone
/// if the destination's is — or reported as staying paused with why. One
/// whose `migrate --via` still waits is left to it. With `force`, a
/// handover the store cannot settle (its URL unreachable, its credentials
/// gone) resumes the VM here without a claim, on the operator's word
/// (audited): the destination may have restored it before the store went.
pub(super) async fn recover(
    host: &Arc<Host>,
    vm: Option<&VmName>,
    force: bool,
    may: impl Fn(&VmName) -> Result<(), String>,
) -> Result<Vec<RecoveryReport>, String> {
    let _one = host.resolving.lock().await;
    let pending = host
        .snapshots
        .seen
        .pending_handovers()
        .map_err(|e| format!("the unsettled handovers cannot be read: {e}"))?;
    let mut out = Vec::new();
    for p in pending {
        if vm.is_some_and(|v| *v != p.vm) {
            continue;
        }
        let report = |decision, reason: String| RecoveryReport {
            migration: p.migration,
            vm: p.vm.clone(),
            role: "source".into(),
            peer: p.destination.to_string(),
            phase: format!("store-and-forward handover via {}", p.url),
            decision,
            reason,
        };
        if let Err(why) = may(&p.vm) {
            out.push(report(RecoveryDecision::StaysPaused, why));
            continue;
        }
        if host.vms().get(&p.vm).is_some_and(|e| e.cancel.is_some()) {
            out.push(report(
                RecoveryDecision::StaysPaused,
                "its migrate --via waits for the claim (convoyctl abort ends the wait)".into(),
            ));
            continue;
        }
        let claim = match host.config.snapshot_profiles.open(&p.url) {
            Ok(store) => claim_back(host, &store, &p).await,
            Err(e) => Err(e.into()),
        };
        let (decision, reason) = match claim {
            Err(e) if force => {
                let why = format!(
                    "forced by the operator without a claim ({e}); the destination may \
                     have restored it"
                );
                if held_here(host, &p) {
                    give_back(host, &p).await;
                }
                let outcome = Outcome::Aborted(why.clone());
                audit(host, &p, &outcome);
                if let Err(e) = host.snapshots.seen.settle_handover(&p.migration) {
                    tracing::error!(migration = %p.migration, "cannot forget a handover: {e}");
                }
                (RecoveryDecision::ResumedHere, why)
            }
            claim => match conclude(host, &p, claim, "claimed back by recover".into()).await {
                Outcome::Completed => (
                    RecoveryDecision::DiscardedHere,
                    format!("{} claimed it: it runs there", p.destination),
                ),
                Outcome::Aborted(why) => (RecoveryDecision::ResumedHere, why),
                other => (RecoveryDecision::StaysPaused, other.to_string()),
            },
        };
        out.push(report(decision, reason));
    }
    Ok(out)
}
