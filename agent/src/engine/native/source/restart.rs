//! A post-copy migration taken up again by its source after the process
//! that switched it is gone (killed and restarted) or gave its link up
//! (past its recovery window), while the destination still waits for the
//! pages it lacks: the destination says so in a signed statement
//! ([`Verdict::AwaitsResume`](convoy_protocol::indoubt::Verdict)), and
//! `crate::host::indoubt` calls [`take_up`].
//!
//! Only sim VMs: their paused memory outlives the agent (its helper
//! process), and the Merkle tree is rebuilt from it. A QEMU source's
//! record of the broken channel (what it sent, for the prefix check) died
//! with the agent, so a QEMU migration stays paused on both sides.
//! (`crate::engine::outgoing::take_up` runs what [`prepare`] makes and
//! audits its end.)
//!
//! What the new source needs it finds in the journal (the record, the
//! operator's ticket kept beside the claim: the plan, the destination)
//! and in the paused VM (the leaves, the device state). It owes every
//! page and takes the destination's word for what it holds; the root
//! check at `Finish` covers that word
//! ([`Source::restarted_after_switch`]). The copy here stays paused and
//! is kept until `Started`, as in any post-copy migration; if the
//! migration ends in doubt again, the source asks again later.

use std::sync::Arc;

use convoy_protocol::ctl::MigrationReport;
use convoy_protocol::digest::{leaf_digest, Digest};
use convoy_protocol::journal::JournalRecord;
use convoy_protocol::model::MigrationMode;
use convoy_protocol::page::PageIndex;
use convoy_protocol::source::Source;
use tokio::sync::mpsc;

use super::driver::Driver;
use super::Run;
use crate::backend::VmBackend;
use crate::engine::clock;
use crate::host::{ActiveGuard, Host, VmHandle};

/// The source's post-copy migration, ready to be taken up again.
pub(crate) struct Prepared {
    run: Run,
    sm: Source,
    dest: convoy_protocol::names::SpiffeId,
    _grant: crate::host::bookkeeping::BookkeepingGrant,
    /// What was done, for the operator.
    pub(crate) what: String,
}

impl Prepared {
    /// Runs the migration to its end: the run (its request and phases)
    /// and the report.
    pub(crate) async fn drive(mut self) -> (Run, MigrationReport) {
        let host = self.run.host.clone();
        let _active = ActiveGuard::new(&host.active);
        self.run
            .phase("taken up again after the post-copy switch, from the paused copy here");
        let report = Driver::restarted(&mut self.run, self.sm, self.dest)
            .run()
            .await;
        (self.run, report)
    }
}

/// Prepares the source's post-copy migration `r` to be taken up again
/// from the paused copy here, with the destination at `addr` (the VM is
/// claimed for it); `Err` with why it cannot (the copy stays paused).
pub(crate) async fn prepare(
    host: &Arc<Host>,
    r: &JournalRecord,
    addr: std::net::SocketAddr,
) -> Result<Prepared, String> {
    let ticket = host
        .journal
        .ticket(r.migration)
        .map_err(|e| format!("the journal cannot be read: {e}"))?
        .ok_or("the journal kept no ticket for it")?;
    let creds = host.creds();
    let (t, _) = ticket
        // Within its window, now: the submitter's certificate may be
        // younger than the ticket's request.
        .open_at_claimed(&creds.trust, |t| {
            crate::trust::authz::now_unix().clamp(t.issued_at, t.expires_at.max(t.issued_at))
        })
        .map_err(|e| format!("the ticket the journal kept does not verify: {e}"))?;
    if t.id != r.migration
        || t.destination != r.peer
        || t.vm != r.vm
        || convoy_protocol::receipt::ticket_digest(&ticket) != r.ticket
    {
        return Err("the ticket the journal kept is not this migration's".into());
    }
    if t.plan.mode == MigrationMode::Precopy {
        return Err("not a post-copy migration".into());
    }
    if host.config.recovery_window.is_zero() {
        return Err("recovery is off here (--recovery-window 0)".into());
    }
    // Claimed for this migration: nobody else decides it meanwhile.
    let cancel = Arc::new(tokio::sync::Notify::new());
    let (vm, attributes) = claim(host, r, &cancel)?;
    let release = |why: String| {
        if let Some(e) = host.vms().get_mut(&r.vm) {
            e.cancel = None;
        }
        why
    };
    let leaves = convoy_protocol::disk::check(vm.geometry(), &vm.disks())
        .map_err(|e| release(format!("its disks: {e}")))?;
    let grant = host
        .bookkeeping
        .take_leaves(leaves)
        .map_err(|e| release(e.to_string()))?;
    let image = {
        let vm = vm.clone();
        tokio::task::spawn_blocking(move || image_leaves(vm.as_ref(), leaves))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .map_err(|e| release(format!("the paused copy cannot be read: {e}")))?
    };
    let device_state = vm
        .device_state()
        .map_err(|e| release(format!("its device state: {e}")))?;
    // Progress goes nowhere: no operator waits on this migration.
    let (progress, _) = mpsc::channel(1);
    let dest = t.destination.clone();
    let run = Run {
        host: host.clone(),
        vm: vm.clone(),
        req: convoy_protocol::ctl::MigrateRequest {
            vm: r.vm.clone(),
            to: dest.name().clone(),
            to_addr: Some(addr.to_string()),
            ticket,
        },
        plan: t.plan.clone(),
        migration: r.migration,
        progress,
        counter_at_pause: Some(vm.counter()),
        control_bytes: 0,
        cancel,
        attributes,
        phases: Vec::new(),
        started: clock::now(),
        back: None,
        retain: None,
        addr,
    };
    let cfg = run.config(&t.plan, &dest);
    let sm = Source::restarted_after_switch(cfg, &image, device_state, clock::now())
        .map_err(|e| release(e.to_string()))?;
    Ok(Prepared {
        run,
        sm,
        dest,
        _grant: grant,
        what: format!(
            "the destination waits for its pages: post-copy taken up again from the paused \
             copy here ({owed} owed)",
            owed = if t.plan.storage_postcopy {
                format!("{leaves} pages and disk blocks")
            } else {
                format!("{} pages", vm.geometry().page_count())
            }
        ),
    })
}

/// The sim VM of `r` here, paused and not being migrated, claimed for it.
fn claim(
    host: &Host,
    r: &JournalRecord,
    cancel: &Arc<tokio::sync::Notify>,
) -> Result<(Arc<dyn VmBackend>, convoy_protocol::vm::VmAttributes), String> {
    let mut vms = host.vms();
    let e = vms.get_mut(&r.vm).ok_or("the VM is not here")?;
    if r.incarnation.is_some_and(|i| i != e.incarnation) {
        return Err("another VM of that name is here now".into());
    }
    if e.cancel.is_some() {
        return Err("a migration of it runs here".into());
    }
    let vm = match &e.handle {
        Some(VmHandle::Sim(vm)) => vm.clone(),
        Some(VmHandle::Qemu(_)) => {
            return Err(
                "a QEMU guest: what this agent sent of its stream died with the process that \
                 sent it, so its post-copy cannot be taken up again"
                    .into(),
            )
        }
        Some(VmHandle::Lost(l)) => return Err(format!("the VM here is lost: {}", l.reason)),
        None => return Err("no copy of the VM is here".into()),
    };
    if vm.is_running() {
        return Err("the copy here runs".into());
    }
    e.cancel = Some(cancel.clone());
    Ok((vm, e.attributes.clone()))
}

/// The leaf digests of the paused image: every memory page, then every
/// disk block.
fn image_leaves(vm: &dyn VmBackend, leaves: u64) -> Result<Vec<Digest>, String> {
    let mut buf = vec![0u8; vm.geometry().page_size().bytes()];
    let mut out = Vec::with_capacity(usize::try_from(leaves).map_err(|e| e.to_string())?);
    for i in 0..leaves {
        vm.read_leaf(PageIndex(i), &mut buf)
            .map_err(|e| e.to_string())?;
        out.push(leaf_digest(&buf));
    }
    Ok(out)
}
