//! VMs outlive their agent. The real `convoy-agent` binary runs as a child
//! process on a state directory; it is killed (SIGKILL), stopped by
//! SIGTERM, and by SIGINT sent to its whole process group (as a Ctrl-C in
//! its terminal would), and started again on the same state directory:
//! its QEMU guest keeps running throughout, is listed again, can be paused,
//! resumed and deleted; so are its two sim VMs (one with a disk), whose
//! memory and vCPU live in helper processes of their own: their counters
//! advance through every restart, and deleting them ends their helpers.
//! A destination killed in the middle
//! of a migration finds the staging QEMU it had launched at its next start,
//! kills it and removes its files and the disk created for it, while the
//! source still runs the VM; a source stopped in the middle of one cancels
//! it, keeps the guest running, and finds it again when it starts.
//!
//! A test binary of the agent crate rather than a module of `tests/it`:
//! only here does Cargo build the agent binary for the test and name it
//! (`CARGO_BIN_EXE_convoy-agent`), so a stale binary is never run. Needs
//! QEMU and the test guest like `tests/it`'s `qemu::` tests: fails under
//! `CI=true` without them, skips with a message otherwise.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::io::{Read, Seek};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use convoy_agent::backend::qemu::guest::{self, counters, TestGuest};
use convoy_agent::client::CtlClient;
use convoy_agent::lab::Lab;
use convoy_protocol::ctl::{ContentProfile, QemuVmSpec, SimVmSpec, VmInfo, VmState};
use convoy_protocol::names::{AgentName, Role, SpiffeId};
use rustix::process::Signal;

mod restart_sim;
mod support;
use restart_sim::*;

/// The guest's kernel and initramfs (see [`support::test_guest`]).
fn guest() -> Option<TestGuest> {
    support::test_guest()
}

/// One test at a time: each runs TCG guests that can take a core each.
async fn heavy() -> tokio::sync::SemaphorePermit<'static> {
    static HEAVY: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
    HEAVY
        .acquire()
        .await
        .expect("the semaphore is never closed")
}

async fn until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f()
}

/// A PKI, a policy and the test guest, for agents run as processes.
struct Setup {
    dir: tempfile::TempDir,
    lab: Lab,
    guest: TestGuest,
}

impl Setup {
    /// The lab's PKI and policy (no in-process agent), with agents
    /// `names` issued and in the inventory.
    async fn new(names: &[&str], guest: TestGuest) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let lab = Lab::start(dir.path(), &[], |_, _| {}).await.unwrap();
        let mut inv = lab.inventory().unwrap();
        for n in names {
            let name: AgentName = n.parse().unwrap();
            lab.pki
                .issue(Role::Agent, &name, Duration::from_secs(86400))
                .unwrap();
            inv.agents.insert(
                SpiffeId::agent(lab.trust.domain().clone(), name),
                convoy_agent::trust::policy::HostFacts {
                    zone: "lab-a".into(),
                    security_level: 2,
                    groups: Default::default(),
                },
            );
        }
        lab.write_inventory(&inv).unwrap();
        Setup { dir, lab, guest }
    }

    /// Agent `name` (not started): its own state, image and runtime
    /// directories, a free port, the guest's kernel and initramfs in
    /// its image directory.
    fn agent(&self, name: &str) -> AgentProcess {
        let root = self.dir.path();
        let images = root.join(format!("images-{name}"));
        std::fs::create_dir_all(&images).unwrap();
        std::fs::copy(&self.guest.kernel, images.join("vmlinuz")).unwrap();
        std::fs::copy(&self.guest.initrd, images.join("initrd.img")).unwrap();
        let state = root.join("state").join(name);
        let addr = support::listen_addr();
        let policy = self.lab.policy_files();
        let args = [
            "--name",
            name,
            "--listen",
            &addr.to_string(),
            "--pki",
            &self.lab.pki.dir().display().to_string(),
            "--state-dir",
            &state.display().to_string(),
            "--policy",
            &policy.policies.display().to_string(),
            "--inventory",
            &policy.inventory.display().to_string(),
            "--qemu-binary",
            &guest::find_qemu().unwrap().display().to_string(),
            "--image-dir",
            &images.display().to_string(),
            "--link-timeout",
            "5",
        ]
        .map(String::from)
        .to_vec();
        AgentProcess {
            id: SpiffeId::agent(self.lab.trust.domain().clone(), name.parse().unwrap()),
            log: root.join(format!("agent-{name}.log")),
            args,
            addr,
            state,
            images,
            child: None,
        }
    }

    async fn client(&self, a: &AgentProcess) -> CtlClient {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            match CtlClient::connect(a.addr, a.id.clone(), &self.lab.operator, &self.lab.trust)
                .await
            {
                Ok(c) => return c,
                Err(e) if Instant::now() < end => {
                    eprintln!("agent not answering yet: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("agent never answered: {e}\n{}", a.output()),
            }
        }
    }
}

/// `convoy-agent`, run as a child process in a process group of its own.
struct AgentProcess {
    id: SpiffeId,
    args: Vec<String>,
    addr: SocketAddr,
    state: PathBuf,
    images: PathBuf,
    /// Its output, every run appended.
    log: PathBuf,
    child: Option<Child>,
}

impl AgentProcess {
    /// Starts it and waits until it listens.
    async fn start(&mut self) {
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let from = out.seek(std::io::SeekFrom::End(0)).unwrap();
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(env!("CARGO_BIN_EXE_convoy-agent"))
                .args(&self.args)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .process_group(0)
                .spawn()
                .unwrap()
        };
        self.child = Some(child);
        let log = self.log.clone();
        let listening = until(Duration::from_secs(60), || {
            let mut f = std::fs::File::open(&log).unwrap();
            f.seek(std::io::SeekFrom::Start(from)).unwrap();
            let mut s = String::new();
            let _ = f.read_to_string(&mut s);
            s.contains("agent listening")
        })
        .await;
        assert!(listening, "the agent did not start:\n{}", self.output());
    }

    /// Sends `sig` to it (to its whole process group with `group`, as a
    /// terminal's Ctrl-C does) and waits for it to exit.
    async fn stop(&mut self, sig: Signal, group: bool) -> ExitStatus {
        let mut child = self.child.take().expect("the agent runs");
        let pid = rustix::process::Pid::from_child(&child);
        if group {
            rustix::process::kill_process_group(pid, sig).unwrap();
        } else {
            rustix::process::kill_process(pid, sig).unwrap();
        }
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < end,
                "the agent did not stop:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn runtime(&self) -> PathBuf {
        self.state.join("qemu")
    }

    fn serial(&self, vm: &str) -> PathBuf {
        self.runtime().join(vm).join("serial.log")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A failed test leaves no guest behind.
        for pid in qemu_pids(&self.runtime()) {
            if let Some(p) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(p, Signal::KILL);
            }
        }
    }
}

/// Live (not zombie) QEMU processes whose command line names `dir`.
fn qemu_pids(dir: &Path) -> Vec<i32> {
    let needle = format!("{}/", dir.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
                && alive(*pid)
        })
        .collect()
}

/// Whether process `pid` exists and has not exited (a zombie has).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rfind(')')
            .and_then(|i| s[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

fn definition(vm: &str, disks: Vec<String>) -> QemuVmSpec {
    let mut d = Lab::qemu_test_vm(
        vm.parse().unwrap(),
        128,
        "console=ttyS0 quiet panic=-1".into(),
    );
    d.disks = disks;
    d
}

fn sim(vm: &str) -> SimVmSpec {
    SimVmSpec {
        name: vm.parse().unwrap(),
        memory_bytes: 8 << 20,
        dirty_pages_per_sec: 100,
        hot_set_pct: 10,
        content: ContentProfile::Mixed,
        seed: 1,
        attributes: Default::default(),
        disks: Vec::new(),
        service_requests_per_sec: 0,
    }
}

fn find<'a>(vms: &'a [VmInfo], name: &str) -> &'a VmInfo {
    vms.iter()
        .find(|v| v.name.as_str() == name)
        .unwrap_or_else(|| panic!("no VM {name} in {vms:?}"))
}

/// Whether the guest's counter goes on (a new one within 60 s).
async fn counting(serial: &Path) -> bool {
    let n = counters(serial).len();
    until(Duration::from_secs(60), || counters(serial).len() > n).await
}

/// Whether the agent's audit log holds `text` (record strings are stored
/// as they are).
async fn audited(c: &CtlClient, text: &str) -> bool {
    let log = c.audit_log().await.unwrap();
    log.windows(text.len()).any(|w| w == text.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_outlive_an_agent_killed_or_stopped_and_are_found_again() {
    let Some(g) = guest() else { return };
    let _heavy = heavy().await;
    let s = Setup::new(&["a"], g).await;
    let mut a = s.agent("a");
    a.start().await;
    let c = s.client(&a).await;
    c.vm_create_qemu(definition("guest", vec![])).await.unwrap();
    c.vm_create(sim("sim")).await.unwrap();
    c.vm_create(sim_with_disk("simdisk")).await.unwrap();
    let helpers = [helper_pids("sim"), helper_pids("simdisk")];
    assert!(helpers.iter().all(|h| h.len() == 1), "{helpers:?}");
    let _helpers = HelpersKilledOnDrop(&["sim", "simdisk"]);
    let serial = a.serial("guest");
    assert!(
        until(Duration::from_secs(180), || counters(&serial).len() >= 3).await,
        "the guest did not come up: {:?}\n{}",
        std::fs::read_to_string(&serial).unwrap_or_default(),
        a.output()
    );
    let pids = qemu_pids(&a.runtime());
    assert_eq!(pids.len(), 1, "{pids:?}");
    let qemu = pids[0];
    let before = [counter(&c, "sim").await, counter(&c, "simdisk").await];
    c.close().await;

    // Killed outright: no handler runs, the guest runs on.
    let status = a.stop(Signal::KILL, false).await;
    assert!(!status.success());
    assert!(alive(qemu), "QEMU died with its agent");
    assert!(counting(&serial).await, "the guest stopped with its agent");
    for h in &helpers {
        assert!(alive(h[0]), "a sim VM's helper died with its agent");
    }

    // Started again on the same state directory: all three are found
    // again, running, and obey.
    a.start().await;
    let c = s.client(&a).await;
    let vms = c.vm_list().await.unwrap();
    let q = find(&vms, "guest");
    assert_eq!((q.backend.as_str(), q.state), ("qemu", VmState::Running));
    for (vm, past) in [("sim", before[0]), ("simdisk", before[1])] {
        let v = find(&vms, vm);
        assert_eq!((v.backend.as_str(), v.state), ("sim", VmState::Running));
        assert!(sim_counting(&c, vm, past).await, "{vm} does not run on");
    }
    assert_eq!(
        [helper_pids("sim"), helper_pids("simdisk")],
        helpers,
        "the same helpers"
    );
    assert_eq!(qemu_pids(&a.runtime()), vec![qemu], "the same QEMU");
    // A re-attached sim VM obeys too.
    let paused = c.vm_pause("simdisk".parse().unwrap(), true).await.unwrap();
    assert_eq!(paused.state, VmState::Paused);
    let held = counter(&c, "simdisk").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(counter(&c, "simdisk").await, held, "a paused sim VM runs");
    c.vm_pause("simdisk".parse().unwrap(), false).await.unwrap();
    assert!(sim_counting(&c, "simdisk", held).await);
    let paused = c.vm_pause("guest".parse().unwrap(), true).await.unwrap();
    assert_eq!(paused.state, VmState::Paused);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let still = counters(&serial).len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(counters(&serial).len(), still, "a paused guest runs");
    let resumed = c.vm_pause("guest".parse().unwrap(), false).await.unwrap();
    assert_eq!(resumed.state, VmState::Running);
    assert!(counting(&serial).await, "the resumed guest does not run");
    assert!(audited(&c, "QEMU re-attached").await);
    assert!(audited(&c, "sim VM re-attached").await);
    let before = counter(&c, "sim").await;
    c.close().await;

    // Ctrl-C in the agent's terminal (SIGINT to its process group): the
    // agent stops serving and leaves the guest, which is in a group of
    // its own and never sees the signal.
    let status = a.stop(Signal::INT, true).await;
    assert!(status.success(), "{status}:\n{}", a.output());
    assert!(alive(qemu), "QEMU died with a Ctrl-C meant for its agent");
    assert!(counting(&serial).await);
    assert!(
        alive(helpers[0][0]),
        "a helper died with a Ctrl-C meant for its agent"
    );
    // Found again: no longer the agent's child, the same checks hold.
    a.start().await;
    let c = s.client(&a).await;
    let vms = c.vm_list().await.unwrap();
    assert_eq!(find(&vms, "guest").state, VmState::Running);
    assert_eq!(find(&vms, "sim").state, VmState::Running);
    assert!(sim_counting(&c, "sim", before).await);
    let before = counter(&c, "sim").await;
    c.close().await;

    // SIGTERM: the same.
    let status = a.stop(Signal::TERM, false).await;
    assert!(status.success(), "{status}:\n{}", a.output());
    assert!(alive(qemu), "QEMU died with SIGTERM to its agent");
    a.start().await;
    let c = s.client(&a).await;
    assert_eq!(
        find(&c.vm_list().await.unwrap(), "guest").state,
        VmState::Running
    );
    assert!(sim_counting(&c, "sim", before).await);

    // Destroying a VM is the operator's act: a sim VM's helper ends and
    // its disk goes, the QEMU one is quit and its files removed.
    c.vm_delete("sim".parse().unwrap()).await.unwrap();
    c.vm_delete("simdisk".parse().unwrap()).await.unwrap();
    c.vm_delete("guest".parse().unwrap()).await.unwrap();
    assert!(
        until(Duration::from_secs(10), || !alive(qemu)).await,
        "QEMU outlived its deletion"
    );
    assert!(
        until(Duration::from_secs(10), || helper_pids("sim").is_empty()
            && helper_pids("simdisk").is_empty())
        .await,
        "a sim VM's helper outlived its deletion"
    );
    assert!(
        !a.state.join("disks").join("simdisk").exists(),
        "disk files left"
    );
    assert!(!a.runtime().join("guest").exists(), "runtime files left");
    assert!(c.vm_list().await.unwrap().is_empty());
    c.close().await;
    assert!(a.stop(Signal::TERM, false).await.success());
    // And a deleted VM stays deleted.
    a.start().await;
    let c = s.client(&a).await;
    assert!(c.vm_list().await.unwrap().is_empty());
    c.close().await;
    assert!(a.stop(Signal::TERM, false).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_cut_by_an_agent_s_death_or_stop_leaves_one_guest_and_no_staging() {
    let Some(g) = guest() else { return };
    let _heavy = heavy().await;
    let s = Setup::new(&["a", "b"], g).await;
    let (mut a, mut b) = (s.agent("a"), s.agent("b"));
    a.start().await;
    b.start().await;
    let ca = s.client(&a).await;
    std::fs::File::create(a.images.join("disk.img"))
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    ca.vm_create_qemu(definition("guest", vec!["disk.img".into()]))
        .await
        .unwrap();
    let serial = a.serial("guest");
    assert!(
        until(Duration::from_secs(180), || counters(&serial).len() >= 3).await,
        "the guest did not come up: {:?}\n{}",
        std::fs::read_to_string(&serial).unwrap_or_default(),
        a.output()
    );
    let source = qemu_pids(&a.runtime());
    ca.close().await;

    let (mover, staged) = migrate_until_staged(&s, &a, &b, "guest").await;
    let created = b.images.join("disk.img");
    assert!(created.exists());

    // The destination dies mid-copy. Its staging QEMU outlives it, or
    // exits when its incoming stream breaks; its files stay either way.
    let _ = b.stop(Signal::KILL, false).await;
    // The migration never committed: the source runs the VM on.
    let _ = tokio::time::timeout(Duration::from_secs(90), mover)
        .await
        .expect("the source gave up on the dead destination");
    let ca = s.client(&a).await;
    let end = Instant::now() + Duration::from_secs(30);
    while find(&ca.vm_list().await.unwrap(), "guest").state != VmState::Running {
        assert!(Instant::now() < end, "the source did not roll back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(qemu_pids(&a.runtime()), source);
    assert!(counting(&serial).await, "the source guest stopped");
    assert!(b.runtime().join("guest").exists() && created.exists());

    // Another staging left running, as a destination killed before its
    // stream started leaves one (launched here the way the destination
    // does: `-incoming defer`, paused, its disk created in the image
    // directory, no VM in the registry holds it).
    let ghost_disk = b.images.join("ghost.img");
    std::fs::File::create(&ghost_disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let spec = convoy_agent::backend::qemu::process::QemuSpec {
        binary: guest::find_qemu().unwrap(),
        memory_mib: 128,
        vcpus: 1,
        kernel: Some(b.images.join("vmlinuz").canonicalize().unwrap()),
        initrd: Some(b.images.join("initrd.img").canonicalize().unwrap()),
        append: String::new(),
        disks: vec![ghost_disk.canonicalize().unwrap()],
        accel: convoy_protocol::ctl::Accel::Tcg,
        extra_args: vec!["-S".into()],
    };
    let mut ghost = convoy_agent::backend::qemu::process::QemuProcess::launch(
        &spec,
        &b.runtime().join("ghost"),
        true,
    )
    .await
    .unwrap();
    ghost.outlive_agent();
    let ghost_pid = i32::try_from(ghost.pid().unwrap()).unwrap();
    drop(ghost);
    let staged_alive = alive(staged);

    // Restarted, the destination kills the staging QEMUs and removes their
    // files and the disks created for them; it lists nothing.
    b.start().await;
    let cb = s.client(&b).await;
    assert!(cb.vm_list().await.unwrap().is_empty());
    assert!(
        until(Duration::from_secs(10), || !alive(staged)
            && !alive(ghost_pid))
        .await,
        "a staging QEMU still runs"
    );
    for gone in [
        b.runtime().join("guest"),
        b.runtime().join("ghost"),
        created.clone(),
        ghost_disk,
    ] {
        assert!(!gone.exists(), "{} is left", gone.display());
    }
    assert!(audited(&cb, "discarded the staging of an incoming migration").await);
    assert!(audited(&cb, &format!("QEMU pid {ghost_pid} killed")).await);
    if staged_alive {
        assert!(audited(&cb, &format!("QEMU pid {staged} killed")).await);
    }
    cb.close().await;
    ca.close().await;

    // The source is stopped (SIGTERM) in the middle of another copy: it
    // cancels the migration, which had not handed the VM over, and leaves
    // the guest running; the destination discards its staging; the
    // restarted source finds the guest again, running.
    let (mover, staged) = migrate_until_staged(&s, &a, &b, "guest").await;
    let status = a.stop(Signal::TERM, false).await;
    assert!(status.success(), "{status}:\n{}", a.output());
    let _ = tokio::time::timeout(Duration::from_secs(60), mover).await;
    assert_eq!(qemu_pids(&a.runtime()), source, "the source QEMU");
    assert!(counting(&serial).await, "the source guest stopped");
    assert!(
        until(Duration::from_secs(30), || !alive(staged)
            && !b.runtime().join("guest").exists()
            && !created.exists())
        .await,
        "the destination kept its staging"
    );
    let cb = s.client(&b).await;
    assert!(cb.vm_list().await.unwrap().is_empty());
    cb.close().await;
    a.start().await;
    let ca = s.client(&a).await;
    assert_eq!(
        find(&ca.vm_list().await.unwrap(), "guest").state,
        VmState::Running
    );
    assert!(audited(&ca, "QEMU re-attached").await);
    ca.vm_delete("guest".parse().unwrap()).await.unwrap();
    ca.close().await;
    assert!(a.stop(Signal::TERM, false).await.success());
    assert!(b.stop(Signal::TERM, false).await.success());
}

/// Starts a migration of `vm` from `a` to `b` slow enough to be caught in
/// the middle (its disk copied, capped at 1 MiB/s) and waits until `b`
/// lists it arriving with a staging QEMU: returns the migration's task
/// and that QEMU's pid.
async fn migrate_until_staged(
    s: &Setup,
    a: &AgentProcess,
    b: &AgentProcess,
    vm: &str,
) -> (
    tokio::task::JoinHandle<
        Result<convoy_protocol::ctl::MigrationReport, convoy_agent::client::ClientError>,
    >,
    i32,
) {
    use convoy_protocol::model::{MigrationMode, MigrationPlan};
    let plan = MigrationPlan {
        mode: MigrationMode::Precopy,
        copy_storage: true,
        bandwidth: Some(1 << 20),
        ..Default::default()
    };
    let ca = s.client(a).await;
    let req = migrate_request(&ca, s, a, b, vm, &plan).await;
    let mover = tokio::spawn(async move { ca.migrate(req, |_| {}).await });
    let cb = s.client(b).await;
    let mut staged = Vec::new();
    let mut arriving = false;
    let end = Instant::now() + Duration::from_secs(60);
    while (!arriving || staged.is_empty()) && Instant::now() < end {
        arriving = cb
            .vm_list()
            .await
            .unwrap()
            .iter()
            .any(|v| v.name.as_str() == vm && v.state == VmState::Incoming);
        staged = qemu_pids(&b.runtime());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(arriving && staged.len() == 1, "no staging caught at b");
    cb.close().await;
    (mover, staged[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sim_vm_migrated_to_an_agent_then_killed_is_found_running_there() {
    use convoy_protocol::model::MigrationMode;
    let Some(g) = guest() else { return };
    let _heavy = heavy().await;
    let s = Setup::new(&["a", "b"], g).await;
    let (mut a, mut b) = (s.agent("a"), s.agent("b"));
    a.start().await;
    b.start().await;
    let ca = s.client(&a).await;
    ca.vm_create(sim_with_disk("mpre")).await.unwrap();
    ca.vm_create(sim("mpost")).await.unwrap();
    let _helpers = HelpersKilledOnDrop(&["mpre", "mpost"]);
    ca.close().await;
    for (vm, mode) in [
        ("mpre", MigrationMode::Precopy),
        ("mpost", MigrationMode::Postcopy),
    ] {
        let report = migrate_sim(&s, &a, &b, vm, mode).await;
        assert_eq!(
            report.outcome,
            convoy_protocol::ctl::Outcome::Completed,
            "{vm}: {report:?}"
        );
        // The source's copy went, and its helper with it; one runs at b.
        assert!(
            until(Duration::from_secs(10), || helper_pids(vm).len() == 1).await,
            "{vm}: {:?}",
            helper_pids(vm)
        );
    }
    let cb = s.client(&b).await;
    let before = [counter(&cb, "mpre").await, counter(&cb, "mpost").await];
    let at_b = [helper_pids("mpre"), helper_pids("mpost")];
    cb.close().await;

    // The destination is killed: its arrivals run on in their helpers and
    // are found again, counters continuous.
    assert!(!b.stop(Signal::KILL, false).await.success());
    b.start().await;
    let cb = s.client(&b).await;
    let vms = cb.vm_list().await.unwrap();
    for (vm, past) in [("mpre", before[0]), ("mpost", before[1])] {
        assert_eq!(find(&vms, vm).state, VmState::Running, "{vm}");
        assert!(sim_counting(&cb, vm, past).await, "{vm} does not run on");
    }
    assert_eq!([helper_pids("mpre"), helper_pids("mpost")], at_b);
    for vm in ["mpre", "mpost"] {
        cb.vm_delete(vm.parse().unwrap()).await.unwrap();
    }
    assert!(
        until(Duration::from_secs(10), || helper_pids("mpre").is_empty()
            && helper_pids("mpost").is_empty())
        .await
    );
    cb.close().await;
    assert!(b.stop(Signal::TERM, false).await.success());
    assert!(a.stop(Signal::TERM, false).await.success());
}
