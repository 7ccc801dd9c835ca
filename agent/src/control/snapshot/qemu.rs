//! `snapshot push` and `snapshot pull` of QEMU VMs ([`crate::snapshot::qemu`]):
//! the same policy questions, records, audit and reports as for sim VMs
//! (asked and made by the parent module); here the VM is taken out of,
//! or put into, the registry around QEMU.

use std::sync::Arc;
use std::time::Instant;

use convoy_protocol::ctl::{CtlErrorKind, CtlResponse, VmState};
use convoy_protocol::names::{SpiffeId, VmName};
use convoy_protocol::snapshot::{SealingKeyStatement, SnapshotBackend};

use super::super::hold::{failed, release, Claimed, Guest};
use super::super::{error, vm};
use super::{finish_kept, pull_done, pushed, PullDone};
use crate::host::{Host, VmHandle};
use crate::snapshot::{self as snap, SnapshotStore};
use crate::trust::authz::now_unix;
use convoy_protocol::ctl::snapshot::SnapshotResponse;

/// Pushes QEMU VM `name` (the policy has permitted it; `recipients` are
/// checked): QEMU saves it while it runs, the stream and disks are sealed
/// and uploaded, then the guest runs on (as soon as QEMU's save is done
/// for a VM without disks; once its disks are read otherwise).
#[allow(clippy::too_many_arguments)]
pub(super) async fn push(
    host: &Arc<Host>,
    store: &SnapshotStore,
    name: VmName,
    attributes: convoy_protocol::vm::VmAttributes,
    recipients: Vec<SealingKeyStatement>,
    operator: &SpiffeId,
    claimed: Claimed,
    qvm: Arc<crate::backend::qemu::vm::QemuVm>,
) -> Result<SnapshotResponse, CtlResponse> {
    let Claimed {
        vm: guest,
        was_running,
        cancel,
        ..
    } = claimed;
    let creds = host.creds();
    let (mut stopped_at, mut resumed_at) = (None, None);
    let work = async {
        let captured = snap::qemu::capture(&qvm, &attributes).await?;
        let (saved, downtime) = captured.saved;
        // QEMU stopped the guest at the end of its save.
        stopped_at = Some(
            Instant::now()
                .checked_sub(std::time::Duration::from_millis(downtime.unwrap_or(0)))
                .unwrap_or_else(Instant::now),
        );
        if was_running && qvm.spec.disks.is_empty() {
            // Nothing of the guest is read after the save.
            resume(&guest, &name).await;
            resumed_at = Some(Instant::now());
        }
        let req = snap::push::PushRequest {
            name: name.clone(),
            attributes: attributes.clone(),
            vm: Arc::new(captured),
            me: host.id.clone(),
            signer: Arc::new(creds.identity.clone()),
            keys: host.snapshots.sealing.clone(),
            recipients,
            level: snap::push::DEFAULT_LEVEL,
            now_unix: now_unix(),
            ticket: None,
            snapshot: None,
            live: false,
            backend: SnapshotBackend::Qemu,
            journal: Some(host.snapshots.seen.clone()),
        };
        snap::push::push(store, &creds.trust, req)
            .await
            .map(|r| (r, saved))
    };
    let pushed_r = tokio::select! {
        r = work => Some(r),
        () = cancel.notified() => None,
    };
    let paused_ms = match (was_running, stopped_at) {
        (true, Some(t)) => {
            resumed_at
                .unwrap_or_else(Instant::now)
                .saturating_duration_since(t)
                .as_secs_f64()
                * 1e3
        }
        _ => 0.0,
    };
    if was_running {
        resume(&guest, &name).await;
    }
    release(
        host,
        &name,
        if was_running {
            VmState::Running
        } else {
            VmState::Paused
        },
    );
    let (mut r, saved) = match pushed_r {
        None => {
            let _ = qvm.execute("migrate_cancel", None).await;
            return Err(error(
                CtlErrorKind::MigrationFailed,
                format!("snapshot push of {name} aborted; the VM runs here"),
            ));
        }
        Some(Err(e)) => return Err(failed(&format!("snapshot push of {name}"), &e)),
        Some(Ok(r)) => r,
    };
    // The whole push, QEMU's save included.
    r.took += saved;
    Ok(pushed(host, store, operator, name, &r, paused_ms))
}

/// Runs a guest QEMU stopped at the end of a save; a failure is logged
/// (the VM is then listed running but does not run: the operator sees
/// it in the log and can resume it).
async fn resume(guest: &super::super::hold::Guest, name: &VmName) {
    if let Err(e) = guest.resume().await {
        tracing::error!(vm = %name, "cannot resume after a snapshot push: {e}");
    }
}

/// The VM QEMU snapshot `found` holds, as a ticket names it (its sealed
/// state opened and checked).
#[allow(clippy::result_large_err)]
pub(super) fn subject(
    host: &Arc<Host>,
    found: &snap::Found,
) -> Result<convoy_protocol::vm::VmSubject, CtlResponse> {
    let image = snap::qemu::image_of(found, &host.id, &host.snapshots.sealing)
        .map_err(|e| failed("snapshot pull", &e))?;
    Ok(image.subject(&found.manifest))
}

/// Restores the QEMU snapshot `found` (the policy permitted it; `seen` is
/// the newest generation this agent saw of its lineage).
/// With `ticket`, a store-and-forward migration: restored paused, started
/// only once the destination's claim is written (as for a sim VM).
pub(super) async fn pull(
    host: &Arc<Host>,
    store: &SnapshotStore,
    found: snap::Found,
    seen: Option<(u64, convoy_protocol::digest::Digest)>,
    paused: bool,
    ticket: Option<&convoy_protocol::ticket::VerifiedTicket>,
    operator: &SpiffeId,
) -> Result<SnapshotResponse, CtlResponse> {
    let started = Instant::now();
    let Some(cfg) = host.config.qemu.clone() else {
        return Err(error(
            CtlErrorKind::BadRequest,
            "this agent has no QEMU backend (start it with --qemu-binary and --image-dir)",
        ));
    };
    let o = snap::qemu::open(found, &host.id, &host.snapshots.sealing, seen)
        .map_err(|e| failed("snapshot pull", &e))?;
    let name = o.found.manifest.vm.clone();
    // The agent's own limits (binary, sizes, kernel and initrd in its
    // image directory) before anything is reserved; the disks are made by
    // the restore, never over an existing file.
    let mut probe = o.image.definition.clone();
    probe.disks.clear();
    if let Err(e) = cfg.resolve(&probe) {
        return Err(error(
            CtlErrorKind::BadRequest,
            format!("snapshot pull of {name}: the VM's definition: {e}"),
        ));
    }
    if let Some(r) = vm::reserve_error(host, &name, o.image.definition.memory_mib << 20) {
        return Err(r);
    }

    let (object, manifest, layout, digest) = (
        o.found.object.clone(),
        o.found.manifest.clone(),
        o.found.layout,
        o.found.digest,
    );
    let partial = super::kept(host, digest, manifest.stored().1, layout).await;
    let restored = snap::qemu::restore(
        store,
        o,
        &cfg,
        host.config.disk_capacity_bytes,
        partial.clone(),
    )
    .await;
    let restored = match restored {
        Ok(r) => r,
        Err(e) => {
            host.remove(&name);
            return Err(failed(&format!("snapshot pull of {name}"), &e));
        }
    };
    let qvm = restored.vm.clone();
    let discard = |why: CtlResponse| {
        let (host, qvm) = (host.clone(), qvm.clone());
        async move {
            host.remove(&qvm.definition.name);
            qvm.kill().await;
            remove_disks(&qvm);
            vm::unclaim(&host, &qvm.definition.name).await;
            Err(why)
        }
    };
    // Recorded before the VM is: a later pull of an older generation is
    // refused even if the agent stops right after this one.
    if let Err(e) = host
        .snapshots
        .seen
        .record(&manifest.lineage, manifest.generation, &digest)
    {
        return discard(error(
            CtlErrorKind::Internal,
            format!("the snapshot record cannot be written ({e}); VM {name} not started"),
        ))
        .await;
    }
    // With a registry, the VM is this agent's (the name free, or already
    // its own) before it may run here.
    if let Some(r) = vm::claim(host, &name, &manifest.attributes, "restored").await {
        return discard(r).await;
    }
    let guest = Guest::Qemu(qvm.clone());
    if let Some(v) = ticket {
        // Started (unless to stay paused) only once the claim is ours.
        let h = convoy_protocol::snapshot::claim::Handover {
            migration: v.ticket.id,
            snapshot: manifest.snapshot,
            manifest: digest,
            source: &manifest.source,
            destination: &host.id,
        };
        if let Err(why) =
            super::super::via::claim_started(host, store, &h, &name, &guest, paused).await
        {
            return discard(why).await;
        }
    } else if !paused {
        if let Err(e) = guest.resume().await {
            return discard(error(
                CtlErrorKind::Internal,
                format!("VM {name} was restored but does not start: {e}"),
            ))
            .await;
        }
    }
    let state = if paused {
        VmState::Paused
    } else {
        VmState::Running
    };
    if let Err(r) = vm::register(
        host,
        &name,
        VmHandle::Qemu(qvm.clone()),
        state,
        &manifest.attributes,
    )
    .await
    {
        // Its QEMU is stopped by `register`; the disks this pull made go
        // too, as on every other failure.
        remove_disks(&qvm);
        vm::unclaim(host, &name).await;
        return Err(r);
    }
    crate::host::watch_qemu(host, &name, &qvm);
    tracing::info!(
        vm = %name,
        "restored from {object}: chunks in {:?}, QEMU loaded its state in {:?}",
        restored.chunks_took,
        restored.load_took
    );
    finish_kept(partial).await;
    pull_done(
        host,
        store,
        operator,
        &PullDone {
            object: &object,
            manifest: &manifest,
            layout,
            digest,
            fetched: restored.fetched,
            chunks_took: restored.chunks_took,
            took: started.elapsed(),
        },
    )
}

/// Removes the disks a pull made for `qvm` (its QEMU stopped).
fn remove_disks(qvm: &crate::backend::qemu::vm::QemuVm) {
    for d in &qvm.spec.disks {
        let _ = std::fs::remove_file(d);
    }
}
