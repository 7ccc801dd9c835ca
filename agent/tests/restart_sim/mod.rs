//! Sim VMs of agents run as processes: their specs, their vCPU helper
//! processes, their counters, and migrating them between two agents.

use super::*;

mod via;

/// `vm` with a disk that its workload writes.
pub(crate) fn sim_with_disk(vm: &str) -> SimVmSpec {
    let mut s = sim(vm);
    s.disks = vec![convoy_protocol::ctl::SimDiskSpec {
        name: "root".parse().unwrap(),
        bytes: 4 << 20,
        writes_per_sec: 200,
        used_pct: 20,
        base: None,
    }];
    s
}

/// Live vCPU helper processes of sim VM `vm` (their memfd, standard
/// input, is named after it).
pub(crate) fn helper_pids(vm: &str) -> Vec<i32> {
    let memfd = format!("/memfd:convoy-sim:{vm} (deleted)");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).nth(1) == Some(b"__sim-vcpu".as_slice()))
                && std::fs::read_link(format!("/proc/{pid}/fd/0"))
                    .is_ok_and(|l| l.to_str() == Some(memfd.as_str()))
                && alive(*pid)
        })
        .collect()
}

/// The helpers of these sim VMs, which a failed test must not leave.
pub(crate) struct HelpersKilledOnDrop(pub(crate) &'static [&'static str]);

impl Drop for HelpersKilledOnDrop {
    fn drop(&mut self) {
        for pid in self.0.iter().flat_map(|vm| helper_pids(vm)) {
            if let Some(p) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(p, Signal::KILL);
            }
        }
    }
}

/// The counter of sim VM `vm`.
pub(crate) async fn counter(c: &CtlClient, vm: &str) -> u64 {
    find(&c.vm_list().await.unwrap(), vm).counter
}

/// Whether sim VM `vm` runs: its counter passes `past` within 10 s, then
/// advances again. A resumed vCPU's next tick is a millisecond away, which
/// is longer than a control request on loopback takes: the first reading
/// right after a resume may still be `past`.
pub(crate) async fn sim_counting(c: &CtlClient, vm: &str, past: u64) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut now = counter(c, vm).await;
    while now <= past {
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        now = counter(c, vm).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    counter(c, vm).await > now
}

/// Migrates sim VM `vm` from `a` to `b` in `mode` and waits for the
/// report.
pub(crate) async fn migrate_sim(
    s: &Setup,
    a: &AgentProcess,
    b: &AgentProcess,
    vm: &str,
    mode: convoy_protocol::model::MigrationMode,
) -> convoy_protocol::ctl::MigrationReport {
    let plan = convoy_protocol::model::MigrationPlan {
        mode,
        // The pre-copy VM has a disk, the post-copy one none.
        copy_storage: mode == convoy_protocol::model::MigrationMode::Precopy,
        ..Default::default()
    };
    let ca = s.client(a).await;
    let req = migrate_request(&ca, s, a, b, vm, &plan).await;
    let report = ca.migrate(req, |_| {}).await.unwrap();
    ca.close().await;
    report
}

/// A request to move `vm` from `a` (connected as `ca`) to `b` under
/// `plan`, on a ticket of the lab's operator for the VM as `a` reports it.
pub(crate) async fn migrate_request(
    ca: &CtlClient,
    s: &Setup,
    a: &AgentProcess,
    b: &AgentProcess,
    vm: &str,
    plan: &convoy_protocol::model::MigrationPlan,
) -> convoy_protocol::ctl::MigrateRequest {
    let name: convoy_protocol::names::VmName = vm.parse().unwrap();
    let subject = find(&ca.vm_list().await.unwrap(), vm)
        .subject
        .clone()
        .unwrap();
    let ticket = convoy_agent::trust::authz::issue_ticket(
        &s.lab.operator,
        &name,
        subject,
        a.id.clone(),
        b.id.clone(),
        plan,
        Duration::from_secs(900),
    )
    .unwrap();
    convoy_protocol::ctl::MigrateRequest {
        vm: name,
        to: "b".parse().unwrap(),
        to_addr: Some(b.addr.to_string()),
        ticket,
    }
}
