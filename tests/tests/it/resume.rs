//! Pre-copy migrations whose link breaks in the middle of a round, through
//! a relay the test cuts (UDP and TCP alike, so each CI pass exercises its
//! transport): within the recovery window the migration resumes on a new
//! connection and sends again only what the destination lacks; past it,
//! the migration fails, the VM runs on at the source and the destination
//! discards its copy.

use std::time::Duration;

use convoy_agent::lab::Lab;
use convoy_protocol::ctl::{ContentProfile, MigrationReport, Outcome, VmState};
use convoy_protocol::model::MigrationPlan;
use convoy_tests::{
    assert_phases_audited, eventually, lab_with, short_links, sim_spec, CuttableLink,
};

/// Pages of the test VM (32 MiB of random memory).
const PAGES: u64 = 8192;

/// Agents a and b waiting `window` for a broken link, a busy 32 MiB VM of
/// incompressible memory on a, and a migration to b through a cuttable
/// link capped at 8 MiB/s (a first round of about 4 s) over `connections`
/// connections, cut 1.5 s into that round.
async fn cut_mid_round(
    window: Duration,
    connections: u16,
) -> (
    tempfile::TempDir,
    Lab,
    CuttableLink,
    tokio::task::JoinHandle<MigrationReport>,
) {
    let (dir, lab) = lab_with(&["a", "b"], |_, c| short_links(window)(c)).await;
    let a = lab.client("a").await.unwrap();
    let mut spec = sim_spec("web", PAGES * 4096, 500);
    spec.content = ContentProfile::Random;
    a.vm_create(spec).await.unwrap();
    let link = CuttableLink::start(lab.agent("b").unwrap().addr)
        .await
        .unwrap();
    let plan = MigrationPlan {
        bandwidth: Some(8 << 20),
        connections,
        ..MigrationPlan::default()
    };
    let mut req = lab.migrate_request("web", "a", "b", plan).unwrap();
    req.to_addr = Some(link.addr().to_string());
    let mover = tokio::spawn(async move {
        let r = a.migrate(req, |_| {}).await.unwrap();
        a.close().await;
        r
    });
    // Staged at b: the first round is under way.
    let b = lab.client("b").await.unwrap();
    assert!(
        eventually(Duration::from_secs(20), || async {
            !b.vm_list().await.unwrap().is_empty()
        })
        .await,
        "the migration never reached b"
    );
    b.close().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    link.set_up(false);
    (dir, lab, link, mover)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_precopy_link_cut_mid_round_resumes_and_sends_only_what_did_not_arrive() {
    let (_dir, lab, link, mover) = cut_mid_round(Duration::from_secs(30), 1).await;
    // Longer than the 2 s link timeout: both connections die.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let a = lab.client("a").await.unwrap();
    assert_eq!(
        a.vm_list().await.unwrap()[0].state,
        VmState::MigratingOut,
        "the VM runs at the source meanwhile"
    );
    link.set_up(true);
    let r = tokio::time::timeout(Duration::from_secs(120), mover)
        .await
        .expect("the migration ends")
        .unwrap();
    assert_eq!(r.outcome, Outcome::Completed, "{r:?}");
    assert!(r.verified, "every page checked against the source's root");
    let c = r.convergence;
    eprintln!("recovered: {c:?}, {} pages sent in all", r.pages_sent);
    assert_eq!(c.recoveries, 1, "{c:?}");
    // 1.5 s of a 4 s round had gone: what arrived was not sent again.
    assert!(
        c.recovery_resent > 0 && c.recovery_resent < PAGES - PAGES / 8,
        "{c:?}"
    );
    // Exactly once: gone at a, running at b from where it paused, and on.
    assert!(a.vm_list().await.unwrap().is_empty());
    let b = lab.client("b").await.unwrap();
    let there = b.vm_list().await.unwrap()[0].clone();
    assert_eq!(there.state, VmState::Running);
    assert_eq!(there.counter_at_start, r.counter_at_pause);
    // Both sides audited the break and the resume.
    assert_phases_audited(
        &lab,
        &[
            (
                "a",
                &[
                    "in a pre-copy round, the VM running here",
                    "asking the destination to resume",
                ],
            ),
            (
                "b",
                &[
                    "link lost in a pre-copy round",
                    "resumed on a new connection",
                ],
            ),
        ],
    );
    a.close().await;
    b.close().await;
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_precopy_link_down_past_the_window_fails_and_the_vm_runs_on_at_the_source() {
    let (_dir, lab, link, mover) = cut_mid_round(Duration::from_secs(3), 1).await;
    let r = tokio::time::timeout(Duration::from_secs(60), mover)
        .await
        .expect("the migration ends")
        .unwrap();
    assert!(
        matches!(&r.outcome, Outcome::Aborted(w) if w.contains("during pre-copy") && w.contains("within 3 s")),
        "{r:?}"
    );
    let a = lab.client("a").await.unwrap();
    let here = a.vm_list().await.unwrap()[0].clone();
    assert_eq!(here.state, VmState::Running, "{here:?}");
    let c0 = here.counter;
    assert!(
        eventually(Duration::from_secs(5), || async {
            a.vm_list().await.unwrap()[0].counter > c0
        })
        .await,
        "the workload runs on at the source"
    );
    // The destination gives its copy up once its own window passed.
    let b = lab.client("b").await.unwrap();
    assert!(
        eventually(Duration::from_secs(20), || async {
            b.vm_list().await.unwrap().is_empty()
        })
        .await,
        "{:?}",
        b.vm_list().await.unwrap()
    );
    link.set_up(true);
    a.close().await;
    b.close().await;
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_with_lanes_resumes_on_one_connection_and_completes() {
    let (_dir, lab, link, mover) = cut_mid_round(Duration::from_secs(30), 2).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    link.set_up(true);
    let r = tokio::time::timeout(Duration::from_secs(120), mover)
        .await
        .expect("the migration ends")
        .unwrap();
    assert_eq!(r.outcome, Outcome::Completed, "{r:?}");
    assert!(r.verified, "every page checked against the source's root");
    assert_eq!(r.convergence.recoveries, 1, "{:?}", r.convergence);
    assert_eq!(r.lanes, 0, "the resumed link is one connection");
    let a = lab.client("a").await.unwrap();
    assert!(a.vm_list().await.unwrap().is_empty());
    let b = lab.client("b").await.unwrap();
    assert_eq!(b.vm_list().await.unwrap()[0].state, VmState::Running);
    assert_phases_audited(
        &lab,
        &[
            (
                "a",
                &["data streams over 2 ", "asking the destination to resume"],
            ),
            (
                "b",
                &[
                    "lane 1 joined",
                    "link lost in a pre-copy round",
                    "resumed on a new connection",
                ],
            ),
        ],
    );
    a.close().await;
    b.close().await;
    lab.shutdown().await;
}
