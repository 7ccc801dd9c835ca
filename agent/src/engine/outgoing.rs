//! An outgoing migration, whatever the backend: the operator's request
//! checked (ticket, plan, policy), the VM claimed, the engine of its backend
//! run ([`crate::engine::native::source`] for sim VMs,
//! [`crate::engine::qemu::source`] for QEMU), the outcome audited.

use crate::engine::clock;
use std::sync::Arc;

use convoy_protocol::audit::AuditEvent;
use convoy_protocol::ctl::{MigrateRequest, MigrationReport, Outcome, Progress, VmState};
use convoy_protocol::journal::{JournalRecord, JournalRole, JournalStep};
use convoy_protocol::model::MigrationMode;
use convoy_protocol::names::{MigrationId, SpiffeId};
use tokio::sync::mpsc;

use crate::backend::VmBackend;
pub(crate) use crate::engine::error::MigrateError;
use crate::engine::error::OptionsError;
use crate::engine::native::source::Run;
use crate::engine::qemu::source as qemu_source;
use crate::host::journal::JournalChange;
use crate::host::{ActiveGuard, Host, VmHandle};
use crate::transport::ALPN_AGENT;
use crate::trust::policy::{Query, VmFacts};

/// Largest guest, in 4 KiB pages, that may switch to post-copy: 64 GiB,
/// whose owed-page bitmap fits a frame however dense.
const MAX_POSTCOPY_PAGES: u64 = 64 << 18;

/// Migrates `req.vm` to `req.to`, reporting progress on `progress`.
pub(crate) async fn migrate(
    host: Arc<Host>,
    req: MigrateRequest,
    caller: SpiffeId,
    progress: mpsc::Sender<Progress>,
) -> Result<MigrationReport, MigrateError> {
    if &req.to == host.id.name()
        && host
            .creds()
            .trust
            .federated_peer(convoy_protocol::names::Role::Agent, &req.to)
            .is_none()
    {
        return Err(MigrateError::SelfMigration);
    }
    if !host.audit_ok() {
        return Err(MigrateError::AuditUnavailable);
    }
    // Nothing is touched before the operator's ticket checks out.
    let ticket = match host.authority().at_source(&caller, &host.id, &req) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(operator = %caller, "migration refused: {e}");
            host.audit(AuditEvent::Refused {
                migration: None,
                peer: caller.to_string(),
                reason: e.to_string(),
            });
            return Err(e.into());
        }
    };
    let span = tracing::Span::current();
    span.record("migration", tracing::field::display(ticket.ticket.id));
    span.record("peer", tracing::field::display(&ticket.ticket.destination));
    // The plan is the ticket's: what the operator signed is what runs.
    let opts = &ticket.ticket.plan;
    opts.validate().map_err(OptionsError::Plan)?;
    // The destination is the one the operator signed for: its full SPIFFE
    // ID, in our trust domain or a federated one (checked in `at_source`).
    let dest_id = ticket.ticket.destination.clone();
    host.audit(AuditEvent::TicketAccepted {
        migration: ticket.ticket.id,
        vm: req.vm.clone(),
        operator: ticket.signer.clone(),
        peer: dest_id.clone(),
        role: "source".into(),
    });
    host.audit(AuditEvent::Ticket(req.ticket.clone()));
    // The VM the ticket was issued for, and the policy, before anything
    // is touched. Which incarnation of the VM they were decided on is
    // checked again when it is claimed.
    let (attributes, incarnation, subject) = host
        .vms()
        .get(&req.vm)
        .map(|e| (e.attributes.clone(), e.incarnation, e.subject()))
        .ok_or_else(|| MigrateError::NoSuchVm(req.vm.clone()))?;
    if let Some(here) = subject.filter(|s| *s != ticket.ticket.subject) {
        let e = MigrateError::WrongSubject {
            vm: req.vm.clone(),
            ticket: Box::new(ticket.ticket.subject.clone()),
            here: Box::new(here),
        };
        host.audit(AuditEvent::Refused {
            migration: Some(ticket.ticket.id),
            peer: caller.to_string(),
            reason: e.to_string(),
        });
        return Err(e);
    }
    let decision = host.decide(
        &Query::MigrateOut {
            operator: &ticket.signer,
            vm: VmFacts {
                name: &req.vm,
                attributes: &attributes,
            },
            source: &host.id,
            destination: &dest_id,
            ticket: &ticket,
        },
        Some(ticket.ticket.id),
    );
    if !decision.permitted {
        return Err(MigrateError::Forbidden(decision));
    }
    // With a registry, only the VM's registered owner moves it.
    if let Some(registry) = host.registry().map_err(MigrateError::Registry)? {
        registry
            .expect_owner(&req.vm, &host.id)
            .await
            .map_err(MigrateError::Registry)?;
    }
    let addr = match &req.to_addr {
        Some(a) => a.parse().map_err(|error| OptionsError::Address {
            input: a.clone(),
            error,
        })?,
        None => *host
            .config
            .peers
            .get(&req.to)
            .ok_or_else(|| MigrateError::UnknownPeer(req.to.clone()))?,
    };
    // Claim the VM: only a running VM may leave, and only once at a time.
    let cancel = Arc::new(tokio::sync::Notify::new());
    let claimed = {
        let mut vms = host.vms();
        let entry = vms
            .get_mut(&req.vm)
            .ok_or_else(|| MigrateError::NoSuchVm(req.vm.clone()))?;
        if entry.incarnation != incarnation {
            return Err(MigrateError::Replaced(req.vm.clone()));
        }
        let claimed = match (&entry.handle, entry.state) {
            (Some(VmHandle::Qemu(q)), VmState::Running) => {
                if opts.storage_postcopy {
                    return Err(OptionsError::StoragePostcopyQemu.into());
                }
                if opts.connections > 1 {
                    return Err(OptionsError::ConnectionsQemu.into());
                }
                let multifd = host
                    .config
                    .qemu
                    .as_ref()
                    .map(|c| c.multifd)
                    .unwrap_or_default();
                let prepared = qemu_source::prepare(q, &req, opts, multifd)?;
                Claimed::Qemu(q.clone(), Box::new(prepared))
            }
            (Some(VmHandle::Sim(vm)), VmState::Running) => {
                let disks = vm.disks().len();
                if opts.copy_storage && disks == 0 {
                    return Err(OptionsError::NoDisks(req.vm.clone()).into());
                }
                if disks > 0 && !opts.copy_storage {
                    return Err(OptionsError::DisksNeedCopyStorage {
                        vm: req.vm.clone(),
                        disks,
                    }
                    .into());
                }
                if disks > 0 && opts.mode == MigrationMode::Postcopy && !opts.storage_postcopy {
                    return Err(OptionsError::PostcopyDisksNeedStoragePostcopy.into());
                }
                // The owed bitmap travels in one frame: over the memory's
                // pages, or with storage post-copy over every leaf.
                let owed_leaves = if opts.storage_postcopy {
                    convoy_protocol::disk::check(vm.geometry(), &vm.disks()).unwrap_or(u64::MAX)
                } else {
                    vm.geometry().page_count()
                };
                if opts.mode != MigrationMode::Precopy && owed_leaves > MAX_POSTCOPY_PAGES {
                    return Err(OptionsError::TooLargeForPostcopy(MAX_POSTCOPY_PAGES >> 18).into());
                }
                // The source's Merkle tree over every page and disk block
                // shares the agent's bookkeeping limit with the incoming
                // migrations' trees.
                let leaves =
                    convoy_protocol::disk::check(vm.geometry(), &vm.disks()).unwrap_or(u64::MAX);
                let grant = host.bookkeeping.take_leaves(leaves)?;
                Claimed::Sim(vm.clone(), grant)
            }
            (_, s) => return Err(MigrateError::NotRunning(req.vm.clone(), s)),
        };
        entry.state = VmState::MigratingOut;
        entry.cancel = Some(cancel.clone());
        // Going back to the host that retained its image: offer the key
        // to that host only.
        let back = entry.reuse.clone().filter(|r| r.holder == dest_id);
        (claimed, back)
    };
    let (claimed, back) = claimed;
    let migration = ticket.ticket.id;
    // The claim is on disk before the destination hears of it.
    let claim = JournalRecord {
        // A restarted source asks the destination there.
        peer_addr: Some(addr.to_string()),
        ..JournalRecord::claimed(
            migration,
            convoy_protocol::receipt::ticket_digest(&req.ticket),
            dest_id.clone(),
            req.vm.clone(),
            Some(incarnation),
            crate::trust::authz::now_unix(),
        )
    };
    let claim = JournalChange::Claim(claim, Box::new(req.ticket.clone()));
    if let Err(e) = host.journal(claim).await {
        if let Some(entry) = host.vms().get_mut(&req.vm) {
            if entry.incarnation == incarnation {
                entry.state = VmState::Running;
                entry.cancel = None;
            }
        }
        let e = MigrateError::Journal(e);
        host.audit(AuditEvent::Refused {
            migration: Some(migration),
            peer: caller.to_string(),
            reason: e.to_string(),
        });
        return Err(e);
    }
    let _active = ActiveGuard::new(&host.active);
    let started = clock::now();
    let deadline = opts
        .deadline_ms
        .map(|ms| Deadline::arm(std::time::Duration::from_millis(ms.into()), cancel.clone()));
    tracing::info!(%migration, vm = %req.vm, to = %dest_id, "migration starting");
    let creds = host.creds();
    let conn = host
        .dialer
        .connect(
            addr,
            dest_id.clone(),
            ALPN_AGENT,
            &creds.identity,
            &creds.trust,
        )
        .await;
    let (vm, _bookkeeping) = match claimed {
        Claimed::Sim(vm, grant) => (vm, grant),
        Claimed::Qemu(qvm, prepared) => {
            let run = qemu_source::Run {
                host: host.clone(),
                vm: qvm,
                req: req.clone(),
                migration,
                dest: dest_id.clone(),
                addr,
                plan: opts.clone(),
                prepared: *prepared,
                progress,
                cancel,
                attributes,
                started,
            };
            let done = run.drive(conn).await;
            let report = Deadline::explain(deadline, done.report);
            return Ok(finish(&host, &req, opts.mode, migration, done.phases, report).await);
        }
    };

    // Retention where the VM leaves: the agent allows it and the VM opts in.
    let retain = match host.config.retain_images {
        Some(_) if attributes.retain_on_leave() => crate::host::retain::fresh_offer(),
        _ => None,
    };
    // A retained image holds memory only (disks travel by their own
    // rules: whole, or over a base the destination holds).
    let back = back.filter(|b| b.leaves.len() as u64 == vm.geometry().page_count());
    let mut run = Run {
        host: host.clone(),
        back,
        retain,
        vm: vm.clone(),
        req: req.clone(),
        plan: opts.clone(),
        migration,
        progress,
        counter_at_pause: None,
        control_bytes: 0,
        cancel,
        attributes,
        phases: Vec::new(),
        started,
        addr,
    };
    let report = match conn {
        Ok(conn) => run.drive(conn, dest_id.clone()).await,
        Err(e) => {
            host.set_state(&req.vm, VmState::Running);
            run.report_without_link(
                dest_id.clone(),
                started,
                format!("cannot reach {dest_id}: {e}"),
            )
        }
    };
    let phases = std::mem::take(&mut run.phases);
    let report = Deadline::explain(deadline, report);
    Ok(finish(&host, &req, opts.mode, migration, phases, report).await)
}

/// The plan's deadline: when it passes, a task cancels the migration as an
/// operator's abort does (which the engines refuse once the VM is handed
/// over), and the report then says why.
struct Deadline {
    after: std::time::Duration,
    passed: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Deadline {
    fn arm(after: std::time::Duration, cancel: Arc<tokio::sync::Notify>) -> Deadline {
        let passed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = passed.clone();
        let task = crate::engine::spawn(async move {
            tokio::time::sleep(after).await;
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            // A permit if the engine is not waiting at this instant.
            cancel.notify_one();
        });
        Deadline {
            after,
            passed,
            task,
        }
    }

    /// `report`, its outcome naming the deadline when the deadline
    /// aborted the migration.
    fn explain(deadline: Option<Deadline>, mut report: MigrationReport) -> MigrationReport {
        let Some(d) = deadline else { return report };
        if d.passed.load(std::sync::atomic::Ordering::SeqCst) {
            if let Outcome::Aborted(why) = &report.outcome {
                report.outcome = Outcome::Aborted(format!(
                    "the migration's deadline of {:.1} s passed before the handover ({why}); the \
                     VM runs at the source",
                    d.after.as_secs_f64()
                ));
            }
        }
        report
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The VM a migration claimed.
enum Claimed {
    /// A sim VM, with its tree's share of the bookkeeping limit.
    Sim(
        Arc<dyn VmBackend>,
        crate::host::bookkeeping::BookkeepingGrant,
    ),
    Qemu(
        Arc<crate::backend::qemu::vm::QemuVm>,
        Box<qemu_source::Prepared>,
    ),
}

/// Takes the source's post-copy migration `r` up again from the paused
/// copy here (see [`crate::engine::native::source::restart`]), in the
/// background, its end audited and journalled like any migration's:
/// what was done, or why it cannot be (the copy stays paused).
pub(crate) async fn take_up(
    host: &Arc<Host>,
    r: &JournalRecord,
    addr: std::net::SocketAddr,
) -> Result<String, String> {
    let prepared = crate::engine::native::source::restart::prepare(host, r, addr).await?;
    let what = prepared.what.clone();
    let host = host.clone();
    crate::engine::spawn(async move {
        let (mut run, report) = prepared.drive().await;
        let phases = std::mem::take(&mut run.phases);
        finish(
            &host,
            &run.req,
            run.plan.mode,
            run.migration,
            phases,
            report,
        )
        .await;
    });
    Ok(what)
}

/// Audits a finished migration (phases, receipts, outcome), then records
/// its outcome in the journal (the journal may forget a settled migration
/// only once the audit log has it).
async fn finish(
    host: &Arc<Host>,
    req: &MigrateRequest,
    mode: MigrationMode,
    migration: MigrationId,
    phases: Vec<(String, u64)>,
    report: MigrationReport,
) -> MigrationReport {
    if let Some(e) = host.vms().get_mut(&req.vm) {
        e.cancel = None;
    }
    tracing::info!(
        %migration,
        outcome = ?report.outcome,
        transport = report.transport.as_deref().unwrap_or("none"),
        "migration finished"
    );
    for (phase, after_ms) in phases {
        host.audit(AuditEvent::Phase {
            migration,
            vm: req.vm.clone(),
            phase,
            after_ms,
        });
    }
    for r in &report.receipts {
        host.audit(AuditEvent::Receipt(r.clone()));
    }
    host.audit(AuditEvent::Outcome {
        migration,
        vm: req.vm.clone(),
        outcome: report.outcome.to_string(),
    });
    let step = match &report.outcome {
        Outcome::Completed => JournalStep::Complete,
        Outcome::Aborted(_) => JournalStep::Abort,
        _ => JournalStep::Doubt,
    };
    let ended = JournalChange::Advance {
        migration,
        role: JournalRole::Source,
        step,
    };
    // A failure here leaves the record unfinished: kept, and reported at
    // the next start (the engine already logged it).
    let _ = host.journal(ended).await;
    // In doubt: ask the destination, now and again, until it is decided.
    if matches!(report.outcome, Outcome::InDoubt(_)) {
        crate::host::indoubt::watch(host.clone(), migration, std::time::Duration::from_secs(1));
    }
    if let Some(m) = &host.metrics {
        m.migrated(mode, &report);
    }
    host.record(report.clone());
    report
}
