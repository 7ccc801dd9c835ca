//! Access-control policies on live agents: tenants, forbid-overrides-permit
//! at the destination, evaluation errors, reloads (good and bad), agents
//! without a policy, operator abort and audit reads. Every decision lands in
//! the deciding agent's audit log, and after every refusal the VM runs
//! exactly once, at the source.

use std::time::Duration;

use convoy_agent::client::ClientError;
use convoy_agent::lab::Lab;
use convoy_agent::trust::policy::{HostFacts, OperatorFacts};
use convoy_protocol::audit::{verify_log, AuditEvent};
use convoy_protocol::ctl::admission::AdmissionQuery;
use convoy_protocol::ctl::{CtlErrorKind, Outcome, SimVmSpec, VmState};
use convoy_protocol::model::MigrationPlan;
use convoy_protocol::names::SpiffeId;
use convoy_tests::{eventually, lab, migrate, sim_spec};

fn spec(name: &str, tenant: &str, level: u8) -> SimVmSpec {
    let mut s = sim_spec(name, 8 << 20, 1000);
    s.attributes.tenant = tenant.into();
    s.attributes.security_level = level;
    s
}

fn agent_id(lab: &Lab, name: &str) -> SpiffeId {
    lab.agent(name).unwrap().id.clone()
}

/// The decisions in `agent`'s audit log: (action, permitted, explanation).
fn decisions(lab: &Lab, agent: &str) -> Vec<(String, bool, String)> {
    convoy_tests::live_audit_log(lab, agent)
        .records
        .into_iter()
        .filter_map(|r| match r.event {
            AuditEvent::Decision {
                action,
                permitted,
                explanation,
                ..
            } => Some((action, permitted, explanation)),
            _ => None,
        })
        .collect()
}

/// Policy load events in `agent`'s log: (loaded, rejected).
fn loads(lab: &Lab, agent: &str) -> (usize, usize) {
    let log = convoy_tests::live_audit_log(lab, agent);
    let n = |f: fn(&AuditEvent) -> bool| log.records.iter().filter(|r| f(&r.event)).count();
    (
        n(|e| matches!(e, AuditEvent::PolicyLoaded { .. })),
        n(|e| matches!(e, AuditEvent::PolicyRejected { .. })),
    )
}

/// Waits until every agent named has logged `loaded` loads and `rejected`
/// refusals.
async fn wait_loads(lab: &Lab, agents: &[&str], loaded: usize, rejected: usize) {
    wait_loads_at_least(lab, agents, loaded, rejected, true).await
}

/// Like [`wait_loads`]; with `exact` false, more refusals than `rejected`
/// are fine (a multi-file edit passes through invalid states).
async fn wait_loads_at_least(
    lab: &Lab,
    agents: &[&str],
    loaded: usize,
    rejected: usize,
    exact: bool,
) {
    assert!(
        eventually(Duration::from_secs(10), || async {
            agents.iter().all(|a| {
                let (l, r) = loads(lab, a);
                l == loaded && (r == rejected || (!exact && r > rejected))
            })
        })
        .await,
        "policy reload not seen: {:?}",
        agents.iter().map(|a| loads(lab, a)).collect::<Vec<_>>()
    );
}

fn assert_forbidden<T: std::fmt::Debug>(r: Result<T, ClientError>, why: &str) {
    match r {
        Err(ClientError::Agent(e)) => {
            assert_eq!(e.kind, CtlErrorKind::Forbidden, "{e:?}");
            assert!(e.message.contains(why), "{:?} lacks {why:?}", e.message);
        }
        other => panic!("expected a policy refusal mentioning {why:?}, got {other:?}"),
    }
}

/// `vm` runs on `at` only, among `agents`; elsewhere it never runs and a
/// staging copy being discarded is gone soon.
async fn runs_exactly_once(lab: &Lab, vm: &str, at: &str, agents: &[&str]) {
    for a in agents {
        let c = lab.client(a).await.unwrap();
        let state = || async {
            let list = c.vm_list().await.unwrap();
            list.iter().find(|v| v.name.as_str() == vm).map(|v| v.state)
        };
        if *a == at {
            assert_eq!(state().await, Some(VmState::Running), "{vm} on {a}");
        } else {
            assert_ne!(
                state().await,
                Some(VmState::Running),
                "{vm} runs on {a} too"
            );
            assert!(
                eventually(Duration::from_secs(5), || async { state().await.is_none() }).await,
                "{vm} left behind on {a}"
            );
        }
    }
}

/// Replaces a file in one step, as an operator should (agents reload on
/// change and must not see half a file).
fn write_atomic(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_create_and_move_only_their_own_vms() {
    let (_dir, lab) = lab(&["a", "b"]).await;
    let alice = lab.add_operator("alice").unwrap();
    let mut inv = lab.inventory().unwrap();
    inv.operators.insert(
        alice.id().clone(),
        OperatorFacts {
            tenants: ["acme".to_string()].into(),
            groups: Default::default(),
        },
    );
    lab.write_inventory(&inv).unwrap();
    wait_loads(&lab, &["a", "b"], 2, 0).await;

    let a = lab.client_as("a", &alice).await.unwrap();
    a.vm_create(spec("mine", "acme", 1)).await.unwrap();
    assert_forbidden(
        a.vm_create(spec("theirs", "globex", 1)).await,
        "default deny",
    );
    // The lab operator (an admin) creates a globex VM; alice may not move it.
    let root = lab.client("a").await.unwrap();
    root.vm_create(spec("theirs", "globex", 1)).await.unwrap();
    let req = lab
        .migrate_request_by(&alice, "theirs", "a", "b", MigrationPlan::default())
        .unwrap();
    assert_forbidden(a.migrate(req, |_| {}).await, "default deny");
    runs_exactly_once(&lab, "theirs", "a", &["a", "b"]).await;
    // Her own VM moves.
    let req = lab
        .migrate_request_by(&alice, "mine", "a", "b", MigrationPlan::default())
        .unwrap();
    let r = a.migrate(req, |_| {}).await.unwrap();
    assert_eq!(r.outcome, Outcome::Completed);
    runs_exactly_once(&lab, "mine", "b", &["a", "b"]).await;

    let at_a = decisions(&lab, "a");
    assert!(at_a.contains(&(
        "CreateVm".into(),
        false,
        "denied: no policy permits it (default deny)".into()
    )));
    assert!(at_a
        .iter()
        .any(|(a, p, e)| a == "MigrateOut" && *p && e.contains("[tenant-owns-vm]")));
    assert!(decisions(&lab, "b")
        .iter()
        .any(|(a, p, e)| a == "MigrateIn" && *p && e.contains("[tenant-ticket-migrates-in]")));
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_forbid_overrides_the_permits_and_nothing_moves() {
    let (_dir, lab) = lab(&["a", "b"]).await;
    // a moves to an unlisted zone: its own MigrateOut is still permitted
    // (admin), but b admits VMs only from named zones.
    let mut inv = lab.inventory().unwrap();
    inv.agents.insert(
        agent_id(&lab, "a"),
        HostFacts {
            zone: "dmz".into(),
            security_level: 2,
            groups: Default::default(),
        },
    );
    lab.write_inventory(&inv).unwrap();
    wait_loads(&lab, &["a", "b"], 2, 0).await;
    let a = lab.client("a").await.unwrap();
    a.vm_create(spec("vm", "default", 1)).await.unwrap();
    // Asked first (as `evacuate` does): a would let it go, b would not
    // take it; nothing is audited, and the ticket is not spent.
    let req = migrate(&lab, "vm", "a", "b");
    let b = lab.client("b").await.unwrap();
    let ask = |memory_bytes| AdmissionQuery {
        ticket: req.ticket.clone(),
        attributes: spec("vm", "default", 1).attributes,
        memory_bytes,
    };
    assert!(a.admission(ask(8 << 20)).await.unwrap().permitted);
    let no = b.admission(ask(8 << 20)).await.unwrap();
    assert!(
        !no.permitted && no.why.contains("[only-from-named-zones]"),
        "{no:?}"
    );
    let too_big = b.admission(ask(1 << 50)).await.unwrap();
    assert!(
        !too_big.permitted && too_big.why.contains("free here"),
        "{too_big:?}"
    );
    assert!(!decisions(&lab, "b")
        .iter()
        .any(|(a, _, _)| a == "MigrateIn"));
    let r = a.migrate(req, |_| {}).await;
    let report = r.unwrap();
    match &report.outcome {
        Outcome::Aborted(why) => assert!(
            why.contains("destination policy denied by [only-from-named-zones]"),
            "{why}"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    runs_exactly_once(&lab, "vm", "a", &["a", "b"]).await;
    assert!(decisions(&lab, "a")
        .iter()
        .any(|(a, p, _)| a == "MigrateOut" && *p));
    assert!(decisions(&lab, "b").iter().any(|(a, p, e)| a == "MigrateIn"
        && !*p
        && e.contains("[only-from-named-zones]")
        && e.contains("not in an allowed zone")));

    // And no downgrade: b's level drops below the VM's; now the source
    // itself refuses.
    inv.agents
        .get_mut(&agent_id(&lab, "b"))
        .unwrap()
        .security_level = 0;
    lab.write_inventory(&inv).unwrap();
    wait_loads(&lab, &["a", "b"], 3, 0).await;
    let req = migrate(&lab, "vm", "a", "b");
    let no = a
        .admission(AdmissionQuery {
            ticket: req.ticket.clone(),
            attributes: spec("vm", "default", 1).attributes,
            memory_bytes: 8 << 20,
        })
        .await
        .unwrap();
    assert!(!no.permitted && no.why.contains("[no-downgrade]"), "{no:?}");
    // A ticket that does not verify is refused.
    let mut other = req.ticket.clone();
    other.signature[0] ^= 1;
    let err = b
        .admission(AdmissionQuery {
            ticket: other,
            attributes: Default::default(),
            memory_bytes: 1,
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ticket"), "{err}");
    assert_forbidden(
        a.migrate(migrate(&lab, "vm", "a", "b"), |_| {}).await,
        "[no-downgrade]",
    );
    runs_exactly_once(&lab, "vm", "a", &["a", "b"]).await;
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_errors_denies_and_a_bad_reload_keeps_the_old_policy() {
    let (_dir, lab) = lab(&["a", "b"]).await;
    let a = lab.client("a").await.unwrap();
    a.vm_create(spec("vm", "default", 1)).await.unwrap();
    let dir = lab.policy_files().policies;

    // A forbid that overflows at evaluation: valid, but it errors.
    write_atomic(
        &dir.join("overflow.cedar"),
        r#"@id("overflowing-forbid")
        forbid (principal, action == Convoy::Action::"MigrateOut", resource is Convoy::Vm)
        when { context.ticket.expires_at * 9223372036854775807 > 0 };"#,
    );
    wait_loads(&lab, &["a", "b"], 2, 0).await;
    assert_forbidden(
        a.migrate(migrate(&lab, "vm", "a", "b"), |_| {}).await,
        "[overflowing-forbid] failed to evaluate",
    );
    runs_exactly_once(&lab, "vm", "a", &["a", "b"]).await;

    // A file that does not parse: refused at reload, the previous policy
    // (with the erroring forbid) stays in force.
    write_atomic(&dir.join("broken.cedar"), "permit (principal, action");
    wait_loads(&lab, &["a", "b"], 2, 1).await;
    assert_forbidden(
        a.migrate(migrate(&lab, "vm", "a", "b"), |_| {}).await,
        "[overflowing-forbid]",
    );
    // An inventory that does not fit: refused too.
    write_atomic(&lab.policy_files().inventory, r#"{"agents": {"x": 1}}"#);
    wait_loads(&lab, &["a", "b"], 2, 2).await;

    // Repaired: the next load is the one in force.
    std::fs::remove_file(dir.join("broken.cedar")).unwrap();
    std::fs::remove_file(dir.join("overflow.cedar")).unwrap();
    let mut inv = convoy_agent::trust::policy::Inventory::default();
    inv.operators.insert(
        lab.operator.id().clone(),
        OperatorFacts {
            tenants: Default::default(),
            groups: ["admins".to_string()].into(),
        },
    );
    for (n, zone) in [("a", "lab-a"), ("b", "lab-b")] {
        inv.agents.insert(
            agent_id(&lab, n),
            HostFacts {
                zone: zone.into(),
                security_level: 2,
                groups: Default::default(),
            },
        );
    }
    lab.write_inventory(&inv).unwrap();
    wait_loads_at_least(&lab, &["a", "b"], 3, 2, false).await;
    let r = a
        .migrate(migrate(&lab, "vm", "a", "b"), |_| {})
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Completed);
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_a_policy_denies_everything() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(dir.path(), &["a"], |_, cfg| cfg.policy = None)
        .await
        .unwrap();
    let a = lab.client("a").await.unwrap();
    assert_forbidden(
        a.vm_create(spec("vm", "default", 0)).await,
        "no policy loaded",
    );
    assert_forbidden(a.audit_log().await, "no policy loaded");
    assert!(a.vm_list().await.unwrap().is_empty());
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_stops_the_agent_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(bad.join("policies")).unwrap();
    std::fs::write(
        bad.join("policies/p.cedar"),
        "permit (principal, action, resource is Convoy::Vm) when { resource.owner == 1 };",
    )
    .unwrap();
    std::fs::write(bad.join("inventory.json"), "{}").unwrap();
    let files = convoy_agent::trust::policy::files_in(&bad);
    let e = Lab::start(&dir.path().join("lab"), &["a"], |_, cfg| {
        cfg.policy = Some(files.clone())
    })
    .await
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("does not validate against the Convoy schema"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_aborts_a_running_migration_and_the_vm_stays_at_the_source() {
    let (_dir, lab) = lab(&["a", "b"]).await;
    let a = lab.client("a").await.unwrap();
    // Big and busy enough to still be copying when the abort arrives.
    let mut s = sim_spec("vm", 256 << 20, 200_000);
    s.attributes.security_level = 1;
    a.vm_create(s).await.unwrap();
    // A first round of 8 s at most (a 1 ms target alone could end the
    // migration before the abort: the round trips on loopback take it).
    let opts = MigrationPlan {
        max_downtime_ms: 1,
        max_rounds: 1000,
        bandwidth: Some(32 << 20),
        ..MigrationPlan::default()
    };
    let req = lab.migrate_request("vm", "a", "b", opts).unwrap();
    let mover = tokio::spawn(async move { a.migrate(req, |_| {}).await });
    let ctl = lab.client("a").await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            ctl.vm_list().await.unwrap()[0].state == VmState::MigratingOut
        })
        .await
    );
    // Another tenant's operator may not abort it.
    let eve = lab.add_operator("eve").unwrap();
    let as_eve = lab.client_as("a", &eve).await.unwrap();
    assert_forbidden(as_eve.abort("vm".parse().unwrap()).await, "default deny");
    // Nor delete it; and nobody deletes a VM in the middle of its migration.
    assert_forbidden(
        as_eve.vm_delete("vm".parse().unwrap()).await,
        "default deny",
    );
    match ctl.vm_delete("vm".parse().unwrap()).await {
        Err(ClientError::Agent(e)) => assert!(e.message.contains("is migrating"), "{e:?}"),
        other => panic!("deleted under a migration: {other:?}"),
    }
    ctl.abort("vm".parse().unwrap()).await.unwrap();
    let report = mover.await.unwrap().unwrap();
    assert!(
        matches!(&report.outcome, Outcome::Aborted(w) if w.contains("cancelled")),
        "{:?}",
        report.outcome
    );
    runs_exactly_once(&lab, "vm", "a", &["a", "b"]).await;
    // Nothing to abort any more.
    match ctl.abort("vm".parse().unwrap()).await {
        Err(ClientError::Agent(e)) => assert!(e.message.contains("not migrating"), "{e:?}"),
        other => panic!("{other:?}"),
    }
    let d = decisions(&lab, "a");
    assert!(d.iter().any(|(a, p, _)| a == "DeleteVm" && !*p));
    assert!(d.iter().any(|(a, p, _)| a == "Abort" && !*p));
    assert!(d.iter().any(|(a, p, _)| a == "Abort" && *p));
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admins_read_audit_logs_remotely_and_what_they_read_verifies() {
    let (_dir, lab) = lab(&["a", "b"]).await;
    let a = lab.client("a").await.unwrap();
    a.vm_create(spec("vm", "default", 1)).await.unwrap();
    a.migrate(migrate(&lab, "vm", "a", "b"), |_| {})
        .await
        .unwrap();
    let log = a.audit_log().await.unwrap();
    let v = verify_log(&log, &lab.trust).unwrap();
    assert_eq!(&v.agent, &agent_id(&lab, "a"));
    assert!(v
        .records
        .iter()
        .any(|r| matches!(r.event, AuditEvent::Outcome { .. })));
    let eve = lab.add_operator("eve").unwrap();
    assert_forbidden(
        lab.client_as("a", &eve).await.unwrap().audit_log().await,
        "default deny",
    );
    lab.shutdown().await;
}
