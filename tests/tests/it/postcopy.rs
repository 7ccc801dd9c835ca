//! Post-copy and hybrid migrations of a dirtying simulated VM between two
//! agents on loopback: the VM runs at the destination on real demand
//! paging (userfaultfd) before its pages have arrived, every page is then
//! verified against the source's root, and it runs exactly once.

use std::time::Duration;

use convoy_agent::lab::Lab;
use convoy_protocol::ctl::{MigrationReport, Outcome, VmState};
use convoy_protocol::model::{MigrationMode, MigrationPlan};
use convoy_protocol::receipt::ReceiptKind;
use convoy_tests::{
    assert_phases_audited, eventually, lab_with, short_links, sim_spec, uffd_or_skip,
};

/// Agents a and b, and on a a 64 MiB VM writing `rate` pages per second.
async fn two_agents_and_vm(vm: &str, rate: u64) -> (tempfile::TempDir, Lab) {
    two_agents_and_vm_with(vm, rate, |_| {}).await
}

/// [`two_agents_and_vm`] with both agents' configuration adjusted.
async fn two_agents_and_vm_with(
    vm: &str,
    rate: u64,
    tweak: impl Fn(&mut convoy_agent::config::AgentConfig),
) -> (tempfile::TempDir, Lab) {
    let (dir, lab) = lab_with(&["a", "b"], |_, c| tweak(c)).await;
    let a = lab.client("a").await.unwrap();
    a.vm_create(sim_spec(vm, 64 << 20, rate)).await.unwrap();
    a.close().await;
    (dir, lab)
}

/// Migrates `vm` from a to b and checks it moved exactly once, verified.
async fn moves(lab: &Lab, vm: &str, opts: MigrationPlan) -> MigrationReport {
    let a = lab.client("a").await.unwrap();
    let b = lab.client("b").await.unwrap();
    let req = lab.migrate_request(vm, "a", "b", opts).unwrap();
    let r = a.migrate(req, |_| {}).await.unwrap();
    assert_eq!(r.outcome, Outcome::Completed, "{r:?}");
    assert!(
        r.verified,
        "the destination checked every page against our root"
    );
    // Four receipts, as for pre-copy.
    let kinds: Vec<ReceiptKind> = r
        .receipts
        .iter()
        .map(|x| x.verify(&lab.trust).unwrap().receipt.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            ReceiptKind::Accepted,
            ReceiptKind::Ready,
            ReceiptKind::Sent,
            ReceiptKind::Started
        ]
    );
    // Exactly once: gone here, running there, from where it paused.
    assert!(a.vm_list().await.unwrap().is_empty());
    let there = &b.vm_list().await.unwrap()[0];
    assert_eq!(there.state, VmState::Running);
    assert_eq!(there.counter_at_start, r.counter_at_pause);
    let c0 = there.counter;
    assert!(
        eventually(Duration::from_secs(5), || async {
            b.vm_list().await.unwrap()[0].counter > c0
        })
        .await,
        "the workload runs on at the destination"
    );
    a.close().await;
    b.close().await;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_runs_the_vm_at_the_destination_before_its_pages_arrive() {
    if !uffd_or_skip() {
        return;
    }
    let (_dir, lab) = two_agents_and_vm("web", 20_000).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let opts = MigrationPlan {
        mode: MigrationMode::Postcopy,
        ..MigrationPlan::default()
    };
    let r = moves(&lab, "web", opts).await;
    let pc = r.postcopy.clone().expect("post-copy figures");
    assert_eq!(pc.owed, (64 << 20) / 4096, "every page was owed");
    assert_eq!(r.rounds, 1, "no pre-copy round");
    // The workload touches page 0 and its hot set at once: real faults,
    // served from the source and timed at the destination.
    let f = pc.faults.expect("the destination's fault figures");
    assert!(f.faults > 0 && pc.fetches > 0 && pc.served > 0, "{pc:?}");
    assert!(f.p99_us >= f.median_us && f.median_us > 0, "{f:?}");
    // The push leaves out what the faults carried (each fault brings up
    // to 15 pages after it): a page goes twice only when its fault came
    // after the push had read it. Without that, nearly every served page
    // went twice.
    assert!(
        r.convergence.resent_pages * 2 < pc.served,
        "re-sent {} of {} served on the fault stream",
        r.convergence.resent_pages,
        pc.served
    );
    // The downtime ends when the VM runs there, not when the last page
    // arrives.
    assert!(r.downtime_ms < r.total_ms, "{r:?}");
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_switches_to_postcopy_when_precopy_cannot_meet_the_target() {
    if !uffd_or_skip() {
        return;
    }
    let (_dir, lab) = two_agents_and_vm("db", 100_000).await;
    // 1 ms of downtime cannot be met by pre-copy at this dirty rate.
    let opts = MigrationPlan {
        mode: MigrationMode::Hybrid,
        max_downtime_ms: 1,
        ..MigrationPlan::default()
    };
    let r = moves(&lab, "db", opts).await;
    let pc = r.postcopy.expect("hybrid switched to post-copy");
    assert_eq!(r.rounds, 2, "one full pre-copy pass, then post-copy");
    assert!(pc.owed > 0 && pc.owed < (64 << 20) / 4096, "{pc:?}");
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_lost_after_the_switch_keeps_the_vm_at_the_destination_in_doubt() {
    if !uffd_or_skip() {
        return;
    }
    // The restarted source forgot the migration and never comes back: the
    // destination waits its recovery window (3 s here), then is in doubt.
    let (_dir, mut lab) = two_agents_and_vm_with("web", 20_000, |c| {
        c.recovery_window = Duration::from_secs(3);
    })
    .await;
    let a = lab.client("a").await.unwrap();
    let b = lab.client("b").await.unwrap();
    // Capped, so that the push is still going when the source dies.
    let opts = MigrationPlan {
        mode: MigrationMode::Postcopy,
        bandwidth: Some(8 << 20),
        ..MigrationPlan::default()
    };
    let req = lab.migrate_request("web", "a", "b", opts).unwrap();
    let mover = tokio::spawn(async move { a.migrate(req, |_| {}).await });
    assert!(
        reaches(&b, VmState::PostcopyIn, 20).await,
        "the VM runs at the destination on demand paging"
    );
    // The source host's process dies in the middle of the push.
    lab.restart("a").await.unwrap();
    let _ = mover.await;
    // The destination keeps the only running copy, in doubt: it is never
    // discarded by itself (its vCPU waits for pages that do not come).
    // (Waited for longer than the 30 s idle timeout, so that the cause
    // checked below, not this wait, is what fails if the restarted source
    // went unnoticed.)
    assert!(
        reaches(&b, VmState::InDoubt, 45).await,
        "{:?}",
        b.vm_list().await.unwrap()
    );
    convoy_tests::assert_refusals_logged(&lab, "b", &["in doubt"]).await;
    // Noticed at once, not by the idle timeout: the dying agent closed
    // the connection, or (its close lost) the restarted one, holding the
    // same stateless-reset key, reset it at b's next packet.
    let doubt = convoy_tests::refusals_logged(&lab, "b");
    assert!(
        doubt
            .iter()
            .filter(|r| r.contains("in doubt"))
            .all(|r| !r.contains("timed out")),
        "{doubt:#?}"
    );
    b.close().await;
    lab.shutdown().await;
}

/// Whether the first VM of `agent` reaches `state` within `secs` seconds.
async fn reaches(agent: &convoy_agent::client::CtlClient, state: VmState, secs: u64) -> bool {
    eventually(Duration::from_secs(secs), || async {
        agent
            .vm_list()
            .await
            .unwrap()
            .first()
            .is_some_and(|v| v.state == state)
    })
    .await
}

/// Starts a capped post-copy migration of `vm` from a to b through `link`;
/// returns once the VM runs at b on demand paging.
async fn postcopy_through(
    lab: &Lab,
    vm: &str,
    link: &convoy_tests::CuttableLink,
) -> tokio::task::JoinHandle<MigrationReport> {
    let a = lab.client("a").await.unwrap();
    let b = lab.client("b").await.unwrap();
    // Capped, so that the push is still going when the link breaks.
    let opts = MigrationPlan {
        mode: MigrationMode::Postcopy,
        bandwidth: Some(8 << 20),
        ..MigrationPlan::default()
    };
    let mut req = lab.migrate_request(vm, "a", "b", opts).unwrap();
    req.to_addr = Some(link.addr().to_string());
    let mover = tokio::spawn(async move {
        let r = a.migrate(req, |_| {}).await.unwrap();
        a.close().await;
        r
    });
    assert!(
        reaches(&b, VmState::PostcopyIn, 20).await,
        "the VM runs at the destination on demand paging"
    );
    b.close().await;
    mover
}

/// A capped post-copy migration of a busy VM from a to b through a link
/// that breaks in the middle of the push, and stays broken (for longer
/// than the agents' 2 s idle timeout: both connections die); the agents
/// wait `window` for it.
async fn cut_mid_postcopy(
    window: Duration,
) -> (
    tempfile::TempDir,
    Lab,
    convoy_tests::CuttableLink,
    tokio::task::JoinHandle<MigrationReport>,
) {
    let (dir, lab) = two_agents_and_vm_with("web", 20_000, short_links(window)).await;
    let link = convoy_tests::CuttableLink::start(lab.agent("b").unwrap().addr)
        .await
        .unwrap();
    let mover = postcopy_through(&lab, "web", &link).await;
    link.set_up(false);
    (dir, lab, link, mover)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postcopy_link_that_breaks_resumes_on_a_new_connection_and_verifies() {
    if !uffd_or_skip() {
        return;
    }
    let (_dir, lab, link, mover) = cut_mid_postcopy(Duration::from_secs(30)).await;
    let b = lab.client("b").await.unwrap();
    assert!(
        reaches(&b, VmState::Recovering, 10).await,
        "the destination keeps the VM and waits for its source: {:?}",
        b.vm_list().await.unwrap()
    );
    let c0 = b.vm_list().await.unwrap()[0].counter;
    tokio::time::sleep(Duration::from_secs(1)).await;
    link.set_up(true);
    let r = mover.await.unwrap();
    assert_eq!(r.outcome, Outcome::Completed, "{r:?}");
    assert!(r.verified, "every page checked against the source's root");
    let pc = r.postcopy.clone().expect("post-copy figures");
    assert_eq!(pc.recoveries, 1, "{pc:?}");
    // Exactly once: gone at a, running at b from where it paused, and on.
    let a = lab.client("a").await.unwrap();
    assert!(a.vm_list().await.unwrap().is_empty());
    let there = b.vm_list().await.unwrap()[0].clone();
    assert_eq!(there.state, VmState::Running);
    assert_eq!(there.counter_at_start, r.counter_at_pause);
    assert!(there.counter >= c0);
    assert!(
        eventually(Duration::from_secs(5), || async {
            b.vm_list().await.unwrap()[0].counter > there.counter
        })
        .await,
        "the workload runs on at the destination"
    );
    // Both sides audited the break and the resume.
    assert_phases_audited(
        &lab,
        &[
            (
                "a",
                &[
                    "dialling the destination again",
                    "asking the destination to resume",
                ],
            ),
            (
                "b",
                &[
                    "waits for the source to reconnect",
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
async fn a_postcopy_link_down_past_the_recovery_window_is_in_doubt_and_runs_nowhere_twice() {
    if !uffd_or_skip() {
        return;
    }
    let (_dir, lab, _link, mover) = cut_mid_postcopy(Duration::from_secs(3)).await;
    let r = mover.await.unwrap();
    assert!(
        matches!(&r.outcome, Outcome::InDoubt(w) if w.contains("could not be reached again")),
        "{r:?}"
    );
    assert_eq!(r.postcopy.clone().unwrap().recoveries, 0);
    // The source keeps its paused copy, never resumed by itself; the
    // destination keeps the VM it runs, in doubt.
    let a = lab.client("a").await.unwrap();
    let b = lab.client("b").await.unwrap();
    assert_eq!(a.vm_list().await.unwrap()[0].state, VmState::InDoubt);
    assert!(
        eventually(Duration::from_secs(10), || async {
            b.vm_list().await.unwrap()[0].state == VmState::InDoubt
        })
        .await,
        "{:?}",
        b.vm_list().await.unwrap()
    );
    a.close().await;
    b.close().await;
    lab.shutdown().await;
}
