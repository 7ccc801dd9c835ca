//! `convoyctl bench --json` (the default: migrations against raw
//! transfers) at a small size over both transports: every row is there,
//! the baselines verified, each side's CPU measured, and each ratio within
//! the range of its runs.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use serde_json::Value;

mod common;

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn the_default_bench_measures_both_sides_against_the_verified_baseline() {
    let v = common::bench_json(&[
        "--memory",
        "64MiB",
        "--scenarios",
        "random,zero",
        "--transports",
        "quic,tcp",
        "--runs",
        "2",
    ]);
    let rows = v.as_array().unwrap();
    // Per transport: three raw rows, then the two migrations.
    assert_eq!(rows.len(), 10, "{v}");
    for (t, part) in ["quic", "tcp"].iter().zip(rows.chunks(5)) {
        let names: Vec<&str> = part
            .iter()
            .map(|r| r["scenario"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "raw into nothing",
                "raw into fresh memory",
                "raw pages digested at both ends, into fresh memory",
                "idle, random memory",
                "idle, zero memory"
            ]
        );
        for r in part {
            assert_eq!(r["transport"], *t, "{r}");
            assert_eq!(r["verified"], true, "{r}");
            assert_eq!(r["runs"], 2, "{r}");
            // Each column is the median of its runs: the ratio lies within
            // the runs' range.
            let ratio = f(&r["vs_verified_raw"]);
            let (lo, hi) = (
                f(&r["vs_verified_raw_range"][0]),
                f(&r["vs_verified_raw_range"][1]),
            );
            assert!(lo <= ratio && ratio <= hi, "{r}");
        }
        assert!((f(&part[2]["vs_verified_raw"]) - 1.0).abs() < 1e-9);
        // Each side of the raw transfers and of the incompressible
        // migration used CPU, measured apart (a meter that counted nothing
        // would give 0).
        for r in [&part[0], &part[2], &part[3]] {
            assert!(f(&r["source_cpu_s_per_gib"]) > 0.0, "{r}");
            assert!(f(&r["destination_cpu_s_per_gib"]) > 0.0, "{r}");
        }
        // Digesting every page costs the sender more than sending alone.
        assert!(
            f(&part[2]["source_cpu_s_per_gib"]) > f(&part[0]["source_cpu_s_per_gib"]),
            "{part:?}"
        );
        // Zero memory costs the destination almost nothing next to random.
        assert!(
            f(&part[4]["destination_cpu_s_per_gib"]) < f(&part[3]["destination_cpu_s_per_gib"]),
            "{part:?}"
        );
    }
}
