//! `convoyctl bench --engine --json` at tiny sizes: every table is there,
//! its rows parse, and the figures agree with each other.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use serde_json::Value;

mod common;

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn the_engine_bench_reports_consistent_rows() {
    let v = common::bench_json(&[
        "--engine",
        "--memory",
        "16MiB",
        "--modes",
        "precopy,postcopy",
        "--dirty",
        "idle=0,busy=20000",
        "--runs",
        "1",
        "--concurrent",
        "2",
        "--concurrent-memory",
        "16MiB",
        "--reuse-dwell",
        "300",
    ]);
    assert_eq!(v["memory_bytes"], 16 << 20);

    // Modes × dirty rates: one row each, in order.
    let modes = v["modes"].as_array().unwrap();
    assert_eq!(modes.len(), 4);
    let keys: Vec<(&str, &str)> = modes
        .iter()
        .map(|r| (r["mode"].as_str().unwrap(), r["dirty"].as_str().unwrap()))
        .collect();
    assert_eq!(
        keys,
        [
            ("precopy", "idle"),
            ("precopy", "busy"),
            ("postcopy", "idle"),
            ("postcopy", "busy")
        ]
    );
    for r in &modes[..2] {
        assert_eq!(r["outcome"], "completed", "{r}");
        assert_eq!(r["verified"], true, "{r}");
        let fig = &r["figures"];
        assert!(f(&fig["total_ms"]) >= f(&fig["downtime_ms"]), "{r}");
        assert!(u(&fig["pages_sent"]) >= u(&fig["resent_pages"]), "{r}");
        assert!(u(&fig["pages_sent"]) >= u(&fig["delta_pages"]), "{r}");
        assert!(u(&fig["wire_bytes"]) > 0, "{r}");
        assert!(u(&fig["rounds"]) >= 2, "{r}");
    }
    // Idle: nothing is sent twice but page 0, where the device counter
    // ticks every millisecond: at most once per round after the first (a
    // loaded machine may take a third round).
    let idle = &modes[0]["figures"];
    assert!(
        u(&idle["resent_pages"]) < u(&idle["rounds"]),
        "{}",
        modes[0]
    );
    assert_eq!(modes[0]["dirty_pages_per_sec"], 0);
    assert!(
        u(&modes[1]["figures"]["resent_pages"]) > u(&modes[0]["figures"]["resent_pages"]),
        "a busy guest re-sends more than an idle one: {modes:?}"
    );
    // Pre-copy has no faults; post-copy reports them with their latency.
    for r in &modes[..2] {
        assert!(r["figures"]["faults"].is_null(), "{r}");
    }
    // Post-copy: refused where the agent cannot do it (a row that says
    // so), or done.
    for r in &modes[2..] {
        let o = r["outcome"].as_str().unwrap();
        if o == "completed" {
            assert_eq!(r["verified"], true, "{r}");
            let fig = &r["figures"];
            u(&fig["faults"]);
            assert!(u(&fig["fault_median_us"]) <= u(&fig["fault_p99_us"]), "{r}");
        } else {
            assert!(o.starts_with("not supported: "), "{r}");
            assert!(r["figures"].is_null(), "{r}");
        }
    }

    // A/B at the highest rate: baseline, hot-page ordering off,
    // auto-converge off; delta pages have no A/B.
    let ab = &v["ab"];
    assert_eq!(ab["dirty"], "busy");
    let arms = ab["arms"].as_array().unwrap();
    assert_eq!(arms.len(), 3);
    assert_eq!(arms[0]["hold_hot_pages"], true);
    assert_eq!(arms[0]["auto_converge"], true);
    assert_eq!(arms[1]["hold_hot_pages"], false);
    assert_eq!(arms[2]["auto_converge"], false);
    for a in arms {
        assert_eq!(a["runs"], 1, "{a}");
        assert!(u(&a["completed"]) <= 1, "{a}");
        assert_eq!(a["outcomes"].as_array().unwrap().len(), 1, "{a}");
    }
    let savings = ab["savings"].as_array().unwrap();
    assert_eq!(savings.len(), 3);
    assert!(savings[2]["skipped"].as_str().unwrap().contains("delta"));
    if arms[0]["completed"] == 1 && arms[1]["completed"] == 1 {
        let (on, off) = (&arms[0]["median"], &arms[1]["median"]);
        let want = u(&off["wire_bytes"]) as f64 / u(&on["wire_bytes"]) as f64;
        assert!((f(&savings[0]["wire_bytes"]) - want).abs() < 1e-9);
    }

    // Two VMs at once: one row each, all verified, times consistent.
    let runs = v["concurrent"].as_array().unwrap();
    assert_eq!(runs.len(), 1);
    let c = &runs[0];
    assert_eq!(c["vms"], 2);
    let per_vm = c["per_vm"].as_array().unwrap();
    assert_eq!(per_vm.len(), 2);
    for p in per_vm {
        assert_eq!(p["verified"], true, "{p}");
        assert!(f(&p["finished_ms"]) <= f(&c["wall_ms"]) + 1e-6, "{p}");
    }
    assert!(f(&c["median_total_ms"]) <= f(&c["max_total_ms"]));
    assert!(f(&c["max_total_ms"]) <= f(&c["wall_ms"]) + 50.0, "{c}");
    assert!(f(&c["aggregate_guest_mb_s"]) > 0.0);
    assert!(u(&c["peak_rss_bytes"]) >= u(&c["rss_before_bytes"]), "{c}");
    // The guest images are the process's shared memory: at least the 60%
    // of each image that mixed content fills (25% of the pages are zero,
    // never touched), at the source when created and at the destination
    // when deleted.
    for images in ["source_images_bytes", "destination_images_bytes"] {
        assert!(u(&c[images]) >= 2 * (16 << 20) * 6 / 10, "{images}: {c}");
    }
    // The agents' peak is the rise of anonymous memory, against both
    // agents' default budgets.
    assert_eq!(
        c["overhead_bytes"].as_i64().unwrap(),
        u(&c["peak_anon_bytes"]) as i64 - u(&c["anon_before_bytes"]) as i64
    );
    assert_eq!(u(&c["budget_bytes"]), 2 * (256 << 20));
    // One VM alone first (--runs 1), the baseline of the ratio.
    let alone = v["concurrent_alone"].as_array().unwrap();
    assert_eq!(alone.len(), 1);
    assert_eq!(alone[0]["vms"], 1);
    assert!(alone[0]["vs_one_alone"].is_null());
    let want = f(&c["aggregate_guest_mb_s"]) / f(&alone[0]["aggregate_guest_mb_s"]);
    assert!((f(&c["vs_one_alone"]) - want).abs() < 1e-9, "{c}");

    // Out and back, per dirty rate: the trip back reuses the kept image.
    let reuse = v["reuse"].as_array().unwrap();
    assert_eq!(reuse.len(), 2);
    for r in reuse {
        assert_eq!(r["outcome"], "completed", "{r}");
        assert_eq!(r["verified"], true, "{r}");
        assert_eq!(r["dwell_ms"], 300, "{r}");
        assert!(u(&r["retained_pages"]) > 0, "{r}");
        let (there, back) = (&r["there"], &r["back"]);
        let want = u(&back["wire_bytes"]) as f64 / u(&there["wire_bytes"]) as f64;
        assert!((f(&r["wire_ratio"]) - want).abs() < 1e-9, "{r}");
    }
    // Idle, nothing changed: the way back costs a small fraction.
    assert!(f(&reuse[0]["wire_ratio"]) < 0.2, "{}", reuse[0]);
    assert!(
        f(&reuse[1]["sent_back_share"]) > f(&reuse[0]["sent_back_share"]),
        "a busy VM changes more pages than an idle one: {reuse:?}"
    );
}

/// `--timelines DIR`: each row's migration drawn, with the service of
/// `--service-rps` in it.
#[test]
fn the_engine_bench_draws_each_rows_timeline() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("timelines");
    let v = common::bench_json(&[
        "--engine",
        "--tables",
        "modes",
        "--memory",
        "64MiB",
        "--modes",
        "precopy",
        "--dirty",
        "busy=20000",
        "--runs",
        "1",
        "--service-rps",
        "500",
        "--timelines",
        out.to_str().unwrap(),
    ]);
    assert_eq!(v["modes"].as_array().unwrap().len(), 1, "{v}");
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let json = names
        .iter()
        .find(|n| n.ends_with("-precopy-20000.json"))
        .unwrap_or_else(|| panic!("{names:?}"));
    assert!(names.contains(&json.replace(".json", ".svg")), "{names:?}");
    let t: Value = serde_json::from_slice(&std::fs::read(out.join(json)).unwrap()).unwrap();
    assert!(t["points"].as_array().unwrap().len() >= 2, "{t}");
    assert_eq!(t["service_summary"]["requests_per_sec"], 500, "{t}");
    assert!(u(&t["service_summary"]["served"]) > 0, "{t}");
}
