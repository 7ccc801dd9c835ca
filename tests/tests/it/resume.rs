//! Pre-copy migrations whose link breaks in the middle of a round, through
//! a relay the test cuts (UDP and TCP alike, so each CI pass exercises its
//! transport): within the recovery window the migration resumes on a new
//! connection and sends again only what the destination lacks; past it,
//! the migration fails, the VM runs on at the source and the destination
//! discards its copy.

use std::time::Duration;

use convoy_agent::client::CtlClient;
use convoy_agent::lab::Lab;
use convoy_protocol::ctl::{ContentProfile, MigrationReport, Outcome, VmState};
use convoy_protocol::model::MigrationPlan;
use convoy_tests::{
    assert_phases_audited, audited_phases, eventually, lab_with, short_links, sim_spec,
    CuttableLink,
};

/// Pages of the test VM (32 MiB of random memory).
const PAGES: u64 = 8192;

/// What the source has reported of a migration so far.
#[derive(Debug, Clone, Default)]
struct Seen {
    /// Times the destination took a resume (its progress entered
    /// "pre-copy (resumed)"; every sample after carries that phase until
    /// the next change, so a dropped frame does not hide one).
    resumes: u32,
    /// The phase last reported.
    phase: String,
    /// Pages sent, all rounds.
    pages_sent: u64,
}

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
    let (dir, lab, link, mover, _) = cut_mid_round_seen(window, connections, None).await;
    (dir, lab, link, mover)
}

/// [`cut_mid_round`], with the plan's deadline, and what the source
/// reports as it goes.
async fn cut_mid_round_seen(
    window: Duration,
    connections: u16,
    deadline_ms: Option<u32>,
) -> (
    tempfile::TempDir,
    Lab,
    CuttableLink,
    tokio::task::JoinHandle<MigrationReport>,
    tokio::sync::watch::Receiver<Seen>,
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
        deadline_ms,
        ..MigrationPlan::default()
    };
    let mut req = lab.migrate_request("web", "a", "b", plan).unwrap();
    req.to_addr = Some(link.addr().to_string());
    let (seen_tx, seen) = tokio::sync::watch::channel(Seen::default());
    let mover = tokio::spawn(async move {
        let r = a
            .migrate(req, |p| {
                seen_tx.send_modify(|s| {
                    const RESUMED: &str = "pre-copy (resumed)";
                    if p.phase == RESUMED && s.phase != RESUMED {
                        s.resumes += 1;
                    }
                    p.phase.clone_into(&mut s.phase);
                    s.pages_sent = s.pages_sent.max(p.pages_sent);
                });
            })
            .await
            .unwrap();
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
    (dir, lab, link, mover, seen)
}

/// The migration's report, once it ends (within `secs`).
async fn ended(mover: tokio::task::JoinHandle<MigrationReport>, secs: u64) -> MigrationReport {
    tokio::time::timeout(Duration::from_secs(secs), mover)
        .await
        .expect("the migration ends")
        .unwrap()
}

/// Waits for the migration to end and checks it completed, verified, and
/// that the VM runs exactly once: gone at a, running at b from where it
/// paused. Returns the report and clients of a and b.
async fn completed_once(
    lab: &Lab,
    mover: tokio::task::JoinHandle<MigrationReport>,
) -> (MigrationReport, CtlClient, CtlClient) {
    let r = ended(mover, 120).await;
    assert_eq!(r.outcome, Outcome::Completed, "{r:?}");
    assert!(r.verified, "every page checked against the source's root");
    let a = lab.client("a").await.unwrap();
    assert!(a.vm_list().await.unwrap().is_empty());
    let b = lab.client("b").await.unwrap();
    let there = b.vm_list().await.unwrap()[0].clone();
    assert_eq!(there.state, VmState::Running);
    assert_eq!(there.counter_at_start, r.counter_at_pause);
    (r, a, b)
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
    a.close().await;
    link.set_up(true);
    let (r, a, b) = completed_once(&lab, mover).await;
    let c = r.convergence;
    eprintln!("recovered: {c:?}, {} pages sent in all", r.pages_sent);
    assert_eq!(c.recoveries, 1, "{c:?}");
    // 1.5 s of a 4 s round had gone: what arrived was not sent again.
    assert!(
        c.recovery_resent > 0 && c.recovery_resent < PAGES - PAGES / 8,
        "{c:?}"
    );
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
    let r = ended(mover, 60).await;
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

/// A link with a lane, cut mid-round: the resumed link dials its lane
/// again once the destination has answered the `Resume`, and the rest of
/// the round goes over both connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_with_lanes_resumes_with_its_lanes_and_completes() {
    let (_dir, lab, link, mover) = cut_mid_round(Duration::from_secs(30), 2).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    link.set_up(true);
    let (r, a, b) = completed_once(&lab, mover).await;
    assert_eq!(r.convergence.recoveries, 1, "{:?}", r.convergence);
    assert_eq!(r.lanes, 1, "the resumed link has its lane again");
    // In order: the lane joins the first link, the link breaks and
    // resumes, and the lane joins the new link and carries some of it.
    let at = |agent: &str, needles: &[&str]| {
        let phases = audited_phases(&lab, agent);
        let mut from = 0;
        for n in needles {
            match phases[from..].iter().position(|p| p.contains(n)) {
                Some(i) => from += i + 1,
                None => panic!("{agent}: {n:?} after phase {from}: {phases:#?}"),
            }
        }
        phases
    };
    at(
        "b",
        &[
            "lane 1 joined",
            "link lost in a pre-copy round",
            "resumed on a new connection",
            "lane 1 joined",
        ],
    );
    let phases = at(
        "a",
        &[
            "data streams over 2 ",
            "asking the destination to resume",
            "data streams over 2 ",
            "lanes carried ",
        ],
    );
    let carried = phases
        .iter()
        .find_map(|p| p.strip_prefix("lanes carried "))
        .and_then(|p| p.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok());
    assert!(carried.is_some_and(|n| n > 0), "{phases:#?}");
    a.close().await;
    b.close().await;
    lab.shutdown().await;
}

/// A link that breaks again and again in the first round: each time the
/// migration resumes on a new connection, and it completes, verified,
/// with the VM running once, at the destination. Each resume is awaited
/// (pages flowing again) before the next cut, so every cut lands on a
/// live link, mid-round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_flaps_mid_round_resumes_each_time_and_completes() {
    const CUTS: u32 = 3;
    let (_dir, lab, link, mover, mut seen) =
        cut_mid_round_seen(Duration::from_secs(30), 1, None).await;
    for cut in 1..=CUTS {
        // Down past the 2 s link timeout: both ends see the link go.
        tokio::time::sleep(Duration::from_secs(3)).await;
        link.set_up(true);
        if cut == CUTS {
            break;
        }
        // Resumed: the source dialled again and sends pages again (a
        // megabyte past what it had sent when it noticed the cut)...
        let before = seen.borrow().pages_sent;
        let resumed = tokio::time::timeout(
            Duration::from_secs(30),
            seen.wait_for(|s| s.resumes == cut && s.pages_sent > before + 256),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        assert!(resumed, "cut {cut}: no resume: {:?}", *seen.borrow());
        // ... then cut again, the round not over (about a second of it
        // left after each resume at 8 MiB/s).
        tokio::time::sleep(Duration::from_millis(300)).await;
        link.set_up(false);
    }
    let (r, a, b) = completed_once(&lab, mover).await;
    let c = r.convergence;
    eprintln!("flapped: {c:?}, {} pages sent in all", r.pages_sent);
    assert_eq!(c.recoveries, CUTS, "{c:?}");
    // What arrived before each cut was not sent again: a resume that
    // sent the whole round again would send all its pages (and those the
    // guest dirtied meanwhile) each time, CUTS rounds' worth at least.
    assert!(
        c.recovery_resent > 0 && c.recovery_resent < u64::from(CUTS) * PAGES,
        "{c:?}"
    );
    a.close().await;
    b.close().await;
    lab.shutdown().await;
}

/// A link that flaps for as long as the migration has, up too briefly
/// each time for the first round to end: the plan's deadline ends the
/// migration honestly — aborted, naming the deadline, the VM running on
/// at the source, nothing left at the destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_flaps_past_the_deadline_ends_the_migration_with_the_vm_at_the_source() {
    let (_dir, lab, link, mover, _seen) =
        cut_mid_round_seen(Duration::from_secs(10), 1, Some(10_000)).await;
    let link = std::sync::Arc::new(link);
    // 2.5 s down, 0.5 s up, until the migration ends: at 8 MiB/s the
    // 20 MiB left of the first round need 2.5 s of link up, and the 10 s
    // deadline leaves at most 1.5 s of it (less each reconnect's share).
    let flapping = {
        let link = link.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(2500)).await;
                link.set_up(true);
                tokio::time::sleep(Duration::from_millis(500)).await;
                link.set_up(false);
            }
        })
    };
    let r = ended(mover, 60).await;
    flapping.abort();
    link.set_up(true);
    match &r.outcome {
        Outcome::Aborted(why) => assert!(why.contains("deadline of 10.0 s"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(r.total_ms < 20_000.0, "ended at the deadline: {r:?}");
    let a = lab.client("a").await.unwrap();
    let here = a.vm_list().await.unwrap()[0].clone();
    assert_eq!(here.state, VmState::Running, "{here:?}");
    // The destination gives its copy up (at once when told, else when
    // its own 10 s window passes).
    let b = lab.client("b").await.unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async {
            b.vm_list().await.unwrap().is_empty()
        })
        .await,
        "{:?}",
        b.vm_list().await.unwrap()
    );
    a.close().await;
    b.close().await;
    lab.shutdown().await;
}
