//! The fleet registry on a real etcd (`etcd-server`, started here): a
//! migration commits by one transaction, a lost compare leaves the VM at
//! its source, a registry that does not answer at the commit leaves it
//! paused until `recover`, an agent cut off loses its lease and comes
//! back, and a three-member cluster commits with a member killed
//! mid-migration.

use std::path::Path;
use std::time::Duration;

use convoy_agent::client::CtlClient;
use convoy_agent::lab::etcd::{etcd_binary, EtcdCluster};
use convoy_agent::lab::link::CuttableLink;
use convoy_agent::lab::Lab;
use convoy_agent::registry::RegistryConfig;
use convoy_protocol::ctl::fleet::{FleetQuery, FleetView};
use convoy_protocol::ctl::{Outcome, RecoveryDecision, VmState};
use convoy_protocol::model::MigrationPlan;
use convoy_protocol::names::VmName;
use convoy_protocol::registry::OwnerRecord;
use convoy_tests::{eventually, sim_spec};

fn registry(endpoints: Vec<String>) -> RegistryConfig {
    let mut c = RegistryConfig::new(endpoints);
    c.lease_ttl = Duration::from_secs(2);
    c.timeout = Duration::from_secs(2);
    c
}

async fn etcd(test: &str, dir: &Path, members: usize) -> Option<EtcdCluster> {
    let bin = etcd_binary(test).unwrap()?;
    Some(EtcdCluster::start(&bin, dir, members).await.unwrap())
}

/// The owner record of `vm`, read straight from etcd.
async fn record(endpoints: &[String], vm: &str) -> Option<OwnerRecord> {
    let mut c = etcd_client::Client::connect(endpoints, None).await.unwrap();
    let key = format!("/convoy/vms/{vm}");
    let r = c.get(key.as_bytes(), None).await.unwrap();
    r.kvs()
        .first()
        .map(|kv| OwnerRecord::decode("/convoy/", kv.key(), kv.value()).unwrap())
}

async fn put_raw(endpoints: &[String], key: &str, value: Vec<u8>) {
    let mut c = etcd_client::Client::connect(endpoints, None).await.unwrap();
    c.put(key, value, None).await.unwrap();
}

async fn fleet(c: &CtlClient, q: FleetQuery) -> FleetView {
    c.fleet(q).await.unwrap()
}

async fn state_of(c: &CtlClient, vm: &str) -> Option<VmState> {
    c.vm_list()
        .await
        .unwrap()
        .into_iter()
        .find(|v| v.name.as_str() == vm)
        .map(|v| v.state)
}

/// What `recover` decided about `vm`'s migrations on `c`.
async fn recover(c: &CtlClient, vm: &str) -> Vec<RecoveryDecision> {
    c.recover(Some(vm.parse().unwrap()), false)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.decision)
        .collect()
}

fn slow() -> MigrationPlan {
    MigrationPlan {
        bandwidth: Some(8 << 20),
        ..MigrationPlan::default()
    }
}

/// Starts migrating `vm` from a to b, slowly; returns once pages flow
/// (the destination has read the registry and accepted).
async fn start_slow_migration(
    lab: &Lab,
    vm: &str,
) -> tokio::task::JoinHandle<convoy_protocol::ctl::MigrationReport> {
    let a = lab.client("a").await.unwrap();
    let req = lab.migrate_request(vm, "a", "b", slow()).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut tx = Some(tx);
    let h = tokio::spawn(async move {
        a.migrate(req, |p| {
            if p.payload_bytes > 0 {
                if let Some(t) = tx.take() {
                    let _ = t.send(());
                }
            }
        })
        .await
        .unwrap()
    });
    tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .expect("pages flow within 30 s")
        .expect("the migration reports progress");
    h
}

/// A lab of agents a and b sharing one etcd of `members` members, and
/// clients of both; `None` when the test is skipped (no etcd, outside CI).
struct Fleet {
    _dir: tempfile::TempDir,
    etcd: EtcdCluster,
    ep: Vec<String>,
    lab: Lab,
    a: CtlClient,
    b: CtlClient,
}

impl Fleet {
    async fn end(self) {
        self.lab.shutdown().await;
    }
}

async fn fleet_of(test: &str, members: usize, timeout: Duration) -> Option<Fleet> {
    let dir = tempfile::tempdir().unwrap();
    let etcd = etcd(test, dir.path(), members).await?;
    let ep = etcd.endpoints();
    let lab = Lab::start(&dir.path().join("lab"), &["a", "b"], |_, c| {
        let mut r = registry(ep.clone());
        r.timeout = timeout;
        c.registry = Some(r);
    })
    .await
    .unwrap();
    let (a, b) = (
        lab.client("a").await.unwrap(),
        lab.client("b").await.unwrap(),
    );
    Some(Fleet {
        _dir: dir,
        etcd,
        ep,
        lab,
        a,
        b,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_commits_in_etcd_and_the_fleet_shows_where_each_vm_runs() {
    let dir = tempfile::tempdir().unwrap();
    let Some(etcd) = etcd("registry commits", dir.path(), 1).await else {
        return;
    };
    let ep = etcd.endpoints();
    let lab = Lab::start(&dir.path().join("lab"), &["a", "b"], |_, c| {
        c.registry = Some(registry(ep.clone()));
    })
    .await
    .unwrap();
    let (a, b) = (
        lab.client("a").await.unwrap(),
        lab.client("b").await.unwrap(),
    );
    a.vm_create(sim_spec("web", 16 << 20, 500)).await.unwrap();
    let r = record(&ep, "web").await.expect("registered at creation");
    assert_eq!((r.owner.name().as_str(), r.epoch), ("a", 1), "{r:?}");

    let req = lab
        .migrate_request("web", "a", "b", MigrationPlan::default())
        .unwrap();
    let report = a.migrate(req, |_| {}).await.unwrap();
    assert_eq!(report.outcome, Outcome::Completed, "{report:?}");
    let r = record(&ep, "web").await.unwrap();
    assert_eq!((r.owner.name().as_str(), r.epoch), ("b", 2), "{r:?}");
    assert_eq!(r.cause, format!("migrated {}", report.migration), "{r:?}");

    // Asked of either agent: where it runs, and who is alive.
    let view = fleet(&a, FleetQuery::default()).await;
    assert_eq!(view.vms.len(), 1, "{view:?}");
    assert_eq!(view.vms[0].owner.name().as_str(), "b");
    assert!(view.vms[0].owner_alive, "{view:?}");
    let alive: Vec<_> = view
        .agents
        .iter()
        .map(|g| g.id.name().to_string())
        .collect();
    assert_eq!(alive, ["a", "b"], "{view:?}");
    let on_a = fleet(
        &b,
        FleetQuery {
            host: Some("a".parse().unwrap()),
            ..FleetQuery::default()
        },
    )
    .await;
    assert!(on_a.vms.is_empty(), "{on_a:?}");
    let w = fleet(
        &b,
        FleetQuery {
            vm: Some("web".parse().unwrap()),
            ..FleetQuery::default()
        },
    )
    .await;
    assert_eq!(w.vms[0].epoch, 2);
    let missing = b
        .fleet(FleetQuery {
            vm: Some("nowhere".parse().unwrap()),
            ..FleetQuery::default()
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(missing.contains("not in the registry"), "{missing}");

    // The name is taken fleet-wide: a creates no second "web".
    let taken = a
        .vm_create(sim_spec("web", 16 << 20, 0))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        taken.contains("owned by") && taken.contains("/agent/b"),
        "{taken}"
    );
    assert!(state_of(&a, "web").await.is_none());

    // An operator outside the VM's tenant does not see it.
    let eve = lab.add_operator("eve").unwrap();
    let as_eve = lab.client_as("a", &eve).await.unwrap();
    let seen = fleet(&as_eve, FleetQuery::default()).await;
    assert!(seen.vms.is_empty(), "{seen:?}");
    assert_eq!(seen.hidden, 1, "{seen:?}");
    // Nor, not being an admin, the agents or the findings.
    assert!(
        seen.agents.is_empty() && seen.disagreements.is_empty(),
        "{seen:?}"
    );

    // A hostile record is reported, not believed.
    put_raw(&ep, "/convoy/vms/junk", b"{\"vm\":".to_vec()).await;
    put_raw(
        &ep,
        "/convoy/vms/elsewhere",
        serde_json::to_vec(&OwnerRecord {
            vm: "other".parse().unwrap(),
            ..r.clone()
        })
        .unwrap(),
    )
    .await;
    let view = fleet(&a, FleetQuery::default()).await;
    assert_eq!(view.vms.len(), 1, "{view:?}");
    let bad = view.disagreements.join("\n");
    assert!(bad.contains("junk") && bad.contains("names other"), "{bad}");

    // Deleted where it runs: its record goes.
    b.vm_delete("web".parse().unwrap()).await.unwrap();
    assert!(record(&ep, "web").await.is_none());
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_compare_and_swap_leaves_the_vm_running_at_its_source() {
    let Some(f) = fleet_of("registry lost cas", 1, Duration::from_secs(2)).await else {
        return;
    };
    let (ep, lab, a, b) = (f.ep.clone(), &f.lab, &f.a, &f.b);
    a.vm_create(sim_spec("db", 32 << 20, 2_000)).await.unwrap();
    let mover = start_slow_migration(lab, "db").await;
    // Someone else changes the record after the destination read it.
    let before = record(&ep, "db").await.unwrap();
    let changed = OwnerRecord {
        epoch: 7,
        cause: "changed by another tool".into(),
        ..before
    };
    put_raw(&ep, "/convoy/vms/db", changed.encode()).await;

    let report = mover.await.unwrap();
    match &report.outcome {
        Outcome::Aborted(why) => assert!(why.contains("registry"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(state_of(a, "db").await, Some(VmState::Running));
    assert_eq!(state_of(b, "db").await, None);
    // Taken back by its own transaction, which fences the lost commit.
    let r = record(&ep, "db").await.unwrap();
    assert_eq!((r.owner.name().as_str(), r.epoch), ("a", 8), "{r:?}");
    assert!(r.cause.starts_with("reclaimed"), "{r:?}");
    f.end().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_silent_at_the_commit_keeps_the_vm_paused_until_recover() {
    let Some(f) = fleet_of("registry silent", 1, Duration::from_secs(2)).await else {
        return;
    };
    let (ep, lab, a, b) = (f.ep.clone(), &f.lab, &f.a, &f.b);
    a.vm_create(sim_spec("cache", 32 << 20, 2_000))
        .await
        .unwrap();
    let mover = start_slow_migration(lab, "cache").await;
    // etcd is there but says nothing from now on.
    f.etcd.pause(0, true).unwrap();
    let report = mover.await.unwrap();
    match &report.outcome {
        Outcome::InDoubt(why) => assert!(why.contains("registry"), "{why}"),
        other => panic!("{other:?}"),
    }
    // Not committed, so not at b; not confirmed, so not resumed at a.
    assert_eq!(state_of(b, "cache").await, None);
    assert_eq!(state_of(a, "cache").await, Some(VmState::InDoubt));
    // A recover while etcd is still silent changes nothing.
    let decided = recover(a, "cache").await;
    assert!(
        decided.iter().all(|d| *d == RecoveryDecision::StaysPaused),
        "{decided:?}"
    );
    assert_eq!(state_of(a, "cache").await, Some(VmState::InDoubt));

    f.etcd.pause(0, false).unwrap();
    let decided = recover(a, "cache").await;
    assert!(
        decided.contains(&RecoveryDecision::ResumedHere),
        "{decided:?}"
    );
    assert_eq!(state_of(a, "cache").await, Some(VmState::Running));
    // Epoch 2 when b's commit never reached etcd; 3 when etcd applied it
    // once it ran again (after b had given up on it): a then takes the
    // record back on b's signed word that it gave the VM back.
    let r = record(&ep, "cache").await.unwrap();
    assert_eq!(r.owner.name().as_str(), "a", "{r:?}");
    assert!(matches!(r.epoch, 2 | 3), "{r:?}");
    assert!(r.cause.starts_with("reclaimed"), "{r:?}");
    assert_eq!(state_of(b, "cache").await, None);
    f.end().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_gone_for_good_is_settled_by_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let Some(etcd) = etcd("registry peer gone", dir.path(), 1).await else {
        return;
    };
    let ep = etcd.endpoints();
    // b reaches etcd through a link that will go dark for good: its
    // commit never arrives.
    let target = ep[0].trim_start_matches("http://").parse().unwrap();
    let link = CuttableLink::start(target).await.unwrap();
    let via = format!("http://{}", link.addr());
    let mut lab = Lab::start(&dir.path().join("lab"), &["a", "b"], |n, c| {
        let e = if n == "b" { via.clone() } else { ep[0].clone() };
        c.registry = Some(registry(vec![e]));
    })
    .await
    .unwrap();
    let a = lab.client("a").await.unwrap();
    a.vm_create(sim_spec("queue", 32 << 20, 2_000))
        .await
        .unwrap();
    let mover = start_slow_migration(&lab, "queue").await;
    link.set_up(false);
    etcd.pause(0, true).unwrap();
    let report = mover.await.unwrap();
    assert!(matches!(report.outcome, Outcome::InDoubt(_)), "{report:?}");
    // b is gone for good; etcd answers again.
    lab.stop_agent("b").await.unwrap();
    etcd.pause(0, false).unwrap();
    // (The agent's own watcher may have asked first: the same rule.)
    let decided = recover(&a, "queue").await;
    assert!(
        decided.iter().all(|d| *d == RecoveryDecision::ResumedHere),
        "{decided:?}"
    );
    assert_eq!(state_of(&a, "queue").await, Some(VmState::Running));
    let r = record(&ep, "queue").await.unwrap();
    assert_eq!((r.owner.name().as_str(), r.epoch), ("a", 2), "{r:?}");
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_without_the_registry_refuses_a_source_with_one() {
    let dir = tempfile::tempdir().unwrap();
    let Some(etcd) = etcd("registry mixed", dir.path(), 1).await else {
        return;
    };
    let ep = etcd.endpoints();
    let lab = Lab::start(&dir.path().join("lab"), &["a", "b"], |n, c| {
        if n == "a" {
            c.registry = Some(registry(ep.clone()));
        }
    })
    .await
    .unwrap();
    let a = lab.client("a").await.unwrap();
    a.vm_create(sim_spec("solo", 16 << 20, 0)).await.unwrap();
    let req = lab
        .migrate_request("solo", "a", "b", MigrationPlan::default())
        .unwrap();
    let report = a.migrate(req, |_| {}).await.unwrap();
    match &report.outcome {
        Outcome::Aborted(why) => assert!(why.contains("registry"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(state_of(&a, "solo").await, Some(VmState::Running));
    let r = record(&ep, "solo").await.unwrap();
    assert_eq!((r.owner.name().as_str(), r.epoch), ("a", 1), "{r:?}");
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cut_off_from_the_registry_loses_its_lease_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let Some(etcd) = etcd("registry lease", dir.path(), 1).await else {
        return;
    };
    let ep = etcd.endpoints();
    let target = ep[0].trim_start_matches("http://").parse().unwrap();
    let link = CuttableLink::start(target).await.unwrap();
    let via = format!("http://{}", link.addr());
    let lab = Lab::start(&dir.path().join("lab"), &["a", "b"], |n, c| {
        let e = if n == "b" { via.clone() } else { ep[0].clone() };
        c.registry = Some(registry(vec![e]));
    })
    .await
    .unwrap();
    let a = lab.client("a").await.unwrap();
    let b = lab.client("b").await.unwrap();
    b.vm_create(sim_spec("batch", 16 << 20, 0)).await.unwrap();
    let alive = |v: &FleetView| -> Vec<String> {
        v.agents.iter().map(|g| g.id.name().to_string()).collect()
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            alive(&fleet(&a, FleetQuery::default()).await) == ["a", "b"]
        })
        .await
    );

    link.set_up(false);
    assert!(
        eventually(Duration::from_secs(20), || async {
            let v = fleet(&a, FleetQuery::default()).await;
            alive(&v) == ["a"] && v.vms.iter().all(|m| !m.owner_alive)
        })
        .await,
        "{:?}",
        fleet(&a, FleetQuery::default()).await
    );
    // Its VM's record stays: a lease ends liveness, never ownership.
    let v = fleet(&a, FleetQuery::default()).await;
    assert_eq!(v.vms[0].vm, "batch".parse::<VmName>().unwrap());
    assert_eq!(v.vms[0].owner.name().as_str(), "b");

    link.set_up(true);
    assert!(
        eventually(Duration::from_secs(20), || async {
            let v = fleet(&a, FleetQuery::default()).await;
            alive(&v) == ["a", "b"] && v.vms.iter().all(|m| m.owner_alive)
        })
        .await,
        "{:?}",
        fleet(&a, FleetQuery::default()).await
    );
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_cluster_commits_with_a_member_killed_mid_migration() {
    let Some(mut f) = fleet_of("registry cluster", 3, Duration::from_secs(5)).await else {
        return;
    };
    let (ep, lab, a, b) = (f.ep.clone(), &f.lab, &f.a, &f.b);
    a.vm_create(sim_spec("api", 32 << 20, 2_000)).await.unwrap();
    let mover = start_slow_migration(lab, "api").await;
    f.etcd.kill(0);
    let report = mover.await.unwrap();
    assert_eq!(report.outcome, Outcome::Completed, "{report:?}");
    assert_eq!(state_of(b, "api").await, Some(VmState::Running));
    assert_eq!(state_of(a, "api").await, None);
    let r = record(&ep[1..], "api").await.unwrap();
    assert_eq!((r.owner.name().as_str(), r.epoch), ("b", 2), "{r:?}");
    assert!(f.etcd.healthy(1).await && f.etcd.healthy(2).await);
    f.end().await;
}

/// Snapshots and the registry: a VM restored from a bucket is registered
/// at the restore — refused while another agent owns that name, which
/// then keeps running there alone — and a store-and-forward handover,
/// whose commit point is a claim in the bucket, is refused by an agent
/// with a registry (it says to migrate live), the VM running on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_vm_is_registered_and_a_via_handover_is_refused() {
    use convoy_protocol::ctl::snapshot::{PullRequest, PushRequest, SnapshotRequest};
    let Some(f) = fleet_of("registry snapshots", 1, Duration::from_secs(2)).await else {
        return;
    };
    let bucket = tempfile::tempdir().unwrap();
    let url = format!("file://{}/snapshots", bucket.path().display());
    f.b.snapshot(SnapshotRequest::Enroll { url: url.clone() })
        .await
        .unwrap();
    f.a.vm_create(sim_spec("db", 16 << 20, 200)).await.unwrap();
    f.a.snapshot(SnapshotRequest::Push(PushRequest {
        vm: "db".parse().unwrap(),
        url: url.clone(),
        recipients: vec!["b".parse().unwrap()],
        live: false,
    }))
    .await
    .unwrap();
    let pull = || {
        f.b.snapshot(SnapshotRequest::Pull(PullRequest {
            url: url.clone(),
            snapshot: None,
            vm: None,
            paused: false,
        }))
    };
    // a owns db: b may not run a copy of it.
    let e = pull().await.unwrap_err().to_string();
    assert!(
        e.contains("the registry says db is owned by spiffe://")
            && e.contains("/agent/a (epoch 1)"),
        "{e}"
    );
    assert_eq!(state_of(&f.b, "db").await, None);
    assert_eq!(state_of(&f.a, "db").await, Some(VmState::Running));
    let r = record(&f.ep, "db").await.unwrap();
    assert_eq!((r.owner.name().as_str(), r.epoch), ("a", 1), "{r:?}");

    // A handover through the bucket is refused, the VM untouched.
    let e =
        f.a.snapshot(SnapshotRequest::MigrateVia {
            migrate: convoy_tests::migrate(&f.lab, "db", "a", "b"),
            url: url.clone(),
            wait_secs: 5,
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("fleet registry") && e.contains("live"), "{e}");
    assert_eq!(state_of(&f.a, "db").await, Some(VmState::Running));

    // Deleted at a, its record goes; restored at b, b's at epoch 1.
    f.a.vm_delete("db".parse().unwrap()).await.unwrap();
    assert!(record(&f.ep, "db").await.is_none());
    pull().await.unwrap();
    assert_eq!(state_of(&f.b, "db").await, Some(VmState::Running));
    let r = record(&f.ep, "db").await.unwrap();
    assert_eq!(
        (r.owner.name().as_str(), r.epoch, r.cause.as_str()),
        ("b", 1, "restored"),
        "{r:?}"
    );
    f.end().await;
}
