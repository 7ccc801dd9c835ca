//! What the `convoyctl bench` smoke tests share.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::process::Command;

use serde_json::Value;

/// Runs `convoyctl bench ARGS --json` (without moto: only `file://`
/// stores) and returns what it printed, parsed; a failed run fails the
/// test with its output.
pub fn bench_json(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_convoyctl"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .env_remove("CONVOY_MOTO_SERVER")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap()
}
