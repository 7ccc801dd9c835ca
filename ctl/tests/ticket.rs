//! `convoyctl ticket request|approve|show` and `migrate --ticket`, run as
//! operators would, against a policy that wants the tenant, the donor and
//! the recipient: refused until all three approved (each by its own key),
//! approvals that cannot count refused before they are written, and the
//! approvals in the audit logs of both agents.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::path::PathBuf;
use std::process::{Command, Output};

use convoy_agent::lab::Lab;
use convoy_protocol::audit::{verify_log, AuditEvent};
use convoy_protocol::ticket::approval::ApprovalRole;

const THREE_PARTIES: &str = r#"
@id("three-parties")
@reason("every move needs the tenant's, the donor's and the recipient's approval")
forbid (
  principal,
  action in [Convoy::Action::"MigrateOut", Convoy::Action::"MigrateIn"],
  resource
)
unless { context.ticket.approval_roles.containsAll(["tenant", "donor", "recipient"]) };
"#;

/// `convoyctl --pki PKI --agent AGENT`, run off the runtime.
struct Ctl {
    pki: PathBuf,
    agent: String,
}

impl Ctl {
    /// Runs `convoyctl … --operator OP ARGS`.
    async fn run(&self, op: &str, args: &[&str]) -> Output {
        let mut all: Vec<String> = vec!["--pki".into(), self.pki.to_str().unwrap().into()];
        all.extend([
            "--agent".into(),
            self.agent.clone(),
            "--operator".into(),
            op.into(),
        ]);
        all.extend(args.iter().map(|s| s.to_string()));
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_convoyctl"))
                .args(&all)
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    }
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{o:?}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn refused(o: &Output, why: &str) {
    assert!(!o.status.success(), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(why), "expected {why:?} in: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_parties_approve_a_ticket_before_the_vm_moves() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(dir.path(), &["a", "b"], |_, cfg| {
        let files = cfg.policy.as_ref().unwrap();
        std::fs::write(files.policies.join("three-parties.cedar"), THREE_PARTIES).unwrap();
    })
    .await
    .unwrap();
    for op in ["dora", "rex", "eve"] {
        lab.add_operator(op).unwrap();
    }
    let pki: PathBuf = lab.pki.dir().to_path_buf();
    let ctl = Ctl {
        pki: pki.clone(),
        agent: format!("a@{}", lab.agent("a").unwrap().addr),
    };
    let b = format!("b@{}", lab.agent("b").unwrap().addr);
    let c = lab.client("a").await.unwrap();
    c.vm_create(Lab::sim_test_vm("vm".parse().unwrap(), 8 << 20, 500))
        .await
        .unwrap();

    // A plain ticket is refused by the policy.
    let o = ctl.run("operator", &["migrate", "vm", "--to", &b]).await;
    refused(&o, "three-parties");

    // The request: unsigned, three roles to approve.
    let file = dir.path().join("vm.ticket");
    let f = file.to_str().unwrap();
    let out = ok(&ctl
        .run(
            "operator",
            &[
                "ticket",
                "request",
                "vm",
                "--to",
                "b",
                "--approver",
                "tenant",
                "--approver",
                "donor",
                "--approver",
                "recipient",
                "--out",
                f,
            ],
        )
        .await);
    assert!(
        out.contains("must approve: a tenant, a donor, a recipient"),
        "{out}"
    );
    // Not overwritten by a second request.
    let o = ctl
        .run(
            "operator",
            &[
                "ticket",
                "request",
                "vm",
                "--to",
                "b",
                "--approver",
                "donor",
                "--out",
                f,
            ],
        )
        .await;
    refused(&o, "exists");

    // Submitted before anyone approved: the agent names who is missing.
    let o = ctl
        .run("operator", &["migrate", "--ticket", f, "--to", &b])
        .await;
    refused(
        &o,
        "still needs the approval of a tenant, a donor, a recipient",
    );

    // Each party checks what it approves (`ticket show`) and signs that
    // digest; a wrong digest (a file changed since) is refused.
    let shown = ok(&ctl.run("rex", &["--json", "ticket", "show", f]).await);
    let digest = serde_json::from_str::<serde_json::Value>(&shown).unwrap()["request_digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let approve = |role: Option<&'static str>, digest: String| {
        let mut args = vec![
            "ticket".to_string(),
            "approve".into(),
            f.into(),
            "--digest".into(),
            digest,
        ];
        if let Some(r) = role {
            args.extend(["--role".into(), r.into()]);
        }
        args
    };
    let run = |op: &'static str, args: Vec<String>| {
        let ctl = &ctl;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ctl.run(op, &args).await
        }
    };
    let o = run("operator", approve(Some("tenant"), "00".repeat(32))).await;
    refused(&o, "not the digest you approve");
    // The parties approve; what could not count is refused up front.
    ok(&run("operator", approve(Some("tenant"), digest.clone())).await);
    let o = run("operator", approve(Some("donor"), digest.clone())).await;
    refused(&o, "already approved");
    let o = run("eve", approve(None, digest.clone())).await;
    refused(&o, "meets none of the ticket's approvers");
    ok(&run("dora", approve(Some("donor"), digest.clone())).await);
    let o = ctl
        .run("operator", &["migrate", "--ticket", f, "--to", &b])
        .await;
    refused(&o, "still needs the approval of a recipient");
    // Each rewrite left nothing beside the ticket.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
    ok(&run("rex", approve(Some("recipient"), digest.clone())).await);
    let shown = ok(&ctl.run("eve", &["--json", "ticket", "show", f]).await);
    let json: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(json["approvals"].as_array().unwrap().len(), 3, "{json}");
    assert_eq!(json["approvals"][1]["role"], "donor", "{json}");

    // Plan flags with --ticket are refused: the plan is the ticket's.
    let o = ctl
        .run("operator", &["migrate", "--ticket", f, "--streams", "4"])
        .await;
    refused(&o, "cannot be used with");

    let out = ok(&ctl
        .run("operator", &["migrate", "--ticket", f, "--to", &b])
        .await);
    assert!(out.contains("completed"), "{out}");
    assert!(c.vm_list().await.unwrap().is_empty());
    // Used once.
    let o = ctl
        .run("operator", &["migrate", "--ticket", f, "--to", &b])
        .await;
    assert!(!o.status.success());

    // Both agents' audit logs hold the ticket with its three approvals
    // (b's once it recorded its outcome, after the source's receipt).
    let migration = json["migration"].as_str().unwrap().to_owned();
    let log = |side: &str| {
        std::fs::read(pki.join(format!("state/{side}/audit.log")))
            .ok()
            .and_then(|b| verify_log(&b, &lab.trust).ok())
    };
    for _ in 0..600 {
        let done = log("b").is_some_and(|v| {
            v.records
                .iter()
                .any(|r| matches!(r.event, AuditEvent::Outcome { .. }))
        });
        if done {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for side in ["a", "b"] {
        let log = log(side).unwrap();
        // The last ticket: the refused plain one came first at a.
        let t = log
            .records
            .iter()
            .rev()
            .find_map(|r| match &r.event {
                AuditEvent::Ticket(t) => Some(t.verify(&lab.trust, r.at_unix, 60).unwrap()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no ticket in {side}'s log"));
        assert_eq!(t.approvals.count(), 3);
        assert_eq!(
            t.approvals.roles().into_iter().collect::<Vec<_>>(),
            [
                ApprovalRole::Tenant,
                ApprovalRole::Donor,
                ApprovalRole::Recipient
            ]
        );
    }
    // The evidence bundle carries them, checked offline.
    let bundle = dir.path().join("evidence.cvb");
    let (log_a, log_b) = (pki.join("state/a/audit.log"), pki.join("state/b/audit.log"));
    ok(&ctl
        .run(
            "eve",
            &[
                "audit",
                "prove",
                &migration,
                "--log",
                log_a.to_str().unwrap(),
                "--log",
                log_b.to_str().unwrap(),
                "-o",
                bundle.to_str().unwrap(),
            ],
        )
        .await);
    let out = ok(&ctl
        .run("eve", &["audit", "check-bundle", bundle.to_str().unwrap()])
        .await);
    assert!(out.contains("approvals    3 distinct keys"), "{out}");
    assert!(out.contains("operator/rex (recipient)"), "{out}");
    c.close().await;
    lab.shutdown().await;
}
