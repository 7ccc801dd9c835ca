//! The QEMU backend's base: the tiny test guest (`scripts/build-test-guest`)
//! boots under QEMU with TCG, QMP drives it, and QEMU's own migration over a
//! local unix socket moves it with the serial counter continuing and no
//! reboot — the native path that Convoy's authenticated tunnel is measured
//! against. Needs `qemu-system-x86_64` and the guest's Debian packages
//! (`scripts/test` installs them): fails under `CI=true` without them,
//! skips with a message otherwise.
//!
//! Each test holds [`convoy_tests::heavy`] while it runs: one QEMU test at
//! a time (its TCG guests can take a core each), beside light tests only.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use convoy_agent::backend::qemu::guest::{
    self, counters, kernel_fault, TestGuest, KERNEL_FAULT_MARKS,
};
use convoy_agent::backend::qemu::process::{Accel, QemuProcess, QemuSpec};
use convoy_agent::backend::qemu::service::ServiceClient;
use convoy_agent::backend::qemu::vm::{multifd_busy_waits, Multifd};
use convoy_protocol::model::MigrationMode;
use serde_json::json;

/// The guest's kernel and initramfs, built once per test binary.
pub(crate) fn guest() -> Option<&'static TestGuest> {
    static GUEST: OnceLock<Result<TestGuest, String>> = OnceLock::new();
    let built = GUEST.get_or_init(|| {
        guest::find_qemu().map_err(|e| e.to_string())?;
        guest::build(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-guest"))
            .map_err(|e| e.to_string())
    });
    match built {
        Ok(g) => Some(g),
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("skipped (QEMU test guest unavailable): {e}");
            None
        }
        Err(e) => panic!("CI=true and the QEMU tests cannot run: {e}"),
    }
}

fn qemu() -> PathBuf {
    guest::find_qemu().unwrap()
}

fn spec(g: &TestGuest) -> QemuSpec {
    QemuSpec {
        binary: qemu(),
        memory_mib: 128,
        vcpus: 1,
        kernel: Some(g.kernel.clone()),
        initrd: Some(g.initrd.clone()),
        append: "console=ttyS0 quiet panic=-1".into(),
        disks: vec![],
        accel: Accel::Tcg,
        extra_args: vec![],
    }
}

/// Polls the source's `query-migrate` (up to 120 s) until the migration
/// ends; prints QEMU's own figures; returns the final status.
async fn migration_end(src: &mut QemuProcess) -> String {
    let end = Instant::now() + Duration::from_secs(120);
    while Instant::now() < end {
        let m = src.qmp.execute("query-migrate", None).await.unwrap();
        let status = m["status"].as_str().unwrap_or("").to_owned();
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            eprintln!(
                "QEMU: total {} ms, downtime {} ms, {} bytes",
                m["total-time"], m["downtime"], m["ram"]["transferred"]
            );
            return status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    "timed out".into()
}

/// The mark of a panic raised when a guest's kernel reports a fault at
/// the destination of a migration whose stream arrived as QEMU wrote it
/// (see [`once_more_on_guest_fault`]).
pub(crate) const GUEST_FAULT: &str = "the guest's kernel faulted after the migration";

/// Waits up to `timeout` for the guest whose console is `log` to print a
/// counter above `after`. A kernel fault report on the console ends the
/// wait with a panic marked [`GUEST_FAULT`], the report in it.
pub(crate) async fn counts_on(log: &Path, after: u64, timeout: Duration) -> bool {
    let on = until(timeout, || {
        kernel_fault(log) || counters(log).iter().any(|&c| c > after)
    })
    .await;
    assert!(!kernel_fault(log), "{GUEST_FAULT}: {}", console(log));
    on
}

/// Runs a QEMU migration test's scenario, and once more if it ended on
/// [`GUEST_FAULT`]. QEMU 7.2 under TCG, here, now and then loses a
/// guest's write during a live migration: its own migration over a unix
/// socket, without Convoy, left the guest's kernel faulting at the
/// destination once in 106 migrations of a guest rewriting memory on a
/// loaded host (the vCPU's store can pass a TLB entry that the migration
/// thread marks for dirty tracking a moment later). Convoy carries the
/// stream QEMU writes and checks it byte for byte, so such a fault says
/// nothing about Convoy; a second one in a row fails the test.
pub(crate) async fn once_more_on_guest_fault<F, Fut>(scenario: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    for attempt in 1..=2 {
        match tokio::spawn(scenario()).await {
            Ok(()) => return,
            Err(e) if e.is_panic() => {
                let p = e.into_panic();
                let msg = p
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| p.downcast_ref::<&str>().copied())
                    .unwrap_or_default();
                if attempt == 1 && msg.contains(GUEST_FAULT) {
                    // Straight to the process's stderr, past the test
                    // harness's capture: a run that passes the second time
                    // still shows the first fault in CI's log.
                    use std::io::Write;
                    let _ = writeln!(
                        std::io::stderr().lock(),
                        "QEMU lost a guest's write (run again): {msg}"
                    );
                    continue;
                }
                std::panic::resume_unwind(p);
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test]
async fn a_guest_fault_runs_the_scenario_once_more_and_only_once() {
    use std::sync::atomic::{AtomicU32, Ordering};
    static RUNS: AtomicU32 = AtomicU32::new(0);
    once_more_on_guest_fault(|| async {
        if RUNS.fetch_add(1, Ordering::SeqCst) == 0 {
            panic!("{GUEST_FAULT}: simulated by this test, first run");
        }
    })
    .await;
    assert_eq!(RUNS.load(Ordering::SeqCst), 2);

    // Twice in a row, or any other failure, fails.
    for first in [GUEST_FAULT, "something else"] {
        let runs = std::sync::Arc::new(AtomicU32::new(0));
        let r = tokio::spawn({
            let runs = runs.clone();
            async move {
                once_more_on_guest_fault(move || {
                    let runs = runs.clone();
                    async move {
                        let n = runs.fetch_add(1, Ordering::SeqCst);
                        let what = if n == 0 { first } else { GUEST_FAULT };
                        panic!("{what}: simulated by this test, run {n}");
                    }
                })
                .await;
            }
        })
        .await;
        assert!(r.is_err_and(|e| e.is_panic()));
        let expected = if first == GUEST_FAULT { 2 } else { 1 };
        assert_eq!(runs.load(Ordering::SeqCst), expected, "{first}");
    }
}

/// What a failed test shows of a guest's console: from just before the
/// first kernel fault report to its end (the whole report, not only its
/// last lines), or the console's last lines when there is none.
pub(crate) fn console(log: &Path) -> String {
    let text = match std::fs::read_to_string(log) {
        Ok(t) => t,
        Err(e) => return format!("({}: {e})", log.display()),
    };
    let lines: Vec<&str> = text.lines().collect();
    let first = lines
        .iter()
        .position(|l| KERNEL_FAULT_MARKS.iter().any(|m| l.contains(m)));
    let from = first.map_or(lines.len().saturating_sub(15), |i| i.saturating_sub(5));
    let shown = &lines[from..lines.len().min(from + 80)];
    format!(
        "{}\n{}",
        if first.is_some() {
            "kernel fault report:"
        } else {
            "last lines:"
        },
        shown.join("\n")
    )
}

/// A QEMU running the test guest (counting already) and one waiting for
/// it (`-incoming defer`), their files under `dir`.
async fn source_and_destination(g: &TestGuest, dir: &Path) -> (QemuProcess, QemuProcess) {
    let src = QemuProcess::launch(&spec(g), &dir.join("src"), false)
        .await
        .unwrap();
    let dst = QemuProcess::launch(&spec(g), &dir.join("dst"), true)
        .await
        .unwrap();
    let src_log = src.serial_log();
    assert!(until(Duration::from_secs(90), || counters(&src_log).len() >= 3).await);
    (src, dst)
}

/// After a migration to `dst`: its guest runs and counts on from just
/// after `last` (no restart, no jump). Its console log.
async fn carried_on(dst: &mut QemuProcess, last: u64) -> PathBuf {
    let dst_log = dst.serial_log();
    assert!(
        counts_on(&dst_log, last, Duration::from_secs(30)).await,
        "no counter at the destination: {}",
        console(&dst_log)
    );
    let first = counters(&dst_log)[0];
    assert!(
        first > last && first <= last + 3,
        "the counter restarted or jumped: source ended at {last}, destination began at {first}"
    );
    let st = dst.qmp.execute("query-status", None).await.unwrap();
    assert_eq!(st["status"], "running");
    dst_log
}

/// Has `dst` (started `-incoming defer`) listen for its migration on a
/// unix socket at `sock`.
async fn incoming_at(dst: &mut QemuProcess, sock: &Path) {
    let uri = format!("unix:{}", sock.display());
    dst.qmp
        .execute("migrate-incoming", Some(json!({ "uri": uri })))
        .await
        .unwrap();
    assert!(until(Duration::from_secs(10), || sock.exists()).await);
}

/// Has `src` migrate to a unix socket at `sock`; its final status.
async fn outgoing_to(src: &mut QemuProcess, sock: &Path) -> String {
    let uri = format!("unix:{}", sock.display());
    src.qmp
        .execute("migrate", Some(json!({ "uri": uri })))
        .await
        .unwrap();
    migration_end(src).await
}

/// QEMU's own migration from `src` to `dst` (started `-incoming defer`)
/// over a unix socket at `sock`; the source's final status.
async fn migrate_natively(src: &mut QemuProcess, dst: &mut QemuProcess, sock: &Path) -> String {
    incoming_at(dst, sock).await;
    outgoing_to(src, sock).await
}

pub(crate) async fn until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_guest_boots_and_answers_qmp() {
    let Some(g) = guest() else { return };
    let _heavy = convoy_tests::heavy().await;
    let dir = tempfile::tempdir().unwrap();
    let mut vm = QemuProcess::launch(&spec(g), dir.path(), false)
        .await
        .unwrap();
    let log = vm.serial_log();
    assert!(
        until(Duration::from_secs(90), || counters(&log).len() >= 3).await,
        "no counter on the serial console: {:?}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let st = vm.qmp.execute("query-status", None).await.unwrap();
    assert_eq!(st["status"], "running");
    assert!(vm.is_running());
    vm.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_migration_over_a_unix_socket_keeps_the_counter_going() {
    once_more_on_guest_fault(|| async {
        let Some(g) = guest() else { return };
        let _heavy = convoy_tests::heavy().await;
        let dir = tempfile::tempdir().unwrap();
        let (mut src, mut dst) = source_and_destination(g, dir.path()).await;
        let src_log = src.serial_log();
        let sock = dir.path().join("migration.sock");
        assert_eq!(
            migrate_natively(&mut src, &mut dst, &sock).await,
            "completed"
        );
        let st = src.qmp.execute("query-status", None).await.unwrap();
        assert_eq!(st["status"], "postmigrate", "the source is paused for good");
        let last = *counters(&src_log).last().unwrap();
        let dst_log = carried_on(&mut dst, last).await;
        let text = std::fs::read_to_string(&dst_log).unwrap();
        assert!(!text.contains("convoy-guest up"), "the guest rebooted");
        src.quit().await;
        dst.quit().await;
    })
    .await;
}

/// QEMU's migration stream and return path carried through an
/// authenticated QUIC stream between two mutually-TLS'd endpoints (the
/// agents' transport), with both ends computing the same digests over
/// every byte: the data path of Convoy's `qemu` backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_migration_through_an_authenticated_quic_tunnel() {
    once_more_on_guest_fault(|| async {
        use convoy_agent::backend::qemu::tunnel::splice;
        use convoy_agent::transport::{self, Tuning, ALPN_AGENT};
        use convoy_agent::trust::identity::server_config;
        use convoy_agent::trust::pki::Pki;
        use convoy_protocol::names::{Role, TrustDomain};

        let Some(g) = guest() else { return };
        let _heavy = convoy_tests::heavy().await;
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(
            &dir.path().join("pki"),
            TrustDomain::new("tunnel.test").unwrap(),
        )
        .unwrap();
        let (na, nb) = ("a".parse().unwrap(), "b".parse().unwrap());
        for n in [&na, &nb] {
            pki.issue(Role::Agent, n, Duration::from_secs(600)).unwrap();
        }
        let (ida, idb) = (
            pki.identity(Role::Agent, &na).unwrap(),
            pki.identity(Role::Agent, &nb).unwrap(),
        );
        let trust = pki.trust().unwrap();
        let tuning = Tuning::default();
        let server = transport::endpoint(
            "127.0.0.1:0".parse().unwrap(),
            Some(server_config(&idb, &trust, &[ALPN_AGENT]).unwrap()),
            &tuning,
        )
        .unwrap();
        let server_addr = server.local_addr().unwrap();

        let (mut src, mut dst) = source_and_destination(g, dir.path()).await;
        let src_log = src.serial_log();

        // Destination agent: QEMU listens on its own socket; the agent accepts
        // the authenticated stream and connects it there.
        let dst_sock = dir.path().join("dst-incoming.sock");
        incoming_at(&mut dst, &dst_sock).await;
        let b_side = tokio::spawn(async move {
            let conn = transport::Connection::Quic(server.accept().await.unwrap().await.unwrap());
            transport::grant_migration_credit(&conn, &transport::Tuning::default());
            let (send, recv) = conn.accept_bi().await.unwrap();
            let local = tokio::net::UnixStream::connect(&dst_sock).await.unwrap();
            let r = splice(local, send, recv, 0).await.unwrap();
            conn.closed().await;
            r
        });
        // Source agent: QEMU migrates to a socket the agent listens on; the
        // agent carries it to b, whose certificate it checks.
        let src_sock = dir.path().join("src-outgoing.sock");
        let listener = tokio::net::UnixListener::bind(&src_sock).unwrap();
        let client = transport::endpoint("127.0.0.1:0".parse().unwrap(), None, &tuning).unwrap();
        let conn = transport::connect(
            &client,
            server_addr,
            pki.identity(Role::Agent, &nb).unwrap().id().clone(),
            ALPN_AGENT,
            &ida,
            &trust,
            &tuning,
        )
        .await
        .unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        let a_side = tokio::spawn(async move {
            let (local, _) = listener.accept().await.unwrap();
            splice(local, send, recv, 0).await.unwrap()
        });
        assert_eq!(outgoing_to(&mut src, &src_sock).await, "completed");
        let last = *counters(&src_log).last().unwrap();
        // The source QEMU is done: quitting it closes its end of the stream.
        src.quit().await;
        let a = tokio::time::timeout(Duration::from_secs(30), a_side)
            .await
            .unwrap()
            .unwrap();
        conn.close(0u32.into(), b"done");
        let b = tokio::time::timeout(Duration::from_secs(30), b_side)
            .await
            .unwrap()
            .unwrap();
        // Every byte arrived as sent, both ways.
        assert!(a.out.bytes > 1 << 20, "{a:?}");
        assert_eq!(a.out, b.back, "source → destination digests differ");
        assert_eq!(a.back, b.out, "return-path digests differ");

        carried_on(&mut dst, last).await;
        dst.quit().await;
    })
    .await;
}

/// QEMU VMs through the agent's operator API: only allow-listed binaries
/// and images inside the image directory; listed as `qemu`; a destination
/// without a QEMU backend refuses them at Accept; deleted with their
/// process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_run_qemu_vms_only_from_allowed_binaries_and_images() {
    use convoy_agent::backend::qemu::vm::QemuConfig;
    use convoy_agent::client::ClientError;
    use convoy_agent::lab::Lab;
    use convoy_protocol::ctl::{Outcome, VmState};

    let Some(g) = guest() else { return };
    let _heavy = convoy_tests::heavy().await;
    let images = g.kernel.parent().unwrap().to_owned();
    let qemu = qemu();
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("runtime");
    let lab = Lab::start(&dir.path().join("lab"), &["a", "b"], |name, cfg| {
        if name == "a" {
            cfg.qemu = Some(QemuConfig {
                binaries: vec![qemu.clone()],
                images: images.clone(),
                runtime: runtime.clone(),
                multifd: Default::default(),
            });
        }
    })
    .await
    .unwrap();
    let a = lab.client("a").await.unwrap();
    let spec = |name: &str| definition(name, vec![]);
    let bad = |r: Result<convoy_protocol::ctl::VmInfo, ClientError>, why: &str| match r {
        Err(ClientError::Agent(e)) => assert!(e.message.contains(why), "{e:?} lacks {why:?}"),
        other => panic!("expected a refusal mentioning {why:?}: {other:?}"),
    };
    let mut s = spec("evil");
    s.binary = "/bin/sh".into();
    bad(a.vm_create_qemu(s).await, "not one this agent allows");
    let mut s = spec("evil");
    s.kernel = Some("../../../etc/passwd".into());
    bad(a.vm_create_qemu(s).await, "not a file inside");
    let mut s = spec("evil");
    s.append = "console=ttyS0\n-monitor stdio".into();
    bad(a.vm_create_qemu(s).await, "printable ASCII");
    assert!(a.vm_list().await.unwrap().is_empty(), "nothing left behind");

    // A delete while QEMU starts finds a place, not a VM: refused, so the
    // launch cannot end with a QEMU nobody registered.
    let creating = tokio::spawn({
        let a2 = lab.client("a").await.unwrap();
        let s = spec("guest");
        async move { a2.vm_create_qemu(s).await }
    });
    let mut refused_while_starting = 0;
    let mut deleted_once_registered = false;
    while !creating.is_finished() {
        match a.vm_delete("guest".parse().unwrap()).await {
            Err(ClientError::Agent(e)) if e.message.contains("is being created") => {
                refused_while_starting += 1;
            }
            Err(ClientError::Agent(e))
                if e.kind == convoy_protocol::ctl::CtlErrorKind::NotFound => {}
            // Registered (the answer to the create still on its way): a
            // VM now, which a delete may remove.
            Ok(()) => {
                deleted_once_registered = true;
                break;
            }
            other => panic!("a delete during the launch: {other:?}"),
        }
    }
    let first = creating.await.unwrap();
    assert!(
        refused_while_starting > 0,
        "QEMU started before any delete reached the agent"
    );
    let info = if deleted_once_registered {
        a.vm_create_qemu(spec("guest")).await.unwrap()
    } else {
        first.unwrap()
    };
    assert_eq!(info.backend, "qemu");
    assert_eq!(info.state, VmState::Running);
    let log = runtime.join("guest/serial.log");
    assert!(until(Duration::from_secs(90), || counters(&log).len() >= 3).await);
    // The runtime directory (QMP socket, migration sockets) and the
    // guest's serial log and stderr are the agent's alone.
    {
        use convoy_agent::private::mode_of;
        assert_eq!(mode_of(&runtime.join("guest")).unwrap(), 0o700);
        assert_eq!(mode_of(&log).unwrap(), 0o600);
        assert_eq!(mode_of(&runtime.join("guest/qemu.stderr")).unwrap(), 0o600);
    }
    let pid = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| {
            std::fs::read_to_string(e.path().join("cmdline"))
                .is_ok_and(|c| c.contains(runtime.join("guest").to_str().unwrap()))
        })
        .map(|e| e.path());
    let pid = pid.expect("the QEMU process runs");
    // Paused (QMP stop), the guest prints nothing and cannot migrate;
    // resumed (QMP cont), it carries on.
    let paused = a.vm_pause("guest".parse().unwrap(), true).await.unwrap();
    assert_eq!(paused.state, VmState::Paused);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let still = counters(&log).len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(counters(&log).len(), still, "a paused guest runs");
    let err = a
        .migrate(
            lab.migrate_request("guest", "a", "b", Default::default())
                .unwrap(),
            |_| {},
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Paused"), "{err}");
    let resumed = a.vm_pause("guest".parse().unwrap(), false).await.unwrap();
    assert_eq!(resumed.state, VmState::Running);
    assert!(until(Duration::from_secs(30), || counters(&log).len() > still).await);
    // The destination has no QEMU backend: refused at Accept, the VM
    // keeps running here.
    let r = a
        .migrate(
            lab.migrate_request("guest", "a", "b", Default::default())
                .unwrap(),
            |_| {},
        )
        .await
        .unwrap();
    match &r.outcome {
        Outcome::Aborted(why) => assert!(why.contains("no QEMU backend"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(a.vm_list().await.unwrap()[0].state, VmState::Running);
    a.vm_delete("guest".parse().unwrap()).await.unwrap();
    assert!(
        until(Duration::from_secs(10), || !pid.exists()).await,
        "QEMU outlived its VM"
    );
    assert!(!runtime.join("guest").exists(), "runtime files removed");
    lab.shutdown().await;
}

/// Two agents with QEMU backends ([`convoy_agent::lab::Lab::start_qemu`]),
/// each with its own image directory (a copy of the guest's kernel and
/// initramfs) and runtime directory.
pub(crate) struct QemuLab {
    pub(crate) lab: convoy_agent::lab::Lab,
    /// Every progress report of the last migration, in order.
    progress: std::sync::Mutex<Vec<convoy_protocol::ctl::Progress>>,
}

impl QemuLab {
    pub(crate) async fn start(root: &Path, g: &TestGuest) -> QemuLab {
        Self::start_with(root, g, |_, _| {}).await
    }

    async fn start_with(
        root: &Path,
        g: &TestGuest,
        tweak: impl Fn(&str, &mut convoy_agent::config::AgentConfig),
    ) -> QemuLab {
        let lab = convoy_agent::lab::Lab::start_qemu_with(root, &["a", "b"], &qemu(), g, tweak)
            .await
            .unwrap();
        QemuLab {
            lab,
            progress: Default::default(),
        }
    }

    /// A lab whose agent a runs the guest "guest" with a 4 MiB disk
    /// (`disk.img`) it keeps writing, once one whole generation is on it:
    /// the lab and the disk's path at a.
    pub(crate) async fn with_written_disk(root: &Path, g: &TestGuest) -> (QemuLab, PathBuf) {
        let q = QemuLab::start(root, g).await;
        let disk = q.images("a").join("disk.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        q.create("a", "guest", vec!["disk.img".into()]).await;
        assert!(
            until(Duration::from_secs(120), || disk_blocks(&disk, 256)
                .iter()
                .all(Option::is_some))
            .await,
            "the guest never wrote its disk"
        );
        (q, disk)
    }

    pub(crate) fn serial(&self, agent: &str, vm: &str) -> PathBuf {
        self.lab.qemu_serial(agent, vm)
    }

    pub(crate) fn images(&self, agent: &str) -> PathBuf {
        self.lab.qemu_images(agent)
    }

    /// The QEMU processes whose runtime directory is under `agent`'s.
    pub(crate) fn processes(&self, agent: &str) -> Vec<PathBuf> {
        let needle = format!("{}/", self.lab.qemu_runtime(agent).display());
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
            })
            .map(|e| e.path())
            .collect()
    }

    pub(crate) async fn create(&self, agent: &str, vm: &str, disks: Vec<String>) {
        let c = self.lab.client(agent).await.unwrap();
        c.vm_create_qemu(definition(vm, disks)).await.unwrap();
        let log = self.serial(agent, vm);
        assert!(
            until(Duration::from_secs(90), || counters(&log).len() >= 5).await,
            "the guest did not come up: {:?}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    async fn migrate(
        &self,
        vm: &str,
        from: &str,
        to: &str,
        options: convoy_protocol::model::MigrationPlan,
    ) -> convoy_protocol::ctl::MigrationReport {
        let c = self.lab.client(from).await.unwrap();
        let req = self.lab.migrate_request(vm, from, to, options).unwrap();
        self.progress.lock().unwrap().clear();
        c.migrate(req, |p| self.progress.lock().unwrap().push(p.clone()))
            .await
            .unwrap()
    }

    /// Migrates `vm` and checks it moved ([`QemuLab::assert_moved`]).
    async fn moves(
        &self,
        vm: &str,
        from: &str,
        to: &str,
        options: convoy_protocol::model::MigrationPlan,
    ) -> convoy_protocol::ctl::MigrationReport {
        let service = ServiceClient::start(
            vec![
                self.lab.qemu_service(from, vm),
                self.lab.qemu_service(to, vm),
            ],
            50,
        );
        // A moment of service at the source first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let last = *counters(&self.serial(from, vm)).last().unwrap();
        let r = self.migrate(vm, from, to, options).await;
        self.assert_moved(&r, vm, from, to, last).await;
        assert_served_through(service.finish(Duration::from_secs(30)).await, &r);
        r
    }

    /// After a completed migration: the counter carried on at the
    /// destination without a reboot, the source QEMU is gone, the
    /// destination lists the VM running, and both audit logs hold the
    /// receipts (an evidence bundle built from them checks out).
    async fn assert_moved(
        &self,
        r: &convoy_protocol::ctl::MigrationReport,
        vm: &str,
        from: &str,
        to: &str,
        last_at_source: u64,
    ) {
        use convoy_protocol::ctl::{Outcome, VmState};
        assert_eq!(r.outcome, Outcome::Completed, "{r:#?}");
        assert!(r.verified);
        assert_eq!(r.receipts.len(), 4);
        let q = r.qemu.as_ref().expect("QEMU figures");
        assert_eq!(q.status, "completed");
        eprintln!(
            "{vm} {from}→{to} ({}, multifd {}, disks {}): Convoy total {:.0} ms downtime {:.1} ms; QEMU total {:?} ms downtime {:?} ms, {:?} bytes; {} channels",
            q.mode,
            q.multifd_channels,
            q.disks_copied,
            r.total_ms,
            r.downtime_ms,
            q.total_ms,
            q.downtime_ms,
            q.transferred_bytes,
            q.channels.len()
        );
        if q.mode == convoy_protocol::model::MigrationMode::Precopy {
            // A pre-copy pause in its parts (from QEMU's stop), both
            // agents': they make up the downtime, and the destination's
            // record and start are its own measures.
            let pause = r.convergence.pause;
            let parts_ms = pause.parts_us().iter().sum::<u64>() as f64 / 1e3;
            assert!((parts_ms - r.downtime_ms).abs() < 0.05, "{pause:?}");
            assert!(pause.record_us > 0 && pause.vm_start_us > 0, "{pause:?}");
            eprintln!("pause: {pause:?}");
        }
        assert!(
            until(Duration::from_secs(10), || self.processes(from).is_empty()).await,
            "the source QEMU still runs"
        );
        let dst_log = self.serial(to, vm);
        // A TCG guest beside the suite's other tests on two cores may be
        // slow to print: a minute, and the log's end if it never does.
        if !counts_on(&dst_log, last_at_source, Duration::from_secs(60)).await {
            panic!(
                "no counter after {last_at_source} at the destination; its console: {}\n{}",
                console(&dst_log),
                self.stalled(to, vm).await
            );
        }
        let after: Vec<u64> = counters(&dst_log)
            .into_iter()
            .filter(|&c| c > last_at_source.saturating_sub(1000))
            .collect();
        let first_new = after.iter().copied().find(|&c| c > last_at_source).unwrap();
        assert!(
            first_new <= last_at_source + 30,
            "the counter jumped from {last_at_source} to {first_new}"
        );
        let list = self.lab.client(to).await.unwrap().vm_list().await.unwrap();
        let here = list.iter().find(|v| v.name.as_str() == vm).unwrap();
        assert_eq!(
            (here.backend.as_str(), here.state),
            ("qemu", VmState::Running)
        );
        let gone = self
            .lab
            .client(from)
            .await
            .unwrap()
            .vm_list()
            .await
            .unwrap();
        assert!(gone.iter().all(|v| v.name.as_str() != vm), "{gone:?}");
        let s = evidence(&self.lab, from, to, &r.migration).await;
        assert!(s.started, "{s:?}");
        // Both journals settled it: completed, handed over once.
        use convoy_protocol::journal::{Epoch, JournalOutcome, JournalPhase};
        let completed = |agent: &str| {
            self.lab.journal(agent).unwrap().iter().any(|j| {
                j.migration.to_string() == r.migration
                    && j.phase == JournalPhase::Ended(JournalOutcome::Completed)
                    && j.epoch == Epoch(1)
            })
        };
        assert!(completed(from), "{:?}", self.lab.journal(from));
        assert!(
            until(Duration::from_secs(10), || completed(to)).await,
            "{:?}",
            self.lab.journal(to)
        );
    }
}

/// The guest's service through a completed migration, from a client
/// that sent to both hosts: served first at the source, then at the
/// destination, every request answered in the end, and the slowest
/// waited through QEMU's pause (requests go every 20 ms, so one arrived
/// within 20 ms of its start).
fn assert_served_through(
    s: convoy_agent::backend::qemu::service::ServiceRecord,
    r: &convoy_protocol::ctl::MigrationReport,
) {
    let max_ms = s.stats.percentile_us(1.0).unwrap_or(0) / 1000;
    eprintln!(
        "service: {} served ({:?} at each host), {} waiting, {} dropped; mean {:?} µs, p99 {:?} µs, max {max_ms} ms",
        s.stats.served,
        s.answered_by,
        s.stats.waiting,
        s.stats.dropped,
        s.stats.mean_us(),
        s.stats.percentile_us(0.99),
    );
    assert_eq!((s.stats.waiting, s.stats.dropped), (0, 0), "{s:?}");
    assert!(s.answered_by[0] > 0 && s.answered_by[1] > 0, "{s:?}");
    let downtime = r.qemu.as_ref().and_then(|q| q.downtime_ms).unwrap_or(0);
    assert!(
        max_ms + 20 >= downtime,
        "max {max_ms} ms, QEMU's downtime {downtime} ms"
    );
}

/// The test guest's definition as operators give it (paths relative to
/// the agent's image directory).
fn definition(vm: &str, disks: Vec<String>) -> convoy_protocol::ctl::QemuVmSpec {
    convoy_protocol::ctl::QemuVmSpec {
        name: vm.parse().unwrap(),
        binary: "qemu-system-x86_64".into(),
        memory_mib: 128,
        vcpus: 1,
        kernel: Some("vmlinuz".into()),
        initrd: Some("initrd.img".into()),
        append: "console=ttyS0 quiet panic=-1".into(),
        disks,
        accel: Accel::Tcg,
        attributes: Default::default(),
    }
}

/// A QEMU started outside Convoy (by "someone else": this test) from the
/// command line Convoy would use for [`definition`] with agent a's images,
/// its QMP socket and serial log in `dir`. Returns the process and its QMP
/// socket once the guest counts.
async fn start_outside(q: &QemuLab, dir: &Path) -> (tokio::process::Child, PathBuf) {
    let images = q.images("a");
    let spec = QemuSpec {
        kernel: Some(images.join("vmlinuz").canonicalize().unwrap()),
        initrd: Some(images.join("initrd.img").canonicalize().unwrap()),
        ..spec(guest().unwrap())
    };
    std::fs::create_dir_all(dir).unwrap();
    let child = tokio::process::Command::new(&spec.binary)
        .args(spec.args(dir, false))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log = dir.join("serial.log");
    assert!(
        until(Duration::from_secs(90), || counters(&log).len() >= 5).await,
        "the outside guest did not come up"
    );
    (child, dir.join("qmp.sock"))
}

/// A QEMU that Convoy did not start is adopted by its QMP socket — only if
/// it runs an allowed binary and the VM its definition describes — and
/// then migrates like any other: the counter carries on at b and the
/// adopted process is quit. Refused adoptions say why and leave nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_qemu_is_adopted_by_its_qmp_socket_and_migrates() {
    once_more_on_guest_fault(|| async {
        let Some(g) = guest() else { return };
        let _heavy = convoy_tests::heavy().await;
        let dir = tempfile::tempdir().unwrap();
        let q = QemuLab::start(dir.path(), g).await;
        let outside = dir.path().join("outside");
        let (mut child, sock) = start_outside(&q, &outside).await;
        let c = q.lab.client("a").await.unwrap();
        let sock_str = sock.display().to_string();

        // Refusals: each says what is wrong and registers nothing.
        let refused = |r: Result<_, convoy_agent::client::ClientError>| match r {
            Ok(v) => panic!("adopted: {v:?}"),
            Err(e) => e.to_string(),
        };
        let e = refused(
            c.vm_adopt_qemu(definition("guest", vec![]), "qmp.sock".into())
                .await,
        );
        assert!(e.contains("absolute path"), "{e}");
        let missing = dir.path().join("nothing.sock").display().to_string();
        let e = refused(c.vm_adopt_qemu(definition("guest", vec![]), missing).await);
        assert!(e.contains("nothing.sock"), "{e}");
        // A socket whose listener is not QEMU (this test binary): nothing is
        // said to it.
        let other = dir.path().join("other.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&other).unwrap();
        let e = refused(
            c.vm_adopt_qemu(definition("guest", vec![]), other.display().to_string())
                .await,
        );
        assert!(e.contains("not the allowed QEMU binary"), "{e}");
        let mut bigger = definition("guest", vec![]);
        bigger.memory_mib = 256;
        let e = refused(c.vm_adopt_qemu(bigger, sock_str.clone()).await);
        assert!(
            e.contains("128 MiB of memory, the definition 256 MiB"),
            "{e}"
        );
        let mut wider = definition("guest", vec![]);
        wider.vcpus = 2;
        let e = refused(c.vm_adopt_qemu(wider, sock_str.clone()).await);
        assert!(e.contains("1 vCPUs, the definition 2"), "{e}");
        assert!(c.vm_list().await.unwrap().is_empty());
        assert!(
            matches!(child.try_wait(), Ok(None)),
            "a refused QEMU keeps running"
        );

        let info = c
            .vm_adopt_qemu(definition("guest", vec![]), sock_str)
            .await
            .unwrap();
        assert_eq!(
            (info.backend.as_str(), info.state),
            ("qemu", convoy_protocol::ctl::VmState::Running)
        );
        let last = *counters(&outside.join("serial.log")).last().unwrap();
        let r = q
            .migrate("guest", "a", "b", options(MigrationMode::Precopy, 1))
            .await;
        q.assert_moved(&r, "guest", "a", "b", last).await;
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("the adopted QEMU quits after the migration")
            .unwrap();
        assert!(status.success(), "quit, not killed: {status}");
        q.lab.shutdown().await;
    })
    .await;
}

/// Waits until both agents' logs hold the migration's outcome, then builds
/// an evidence bundle from them and checks it offline.
async fn evidence(
    lab: &convoy_agent::lab::Lab,
    from: &str,
    to: &str,
    migration: &str,
) -> convoy_protocol::evidence::BundleSummary {
    use convoy_protocol::audit::AuditEvent;
    use convoy_protocol::evidence::{build_bundle, check_bundle};
    let read = |agent: &str| convoy_tests::live_audit_log(lab, agent);
    let has_outcome = |agent: &str| {
        read(agent).records.iter().any(|r| {
            matches!(&r.event, AuditEvent::Outcome { migration: m, .. } if m.to_string() == migration)
        })
    };
    assert!(
        until(Duration::from_secs(10), || has_outcome(from)
            && has_outcome(to))
        .await,
        "both logs record the outcome"
    );
    let (a, b) = (read(from), read(to));
    let id = a
        .records
        .iter()
        .find_map(|r| match &r.event {
            AuditEvent::TicketAccepted { migration: m, .. } if m.to_string() == migration => {
                Some(*m)
            }
            _ => None,
        })
        .unwrap();
    let bundle = build_bundle(id, &[a, b]).unwrap().encode().unwrap();
    check_bundle(&bundle, &lab.trust).unwrap()
}

fn options(
    mode: convoy_protocol::model::MigrationMode,
    streams: u16,
) -> convoy_protocol::model::MigrationPlan {
    convoy_protocol::model::MigrationPlan {
        streams,
        mode,
        ..Default::default()
    }
}

/// A heavy test's turn, a QEMU lab in a temporary directory, and the test
/// guest running at `a` as "guest" (dropped in reverse: the lab, its
/// directory, the turn); `None` where QEMU tests are skipped.
async fn guest_at_a() -> Option<(
    tokio::sync::SemaphorePermit<'static>,
    tempfile::TempDir,
    QemuLab,
)> {
    let g = guest()?;
    let heavy = convoy_tests::heavy().await;
    let dir = tempfile::tempdir().unwrap();
    let q = QemuLab::start(dir.path(), g).await;
    q.create("a", "guest", vec![]).await;
    Some((heavy, dir, q))
}

/// The version the test QEMU prints (`QEMU emulator version 7.2.22 …`).
fn qemu_version() -> String {
    let out = std::process::Command::new(qemu())
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .unwrap_or_else(|| panic!("no version in {text:?}"))
        .to_owned()
}

/// Pre-copy over 2 streams a → b, whose agent leaves multifd out for a
/// QEMU whose multifd sender spins (one channel then), then back b → a,
/// whose agent is told to use multifd whatever the version: the counter
/// carries on each time, the source QEMU is gone, both logs hold matching
/// receipts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_vms_migrate_between_agents_precopy_then_multifd() {
    once_more_on_guest_fault(|| async {
        let Some(g) = guest() else { return };
        let _heavy = convoy_tests::heavy().await;
        let dir = tempfile::tempdir().unwrap();
        let q = QemuLab::start_with(dir.path(), g, |name, cfg| {
            if let Some(c) = cfg.qemu.as_mut().filter(|_| name == "b") {
                c.multifd = Multifd::Always;
            }
        })
        .await;
        q.create("a", "guest", vec![]).await;
        let r = q
            .moves("guest", "a", "b", options(MigrationMode::Precopy, 2))
            .await;
        let fig = r.qemu.as_ref().unwrap();
        let spins = multifd_busy_waits(&qemu_version());
        let want = if spins { (0, 1) } else { (2, 3) };
        assert_eq!((fig.multifd_channels, fig.channels.len()), want);

        let r = q
            .moves("guest", "b", "a", options(MigrationMode::Precopy, 2))
            .await;
        let fig = r.qemu.as_ref().unwrap();
        assert_eq!((fig.multifd_channels, fig.channels.len()), (2, 3));
        q.lab.shutdown().await;
    })
    .await;
}

/// Post-copy a → b (the guest starts at b at the switch and faults the
/// rest in over the return path), then hybrid b → a (switching after
/// 300 ms of pre-copy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_vms_migrate_with_postcopy_and_hybrid() {
    once_more_on_guest_fault(|| async {
        let Some((_heavy, _dir, q)) = guest_at_a().await else {
            return;
        };
        let r = q
            .moves("guest", "a", "b", options(MigrationMode::Postcopy, 1))
            .await;
        let fig = r.qemu.as_ref().unwrap();
        assert_eq!(fig.mode, MigrationMode::Postcopy);
        // Post-copy needs the return path: bytes came back on the main channel.
        assert!(fig.channels[0].back_bytes > 0, "{fig:?}");

        let mut o = options(MigrationMode::Hybrid, 1);
        o.postcopy_after_ms = Some(300);
        o.bandwidth = Some(32 << 20);
        q.moves("guest", "b", "a", o).await;
        q.lab.shutdown().await;
    })
    .await;
}

/// Post-copy through a link the test cuts twice after the switch, each
/// time for longer than the agents' link timeout: the guest runs on at b
/// (faulting on what it lacks), the source dials b again, both QEMUs
/// recover (`migrate-recover`, `migrate` with `resume`) over a new
/// connection, the second time from the first recovery's channel, and
/// the migration completes verified, the counter continuous, with each
/// broken channel counted as each side received it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_postcopy_recovers_after_its_link_is_cut() {
    once_more_on_guest_fault(|| async {
        use convoy_protocol::stream::ChannelKind;
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let Some(g) = guest() else { return };
        let _heavy = convoy_tests::heavy().await;
        let dir = tempfile::tempdir().unwrap();
        let q = std::sync::Arc::new(
            QemuLab::start_with(dir.path(), g, |_, c| {
                convoy_tests::short_links(Duration::from_secs(60))(c)
            })
            .await,
        );
        q.create("a", "guest", vec![]).await;
        let last = *counters(&q.serial("a", "guest")).last().unwrap();
        let link = convoy_tests::CuttableLink::start(q.lab.agent("b").unwrap().addr)
            .await
            .unwrap();
        // Slow enough that post-copy's push of the rest takes half a minute
        // (the cap holds after the switch: `max-postcopy-bandwidth`).
        let mut o = options(MigrationMode::Postcopy, 1);
        o.bandwidth = Some(2 << 20);
        let mut req = q.lab.migrate_request("guest", "a", "b", o).unwrap();
        req.to_addr = Some(link.addr().to_string());
        let mover = {
            let q = q.clone();
            tokio::spawn(async move {
                let c = q.lab.client("a").await.unwrap();
                c.migrate(req, |p| q.progress.lock().unwrap().push(p.clone()))
                    .await
                    .unwrap()
            })
        };
        // QEMU's migration is post-copy-active after progress entry `from`.
        let active_after = |from: usize| {
            let q = q.clone();
            move || {
                q.progress.lock().unwrap()[from..]
                    .iter()
                    .any(|p| p.phase == "qemu postcopy-active")
            }
        };
        for cut in 1..=2 {
            assert!(
                until(Duration::from_secs(60), active_after(0)).await,
                "never switched: {:?}",
                q.progress.lock().unwrap().last()
            );
            link.set_up(false);
            // Past the link timeout (2 s) on both sides.
            tokio::time::sleep(Duration::from_secs(5)).await;
            let seen = q.progress.lock().unwrap().len();
            link.set_up(true);
            if cut == 1 {
                // Recovered and migrating again before the second cut.
                assert!(
                    until(Duration::from_secs(60), active_after(seen)).await,
                    "never recovered: {:?}",
                    q.progress.lock().unwrap().last()
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        let r = tokio::time::timeout(Duration::from_secs(300), mover)
            .await
            .expect("the migration never ended")
            .unwrap();
        for agent in ["a", "b"] {
            eprintln!(
                "{agent}: {:#?}",
                convoy_tests::audited_phases(&q.lab, agent)
            );
            eprintln!(
                "{agent}: {:#?}",
                convoy_tests::refusals_logged(&q.lab, agent)
            );
        }
        q.assert_moved(&r, "guest", "a", "b", last).await;
        let fig = r.qemu.as_ref().unwrap();
        let kinds: Vec<_> = fig.channels.iter().map(|c| c.kind).collect();
        assert_eq!(
            kinds,
            [
                ChannelKind::Migration(0),
                ChannelKind::Resumed(1),
                ChannelKind::Resumed(2)
            ]
        );
        for agent in ["a", "b"] {
            let phases = convoy_tests::audited_phases(&q.lab, agent);
            for n in 1..=2 {
                let want = format!("QEMU resumes post-copy on a new connection (recovery {n})");
                assert!(
                    phases.iter().any(|p| p.contains(&want)),
                    "{agent}: {phases:?}"
                );
            }
        }
    })
    .await;
}

/// QEMU's downtime limit leaves room for the handover's two round trips:
/// over a link of 120 ms round trip, a 200 ms target cannot be met (the
/// round trips alone take 240 ms), so pre-copy ends at once, before QEMU
/// sends anything, and the guest runs on at a; a 1 s target gives QEMU
/// the target less the two round trips timed after `Accept`, and the
/// guest moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_downtime_limit_leaves_room_for_the_handovers_round_trips() {
    once_more_on_guest_fault(|| async {
        use convoy_protocol::ctl::Outcome;
        let Some((_heavy, _dir, q)) = guest_at_a().await else {
            return;
        };
        let last = *counters(&q.serial("a", "guest")).last().unwrap();
        let link = convoy_tests::CuttableLink::start(q.lab.agent("b").unwrap().addr)
            .await
            .unwrap();
        link.set_delay(Duration::from_millis(60));
        let c = q.lab.client("a").await.unwrap();
        let migrate = |target_ms: u32| {
            let mut o = options(MigrationMode::Precopy, 1);
            o.max_downtime_ms = target_ms;
            let mut req = q.lab.migrate_request("guest", "a", "b", o).unwrap();
            req.to_addr = Some(link.addr().to_string());
            req
        };

        let r = c.migrate(migrate(200), |_| {}).await.unwrap();
        match &r.outcome {
            Outcome::Aborted(why) => assert!(
                why.contains("the handover's two round trips alone") && why.contains("200 ms"),
                "{why}"
            ),
            other => panic!("{other:?} {r:?}"),
        }
        // Nothing was sent: QEMU never started migrating.
        assert_eq!(r.pages_sent, 0, "{r:?}");
        assert!(
            until(Duration::from_secs(10), || counters(
                &q.serial("a", "guest")
            )
            .last()
                > Some(&last))
            .await,
            "the guest does not run on at a"
        );
        // b drops the QEMU it launched for the migration once the Abort is in
        // (over TCP it may still be listed when a's report is back).
        let cb = q.lab.client("b").await.unwrap();
        let wait = std::time::Instant::now();
        while !cb.vm_list().await.unwrap().is_empty() {
            assert!(
                wait.elapsed() < Duration::from_secs(20),
                "b keeps the guest"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // The last count at a is the one before the pause (over this slow
        // link the copy takes seconds of counting): watched while it runs,
        // since a's console goes with its QEMU.
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let watcher = {
            let (seen, log) = (seen.clone(), q.serial("a", "guest"));
            tokio::spawn(async move {
                loop {
                    if let Some(&n) = counters(&log).last() {
                        seen.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        let r = c.migrate(migrate(1000), |_| {}).await.unwrap();
        watcher.abort();
        eprintln!(
            "1000 ms target: downtime {:.1} ms, QEMU's {:?} ms, {:?}",
            r.downtime_ms,
            r.qemu.as_ref().map(|q| q.downtime_ms),
            r.convergence.pause
        );
        let last = seen.load(std::sync::atomic::Ordering::Relaxed);
        q.assert_moved(&r, "guest", "a", "b", last).await;
        let phases = convoy_tests::audited_phases(&q.lab, "a");
        let limit: u64 = phases
            .iter()
            .find_map(|p| {
                let rest = p.split("QEMU's downtime limit ").nth(1)?;
                rest.split(" ms").next()?.parse().ok()
            })
            .unwrap_or_else(|| panic!("no downtime limit among {phases:?}"));
        // 1000 ms less two round trips of at least 120 ms each.
        assert!((500..=760).contains(&limit), "{limit} ms: {phases:?}");
        // Reached by the ramp, from 30 ms at the first pass.
        assert!(
            phases
                .iter()
                .any(|p| p.contains("reached by a ramp from 30 ms over QEMU's passes")),
            "{phases:?}"
        );
    })
    .await;
}

/// Blocks of the guest's disk pattern (`scripts/build-test-guest`): block
/// i holds "block i gen g <sha256 of 'block i gen g'>", space-padded to
/// 4 KiB. Returns the generation of each of the first `n` blocks (None
/// for a block never written); panics on a block that is neither zero nor
/// valid.
pub(crate) fn disk_blocks(path: &Path, n: usize) -> Vec<Option<u64>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4096];
    for i in 0..n {
        f.read_exact(&mut buf).unwrap();
        if buf.iter().all(|&b| b == 0) {
            out.push(None);
            continue;
        }
        let text = String::from_utf8_lossy(&buf);
        let words: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(words.len(), 5, "block {i} is torn: {:?}", &text[..80]);
        let body = format!("{} {} {} {}", words[0], words[1], words[2], words[3]);
        assert_eq!(words[1], i.to_string(), "block {i} holds another block");
        let sum = ring::digest::digest(&ring::digest::SHA256, body.as_bytes());
        let hex: String = sum.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(words[4], hex, "block {i}: bad checksum");
        out.push(Some(words[3].parse().unwrap()));
    }
    out
}

/// `--copy-storage`: the disk is mirrored over NBD through Convoy while
/// the guest keeps writing to it, then memory follows; the destination's
/// disk verifies block by block and holds every block the source had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_vms_migrate_with_their_disk_while_it_is_written() {
    once_more_on_guest_fault(|| async {
        let Some(g) = guest() else { return };
        let _heavy = convoy_tests::heavy().await;
        let dir = tempfile::tempdir().unwrap();
        let (q, src_disk) = QemuLab::with_written_disk(dir.path(), g).await;
        let gen_before = disk_blocks(&src_disk, 256)
            .iter()
            .flatten()
            .max()
            .copied()
            .unwrap();

        // Without --copy-storage: refused, nothing touched.
        let r = q
            .lab
            .client("a")
            .await
            .unwrap()
            .migrate(
                q.lab
                    .migrate_request("guest", "a", "b", options(MigrationMode::Precopy, 1))
                    .unwrap(),
                |_| {},
            )
            .await;
        match r {
            Err(convoy_agent::client::ClientError::Agent(e)) => {
                assert!(e.message.contains("--copy-storage"), "{e:?}")
            }
            other => panic!("{other:?}"),
        }

        let mut o = options(MigrationMode::Precopy, 1);
        o.copy_storage = true;
        let r = q.moves("guest", "a", "b", o).await;
        let fig = r.qemu.as_ref().unwrap();
        assert_eq!(fig.disks_copied, 1);
        // The mirror's progress was shown before memory's, in 4 KiB units:
        // at least the 4 MiB disk (QEMU's total grows with what the guest
        // rewrites meanwhile), never going back, about all of it once in sync.
        let mirrored: Vec<_> = q
            .progress
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.phase == "mirroring disks")
            .cloned()
            .collect();
        assert!(!mirrored.is_empty(), "{:?}", q.progress.lock().unwrap());
        assert!(
            mirrored
                .iter()
                .all(|p| p.total_pages >= (4 << 20) / 4096 && p.pages_sent <= p.total_pages),
            "{mirrored:?}"
        );
        assert!(mirrored
            .windows(2)
            .all(|w| w[0].pages_sent <= w[1].pages_sent));
        let last = mirrored.last().unwrap();
        // (In sync, offset may trail the total by the guest's latest writes.)
        assert!(last.pages_sent * 10 >= last.total_pages * 9, "{mirrored:?}");
        assert!(
            fig.channels.iter().any(|c| matches!(
                c.kind,
                convoy_protocol::stream::ChannelKind::Nbd(0)
            ) && c.out_bytes >= 1 << 20),
            "{fig:?}"
        );
        // The guest goes on writing at the destination; stop it there, then
        // check its disk block by block.
        let dst_disk = q.images("b").join("disk.img");
        tokio::time::sleep(Duration::from_secs(2)).await;
        q.lab
            .client("b")
            .await
            .unwrap()
            .vm_delete("guest".parse().unwrap())
            .await
            .unwrap();
        let blocks = disk_blocks(&dst_disk, 256);
        assert!(
            blocks.iter().all(Option::is_some),
            "a block never arrived: {blocks:?}"
        );
        let gen_after = blocks.iter().flatten().max().copied().unwrap();
        assert!(
            gen_after >= gen_before,
            "older data at the destination: {gen_after} < {gen_before}"
        );
        eprintln!("disk generations: {gen_before} before the move, {gen_after} at the end");
        q.lab.shutdown().await;
    })
    .await;
}

/// Kills every QEMU of `victim` once the migration to `to` is under way
/// (the destination's QEMU appears at Accept; the copy then runs for a
/// while at the capped bandwidth).
async fn kill_mid_migration(q: std::sync::Arc<QemuLab>, to: &'static str, victim: &'static str) {
    assert!(until(Duration::from_secs(30), || !q.processes(to).is_empty()).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for p in q.processes(victim) {
        let pid = p.file_name().unwrap().to_str().unwrap().to_owned();
        std::process::Command::new("kill")
            .args(["-9", &pid])
            .status()
            .unwrap();
    }
}

impl QemuLab {
    /// What a guest that printed nothing shows from outside: its QEMU's
    /// standard error, and how much CPU each of QEMU's threads took in a
    /// second (a vCPU thread near 0 waits for an interrupt that does not
    /// come; near 100 it runs and the console does not carry its output).
    async fn stalled(&self, agent: &str, vm: &str) -> String {
        let ticks = |p: &Path| -> Vec<(String, u64)> {
            let Ok(tasks) = std::fs::read_dir(p.join("task")) else {
                return vec![];
            };
            tasks
                .filter_map(|t| t.ok())
                .filter_map(|t| {
                    let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
                    // `pid (comm) state ...`: utime and stime are fields 14
                    // and 15, the 12th and 13th after the comm.
                    let (head, rest) = stat.rsplit_once(") ")?;
                    let comm = head.split_once(" (")?.1.to_owned();
                    let f: Vec<&str> = rest.split(' ').collect();
                    let used = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
                    Some((format!("{} {comm}", t.file_name().to_string_lossy()), used))
                })
                .collect()
        };
        let mut out = String::new();
        let stderr = self.lab.qemu_runtime(agent).join(vm).join("qemu.stderr");
        out += &format!(
            "QEMU's standard error: {:?}\n",
            std::fs::read_to_string(&stderr).unwrap_or_else(|e| e.to_string())
        );
        for p in self.processes(agent) {
            let before = ticks(&p);
            tokio::time::sleep(Duration::from_secs(1)).await;
            let after = ticks(&p);
            out += &format!(
                "{}: CPU ticks (1/100 s) in one second, per thread:",
                p.display()
            );
            for (name, t) in &after {
                let was = before.iter().find(|(n, _)| n == name).map_or(0, |b| b.1);
                out += &format!(" [{name}: {}]", t.saturating_sub(was));
            }
            out += "\n";
        }
        out
    }

    /// Nothing of `vm` at `agent`: no QEMU, no listing, no runtime files.
    async fn assert_nothing_at(&self, agent: &str, vm: &str) {
        assert!(
            until(Duration::from_secs(10), || self.processes(agent).is_empty()).await,
            "a QEMU stays at {agent}"
        );
        // The destination may still be tidying up when the source reports.
        let client = self.lab.client(agent).await.unwrap();
        assert!(
            convoy_tests::eventually(Duration::from_secs(10), || async {
                client.vm_list().await.unwrap().is_empty()
            })
            .await,
            "{:?}",
            client.vm_list().await.unwrap()
        );
        let dir = self.lab.qemu_runtime(agent).join(vm);
        assert!(
            until(Duration::from_secs(10), || !dir.exists()).await,
            "{} stays",
            dir.display()
        );
    }
}

/// A destination QEMU killed in the middle: the guest runs on at the
/// source, nothing is left at the destination, and a retry succeeds.
/// Then a source QEMU killed in the middle: the migration fails cleanly
/// and nothing is left at the destination either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_killed_on_either_side_leaves_one_guest_or_a_clean_failure() {
    once_more_on_guest_fault(|| async {
        use convoy_protocol::ctl::{Outcome, VmState};
        let Some(g) = guest() else { return };
        let _heavy = convoy_tests::heavy().await;
        let dir = tempfile::tempdir().unwrap();
        let q = std::sync::Arc::new(QemuLab::start(dir.path(), g).await);
        q.create("a", "guest", vec![]).await;
        let slow = || {
            let mut o = options(MigrationMode::Precopy, 1);
            o.bandwidth = Some(8 << 20);
            o
        };
        let killer = tokio::spawn(kill_mid_migration(q.clone(), "b", "b"));
        let r = q.migrate("guest", "a", "b", slow()).await;
        killer.await.unwrap();
        match &r.outcome {
            Outcome::Aborted(why) => eprintln!("destination killed: {why}"),
            other => panic!("{other:?}"),
        }
        let a_list = q.lab.client("a").await.unwrap().vm_list().await.unwrap();
        assert_eq!(a_list[0].state, VmState::Running);
        let last = *counters(&q.serial("a", "guest")).last().unwrap();
        assert!(
            until(Duration::from_secs(10), || counters(
                &q.serial("a", "guest")
            )
            .last()
            .is_some_and(|&c| c > last + 5))
            .await,
            "the guest does not run at the source"
        );
        q.assert_nothing_at("b", "guest").await;
        // The retry succeeds.
        q.moves("guest", "a", "b", options(MigrationMode::Precopy, 1))
            .await;

        // Now b is the source; kill its QEMU in the middle of the move to a.
        let killer = tokio::spawn(kill_mid_migration(q.clone(), "a", "b"));
        let r = q.migrate("guest", "b", "a", slow()).await;
        killer.await.unwrap();
        match &r.outcome {
            Outcome::Aborted(why) => assert!(why.contains("source QEMU"), "{why}"),
            other => panic!("{other:?}"),
        }
        q.assert_nothing_at("a", "guest").await;
        let b_list = q.lab.client("b").await.unwrap().vm_list().await.unwrap();
        assert_eq!(b_list[0].state, VmState::Exited);
    })
    .await;
}

/// A guest rewriting 16 MiB over and over, migrated over a link capped at
/// 8 MiB/s. Without auto-converge and with 4 rounds, pre-copy gives up
/// honestly: QEMU's figures in the message and in the report, QEMU's
/// migration cancelled, the guest running on at the source. With
/// auto-converge (the default), QEMU throttles the guest until the copy
/// converges, and the report shows the throttle. A deadline shorter than
/// the copy cancels it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_guest_dirtying_faster_than_the_link_is_throttled_or_fails_honestly() {
    once_more_on_guest_fault(|| async {
        use convoy_protocol::ctl::Outcome;
        use convoy_protocol::model::MigrationPlan;
        let Some(g) = guest() else { return };
        let _heavy = convoy_tests::heavy().await;
        let dir = tempfile::tempdir().unwrap();
        let q = QemuLab::start(dir.path(), g).await;
        let c = q.lab.client("a").await.unwrap();
        let mut def = definition("busy", vec![]);
        def.append = "console=ttyS0 quiet panic=-1 convoy.dirty=16".into();
        c.vm_create_qemu(def).await.unwrap();
        let log = q.serial("a", "busy");
        assert!(
            until(Duration::from_secs(90), || counters(&log).len() >= 5).await,
            "the guest did not come up"
        );
        assert!(std::fs::read_to_string(&log)
            .unwrap()
            .contains("convoy-guest dirtying 16 MiB"));

        let capped = MigrationPlan {
            streams: 1,
            bandwidth: Some(8 << 20),
            ..MigrationPlan::default()
        };
        let r = q
            .migrate(
                "busy",
                "a",
                "b",
                MigrationPlan {
                    auto_converge: false,
                    max_rounds: 4,
                    ..capped.clone()
                },
            )
            .await;
        match &r.outcome {
            Outcome::Aborted(why) => {
                assert!(why.contains("did not converge in 4 rounds"), "{why}");
            }
            other => panic!("{other:?} {r:?}"),
        }
        // What was done, not zeros.
        assert!(r.rounds > 4, "{r:?}");
        assert!(r.pages_sent > 0 && r.convergence.dirty_rate > 0, "{r:?}");
        assert_eq!(r.convergence.throttle, 0, "{r:?}");
        assert_eq!(r.qemu.as_ref().unwrap().status, "cancelled", "{r:?}");
        // The guest runs on at a; nothing at b.
        let last = *counters(&log).last().unwrap();
        assert!(
            until(Duration::from_secs(10), || counters(&log).last()
                > Some(&last))
            .await
        );
        assert!(q
            .lab
            .client("b")
            .await
            .unwrap()
            .vm_list()
            .await
            .unwrap()
            .is_empty());

        // Rounds enough, but a deadline of 5 s: cancelled when it passes.
        let r = q
            .migrate(
                "busy",
                "a",
                "b",
                MigrationPlan {
                    auto_converge: false,
                    deadline_ms: Some(5_000),
                    ..capped.clone()
                },
            )
            .await;
        match &r.outcome {
            Outcome::Aborted(why) => assert!(why.contains("deadline of 5.0 s"), "{why}"),
            other => panic!("{other:?} {r:?}"),
        }
        let last = *counters(&log).last().unwrap();
        assert!(
            until(Duration::from_secs(10), || counters(&log).last()
                > Some(&last))
            .await
        );

        // The guest counts on at a while the copy runs (throttled): the
        // counter to carry on from is the last one a printed, watched until
        // a's QEMU and its log are gone.
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let watch = {
            let (seen, log) = (seen.clone(), log.clone());
            tokio::spawn(async move {
                loop {
                    if let Some(&c) = counters(&log).last() {
                        seen.fetch_max(c, std::sync::atomic::Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        let r = q.migrate("busy", "a", "b", capped).await;
        watch.abort();
        let last = seen.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(r.outcome, Outcome::Completed, "{r:?}");
        assert!(r.verified && r.convergence.throttle > 0, "{r:?}");
        assert!(
            until(Duration::from_secs(10), || q.processes("a").is_empty()).await,
            "the source QEMU still runs"
        );
        // The guest counts on at b. Unthrottled there, its copy loop competes
        // with the counter for one TCG vCPU on a loaded machine (a CI run saw
        // no counter within 30 s once): the wait is long, the check the same.
        let dst_log = q.serial("b", "busy");
        assert!(
            counts_on(&dst_log, last, Duration::from_secs(120)).await,
            "no counter after {last} at b; b's console: {}",
            console(&dst_log)
        );
        q.lab.shutdown().await;
    })
    .await;
}

/// QEMU's own live migration, over a unix socket and without Convoy, of a
/// guest rewriting 16 MiB, back and forth `CONVOY_QEMU_ROUNDS` times
/// (300 by default): fails when the guest's kernel faults at a
/// destination. Not a test of Convoy: the evidence behind
/// [`once_more_on_guest_fault`], run on demand (`--ignored`), best on a
/// loaded host (it failed at round 106 of 300 with two busy loops
/// beside it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a reproduction of a QEMU bug, minutes long"]
async fn qemu_alone_migrating_a_busy_tcg_guest_back_and_forth() {
    let Some(g) = guest() else { return };
    let rounds: usize = std::env::var("CONVOY_QEMU_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let dir = tempfile::tempdir().unwrap();
    let busy = QemuSpec {
        append: "console=ttyS0 quiet panic=-1 convoy.dirty=16".into(),
        ..spec(g)
    };
    let mut src = QemuProcess::launch(&busy, &dir.path().join("v0"), false)
        .await
        .unwrap();
    assert!(
        until(Duration::from_secs(90), || counters(&src.serial_log())
            .len()
            >= 5)
        .await
    );
    for i in 1..=rounds {
        let mut dst = QemuProcess::launch(&busy, &dir.path().join(format!("v{i}")), true)
            .await
            .unwrap();
        let sock = dir.path().join(format!("m{i}.sock"));
        assert_eq!(
            migrate_natively(&mut src, &mut dst, &sock).await,
            "completed"
        );
        let last = counters(&src.serial_log()).last().copied().unwrap_or(0);
        src.quit().await;
        let log = dst.serial_log();
        assert!(
            counts_on(&log, last + 2, Duration::from_secs(30)).await,
            "round {i}: no counter after {last}: {}",
            console(&log)
        );
        eprintln!("round {i}: the guest counts on past {last}");
        src = dst;
    }
    src.quit().await;
}
