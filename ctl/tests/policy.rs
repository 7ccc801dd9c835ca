//! `convoyctl policy validate|check` on the shipped example policies, as an
//! operator runs them: decisions explained, denials exit non-zero, broken
//! files named with a clear error.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::path::PathBuf;
use std::process::{Command, Output};

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../agent/policy/examples")
}

fn ctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_convoyctl"))
        .args(args)
        .output()
        .unwrap()
}

fn check(extra: &[&str]) -> Output {
    let e = examples();
    let (p, i) = (e.to_str().unwrap(), e.join("inventory.json"));
    let mut args = vec![
        "policy",
        "check",
        "--policy",
        p,
        "--inventory",
        i.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    ctl(&args)
}

const ALICE: &str = "spiffe://convoy.example/operator/alice";
const A: &str = "spiffe://convoy.example/agent/a";
const B: &str = "spiffe://convoy.example/agent/b";
const C: &str = "spiffe://convoy.example/agent/c";

#[test]
fn the_examples_validate() {
    let e = examples();
    let out = ctl(&[
        "policy",
        "validate",
        e.to_str().unwrap(),
        "--inventory",
        e.join("inventory.json").to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("valid: 10 policies"), "{stdout}");
    assert!(stdout.contains("tenant-owns-vm"), "{stdout}");
}

#[test]
fn a_move_between_providers_is_checked_with_its_approvals() {
    let x = "spiffe://partner.example/agent/x";
    let base = [
        "--action",
        "MigrateOut",
        "--by",
        ALICE,
        "--source",
        A,
        "--destination",
        x,
        "--tenant",
        "acme",
        "--security-level",
        "2",
    ];
    let out = check(&base);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("providers-approve-moves-between-them"),
        "{stdout}"
    );
    let mut approved = base.to_vec();
    approved.extend([
        "--approval",
        "spiffe://convoy.example/operator/alice=tenant",
        "--approval",
        "spiffe://convoy.example/operator/root=donor",
        "--approval",
        "spiffe://partner.example/operator/rex=recipient",
    ]);
    let out = check(&approved);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    // An agent does not approve; an unknown role is named.
    let mut bad = base.to_vec();
    bad.extend(["--approval", "spiffe://convoy.example/agent/a=donor"]);
    let out = check(&bad);
    assert!(String::from_utf8_lossy(&out.stderr).contains("only operators approve"));
    let mut bad = base.to_vec();
    bad.extend([
        "--approval",
        "spiffe://convoy.example/operator/root=auditor",
    ]);
    let out = check(&bad);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown approval role"));
}

#[test]
fn check_explains_permits_and_forbids() {
    let out = check(&[
        "--action",
        "MigrateOut",
        "--by",
        ALICE,
        "--source",
        A,
        "--destination",
        B,
        "--tenant",
        "acme",
        "--security-level",
        "2",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.starts_with("permitted by [tenant-owns-vm]"),
        "{stdout}"
    );
    // The deciding policy's text is shown.
    assert!(stdout.contains("principal.tenants.contains"), "{stdout}");

    let out = check(&[
        "--action",
        "MigrateOut",
        "--by",
        ALICE,
        "--source",
        A,
        "--destination",
        C,
        "--tenant",
        "acme",
        "--security-level",
        "2",
        "--json",
    ]);
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["permitted"], false);
    assert_eq!(v["policies"][0], "no-downgrade");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("MigrateOut denied"), "{err}");
}

#[test]
fn snapshot_actions_are_checked_offline() {
    // A tenant's own VM may be pushed, not once it is pinned.
    let push = |extra: &[&str]| {
        let mut args = vec![
            "--action",
            "PushSnapshot",
            "--by",
            ALICE,
            "--host",
            A,
            "--tenant",
            "acme",
            "--url",
            "s3://vms/eu",
            "--recipient",
            B,
        ];
        args.extend_from_slice(extra);
        check(&args)
    };
    let out = push(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("tenant-owns-vm"), "{stdout}");
    let out = push(&["--label", "pinned=true"]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("pinned-vms-stay"), "{stdout}");
    // Managing snapshots is for admins; PullSnapshot needs the pusher.
    let out = check(&[
        "--action",
        "ManageSnapshots",
        "--by",
        ALICE,
        "--host",
        A,
        "--operation",
        "delete",
    ]);
    assert!(!out.status.success());
    let out = check(&["--action", "PullSnapshot", "--by", ALICE, "--host", A]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--source is required"), "{err}");
}

#[test]
fn bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.cedar");
    std::fs::write(
        &bad,
        "permit (principal, action, resource) when { resource.colour };",
    )
    .unwrap();
    let out = ctl(&["policy", "validate", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.cedar"), "{err}");
    assert!(err.contains("does not validate"), "{err}");
    // A missing flag for the action.
    let out = check(&["--action", "MigrateIn", "--by", ALICE, "--source", A]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--destination is required for MigrateIn"),
        "{err}"
    );
    // An unknown action.
    let out = check(&["--action", "Teleport", "--by", ALICE]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown action"));
}
