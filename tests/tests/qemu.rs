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
    let mut status = String::new();
    let end = Instant::now() + Duration::from_secs(120);
    while Instant::now() < end {
        let m = src.qmp.execute("query-migrate", None).await.unwrap();
        status = m["status"].as_str().unwrap_or("").to_owned();
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, "completed");
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
