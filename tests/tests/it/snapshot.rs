//! Snapshots in object storage between lab agents that never connect to
//! each other for it: `b` enrolls its sealing key in a `file://` bucket,
//! `a` pushes a VM sealed for `b`, `b` restores it after checking every
//! chunk and the root — through the operator API, with policy and audit.

use convoy_agent::client::{ClientError, CtlClient};
use convoy_agent::lab::Lab;
use convoy_protocol::audit::AuditEvent;
use convoy_protocol::ctl::snapshot::{PullRequest, PushRequest, SnapshotRequest, SnapshotResponse};
use convoy_protocol::ctl::{CtlErrorKind, VmState};
use convoy_protocol::snapshot::SnapshotId;
use convoy_tests::sim_spec;

const MEMORY: u64 = 16 << 20;

async fn push(
    c: &CtlClient,
    vm: &str,
    url: &str,
    to: &[&str],
) -> Result<SnapshotResponse, ClientError> {
    c.snapshot(SnapshotRequest::Push(PushRequest {
        vm: vm.parse().unwrap(),
        url: url.into(),
        recipients: to.iter().map(|n| n.parse().unwrap()).collect(),
        live: false,
    }))
    .await
}

async fn pull(
    c: &CtlClient,
    url: &str,
    snapshot: Option<SnapshotId>,
) -> Result<SnapshotResponse, ClientError> {
    c.snapshot(SnapshotRequest::Pull(PullRequest {
        url: url.into(),
        snapshot,
        vm: None,
        paused: false,
    }))
    .await
}

fn kind(e: &ClientError) -> Option<CtlErrorKind> {
    match e {
        ClientError::Agent(e) => Some(e.kind),
        _ => None,
    }
}

fn snapshot_events(lab: &Lab, agent: &str) -> Vec<String> {
    let bytes = std::fs::read(lab.audit_log(agent)).unwrap();
    convoy_protocol::audit::verify_log(&bytes, &lab.trust)
        .unwrap()
        .records
        .into_iter()
        .filter_map(|r| match r.event {
            AuditEvent::Snapshot {
                operation, object, ..
            } => Some(format!("{operation} {object}")),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_moves_through_a_bucket_sealed_for_the_agent_named() {
    let (_dir, lab) = convoy_tests::lab(&["a", "b", "c"]).await;
    let bucket = tempfile::tempdir().unwrap();
    let url = format!("file://{}/snapshots", bucket.path().display());
    let (a, b, c) = (
        lab.client("a").await.unwrap(),
        lab.client("b").await.unwrap(),
        lab.client("c").await.unwrap(),
    );
    // Not enrolled yet: the push names what is missing.
    a.vm_create(sim_spec("web", MEMORY, 0)).await.unwrap();
    let e = push(&a, "web", &url, &["b"]).await.unwrap_err();
    assert_eq!(kind(&e), Some(CtlErrorKind::NotFound), "{e}");
    assert!(e.to_string().contains("snapshot enroll"), "{e}");

    for cl in [&b, &c] {
        match cl
            .snapshot(SnapshotRequest::Enroll { url: url.clone() })
            .await
            .unwrap()
        {
            SnapshotResponse::Enrolled { object, .. } => assert!(object.starts_with("keys/")),
            other => panic!("{other:?}"),
        }
    }
    let first = match push(&a, "web", &url, &["b"]).await.unwrap() {
        SnapshotResponse::Pushed(p) => p,
        other => panic!("{other:?}"),
    };
    assert_eq!(first.summary.generation, 1);
    assert!(first.uploaded > 0 && first.uploaded == first.summary.chunks.1);
    assert_eq!(first.summary.recipients.len(), 2, "{:?}", first.summary);
    // The VM runs on at a after the push.
    let at_a = a.vm_list().await.unwrap();
    assert_eq!(at_a[0].state, VmState::Running);

    // An idle VM pushed again: the next generation, and only the chunk
    // holding page 0 (where the vCPU keeps its counter) uploaded again.
    let second = match push(&a, "web", &url, &["b"]).await.unwrap() {
        SnapshotResponse::Pushed(p) => p,
        other => panic!("{other:?}"),
    };
    assert_eq!(second.summary.generation, 2);
    assert_eq!(second.summary.lineage, first.summary.lineage);
    assert_eq!(second.uploaded, 1, "{second:?}");

    // c is enrolled but not a recipient: it can list, not open.
    match c
        .snapshot(SnapshotRequest::List { url: url.clone() })
        .await
        .unwrap()
    {
        SnapshotResponse::Listed(l) => {
            assert_eq!(l.snapshots.len(), 2);
            assert!(l.refused.is_empty());
            assert_eq!(l.snapshots[0].generation, 2);
        }
        other => panic!("{other:?}"),
    }
    let e = c
        .snapshot(SnapshotRequest::Verify {
            url: url.clone(),
            snapshot: Some(second.summary.snapshot),
        })
        .await
        .unwrap_err();
    assert_eq!(kind(&e), Some(CtlErrorKind::Unauthorized), "{e}");

    // c copies the bucket elsewhere without being able to open it; b
    // verifies the copy.
    let url2 = format!("file://{}/copy", bucket.path().display());
    match c
        .snapshot(SnapshotRequest::Copy {
            url: url.clone(),
            to: url2.clone(),
            snapshot: None,
        })
        .await
        .unwrap()
    {
        SnapshotResponse::Copied(r) => {
            assert_eq!(r.copied.len(), 2);
            assert_eq!(r.chunks_copied, first.summary.chunks.1 + 1);
            assert!(!r.server_side);
        }
        other => panic!("{other:?}"),
    }
    match b
        .snapshot(SnapshotRequest::Verify {
            url: url2.clone(),
            snapshot: None,
        })
        .await
        .unwrap()
    {
        SnapshotResponse::Verified(v) => assert_eq!(v.summary.snapshot, second.summary.snapshot),
        other => panic!("{other:?}"),
    }

    // b verifies, then restores the newest.
    match b
        .snapshot(SnapshotRequest::Verify {
            url: url.clone(),
            snapshot: None,
        })
        .await
        .unwrap()
    {
        SnapshotResponse::Verified(v) => {
            assert_eq!(v.summary.snapshot, second.summary.snapshot);
            assert_eq!(v.fetched.0, second.summary.chunks.1);
        }
        other => panic!("{other:?}"),
    }
    let pulled = match pull(&b, &url, None).await.unwrap() {
        SnapshotResponse::Pulled(p) => p,
        other => panic!("{other:?}"),
    };
    assert_eq!(pulled.summary.snapshot, second.summary.snapshot);
    assert_eq!(pulled.vm.state, VmState::Running);
    assert_eq!(pulled.vm.memory_bytes, MEMORY);
    assert_eq!(pulled.fetched.0, second.summary.chunks.1);
    assert_eq!(pulled.kept, 0, "nothing kept from an earlier pull");
    // The chunks it kept while it ran went once it was done.
    let pulls = lab.audit_log("b").with_file_name("pulls");
    assert_eq!(
        std::fs::read_dir(&pulls).map_or(0, |d| d.count()),
        0,
        "{}",
        pulls.display()
    );
    // The same name cannot be restored twice on one agent.
    let e = pull(&b, &url, None).await.unwrap_err();
    assert_eq!(kind(&e), Some(CtlErrorKind::Exists), "{e}");

    // The bucket rolls back: generation 2's manifest vanishes, so that
    // generation 1 looks like the newest. b saw 2 and refuses it.
    b.vm_delete("web".parse().unwrap()).await.unwrap();
    std::fs::remove_file(bucket.path().join("snapshots").join(&second.summary.object)).unwrap();
    let e = pull(&b, &url, None).await.unwrap_err();
    assert!(e.to_string().contains("older"), "{e}");
    assert!(
        b.vm_list().await.unwrap().is_empty(),
        "nothing restored after a refused pull"
    );

    // Deleting generation 1 removes its chunks (no other manifest names
    // them now); the one chunk only generation 2 uploaded stays, an
    // orphan of the manifest the bucket lost (delete removes only what
    // the deleted manifest names).
    match a
        .snapshot(SnapshotRequest::Delete {
            url: url.clone(),
            snapshot: first.summary.snapshot,
        })
        .await
        .unwrap()
    {
        SnapshotResponse::Deleted(d) => {
            assert_eq!(d.chunks_deleted, first.summary.chunks.1);
            assert_eq!(d.chunks_kept, 0);
        }
        other => panic!("{other:?}"),
    }
    let left = std::fs::read_dir(bucket.path().join("snapshots").join("chunks"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left as u64, second.uploaded);

    let a_events = snapshot_events(&lab, "a");
    assert!(
        a_events.iter().filter(|e| e.starts_with("push ")).count() == 2,
        "{a_events:?}"
    );
    assert!(
        a_events.iter().any(|e| e.starts_with("delete ")),
        "{a_events:?}"
    );
    let c_events = snapshot_events(&lab, "c");
    assert_eq!(
        c_events.iter().filter(|e| e.starts_with("copy ")).count(),
        2,
        "{c_events:?}"
    );
    let b_events = snapshot_events(&lab, "b");
    assert!(
        b_events.iter().any(|e| e.starts_with("enroll keys/")),
        "{b_events:?}"
    );
    assert!(
        b_events.iter().any(|e| e.starts_with("pull manifests/")),
        "{b_events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_vm_is_not_pushed_and_a_bad_url_is_refused() {
    let (_dir, lab) = convoy_tests::lab(&["a"]).await;
    let bucket = tempfile::tempdir().unwrap();
    let url = format!("file://{}/snapshots", bucket.path().display());
    let a = lab.client("a").await.unwrap();
    let mut spec = sim_spec("db", MEMORY, 0);
    spec.attributes
        .labels
        .insert("pinned".into(), "true".into());
    a.vm_create(spec).await.unwrap();
    let e = push(&a, "db", &url, &[]).await.unwrap_err();
    assert_eq!(kind(&e), Some(CtlErrorKind::Forbidden), "{e}");
    assert!(e.to_string().contains("pinned"), "{e}");
    assert_eq!(a.vm_list().await.unwrap()[0].state, VmState::Running);
    assert!(!bucket.path().join("snapshots").join("manifests").exists());

    for bad in [
        "s3://bucket/p?x-amz-security-token=secret",
        "file://relative/dir",
        "http://example.com/x",
    ] {
        let e = push(&a, "db", bad, &[]).await.unwrap_err();
        assert_eq!(kind(&e), Some(CtlErrorKind::BadRequest), "{bad}: {e}");
        assert!(!e.to_string().contains("secret"), "{e}");
    }
}

/// Agents `a` and `b` and a `file://` bucket where `b` has enrolled.
struct Two {
    _dir: tempfile::TempDir,
    lab: Lab,
    bucket: tempfile::TempDir,
    url: String,
    a: CtlClient,
    b: CtlClient,
}

async fn two() -> Two {
    let (_dir, lab) = convoy_tests::lab(&["a", "b"]).await;
    let bucket = tempfile::tempdir().unwrap();
    let url = format!("file://{}/snapshots", bucket.path().display());
    let (a, b) = (
        lab.client("a").await.unwrap(),
        lab.client("b").await.unwrap(),
    );
    b.snapshot(SnapshotRequest::Enroll { url: url.clone() })
        .await
        .unwrap();
    Two {
        _dir,
        lab,
        bucket,
        url,
        a,
        b,
    }
}

async fn migrate_via(
    lab: &Lab,
    c: &CtlClient,
    vm: &str,
    url: &str,
    wait_secs: u32,
) -> Result<convoy_protocol::ctl::snapshot::HandoverReport, ClientError> {
    match c
        .snapshot(SnapshotRequest::MigrateVia {
            migrate: convoy_tests::migrate(lab, vm, "a", "b"),
            url: url.into(),
            wait_secs,
        })
        .await?
    {
        SnapshotResponse::Handed(h) => Ok(*h),
        other => panic!("{other:?}"),
    }
}

/// `migrate --via` of `vm` from a to b, in the background.
async fn spawn_via(
    lab: &Lab,
    url: &str,
    vm: &str,
    wait_secs: u32,
) -> tokio::task::JoinHandle<Result<SnapshotResponse, ClientError>> {
    let (lab_a, url) = (lab.client("a").await.unwrap(), url.to_owned());
    let req = convoy_tests::migrate(lab, vm, "a", "b");
    tokio::spawn(async move {
        lab_a
            .snapshot(SnapshotRequest::MigrateVia {
                migrate: req,
                url,
                wait_secs,
            })
            .await
    })
}

fn pull_of(url: &str, vm: &str) -> SnapshotRequest {
    SnapshotRequest::Pull(PullRequest {
        url: url.into(),
        snapshot: None,
        vm: Some(vm.parse().unwrap()),
        paused: false,
    })
}

/// Store-and-forward: the agents never connect; one create-only claim
/// decides. Claimed by the destination, the VM runs there and is gone at
/// the source; unclaimed in time, the source claims it back and a late
/// destination is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_handed_over_through_a_bucket_runs_exactly_once() {
    let Two {
        _dir,
        lab,
        bucket,
        url,
        a,
        b,
    } = two().await;
    a.vm_create(sim_spec("web", MEMORY, 200)).await.unwrap();
    a.vm_create(sim_spec("db", MEMORY, 0)).await.unwrap();

    // Claimed: b pulls while a waits.
    let source = spawn_via(&lab, &url, "web", 60).await;
    let mut pulled = None;
    for _ in 0..200 {
        match b.snapshot(pull_of(&url, "web")).await {
            Ok(SnapshotResponse::Pulled(p)) => {
                pulled = Some(p);
                break;
            }
            Ok(other) => panic!("{other:?}"),
            // Not pushed yet.
            Err(e) if kind(&e) == Some(CtlErrorKind::NotFound) => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let pulled = pulled.expect("b restored web");
    assert_eq!(pulled.vm.state, VmState::Running);
    let handed = match source.await.unwrap().unwrap() {
        SnapshotResponse::Handed(h) => h,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        handed.outcome,
        convoy_protocol::ctl::Outcome::Completed,
        "{handed:?}"
    );
    let at_a: Vec<_> = a
        .vm_list()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name.to_string())
        .collect();
    assert_eq!(at_a, ["db"], "web is gone at a");
    // The ticket is spent at b: the same snapshot is not restored twice.
    b.vm_delete("web".parse().unwrap()).await.unwrap();
    let e = b.snapshot(pull_of(&url, "web")).await.unwrap_err();
    assert_eq!(kind(&e), Some(CtlErrorKind::Unauthorized), "{e}");

    // Unclaimed: a waits 1 s, claims db back and resumes it; b, late, is
    // refused and runs nothing.
    let h = migrate_via(&lab, &a, "db", &url, 1).await.unwrap();
    assert!(
        matches!(h.outcome, convoy_protocol::ctl::Outcome::Aborted(_)),
        "{h:?}"
    );
    let db = a.vm_list().await.unwrap();
    assert_eq!(db.len(), 1);
    assert_eq!(db[0].state, VmState::Running);
    let e = b.snapshot(pull_of(&url, "db")).await.unwrap_err();
    assert_eq!(kind(&e), Some(CtlErrorKind::MigrationFailed), "{e}");
    assert!(e.to_string().contains("claimed VM db first"), "{e}");
    assert!(b.vm_list().await.unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(bucket.path().join("snapshots").join("claims"))
            .unwrap()
            .count(),
        2,
        "one claim per handover"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_push_copies_a_busy_vm_while_it_runs() {
    let t = two().await;
    let (a, b, url) = (&t.a, &t.b, &t.url);
    // A live push of a busy VM: rounds while it runs, a short pause, and
    // it runs on; b restores what it was at the pause.
    a.vm_create(sim_spec("busy", MEMORY, 2000)).await.unwrap();
    let live = match a
        .snapshot(SnapshotRequest::Push(PushRequest {
            vm: "busy".parse().unwrap(),
            url: url.clone(),
            recipients: vec!["b".parse().unwrap()],
            live: true,
        }))
        .await
        .unwrap()
    {
        SnapshotResponse::Pushed(p) => p,
        other => panic!("{other:?}"),
    };
    assert!(live.rounds >= 1, "{live:?}");
    assert!(live.paused_ms < live.total_ms, "{live:?}");
    let busy = a.vm_list().await.unwrap();
    assert!(busy
        .iter()
        .any(|v| v.name.as_str() == "busy" && v.state == VmState::Running));
    match b.snapshot(pull_of(url, "busy")).await.unwrap() {
        SnapshotResponse::Pulled(p) => assert_eq!(p.vm.state, VmState::Running),
        other => panic!("{other:?}"),
    }
}

/// A store-and-forward ticket binds the VM as its source reported it: for
/// another incarnation of the VM (re-created bigger) the source refuses
/// before anything is paused or pushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_via_ticket_for_another_incarnation_is_refused_before_the_push() {
    let Two {
        _dir,
        lab,
        bucket,
        url,
        a,
        b: _,
    } = two().await;
    a.vm_create(sim_spec("web", MEMORY, 200)).await.unwrap();
    let stale = convoy_tests::migrate(&lab, "web", "a", "b");
    a.vm_delete("web".parse().unwrap()).await.unwrap();
    a.vm_create(sim_spec("web", 2 * MEMORY, 200)).await.unwrap();
    let e = a
        .snapshot(SnapshotRequest::MigrateVia {
            migrate: stale,
            url,
            wait_secs: 5,
        })
        .await
        .unwrap_err();
    assert_eq!(kind(&e), Some(CtlErrorKind::Unauthorized), "{e}");
    assert!(e.to_string().contains("another incarnation"), "{e}");
    assert!(!bucket.path().join("snapshots").join("manifests").exists());
    let vms = a.vm_list().await.unwrap();
    assert_eq!(vms[0].state, VmState::Running);
}

/// A store-and-forward source whose host stops with the VM (the lab's
/// agents destroy their VMs as they stop, as in a crash of the whole
/// host) has nothing to claim back at its restart: it leaves the handover
/// to the destination, whose pull restores the one copy there is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_via_source_restarted_without_its_vm_leaves_the_snapshot_to_the_destination() {
    let Two {
        _dir,
        mut lab,
        bucket,
        url,
        a,
        b,
    } = two().await;
    a.vm_create(sim_spec("web", MEMORY, 200)).await.unwrap();
    let req = convoy_tests::migrate(&lab, "web", "a", "b");
    let (source, u) = (lab.client("a").await.unwrap(), url.clone());
    let waiting = tokio::spawn(async move {
        source
            .snapshot(SnapshotRequest::MigrateVia {
                migrate: req,
                url: u,
                wait_secs: 600,
            })
            .await
    });
    let manifests = bucket.path().join("snapshots").join("manifests");
    for _ in 0..200 {
        if std::fs::read_dir(&manifests).is_ok_and(|mut d| d.next().is_some()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    a.close().await;
    lab.restart("a").await.unwrap();
    assert!(
        waiting.await.unwrap().is_err(),
        "the waiting call ends with its agent"
    );
    let a = lab.client("a").await.unwrap();
    assert!(a.vm_list().await.unwrap().is_empty());
    let log = a.audit_log().await.unwrap();
    let said = "is no longer here; the handover is left to";
    assert!(log.windows(said.len()).any(|w| w == said.as_bytes()));
    // No claim of a's: b's pull restores and starts the VM.
    match b.snapshot(pull_of(&url, "web")).await.unwrap() {
        SnapshotResponse::Pulled(p) => assert_eq!(p.vm.state, VmState::Running),
        other => panic!("{other:?}"),
    }
}

/// A handover the store can no longer settle (the bucket gone while the
/// source waited): the VM is held in doubt, `recover` says why and leaves
/// it paused; `recover --force-resume-here` resumes it on the operator's
/// word and forgets the handover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_whose_bucket_is_gone_is_recovered_only_by_force() {
    use convoy_protocol::ctl::RecoveryDecision;
    let Two {
        _dir,
        lab,
        bucket,
        url,
        a,
        ..
    } = two().await;
    a.vm_create(sim_spec("web", MEMORY, 0)).await.unwrap();
    let source = spawn_via(&lab, &url, "web", 3).await;
    // Once the snapshot is up, the bucket goes: a file where it was.
    // "Up" is a manifest in place, not the store's staging file for it
    // (`<name>#<n>`, linked into place afterwards): with the bucket gone
    // between the two, the push itself fails (a CI run saw it), which is
    // another path than the one this test is about.
    let prefix = bucket.path().join("snapshots");
    let manifests = prefix.join("manifests");
    let placed = |d: std::fs::ReadDir| {
        d.flatten()
            .any(|e| !e.file_name().to_string_lossy().contains('#'))
    };
    for _ in 0..300 {
        if std::fs::read_dir(&manifests).is_ok_and(placed) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    std::fs::rename(&prefix, bucket.path().join("gone")).unwrap();
    std::fs::write(&prefix, b"not a bucket").unwrap();
    let handed = match source.await.unwrap().unwrap() {
        SnapshotResponse::Handed(h) => h,
        other => panic!("{other:?}"),
    };
    assert!(
        matches!(handed.outcome, convoy_protocol::ctl::Outcome::InDoubt(_)),
        "{handed:?}"
    );
    assert_eq!(a.vm_list().await.unwrap()[0].state, VmState::InDoubt);

    let r = a
        .recover(Some("web".parse().unwrap()), false)
        .await
        .unwrap();
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].decision, RecoveryDecision::StaysPaused, "{r:?}");
    assert!(r[0].phase.contains("store-and-forward"), "{r:?}");
    assert_eq!(a.vm_list().await.unwrap()[0].state, VmState::InDoubt);

    let r = a.recover(Some("web".parse().unwrap()), true).await.unwrap();
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].decision, RecoveryDecision::ResumedHere, "{r:?}");
    assert!(r[0].reason.contains("forced"), "{r:?}");
    assert_eq!(a.vm_list().await.unwrap()[0].state, VmState::Running);
    // Forgotten: nothing more to recover.
    assert!(a.recover(None, false).await.unwrap().is_empty());
}
