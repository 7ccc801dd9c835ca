//! The QEMU backend's base: the tiny test guest (`scripts/build-test-guest`)
//! boots under QEMU with TCG, QMP drives it, and QEMU's own migration over a
//! local unix socket moves it with the serial counter continuing and no
//! reboot — the native path that Convoy's authenticated tunnel is measured
//! against. Needs `qemu-system-x86_64` and the guest's Debian packages
//! (`scripts/test` installs them): fails under `CI=true` without them,
//! skips with a message otherwise.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use convoy_agent::backend::qemu::process::{Accel, QemuProcess, QemuSpec};
use serde_json::json;

/// The guest's kernel and initramfs, built once per test binary.
fn guest() -> Option<&'static (PathBuf, PathBuf)> {
    static GUEST: OnceLock<Result<(PathBuf, PathBuf), String>> = OnceLock::new();
    let built = GUEST.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = root.join("target/test-guest");
        let qemu = which("qemu-system-x86_64")
            .ok_or("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")?;
        let _ = qemu;
        let st = std::process::Command::new(root.join("scripts/build-test-guest"))
            .arg(&out)
            .output()
            .map_err(|e| e.to_string())?;
        if !st.status.success() {
            return Err(String::from_utf8_lossy(&st.stderr).trim().to_string());
        }
        Ok((out.join("vmlinuz"), out.join("initrd.img")))
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

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(cmd))
            .find(|f| f.is_file())
    })
}

fn spec(g: &(PathBuf, PathBuf)) -> QemuSpec {
    QemuSpec {
        binary: which("qemu-system-x86_64").unwrap(),
        memory_mib: 128,
        vcpus: 1,
        kernel: Some(g.0.clone()),
        initrd: Some(g.1.clone()),
        append: "console=ttyS0 quiet panic=-1".into(),
        disks: vec![],
        accel: Accel::Tcg,
        extra_args: vec![],
    }
}

/// Every counter value the guest printed, in order.
fn counters(log: &Path) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("convoy-counter "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
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

async fn until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
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
    let Some(g) = guest() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut src = QemuProcess::launch(&spec(g), &dir.path().join("src"), false)
        .await
        .unwrap();
    let mut dst = QemuProcess::launch(&spec(g), &dir.path().join("dst"), true)
        .await
        .unwrap();
    let src_log = src.serial_log();
    assert!(until(Duration::from_secs(90), || counters(&src_log).len() >= 3).await);
    let sock = dir.path().join("migration.sock");
    let uri = format!("unix:{}", sock.display());
    dst.qmp
        .execute("migrate-incoming", Some(json!({ "uri": uri })))
        .await
        .unwrap();
    assert!(until(Duration::from_secs(10), || sock.exists()).await);
    src.qmp
        .execute("migrate", Some(json!({ "uri": uri })))
        .await
        .unwrap();
    assert_eq!(migration_end(&mut src).await, "completed");
    let st = src.qmp.execute("query-status", None).await.unwrap();
    assert_eq!(st["status"], "postmigrate", "the source is paused for good");
    let last = *counters(&src_log).last().unwrap();
    let dst_log = dst.serial_log();
    assert!(
        until(Duration::from_secs(30), || !counters(&dst_log).is_empty()).await,
        "no counter at the destination"
    );
    let st = dst.qmp.execute("query-status", None).await.unwrap();
    assert_eq!(st["status"], "running");
    let first = counters(&dst_log)[0];
    assert!(
        first > last && first <= last + 3,
        "the counter restarted or jumped: source ended at {last}, destination began at {first}"
    );
    let text = std::fs::read_to_string(&dst_log).unwrap();
    assert!(!text.contains("convoy-guest up"), "the guest rebooted");
    src.quit().await;
    dst.quit().await;
}

/// QEMU's migration stream and return path carried through an
/// authenticated QUIC stream between two mutually-TLS'd endpoints (the
/// agents' transport), with both ends computing the same digests over
/// every byte: the data path of Convoy's `qemu` backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_migration_through_an_authenticated_quic_tunnel() {
    use convoy_agent::backend::qemu::tunnel::splice;
    use convoy_agent::identity::server_config;
    use convoy_agent::pki::Pki;
    use convoy_agent::transport::{self, Tuning, ALPN_AGENT};
    use convoy_protocol::names::{Role, TrustDomain};

    let Some(g) = guest() else { return };
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

    let mut src = QemuProcess::launch(&spec(g), &dir.path().join("src"), false)
        .await
        .unwrap();
    let mut dst = QemuProcess::launch(&spec(g), &dir.path().join("dst"), true)
        .await
        .unwrap();
    let src_log = src.serial_log();
    assert!(until(Duration::from_secs(90), || counters(&src_log).len() >= 3).await);

    // Destination agent: QEMU listens on its own socket; the agent accepts
    // the authenticated stream and connects it there.
    let dst_sock = dir.path().join("dst-incoming.sock");
    dst.qmp
        .execute(
            "migrate-incoming",
            Some(json!({ "uri": format!("unix:{}", dst_sock.display()) })),
        )
        .await
        .unwrap();
    assert!(until(Duration::from_secs(10), || dst_sock.exists()).await);
    let b_side = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (send, recv) = conn.accept_bi().await.unwrap();
        let local = tokio::net::UnixStream::connect(&dst_sock).await.unwrap();
        let r = splice(local, send, recv).await.unwrap();
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
        splice(local, send, recv).await.unwrap()
    });
    src.qmp
        .execute(
            "migrate",
            Some(json!({ "uri": format!("unix:{}", src_sock.display()) })),
        )
        .await
        .unwrap();
    assert_eq!(migration_end(&mut src).await, "completed");
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

    let dst_log = dst.serial_log();
    assert!(until(Duration::from_secs(30), || !counters(&dst_log).is_empty()).await);
    let first = counters(&dst_log)[0];
    assert!(
        first > last && first <= last + 3,
        "source ended at {last}, destination began at {first}"
    );
    let st = dst.qmp.execute("query-status", None).await.unwrap();
    assert_eq!(st["status"], "running");
    dst.quit().await;
}

/// QEMU VMs through the agent's operator API: only allow-listed binaries
/// and images inside the image directory; listed as `qemu`; refused for
/// migration (not built yet) with a clear error; deleted with their process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_run_qemu_vms_only_from_allowed_binaries_and_images() {
    use convoy_agent::backend::qemu::vm::QemuConfig;
    use convoy_agent::client::ClientError;
    use convoy_agent::lab::Lab;
    use convoy_protocol::ctl::{QemuVmSpec, VmState};

    let Some(g) = guest() else { return };
    let images = g.0.parent().unwrap().to_owned();
    let qemu = which("qemu-system-x86_64").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("runtime");
    let lab = Lab::start(&dir.path().join("lab"), &["a", "b"], |_, cfg| {
        cfg.qemu = Some(QemuConfig {
            binaries: vec![qemu.clone()],
            images: images.clone(),
            runtime: runtime.clone(),
        });
    })
    .await
    .unwrap();
    let a = lab.client("a").await.unwrap();
    let spec = |name: &str| QemuVmSpec {
        name: name.parse().unwrap(),
        binary: "qemu-system-x86_64".into(),
        memory_mib: 128,
        vcpus: 1,
        kernel: Some("vmlinuz".into()),
        initrd: Some("initrd.img".into()),
        append: "console=ttyS0 quiet panic=-1".into(),
        disks: vec![],
        accel: Accel::Tcg,
        attributes: Default::default(),
    };
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

    let info = a.vm_create_qemu(spec("guest")).await.unwrap();
    assert_eq!(info.backend, "qemu");
    assert_eq!(info.state, VmState::Running);
    let log = runtime.join("guest/serial.log");
    assert!(until(Duration::from_secs(90), || counters(&log).len() >= 3).await);
    let pid = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| {
            std::fs::read_to_string(e.path().join("cmdline"))
                .is_ok_and(|c| c.contains(runtime.join("guest").to_str().unwrap()))
        })
        .map(|e| e.path());
    let pid = pid.expect("the QEMU process runs");
    // Not through agents yet: a clear refusal, the VM keeps running.
    match a
        .migrate(
            lab.migrate_request("guest", "a", "b", Default::default())
                .unwrap(),
            |_| {},
        )
        .await
    {
        Err(ClientError::Agent(e)) => assert!(
            e.message.contains("cannot migrate through agents yet"),
            "{e:?}"
        ),
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
