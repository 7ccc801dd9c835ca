//! What a starting agent does with the VMs its registry ([`super::vmdb`])
//! holds, and with what an agent before it left behind — before it
//! serves anyone. Every outcome is logged and audited
//! (`AuditEvent::VmAtStart`); nothing is dropped silently.
//!
//! - **A QEMU VM** is found again and adopted ([`QemuVm::reattach`]): the
//!   process with the recorded pid *and* start time, the same executable
//!   and command line, serving the recorded QMP socket (the kernel names
//!   who accepts there), running the same VM (memory, vCPUs, accelerator,
//!   exactly its disks). Its state comes from what was recorded and QEMU's
//!   run status ([`reattached_state`]); nothing is resumed.
//! - A QEMU that is **gone** (exited, its pid another process's now, the
//!   host rebooted) is reported and its record removed, with its runtime
//!   directory.
//! - A QEMU that runs but **cannot be verified** (QMP does not answer, it
//!   differs), or an agent now started without a QEMU backend: listed as
//!   lost ([`super::LostVm`]), tried again at the next start; deleting it
//!   kills the process if it still runs as recorded.
//! - **A sim VM** whose vCPU ran in a helper process is found again
//!   ([`SimVm::reattach`]): the recorded process (pid, start time, boot,
//!   command line), its memfd reopened and checked against the record.
//!   Its state is its own pause flag read as QEMU's run status is. A
//!   helper that is gone is reported and the record removed with its
//!   disks (its memory went with it); one that differs is listed as lost.
//!   A sim VM whose vCPU ran on an agent thread (an agent that could not
//!   start its helper) died with that agent: listed as lost, its disks
//!   kept until it is deleted.
//! - **A place still reserved**: a VM being created that was never
//!   reported created, or the staging of an incoming migration that never
//!   committed. Discarded: its record goes, a sim staging's disk directory
//!   is removed, and a QEMU launched for it is residue.
//! - **Residue**: a runtime directory no VM holds. The QEMU serving its
//!   QMP socket ([`Residue::behind_socket`]) is killed; if its launch
//!   record (the command line kept in the directory, read even once QEMU
//!   has exited) says it was a destination (`-incoming`), the disks it
//!   names in the image directory are removed (a destination creates every
//!   disk it receives; it never opens an existing one); the directory is
//!   removed.
//!
//! # The journal's seam
//!
//! Whether an incoming migration committed is decided here by the
//! registry alone ([`plan`]): a destination VM is recorded as the agent's
//! once it started it (`Guest::Qemu`, written before `Started` is sent);
//! until then its place is `Reserved` and the staging is discarded — even
//! when the journal says the handover came (an agent killed between its
//! record of the handover and its start). That is safe because the
//! journal is consulted next ([`super::indoubt::at_start`]): a handed-over
//! migration with no copy here is *fenced*, so the source, which keeps its
//! whole paused copy until `Started`, resumes it; the VM runs once. (A
//! QEMU post-copy guest continued here in that window loses the run it had
//! since the switch, and its source may refuse to continue after a
//! post-copy switch: then both stay paused, reported.)

use std::path::{Path, PathBuf};
use std::sync::Arc;

use convoy_protocol::audit::AuditEvent;
use convoy_protocol::ctl::VmState;
use convoy_protocol::names::VmName;

use super::vmdb::{Guest, Loaded, VmRecord};
use super::{Host, LostVm, VmEntry, VmHandle};
use crate::backend::qemu::identity::{drive_files, is_incoming, split_cmdline};
use crate::backend::qemu::process::LAUNCHED;
use crate::backend::qemu::residue::Residue;
use crate::backend::qemu::vm::{QemuConfig, QemuVm, QemuVmRecord};
use crate::backend::sim::{SimVm, VcpuRecord};
use crate::backend::{BackendError, VcpuError, VmBackend};

/// What to do with a record at start, decided before anything is touched.
#[derive(Debug, Clone, PartialEq)]
enum Plan {
    /// Find the QEMU again and adopt it.
    Reattach(Box<QemuVmRecord>),
    /// Find the sim VM's vCPU helper again and map its memory.
    ReattachSim(Box<VcpuRecord>),
    /// List the VM as lost, for this reason.
    Lost(String),
    /// Drop the record: a place that never held a VM that ran here.
    Discard,
}

/// The decision for one record (see the journal's seam in the module
/// docs).
fn plan(rec: &VmRecord, qemu: Option<&QemuConfig>) -> Plan {
    let q = match &rec.guest {
        Guest::Reserved => return Plan::Discard,
        Guest::Sim { vcpu: Some(v), .. } => return Plan::ReattachSim(Box::new(v.clone())),
        Guest::Sim { vcpu: None, .. } => {
            return Plan::Lost(
                "a sim VM: its memory and workload lived in the agent process that ended".into(),
            )
        }
        Guest::Lost {
            qemu: None, reason, ..
        } => return Plan::Lost(reason.clone()),
        Guest::Qemu(q) | Guest::Lost { qemu: Some(q), .. } => q,
    };
    let Some(cfg) = qemu else {
        return Plan::Lost(
            "this agent now runs without a QEMU backend (--qemu-binary, --image-dir); \
             it is looked for again at the next start"
                .into(),
        );
    };
    let canonical = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_owned());
    if !cfg
        .binaries
        .iter()
        .any(|b| canonical(b) == canonical(&q.spec.binary))
    {
        return Plan::Lost(format!(
            "its QEMU binary {} is no longer one this agent allows",
            q.spec.binary.display()
        ));
    }
    Plan::Reattach(Box::new(q.clone()))
}

/// The state a re-attached QEMU VM is listed in, from what the registry
/// recorded (`recorded`, and whether an outgoing migration had claimed it)
/// and QEMU's run status now. Never a state that lets the guest run where
/// it might also run elsewhere: a VM that may have been handed over, or
/// arrived by post-copy and lost its source, is in doubt, paused as it is.
pub(crate) fn reattached_state(recorded: VmState, migrating: bool, status: &str) -> VmState {
    match (recorded, status) {
        // Only the evidence (or the journal) settles a doubt.
        (VmState::InDoubt, _) => VmState::InDoubt,
        // Arrived by post-copy with pages still owed: its source link
        // died with the agent.
        (VmState::PostcopyIn | VmState::Recovering, _) => VmState::InDoubt,
        // QEMU still runs the guest: no migration of it can have ended
        // (QEMU stops a source guest for its last copy), so it is ours.
        (_, "running") => VmState::Running,
        // Paused, and no migration had it: an operator's pause.
        (_, "paused") if !migrating => VmState::Paused,
        // Paused by its operator, then saved by a snapshot push (QEMU's
        // save leaves it `postmigrate`), no migration had it: still the
        // operator's pause. (A store-and-forward handover of it is held in
        // doubt by its own record at start, `control::handback`.)
        (VmState::Paused, "postmigrate") if !migrating => VmState::Paused,
        // Stopped by a migration (its final copy, `postmigrate` once
        // QEMU's stream ended, a post-copy source) or by QEMU itself: the
        // handover may have happened.
        _ => VmState::InDoubt,
    }
}

/// Re-attaches, lists as lost or discards every record `loaded` holds,
/// then removes the residue in the QEMU runtime directory. Called once,
/// before the agent serves anyone.
pub(crate) async fn restore(host: &Arc<Host>, loaded: Loaded) {
    for (key, why) in loaded.unreadable {
        let reason = format!("VM registry record {key:?} cannot be read, left as it is: {why}");
        tracing::error!("{reason}");
        host.audit(AuditEvent::Refused {
            migration: None,
            peer: "VM registry".into(),
            reason,
        });
    }
    let mut entries = Vec::new();
    for rec in loaded.records {
        let name = rec.name.clone();
        match plan(&rec, host.config.qemu.as_ref()) {
            Plan::Reattach(q) => {
                if let Some(e) = reattach(host, rec, *q).await {
                    entries.push((name, e));
                }
            }
            Plan::ReattachSim(v) => {
                if let Some(e) = reattach_sim(host, rec, *v) {
                    entries.push((name, e));
                }
            }
            Plan::Lost(reason) => {
                let entry = lost(rec, reason.clone(), None);
                report(host, &name, format!("lost: {reason}"));
                entries.push((name, entry));
            }
            Plan::Discard => discard(host, &rec),
        }
    }
    // Each QEMU watched once its entry is in (an exit marks the entry).
    let watched: Vec<(VmName, Arc<QemuVm>)> = entries
        .iter()
        .filter_map(|(n, e)| match &e.handle {
            Some(VmHandle::Qemu(q)) => Some((n.clone(), q.clone())),
            _ => None,
        })
        .collect();
    // One write: the entries found, the records discarded gone.
    host.vms().extend(entries);
    for (name, vm) in watched {
        crate::host::watch_qemu(host, &name, &vm);
    }
    sweep(host).await;
}

/// Logs (as a warning) and audits what became of `vm`.
fn report(host: &Host, vm: &VmName, outcome: String) {
    tracing::warn!(%vm, "at start: {outcome}");
    host.audit(AuditEvent::VmAtStart {
        vm: vm.clone(),
        outcome,
    });
}

/// Logs and audits a VM found again as it was.
fn report_found(host: &Host, vm: &VmName, outcome: String) {
    tracing::info!(%vm, "at start: {outcome}");
    host.audit(AuditEvent::VmAtStart {
        vm: vm.clone(),
        outcome,
    });
}

/// Logs and audits a VM re-attached in `state`: a warning when in doubt,
/// information when found as it was.
fn report_reattached(host: &Host, vm: &VmName, state: VmState, outcome: String) {
    if state == VmState::InDoubt {
        report(host, vm, outcome);
    } else {
        report_found(host, vm, outcome);
    }
}

/// A registry entry for `rec`, in `state`, held by `handle`.
fn entry(rec: VmRecord, state: VmState, handle: VmHandle) -> VmEntry {
    VmEntry {
        handle: Some(handle),
        state,
        bytes: rec.bytes,
        arrived_from: rec.arrived_from,
        counter_at_start: rec.counter_at_start,
        attributes: rec.attributes,
        incarnation: rec.incarnation,
        cancel: None,
        reuse: None,
    }
}

/// `rec` as a lost VM (with `qemu`, the record to look for again, when
/// the record holds none).
fn lost(rec: VmRecord, reason: String, qemu: Option<QemuVmRecord>) -> VmEntry {
    let (backend, recorded, disk_dir) = match &rec.guest {
        Guest::Sim { disk_dir, .. } => ("sim".to_owned(), None, disk_dir.clone()),
        Guest::Qemu(q) => ("qemu".to_owned(), Some(q.clone()), None),
        Guest::Lost {
            backend,
            qemu,
            disk_dir,
            ..
        } => (backend.clone(), qemu.clone(), disk_dir.clone()),
        Guest::Reserved => ("reserved".to_owned(), None, None),
    };
    // A sim VM whose vCPU ran on an agent thread (never moved to a
    // helper, or mid post-copy) ended with that agent.
    let memory_gone = matches!(rec.guest, Guest::Sim { vcpu: None, .. });
    let l = LostVm {
        backend,
        reason,
        qemu: recorded.or(qemu),
        disk_dir,
        memory_gone,
    };
    entry(rec, VmState::Lost, VmHandle::Lost(Arc::new(l)))
}

/// Finds the QEMU `q` records again; the entry for it, or `None` when it
/// is gone.
async fn reattach(host: &Arc<Host>, rec: VmRecord, q: QemuVmRecord) -> Option<VmEntry> {
    let name = rec.name.clone();
    let pid = q.process.pid;
    match QemuVm::reattach(&q).await {
        Ok((vm, status)) => {
            let state = reattached_state(rec.state, rec.migrating, &status);
            if rec.migrating && state == VmState::Running {
                // QEMU's own outgoing migration went to a socket of the
                // agent that ended: make sure it is over.
                let _ = vm.execute("migrate_cancel", None).await;
            }
            report_reattached(
                host,
                &name,
                state,
                format!(
                    "QEMU re-attached (pid {pid}, QEMU says {status:?}): {state:?}{}",
                    if rec.migrating {
                        " (its outgoing migration ended with the agent)"
                    } else {
                        ""
                    }
                ),
            );
            Some(entry(rec, state, VmHandle::Qemu(vm)))
        }
        Err(e) if e.is_gone() => {
            // The agent's own directory (an adopted QEMU's QMP socket
            // lives elsewhere; this holds its migration sockets).
            remove_dir(&q.dir);
            report(host, &name, format!("removed: {e}"));
            None
        }
        Err(e) => {
            let reason = format!("QEMU (pid {pid}) could not be re-attached: {e}");
            report(host, &name, format!("lost: {reason}"));
            Some(lost(rec, reason, Some(q)))
        }
    }
}

/// Finds the sim VM `v` records again; the entry for it, or `None` when
/// its helper is gone (its record and disks removed).
fn reattach_sim(host: &Host, rec: VmRecord, v: VcpuRecord) -> Option<VmEntry> {
    let name = rec.name.clone();
    let disk_dir = match &rec.guest {
        Guest::Sim { disk_dir, .. } => disk_dir.clone(),
        _ => None,
    };
    let pid = v.process.pid;
    match SimVm::reattach(&v, disk_dir.clone()) {
        Ok(vm) => {
            let status = if vm.is_running() { "running" } else { "paused" };
            let state = reattached_state(rec.state, rec.migrating, status);
            report_reattached(
                host,
                &name,
                state,
                format!(
                    "sim VM re-attached (vCPU helper pid {pid}, counter {}): {state:?}",
                    vm.counter()
                ),
            );
            Some(entry(rec, state, VmHandle::Sim(vm)))
        }
        Err(BackendError::Vcpu(VcpuError::Gone(why))) => {
            if let Some(d) = &disk_dir {
                remove_dir(d);
            }
            report(
                host,
                &name,
                format!("removed: its vCPU helper is gone ({why}), and its memory with it"),
            );
            None
        }
        Err(e) => {
            let reason = format!("sim VM (helper pid {pid}) could not be re-attached: {e}");
            report(host, &name, format!("lost: {reason}"));
            Some(lost(rec, reason, None))
        }
    }
}

/// Drops a reserved place: a sim staging's disk directory goes (a QEMU's
/// runtime directory is residue, swept next).
fn discard(host: &Host, rec: &VmRecord) {
    let what = if rec.state == VmState::Incoming {
        "the staging of an incoming migration that never committed"
    } else {
        "a VM whose creation never finished"
    };
    let mut removed = Vec::new();
    if let Some(d) = host.config.disk_dir().map(|d| d.join(rec.name.as_str())) {
        if d.is_dir() {
            remove_dir(&d);
            removed.push(d.display().to_string());
        }
    }
    report(
        host,
        &rec.name,
        format!(
            "discarded {what}{}",
            if removed.is_empty() {
                String::new()
            } else {
                format!(" (removed {})", removed.join(", "))
            }
        ),
    );
}

fn remove_dir(d: &Path) {
    if let Err(e) = std::fs::remove_dir_all(d) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {e}", d.display());
        }
    }
}

/// Removes what no VM holds in the QEMU runtime directory (see the module
/// docs): QEMUs launched for a migration that never committed or a VM
/// never created, and their files.
async fn sweep(host: &Host) {
    let Some(cfg) = &host.config.qemu else { return };
    let Ok(dirs) = std::fs::read_dir(&cfg.runtime) else {
        return;
    };
    let held: Vec<PathBuf> = host
        .vms()
        .values()
        .filter_map(|e| match &e.handle {
            Some(VmHandle::Qemu(q)) => Some(q.dir().to_owned()),
            Some(VmHandle::Lost(l)) => l.qemu.as_ref().map(|q| q.dir.clone()),
            _ => None,
        })
        .collect();
    for d in dirs.flatten() {
        let dir = d.path();
        // Only directories named like a VM are ours to look at.
        let Some(vm) = d
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<VmName>().ok())
        else {
            continue;
        };
        if !dir.is_dir() || held.contains(&dir) {
            continue;
        }
        let mut done = Vec::new();
        // The command line the agent launched it with, if it did.
        let mut launched = std::fs::read(dir.join(LAUNCHED))
            .map(|raw| split_cmdline(&raw))
            .unwrap_or_default();
        if let Some(r) = Residue::behind_socket(&dir.join("qmp.sock"), &dir, &cfg.binaries).await {
            let pid = r.identity.pid;
            if launched.is_empty() {
                launched = r.identity.cmdline.clone();
            }
            if !r.kill().await {
                report(
                    host,
                    &vm,
                    format!(
                        "a QEMU (pid {pid}) left in {} did not exit when killed",
                        dir.display()
                    ),
                );
                continue;
            }
            done.push(format!("QEMU pid {pid} killed"));
        }
        // A destination creates every disk it receives (it never opens an
        // existing one): they go with a staging that never committed.
        if is_incoming(&launched) {
            for f in drive_files(&launched) {
                if created_for_migration(cfg, &f) && std::fs::remove_file(&f).is_ok() {
                    done.push(format!("disk {} removed", f.display()));
                }
            }
        }
        remove_dir(&dir);
        done.push(format!("{} removed", dir.display()));
        report(
            host,
            &vm,
            format!(
                "residue of a QEMU no VM holds (a migration that never committed, or a \
                 creation that never finished): {}",
                done.join(", ")
            ),
        );
    }
}

/// Whether `f` is a file inside the image directory (where a destination
/// creates the disks it receives).
fn created_for_migration(cfg: &QemuConfig, f: &Path) -> bool {
    let (Ok(root), Ok(file)) = (cfg.images.canonicalize(), f.canonicalize()) else {
        return false;
    };
    file.starts_with(&root) && file.is_file()
}

impl LostVm {
    /// Removes what is left of the VM: the QEMU, if it still runs as
    /// recorded (killed), and its runtime directory; a sim VM's disks.
    pub(crate) async fn clean_up(&self) {
        if let Some(q) = &self.qemu {
            if let Some(r) = Residue::still_running(&q.process) {
                let pid = r.identity.pid;
                if !r.kill().await {
                    tracing::warn!(pid, "a lost VM's QEMU did not exit when killed");
                }
            }
            remove_dir(&q.dir);
        }
        if let Some(d) = &self.disk_dir {
            remove_dir(d);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::*;
    use crate::backend::qemu::identity::ProcessIdentity;
    use crate::backend::qemu::process::{Accel, QemuSpec};

    fn qemu_record(binary: &str) -> QemuVmRecord {
        QemuVmRecord {
            definition: crate::lab::Lab::qemu_test_vm("vm".parse().unwrap(), 128, String::new()),
            spec: QemuSpec {
                binary: binary.into(),
                memory_mib: 128,
                vcpus: 1,
                kernel: None,
                initrd: None,
                append: String::new(),
                disks: Vec::new(),
                accel: Accel::Tcg,
                extra_args: Vec::new(),
            },
            dir: "/state/qemu/vm".into(),
            qmp_socket: "/state/qemu/vm/qmp.sock".into(),
            block_devices: Vec::new(),
            adopted: false,
            process: ProcessIdentity {
                pid: 4242,
                start_ticks: 1,
                boot_id: "b".into(),
                exe: binary.into(),
                cmdline: Vec::new(),
            },
        }
    }

    fn record(state: VmState, guest: Guest) -> VmRecord {
        VmRecord {
            name: "vm".parse().unwrap(),
            incarnation: 1,
            state,
            migrating: false,
            bytes: 128 << 20,
            arrived_from: None,
            counter_at_start: None,
            attributes: Default::default(),
            guest,
        }
    }

    fn config(binary: &str) -> QemuConfig {
        QemuConfig {
            binaries: vec![binary.into()],
            images: "/images".into(),
            runtime: "/state/qemu".into(),
            multifd: Default::default(),
        }
    }

    #[test]
    fn staging_never_committed_is_discarded_and_committed_guests_reattached() {
        let cfg = config("/usr/bin/qemu-system-x86_64");
        // A destination's place, reserved at Propose and never given its
        // VM: the staging of a migration that did not commit.
        assert_eq!(
            plan(&record(VmState::Incoming, Guest::Reserved), Some(&cfg)),
            Plan::Discard
        );
        // A VM being created, never reported created.
        assert_eq!(
            plan(&record(VmState::Paused, Guest::Reserved), Some(&cfg)),
            Plan::Discard
        );
        // Started here (created, or arrived and started): re-attached.
        let q = qemu_record("/usr/bin/qemu-system-x86_64");
        assert_eq!(
            plan(
                &record(VmState::Running, Guest::Qemu(q.clone())),
                Some(&cfg)
            ),
            Plan::Reattach(Box::new(q.clone()))
        );
        // A lost QEMU is looked for again.
        let lost = Guest::Lost {
            backend: "qemu".into(),
            reason: "QMP did not answer".into(),
            qemu: Some(q.clone()),
            disk_dir: None,
        };
        assert_eq!(
            plan(&record(VmState::Lost, lost), Some(&cfg)),
            Plan::Reattach(Box::new(q.clone()))
        );
        // Without a QEMU backend, or with its binary no longer allowed:
        // kept, as lost.
        assert!(matches!(
            plan(&record(VmState::Running, Guest::Qemu(q.clone())), None),
            Plan::Lost(_)
        ));
        assert!(matches!(
            plan(
                &record(VmState::Running, Guest::Qemu(q)),
                Some(&config("/opt/other-qemu"))
            ),
            Plan::Lost(_)
        ));
        // A sim VM whose vCPU ran in the agent died with it: lost, not
        // forgotten.
        let sim = |vcpu| Guest::Sim {
            disk_dir: None,
            vcpu,
        };
        assert!(matches!(
            plan(&record(VmState::Running, sim(None)), Some(&cfg)),
            Plan::Lost(_)
        ));
        // One whose vCPU ran in a helper is looked for, with or without a
        // QEMU backend.
        let v = VcpuRecord {
            process: qemu_record("/usr/bin/convoy-agent").process,
            bytes: 1 << 20,
            disks: Vec::new(),
        };
        for q in [Some(&cfg), None] {
            assert_eq!(
                plan(&record(VmState::Paused, sim(Some(v.clone()))), q),
                Plan::ReattachSim(Box::new(v.clone()))
            );
        }
    }

    #[test]
    fn a_reattached_guest_is_never_resumed_where_it_may_run_elsewhere() {
        use VmState::*;
        // Ours and running, or paused by an operator.
        assert_eq!(reattached_state(Running, false, "running"), Running);
        assert_eq!(reattached_state(Paused, false, "paused"), Paused);
        // Claimed by a migration whose agent died: QEMU still runs the
        // guest, so the migration cannot have ended.
        assert_eq!(reattached_state(MigratingOut, true, "running"), Running);
        // Paused for a final copy, or QEMU's stream sent: in doubt.
        assert_eq!(reattached_state(Paused, true, "paused"), InDoubt);
        assert_eq!(reattached_state(MigratingOut, true, "postmigrate"), InDoubt);
        assert_eq!(reattached_state(Paused, true, "postmigrate"), InDoubt);
        assert_eq!(reattached_state(Running, false, "postmigrate"), InDoubt);
        // A paused VM saved by a snapshot push.
        assert_eq!(reattached_state(Paused, false, "postmigrate"), Paused);
        assert_eq!(
            reattached_state(MigratingOut, true, "finish-migrate"),
            InDoubt
        );
        // Doubt stays doubt; post-copy arrivals lost their source.
        assert_eq!(reattached_state(InDoubt, false, "running"), InDoubt);
        assert_eq!(reattached_state(PostcopyIn, false, "running"), InDoubt);
        assert_eq!(
            reattached_state(Recovering, false, "postcopy-paused"),
            InDoubt
        );
        // Anything QEMU says that is not plainly running or paused.
        assert_eq!(reattached_state(Running, false, "internal-error"), InDoubt);
    }
}
