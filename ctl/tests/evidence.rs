//! `convoyctl audit prove` and `audit check-bundle`, run as an operator
//! would on the logs of a real lab migration: the bundle checks with only
//! the CA certificate, and a damaged bundle or a bad migration id gets one
//! clear error line and a failure status.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::path::Path;
use std::process::{Command, Output};

use convoy_agent::lab::Lab;
use convoy_protocol::audit::{verify_log, AuditEvent};
use convoy_protocol::ctl::Outcome;
use convoy_protocol::model::MigrationPlan;

fn convoyctl(pki: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_convoyctl"))
        .arg("--pki")
        .arg(pki)
        .args(args)
        .output()
        .unwrap()
}

fn failure(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.lines().count(), 1, "one error line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prove_writes_a_bundle_that_checks_with_only_the_ca_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(dir.path(), &["a", "b"], |_, _| {})
        .await
        .unwrap();
    let a = lab.client("a").await.unwrap();
    a.vm_create(Lab::sim_test_vm("vm".parse().unwrap(), 4 << 20, 0))
        .await
        .unwrap();
    let req = lab
        .migrate_request("vm", "a", "b", MigrationPlan::default())
        .unwrap();
    let report = a.migrate(req, |_| {}).await.unwrap();
    assert_eq!(report.outcome, Outcome::Completed);
    let pki = lab.pki.dir().to_path_buf();
    // The destination records its outcome after the source has the Started
    // receipt: wait for it.
    let outcome_in_b = || {
        std::fs::read(pki.join("state/b/audit.log"))
            .ok()
            .and_then(|b| verify_log(&b, &lab.trust).ok())
            .is_some_and(|v| {
                v.records
                    .iter()
                    .any(|r| matches!(r.event, AuditEvent::Outcome { .. }))
            })
    };
    for _ in 0..1000 {
        if outcome_in_b() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(outcome_in_b(), "the destination never recorded its outcome");
    lab.shutdown().await;

    let (log_a, log_b) = (pki.join("state/a/audit.log"), pki.join("state/b/audit.log"));
    let bundle = dir.path().join("evidence.cvb");
    let out = convoyctl(
        &pki,
        &[
            "audit",
            "prove",
            &report.migration,
            "--log",
            log_a.to_str().unwrap(),
            "--log",
            log_b.to_str().unwrap(),
            "-o",
            bundle.to_str().unwrap(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "prove failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("evidence verified"), "{stdout}");

    // A third party holds the bundle and the CA certificate, nothing else.
    let verifier = dir.path().join("verifier");
    std::fs::create_dir(&verifier).unwrap();
    for f in ["ca.crt", "trust-domain"] {
        std::fs::copy(pki.join(f), verifier.join(f)).unwrap();
    }
    let out = convoyctl(
        &verifier,
        &["--json", "audit", "check-bundle", bundle.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "check-bundle failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verified"], true);
    assert_eq!(v["migration"], report.migration.as_str());
    assert_eq!(v["vm"], "vm");
    assert_eq!(v["started"], true);
    assert!(v["operator"]
        .as_str()
        .unwrap()
        .ends_with("/operator/operator"));
    assert!(v["source"]["agent"].as_str().unwrap().ends_with("/agent/a"));
    assert!(v["destination"]["agent"]
        .as_str()
        .unwrap()
        .ends_with("/agent/b"));
    for side in ["source", "destination"] {
        assert_eq!(v[side]["accepted"], true);
        assert_eq!(v[side]["receipts"].as_array().unwrap().len(), 4, "{side}");
    }
    assert_eq!(v["source"]["outcomes"][0], "completed");
    assert_eq!(v["destination"]["outcomes"][0], "started");

    // One flipped byte, anywhere past the header, and the bundle is refused.
    let mut bytes = std::fs::read(&bundle).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    let damaged = dir.path().join("damaged.cvb");
    std::fs::write(&damaged, &bytes).unwrap();
    let err = failure(&convoyctl(
        &verifier,
        &["audit", "check-bundle", damaged.to_str().unwrap()],
    ));
    assert!(err.contains("is not valid evidence"), "{err}");
    let err = failure(&convoyctl(
        &verifier,
        &["audit", "check-bundle", log_a.to_str().unwrap()],
    ));
    assert!(err.contains("not an evidence bundle"), "{err}");

    // Bad or unknown migration ids.
    let logs = [
        "--log",
        log_a.to_str().unwrap(),
        "--log",
        log_b.to_str().unwrap(),
    ];
    let prove = |m: &str| {
        let mut args = vec!["audit", "prove", m];
        args.extend(logs);
        convoyctl(&pki, &args)
    };
    assert!(failure(&prove("not-hex")).contains("is not a migration id"));
    let unknown = if report.migration.starts_with('f') {
        "0"
    } else {
        "f"
    };
    assert!(failure(&prove(unknown)).contains("no migration"));
    // The source's log alone cannot prove it.
    let out = convoyctl(
        &pki,
        &[
            "audit",
            "prove",
            &report.migration,
            "--log",
            log_a.to_str().unwrap(),
            "-o",
            dir.path().join("half.cvb").to_str().unwrap(),
        ],
    );
    assert!(failure(&out).contains("no log of the destination"));

    // Consistency: the log extends its earlier states, and a root held
    // from before must match.
    let a_log = log_a.to_str().unwrap();
    let out = convoyctl(
        &pki,
        &["audit", "consistency", a_log, "--from", "3", "--json"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verified"], true);
    assert!(!v["proof"].as_array().unwrap().is_empty());
    let old_root = v["old_root"].as_str().unwrap().to_string();
    let out = convoyctl(
        &pki,
        &[
            "audit",
            "consistency",
            a_log,
            "--from",
            "3",
            "--root",
            &old_root,
        ],
    );
    assert!(out.status.success());
    let mut wrong = old_root.into_bytes();
    wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
    let wrong = String::from_utf8(wrong).unwrap();
    let out = convoyctl(
        &pki,
        &[
            "audit",
            "consistency",
            a_log,
            "--from",
            "3",
            "--root",
            &wrong,
        ],
    );
    assert!(failure(&out).contains("rewritten since?"));
    let out = convoyctl(&pki, &["audit", "consistency", a_log, "--from", "9999"]);
    assert!(failure(&out).contains("do not fit"));

    // Whose log it is can be pinned: b's log renamed as a's is refused.
    let (a_id, b_id) = (
        "spiffe://convoy.internal/agent/a".to_string(),
        "spiffe://convoy.internal/agent/b".to_string(),
    );
    let out = convoyctl(&pki, &["audit", "verify", a_log, "--owner", &a_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let renamed = dir.path().join("a-really.log");
    std::fs::copy(&log_b, &renamed).unwrap();
    let renamed = renamed.to_str().unwrap();
    let out = convoyctl(&pki, &["audit", "verify", renamed, "--owner", &a_id]);
    assert!(
        failure(&out).contains(&format!("is the log of {b_id}, not of {a_id}")),
        "{}",
        failure(&out)
    );
    let out = convoyctl(&pki, &["audit", "show", renamed, "--owner", &a_id]);
    assert!(failure(&out).contains("is the log of"));
    let out = convoyctl(
        &pki,
        &[
            "audit",
            "consistency",
            renamed,
            "--from",
            "3",
            "--owner",
            &a_id,
        ],
    );
    assert!(failure(&out).contains("is the log of"));
}

/// `convoyctl audit fetch`: an admin downloads an agent's log over the
/// operator API, verified before it is written; another operator is denied
/// by the policy and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_writes_a_verified_log_for_admins_only() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(dir.path(), &["a"], |_, _| {}).await.unwrap();
    lab.add_operator("eve").unwrap();
    let pki = lab.pki.dir().to_path_buf();
    let agent = format!("a@{}", lab.agent("a").unwrap().addr);
    let out = dir.path().join("a.log");
    let run = |op: &str| {
        let (pki, agent, out, op) = (pki.clone(), agent.clone(), out.clone(), op.to_owned());
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_convoyctl"))
                .arg("--pki")
                .arg(&pki)
                .args(["--agent", &agent, "--operator", &op, "audit", "fetch", "-o"])
                .arg(&out)
                .output()
                .unwrap()
        })
    };
    let denied = run("eve").await.unwrap();
    assert!(failure(&denied).contains("denied"));
    assert!(!out.exists(), "nothing written for a denied operator");
    let ok = run("operator").await.unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("fetched and verified"));
    let log = verify_log(&std::fs::read(&out).unwrap(), &lab.trust).unwrap();
    assert_eq!(log.agent, lab.agent("a").unwrap().id);
    lab.shutdown().await;
}

/// `convoyctl audit verify` on a log whose last append was torn by a crash:
/// one error line that says so and where, what verifies before it on
/// stdout, a failure status; `--json` says `verified: false` with the torn
/// tail; `show` fails the same way after listing the records.
#[test]
fn verify_reports_a_torn_tail_with_what_verifies_before_it_and_fails() {
    use convoy_agent::trust::audit::AuditLog;
    use convoy_agent::trust::pki::Pki;
    use convoy_protocol::audit::entry_offsets;
    use convoy_protocol::names::{AgentName, Role, TrustDomain};

    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(dir.path(), TrustDomain::new("convoy.internal").unwrap()).unwrap();
    let name: AgentName = "a".parse().unwrap();
    pki.issue(Role::Agent, &name, std::time::Duration::from_secs(3600))
        .unwrap();
    let id = pki.identity(Role::Agent, &name).unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path, &id, &pki.trust().unwrap()).unwrap();
    log.record(AuditEvent::PolicyRejected {
        reason: "test".into(),
    })
    .unwrap();
    drop(log);
    let whole = std::fs::read(&path).unwrap();
    let at = entry_offsets(&whole);
    let start = at[3].0;
    std::fs::write(&path, &whole[..start + 9]).unwrap();
    let file = path.to_str().unwrap();

    let out = convoyctl(dir.path(), &["audit", "verify", file]);
    let err = failure(&out);
    assert!(
        err.contains(&format!(
            "ends in a torn append: 9 bytes from byte {start} (entry 3)"
        )),
        "{err}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with(
            "verified up to a torn tail: 1 records by spiffe://convoy.internal/agent/a"
        ),
        "{stdout}"
    );
    let out = convoyctl(dir.path(), &["--json", "audit", "verify", file]);
    failure(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verified"], false);
    assert_eq!(v["records"], 1);
    assert_eq!(v["torn_tail"]["offset"], start);
    assert_eq!(v["torn_tail"]["bytes"], 9);
    let out = convoyctl(dir.path(), &["audit", "show", file]);
    assert!(failure(&out).contains("torn append"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("agent started"));
    // Commands that need a whole log say why they refuse it.
    let out = convoyctl(dir.path(), &["audit", "consistency", file, "--from", "1"]);
    assert!(failure(&out).contains("torn last append"));
}
