//! `convoyctl bench --snapshot --json` at a tiny size on `file://` only:
//! every operation of both contents is there, with its baseline, and the
//! figures agree with each other.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

mod common;

#[test]
fn the_snapshot_bench_reports_each_operation_beside_its_baseline() {
    let v = common::bench_json(&["--snapshot", "--memory", "8MiB", "--runs", "1"]);
    let rows = v.as_array().unwrap();
    let keys: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["operation"].as_str().unwrap(),
                r["content"].as_str().unwrap(),
            )
        })
        .collect();
    let ops = [
        "push VM -> file",
        "pull file -> VM",
        "copy file -> file (streamed)",
        "seal only (read, zstd, AEAD, BLAKE3)",
        "open only (AEAD, zstd, BLAKE3)",
    ];
    let want: Vec<(&str, &str)> = ["mixed", "random"]
        .iter()
        .flat_map(|c| ops.iter().map(move |o| (*o, *c)))
        .collect();
    assert_eq!(keys, want);
    for r in rows {
        assert_eq!(r["vm_bytes"], 8 << 20);
        assert_eq!(r["runs"], 1);
        let stored = r["stored_bytes"].as_u64().unwrap();
        assert!(stored > 0 && stored <= 9 << 20, "{r}");
        let op = r["operation"].as_str().unwrap();
        let cpu_only = op.contains("only");
        assert_eq!(r["plain_ms"].is_null(), cpu_only, "{r}");
        if !cpu_only {
            let ratio = r["ratio_stored"].as_f64().unwrap();
            let c = r["convoy_ms"].as_f64().unwrap();
            let p = r["plain_ms"].as_f64().unwrap();
            assert!((ratio - p / c).abs() < 1e-9, "{r}");
        }
    }
    // Random memory does not compress: nearly every byte is stored.
    let random = rows.iter().find(|r| r["content"] == "random").unwrap();
    assert!(random["stored_bytes"].as_u64().unwrap() >= 8 << 20);
}
