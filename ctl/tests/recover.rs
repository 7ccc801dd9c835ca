//! `convoyctl recover`, run as an operator would: nothing to recover, a
//! migration still in progress (left alone, reported, exit status 1), an
//! operator the policy does not allow, and a migration left in doubt by a
//! destination's restart that the agents resolve from the destination's
//! signed fence — the VM runs on at the source and the source's audit log
//! keeps the statement.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use convoy_agent::host::journal::JournalPoint;
use convoy_agent::lab::Lab;
use convoy_protocol::audit::{verify_log, AuditEvent};
use convoy_protocol::ctl::VmState;
use convoy_protocol::journal::JournalPhase;
use convoy_protocol::model::MigrationPlan;

/// Runs `convoyctl --agent a@… --operator OP ARGS` (off the runtime).
async fn convoyctl(pki: PathBuf, agent: String, op: &str, args: &[&str]) -> Output {
    let op = op.to_owned();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_convoyctl"))
            .arg("--pki")
            .arg(&pki)
            .args(["--agent", &agent, "--operator", &op])
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn undecided(o: &Output) -> String {
    assert!(!o.status.success(), "expected exit status 1: {}", stdout(o));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "one error line: {err}");
    assert!(err.contains("undecided"), "{err}");
    stdout(o)
}

async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..600 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_reports_leaves_live_migrations_alone_and_the_agents_settle_a_doubt() {
    let dir = tempfile::tempdir().unwrap();
    let mut lab = Lab::start(dir.path(), &["a", "b"], |name, cfg| {
        if name == "a" {
            cfg.dangerous().pause_at(JournalPoint::SourceCommitted);
        }
    })
    .await
    .unwrap();
    lab.add_operator("eve").unwrap();
    let pki = lab.pki.dir().to_path_buf();
    let agent = format!("a@{}", lab.agent("a").unwrap().addr);
    let a = lab.client("a").await.unwrap();
    a.vm_create(Lab::sim_test_vm("vm".parse().unwrap(), 8 << 20, 500))
        .await
        .unwrap();

    // Nothing unfinished yet.
    let out = convoyctl(
        pki.clone(),
        agent.clone(),
        "operator",
        &["recover", "--all"],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("nothing to recover"), "{out:?}");

    // A migration held right after the source's commit: still driven by
    // the agent, so left alone, and reported.
    let req = lab
        .migrate_request("vm", "a", "b", MigrationPlan::default())
        .unwrap();
    let mover = tokio::spawn(async move { a.migrate(req, |_| {}).await });
    assert!(
        eventually(|| lab
            .journal("a")
            .unwrap()
            .iter()
            .any(|r| r.phase == JournalPhase::Committed))
        .await
    );
    let out = convoyctl(pki.clone(), agent.clone(), "operator", &["recover", "vm"]).await;
    let text = undecided(&out);
    assert!(
        text.contains("vm (source, committed with spiffe://"),
        "{text}"
    );
    assert!(
        text.contains("stays paused — in progress in this agent"),
        "{text}"
    );
    // An operator the policy does not let recover this VM.
    let out = convoyctl(pki.clone(), agent.clone(), "eve", &["recover", "--all"]).await;
    assert!(undecided(&out).contains("policy"), "{out:?}");

    // The destination restarts (its staging is fenced at start); the
    // source, released, sends its Handover into a dead connection and is
    // in doubt; it asks, gets the signed fence, and resumes the VM.
    lab.restart("b").await.unwrap();
    lab.release("a").unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(60), mover).await;
    let c = lab.client("a").await.unwrap();
    let mut running = false;
    for _ in 0..300 {
        let vms = c.vm_list().await.unwrap();
        if vms.first().is_some_and(|v| v.state == VmState::Running) {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(running, "{:?}", c.vm_list().await.unwrap());
    let out = convoyctl(
        pki.clone(),
        agent.clone(),
        "operator",
        &["--json", "recover", "--all"],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["migrations"], serde_json::json!([]), "{json}");
    // The source's log keeps the decision and the statement it rests on.
    let log = verify_log(
        &std::fs::read(pki.join("state/a/audit.log")).unwrap(),
        &lab.trust,
    )
    .unwrap();
    assert!(log.records.iter().any(|r| matches!(
        &r.event,
        AuditEvent::Resolution { decision, statement: Some(_), .. } if decision == "resumed here"
    )));
    c.close().await;
    lab.shutdown().await;
}
