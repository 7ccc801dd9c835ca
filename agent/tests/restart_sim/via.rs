//! A store-and-forward source killed while it waits for the destination's
//! claim: restarted, it settles the handover by the one claim — the VM
//! back and running at the source when its claim wins, gone there (running
//! only at the destination) when the destination claimed it first.

use convoy_protocol::ctl::snapshot::{PullRequest, SnapshotRequest, SnapshotResponse};

use super::*;

/// Starts `migrate --via url` of `vm` from `a` to `b` (waiting up to 10
/// minutes for b's claim) and returns once its manifest is in the bucket.
async fn pushed_and_waiting(
    s: &Setup,
    a: &AgentProcess,
    b: &AgentProcess,
    vm: &str,
    bucket: &Path,
) {
    let ca = s.client(a).await;
    let migrate = migrate_request(&ca, s, a, b, vm, &Default::default()).await;
    let manifests = bucket.join("manifests");
    let before = std::fs::read_dir(&manifests).map_or(0, |d| d.count());
    let url = format!("file://{}", bucket.display());
    tokio::spawn(async move {
        // Ends with an error when the agent is killed.
        let _ = ca
            .snapshot(SnapshotRequest::MigrateVia {
                migrate,
                url,
                wait_secs: 600,
            })
            .await;
    });
    assert!(
        until(Duration::from_secs(60), || std::fs::read_dir(&manifests)
            .map_or(0, |d| d.count())
            > before)
        .await,
        "{vm} never reached the bucket"
    );
}

/// Whether `c`'s VM list satisfies `f` within 30 s.
async fn listed(c: &CtlClient, f: impl Fn(&[VmInfo]) -> bool) -> bool {
    for _ in 0..300 {
        if f(&c.vm_list().await.unwrap()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn pull(bucket: &Path, vm: &str) -> SnapshotRequest {
    SnapshotRequest::Pull(PullRequest {
        url: format!("file://{}", bucket.display()),
        snapshot: None,
        vm: Some(vm.parse().unwrap()),
        paused: false,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_via_source_killed_while_it_waits_settles_by_the_claim_at_its_restart() {
    let Some(g) = guest() else { return };
    let _heavy = heavy().await;
    let s = Setup::new(&["a", "b"], g).await;
    let (mut a, mut b) = (s.agent("a"), s.agent("b"));
    a.start().await;
    b.start().await;
    let bucket = s.dir.path().join("bucket");
    let url = format!("file://{}", bucket.display());
    let cb = s.client(&b).await;
    cb.snapshot(SnapshotRequest::Enroll { url: url.clone() })
        .await
        .unwrap();
    let ca = s.client(&a).await;
    ca.vm_create(sim("back")).await.unwrap();
    ca.vm_create(sim("gone")).await.unwrap();
    let _helpers = HelpersKilledOnDrop(&["back", "gone"]);
    ca.close().await;

    // Killed while it waits; nobody claimed: restarted, a claims "back"
    // back and it runs on there, its counter continuing; b, late, is
    // refused and runs nothing.
    pushed_and_waiting(&s, &a, &b, "back", &bucket).await;
    let paused_at = {
        let ca = s.client(&a).await;
        let c = counter(&ca, "back").await;
        ca.close().await;
        c
    };
    assert!(!a.stop(Signal::KILL, false).await.success());
    a.start().await;
    let ca = s.client(&a).await;
    assert!(
        listed(&ca, |vms| vms.iter().any(
            |v| v.name.as_str() == "back" && v.state == VmState::Running
        ))
        .await,
        "back was not claimed back at a"
    );
    assert!(sim_counting(&ca, "back", paused_at).await);
    let e = cb.snapshot(pull(&bucket, "back")).await.unwrap_err();
    assert!(e.to_string().contains("claimed VM back first"), "{e}");
    assert!(cb.vm_list().await.unwrap().is_empty());
    assert!(
        audited(
            &ca,
            "the source settled the handover without the destination's claim"
        )
        .await
    );
    ca.close().await;

    // Killed while it waits; b claims "gone" while a is down: restarted, a
    // finds b's claim and lets go of its paused copy; it runs only at b.
    pushed_and_waiting(&s, &a, &b, "gone", &bucket).await;
    assert!(!a.stop(Signal::KILL, false).await.success());
    match cb.snapshot(pull(&bucket, "gone")).await.unwrap() {
        SnapshotResponse::Pulled(p) => assert_eq!(p.vm.state, VmState::Running),
        other => panic!("{other:?}"),
    }
    a.start().await;
    let ca = s.client(&a).await;
    assert!(
        listed(&ca, |vms| !vms.iter().any(|v| v.name.as_str() == "gone")).await,
        "gone still at a"
    );
    // a's copy ended with its helper (b's restored guest runs in a helper
    // named for its arrival).
    assert!(
        until(Duration::from_secs(10), || helper_pids("gone").is_empty()).await,
        "{:?}",
        helper_pids("gone")
    );
    let past = counter(&cb, "gone").await;
    assert!(sim_counting(&cb, "gone", past).await);
    ca.close().await;
    cb.close().await;
    assert!(b.stop(Signal::TERM, false).await.success());
    assert!(a.stop(Signal::TERM, false).await.success());
}
