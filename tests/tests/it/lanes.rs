//! A page migration spread over several connections (`--connections`):
//! the lanes carry their share of the data streams, post-copy's faults
//! are served on the first connection meanwhile (with post-copy the data
//! streams go on a lane more, leaving the first to the faults, by default
//! too), a lane the destination will not
//! take is left out without failing the migration, and lanes that are not
//! the migration's own (another agent's, a number used already, one past
//! the plan) are refused and audited while the migration goes on. Each CI
//! pass runs them over its transport (QUIC, then TCP).

use std::time::Duration;

use convoy_agent::lab::Lab;
use convoy_protocol::ctl::{ContentProfile, MigrationReport, Outcome, VmState};
use convoy_protocol::message::{Lane, Message, Reason};
use convoy_protocol::model::{MigrationMode, MigrationPlan};
use convoy_tests::{
    assert_phases_audited, assert_refusals_logged, audited_phases, connect_as, eventually,
    lab_with, sim_spec,
};

/// Pages of the test VMs (32 MiB of random memory).
const PAGES: u64 = 8192;

/// A busy VM of incompressible memory on a.
async fn random_vm(lab: &Lab) {
    let a = lab.client("a").await.unwrap();
    let mut spec = sim_spec("web", PAGES * 4096, 500);
    spec.content = ContentProfile::Random;
    a.vm_create(spec).await.unwrap();
    a.close().await;
}

/// Migrates `web` from a to b under `plan` and returns the report.
async fn migrate(lab: &Lab, plan: MigrationPlan) -> MigrationReport {
    let a = lab.client("a").await.unwrap();
    let req = lab.migrate_request("web", "a", "b", plan).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(120), a.migrate(req, |_| {}))
        .await
        .expect("the migration ends")
        .unwrap();
    a.close().await;
    r
}

/// The share of the last link's wire bytes the lanes carried, from a's
/// audited phase.
fn lane_share(lab: &Lab) -> f64 {
    let (lanes, all) = lane_bytes(lab);
    lanes as f64 / all as f64
}

/// The last link's wire bytes on the lanes and on all its connections,
/// from a's audited phase.
fn lane_bytes(lab: &Lab) -> (u64, u64) {
    let phases = audited_phases(lab, "a");
    let p = phases
        .iter()
        .find(|p| p.starts_with("lanes carried"))
        .unwrap_or_else(|| panic!("no lane figures: {phases:#?}"));
    let n: Vec<u64> = p
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(n.len(), 2, "{p}");
    (n[0], n[1])
}

/// The VM is at b only, running from where it paused at a.
async fn arrived_once(lab: &Lab, r: &MigrationReport) {
    assert_eq!(r.outcome, Outcome::Completed, "{r:?}");
    assert!(r.verified, "every page checked against the source's root");
    let a = lab.client("a").await.unwrap();
    let b = lab.client("b").await.unwrap();
    assert!(a.vm_list().await.unwrap().is_empty());
    let there = b.vm_list().await.unwrap()[0].clone();
    assert_eq!(there.state, VmState::Running);
    assert_eq!(there.counter_at_start, r.counter_at_pause);
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_over_three_connections_verifies_and_the_lanes_carry_their_share() {
    let (_dir, lab) = lab_with(&["a", "b"], |_, _| {}).await;
    random_vm(&lab).await;
    let plan = MigrationPlan {
        streams: 3,
        connections: 3,
        ..MigrationPlan::default()
    };
    let r = migrate(&lab, plan).await;
    arrived_once(&lab, &r).await;
    assert_eq!(r.lanes, 2, "the report names the lanes");
    assert_phases_audited(
        &lab,
        &[
            ("a", &["data streams over 3 "]),
            ("b", &["lane 1 joined", "lane 2 joined"]),
        ],
    );
    // Two streams of three went over the lanes: about two thirds of the
    // bytes (the first connection carries the control stream too).
    let share = lane_share(&lab);
    assert!((0.45..0.8).contains(&share), "lanes carried {share}");
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_over_two_connections_serves_faults_and_completes() {
    // The fault stream (on the first connection) serves what the VM waits
    // for while the lanes push the rest: with post-copy, one lane more
    // than the plan's connections, so the data streams leave the first
    // connection to the faults.
    postcopy_over(2, &["lane 1 joined", "lane 2 joined"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_by_default_gives_its_faults_the_first_connection_alone() {
    // The default plan: one connection asked for, one lane dialled.
    assert_eq!(MigrationPlan::default().connections, 1);
    postcopy_over(1, &["lane 1 joined"]).await;
}

/// A capped post-copy migration of a busy VM over a plan of `connections`:
/// it completes, its faults were served, `joined` are b's phases, and
/// the first connection carried only control and faults.
async fn postcopy_over(connections: u16, joined: &[&str]) {
    if !convoy_tests::uffd_or_skip() {
        return;
    }
    let (_dir, lab) = lab_with(&["a", "b"], |_, _| {}).await;
    random_vm(&lab).await;
    let plan = MigrationPlan {
        mode: MigrationMode::Postcopy,
        streams: 2,
        connections,
        bandwidth: Some(16 << 20),
        ..MigrationPlan::default()
    };
    let r = migrate(&lab, plan).await;
    arrived_once(&lab, &r).await;
    let pc = r.postcopy.clone().expect("post-copy figures");
    let f = pc.faults.expect("the destination's fault figures");
    assert!(f.faults > 0 && pc.served > 0, "{pc:?}");
    assert_eq!(r.lanes, connections, "the report names the lanes");
    assert_phases_audited(
        &lab,
        &[
            ("b", joined),
            ("a", &["post-copy's faults alone on the first connection"]),
        ],
    );
    faults_alone_on_the_first_connection(&lab, pc.served);
    lab.shutdown().await;
}

/// The first connection carried the control stream and the `served`
/// fault pages, and no data stream: its bytes stay under those pages
/// (incompressible, 4 KiB each, with room for framing) and 1 MiB of
/// control, a small part of a migration of 32 MiB.
fn faults_alone_on_the_first_connection(lab: &Lab, served: u64) {
    let (lanes, all) = lane_bytes(lab);
    let first = all - lanes;
    let bound = served * 4096 * 11 / 10 + (1 << 20);
    assert!(
        first <= bound,
        "the first connection carried {first} of {all} bytes; faults and control: at most {bound}"
    );
    assert!(lanes >= PAGES * 4096 / 2, "lanes carried {lanes} of {all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_the_destination_will_not_take_is_left_out_and_the_migration_completes() {
    // b admits one connection per peer: a's lanes are refused at once.
    let (_dir, lab) = lab_with(&["a", "b"], |name, c| {
        if name == "b" {
            c.limits.per_peer = 1;
        }
    })
    .await;
    random_vm(&lab).await;
    let plan = MigrationPlan {
        streams: 2,
        connections: 2,
        ..MigrationPlan::default()
    };
    let r = migrate(&lab, plan).await;
    arrived_once(&lab, &r).await;
    assert_eq!(r.lanes, 0, "one connection carried it");
    assert_phases_audited(
        &lab,
        &[(
            "a",
            &[
                "lane 1 left out",
                "its streams go on the link's other connections",
            ],
        )],
    );
    assert!(
        !audited_phases(&lab, "a")
            .iter()
            .any(|p| p.starts_with("lanes carried")),
        "no lane carried anything"
    );
    lab.shutdown().await;
}

/// Agent `from` offers b a lane; b's answer, if any.
async fn lane_as(lab: &Lab, from: &str, lane: Lane) -> Option<Message> {
    let (_ep, conn) = connect_as(lab, from, "b").await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    convoy_agent::transport::write_message(&mut send, &Message::Lane(lane))
        .await
        .unwrap();
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        convoy_agent::transport::read_message(&mut recv),
    )
    .await;
    match answer {
        Ok(Ok(Some(m))) => Some(m),
        _ => None,
    }
}

fn refused(answer: &Option<Message>, why: &str) -> bool {
    matches!(answer, Some(Message::Abort(a)) if matches!(&a.reason, Reason::Unacceptable(s) if s.contains(why)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_that_are_not_the_migrations_own_are_refused_and_audited() {
    let (_dir, lab) = lab_with(&["a", "b", "c"], |_, _| {}).await;
    random_vm(&lab).await;
    // Slow enough (about 8 s) to knock on b meanwhile.
    let plan = MigrationPlan {
        streams: 2,
        connections: 2,
        bandwidth: Some(4 << 20),
        ..MigrationPlan::default()
    };
    let req = lab.migrate_request("web", "a", "b", plan).unwrap();
    let migration = postcard::from_bytes::<convoy_protocol::ticket::Ticket>(&req.ticket.body)
        .unwrap()
        .id;
    let a = lab.client("a").await.unwrap();
    let mover = tokio::spawn(async move {
        let r = a.migrate(req, |_| {}).await.unwrap();
        a.close().await;
        r
    });
    // Staged at b, so the migration takes lanes; a's own joins within
    // milliseconds of b's Accept on loopback: given 2 s.
    let b = lab.client("b").await.unwrap();
    assert!(
        eventually(Duration::from_secs(20), || async {
            !b.vm_list().await.unwrap().is_empty()
        })
        .await,
        "the migration never reached b"
    );
    b.close().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Another agent, for that migration.
    let answer = lane_as(&lab, "c", Lane { migration, lane: 1 }).await;
    assert!(refused(&answer, "takes lanes here"), "{answer:?}");
    // The source itself, with a number it used already, or past the plan.
    let answer = lane_as(&lab, "a", Lane { migration, lane: 1 }).await;
    assert!(refused(&answer, "joined already"), "{answer:?}");
    let answer = lane_as(&lab, "a", Lane { migration, lane: 2 }).await;
    assert!(
        refused(&answer, "lane 2 past the plan's lanes (1..=1)"),
        "{answer:?}"
    );
    assert_refusals_logged(
        &lab,
        "b",
        &[
            "takes lanes here",
            "joined already",
            "past the plan's lanes",
        ],
    )
    .await;
    // The migration went on regardless.
    let r = tokio::time::timeout(Duration::from_secs(120), mover)
        .await
        .expect("the migration ends")
        .unwrap();
    arrived_once(&lab, &r).await;
    lab.shutdown().await;
}
