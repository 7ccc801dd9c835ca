//! The README's first command, run as an operator would: `convoyctl demo
//! --json` must report a verified, continuous, ticketed, receipted and
//! audited migration — and exit 0.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::process::Command;

#[test]
fn demo_json_reports_a_verified_migration_and_the_trust_path() {
    let out = Command::new(env!("CARGO_BIN_EXE_convoyctl"))
        .args([
            "demo",
            "--json",
            "--memory",
            "64MiB",
            "--dirty-rate",
            "5000",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["verified"], true);
    // Progress went to stderr as JSON lines, the last round's pages sent
    // among them.
    let progress: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("progress").cloned())
        .collect();
    assert!(!progress.is_empty());
    assert!(progress
        .iter()
        .any(|p| p["pages_sent"].as_u64().unwrap_or(0) > 0));
    assert_eq!(v["counter_continuous"], true);
    assert_eq!(v["ticket_verified"], true);
    assert_eq!(v["audit_verified"], true);
    assert!(v["evidence_bundle_bytes"].as_u64().unwrap() > 0);
    assert_eq!(v["policy_permitted"]["source"], true);
    assert_eq!(v["policy_permitted"]["destination"], true);
    assert_eq!(v["receipts"]["source"], 4);
    assert_eq!(v["receipts"]["destination"], 4);
    assert_eq!(v["memory_bytes"], 64 << 20);
    assert!(v["wire_bytes"].as_u64().unwrap() > 0);
    assert!(v["total_ms"].as_f64().unwrap() >= v["downtime_ms"].as_f64().unwrap());
    assert!(v["rounds"].as_u64().unwrap() >= 2);
}

/// `demo --plot FILE.json`: the migration over time, and the guest's work
/// wherever it runs — in post-copy, at the destination after the switch.
#[test]
fn demo_plot_writes_the_migration_and_the_guest_through_it() {
    let dir = tempfile::tempdir().unwrap();
    let bad = Command::new(env!("CARGO_BIN_EXE_convoyctl"))
        .args(["demo", "--plot", "timeline.txt"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--plot takes"));
    let file = dir.path().join("t.json");
    let out = Command::new(env!("CARGO_BIN_EXE_convoyctl"))
        .args(["demo", "--json", "--memory", "256MiB", "--mode", "postcopy"])
        .arg("--plot")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let points = t["points"].as_array().unwrap();
    assert!(points.len() >= 3, "{t}");
    assert!(
        points
            .iter()
            .any(|p| p["bytes_per_sec"].as_f64().unwrap() > 0.0),
        "{t}"
    );
    // Paused at the source from the switch on; the guest works on at the
    // destination meanwhile, as convoyctl saw it from outside.
    let switch = points
        .iter()
        .find(|p| p["paused"] == true)
        .and_then(|p| p["t_s"].as_f64())
        .expect("a sample after the switch");
    let guest = t["guest_work_per_sec_wherever_it_runs"].as_array().unwrap();
    assert!(
        guest
            .iter()
            .any(|g| g["t_s"].as_f64().unwrap() > switch
                && g["work_per_sec"].as_f64().unwrap() > 0.0),
        "{t}"
    );
    // The guest's service (1000 requests/s by default) was served on both
    // sides of the switch, and its requests waited through it: the
    // slowest took at least the downtime.
    let service = t["service"].as_array().unwrap();
    let served_after = |after: f64| {
        service.iter().any(|s| {
            s["t_s"].as_f64().unwrap() > after && s["served_per_sec"].as_f64().unwrap() > 0.0
        })
    };
    assert!(served_after(0.0) && served_after(switch), "{t}");
    let summary = &t["service_summary"];
    assert_eq!(summary["requests_per_sec"], 1000, "{t}");
    assert!(summary["served"].as_u64().unwrap() > 500, "{t}");
    let max = summary["max_ms"].as_f64().unwrap();
    let downtime = t["downtime_ms"].as_f64().unwrap();
    assert!(
        max >= downtime * 0.8,
        "max {max} ms, downtime {downtime} ms"
    );
}

/// The store-and-forward path on the embedded default: through a
/// directory, the agents never connecting.
#[test]
fn demo_via_a_bucket_hands_the_vm_over_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/bucket", dir.path().display());
    let out = Command::new(env!("CARGO_BIN_EXE_convoyctl"))
        .args(["demo", "--json", "--memory", "32MiB", "--via", &url])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo --via failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(v["outcome"], "Completed");
    assert_eq!(v["counter_continuous"], true, "{v}");
    // One manifest and one claim in the bucket.
    let count = |d: &str| {
        std::fs::read_dir(dir.path().join("bucket").join(d))
            .unwrap()
            .count()
    };
    assert_eq!((count("manifests"), count("claims")), (1, 1));
}

#[test]
fn bad_flags_get_a_clear_error_and_a_failure_status() {
    let out = Command::new(env!("CARGO_BIN_EXE_convoyctl"))
        .args(["demo", "--memory", "12 parsecs"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown size unit"), "{err}");
    // A transport that does not exist, by flag or by environment.
    for (args, env) in [
        (vec!["--transport", "udp", "status"], None),
        (vec!["status"], Some("sctp")),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_convoyctl"));
        cmd.args(&args);
        if let Some(v) = env {
            cmd.env("CONVOY_TRANSPORT", v);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("expected quic, tcp or auto"), "{err}");
    }
    // A deadline of nothing, or of more than a day.
    for d in ["0", "86401", "soon"] {
        let out = Command::new(env!("CARGO_BIN_EXE_convoyctl"))
            .args(["demo", "--deadline", d])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--deadline"), "{err}");
    }
}

/// `convoyctl demo --backend qemu --json`: a real guest moved through
/// Convoy, its serial counter continuing, with QEMU's own figures. Needs
/// QEMU and the guest's Debian packages (`scripts/test` installs them):
/// under `CI=true` their absence fails the test, otherwise it skips.
///
/// Run once more when the guest's kernel faulted at b after a verified
/// stream (`guest_fault`): QEMU 7.2 under TCG now and then loses a guest's
/// write, with or without Convoy (as the `it` QEMU tests'
/// `once_more_on_guest_fault`); a second fault in a row fails.
#[test]
fn the_qemu_demo_moves_a_real_guest_and_reports_qemus_figures() {
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("q.json");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_convoyctl"))
            .args([
                "demo",
                "--backend",
                "qemu",
                "--json",
                "--memory",
                "128MiB",
                "--fill-mib",
                "16",
            ])
            .arg("--plot")
            .arg(&plot)
            .output()
            .unwrap()
    };
    let mut out = run();
    let faulted = |o: &std::process::Output| {
        serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .is_ok_and(|v| v["guest_fault"] == true && v["verified"] == true)
    };
    if faulted(&out) {
        // Past the harness's capture: CI's log keeps the first fault.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr().lock(),
            "QEMU lost a guest's write (run again): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out = run();
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success()
        && (stderr.contains("not installed") || stderr.contains("apt-get install"))
        && std::env::var("CI").as_deref() != Ok("true")
    {
        eprintln!("skipped (QEMU or the guest's packages are missing): {stderr}");
        return;
    }
    assert!(out.status.success(), "demo failed: {stderr}\n{stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["backend"], "qemu");
    assert_eq!(v["verified"], true);
    assert_eq!(v["counter_continuous"], true);
    assert_eq!(v["guest_fault"], false);
    assert_eq!(v["audit_verified"], true);
    assert_eq!(v["receipts"]["source"], 4);
    assert_eq!(v["receipts"]["destination"], 4);
    assert!(v["qemu"]["downtime_ms"].as_u64().is_some(), "{v}");
    assert!(v["qemu"]["total_ms"].as_u64().unwrap() > 0);
    assert!(v["qemu"]["transferred_bytes"].as_u64().unwrap() > 16 << 20);
    // QEMU's migration sampled from query-migrate: its bytes over time,
    // paused at the source once QEMU left `active`.
    let t: serde_json::Value = serde_json::from_slice(&std::fs::read(&plot).unwrap()).unwrap();
    let points = t["points"].as_array().unwrap();
    assert!(points.len() >= 2, "{t}");
    assert!(
        points
            .iter()
            .any(|p| p["bytes_per_sec"].as_f64().unwrap() > 0.0),
        "{t}"
    );
    assert!(
        points[0]["phase"].as_str().unwrap().starts_with("qemu "),
        "{t}"
    );
    // The guest's own service (its second serial port), reached from
    // outside at a and then at b: everything answered, nothing dropped,
    // and the slowest request waited through QEMU's pause.
    let summary = &t["service_summary"];
    assert_eq!(summary["requests_per_sec"], 50, "{t}");
    assert!(summary["served"].as_u64().unwrap() >= 10, "{t}");
    assert_eq!(summary["dropped"], 0, "{t}");
    let max = summary["max_ms"].as_f64().unwrap();
    let downtime = v["qemu"]["downtime_ms"].as_f64().unwrap();
    assert!(
        max + 20.0 >= downtime,
        "max {max} ms, downtime {downtime} ms"
    );
    let last = t["service"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["waiting"], 0, "{t}");
}
