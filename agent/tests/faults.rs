//! The exactly-once fault matrix: two real `convoy-agent` processes
//! migrate a sim VM; each agent is told to hold the migration at a named
//! point (`--dangerous-pause-at`, so the fault lands exactly there, not
//! after a sleep); then the source is killed (SIGKILL), or the
//! destination, or the link between them is cut for longer than the link
//! timeout; the killed agent is started again on its state directory, the
//! held one released, the link restored, and `recover` asked of both
//! (the request `convoyctl recover --all` sends). Then, for every case:
//!
//! - exactly one copy runs, on the side the rules say, its counter
//!   advancing and never behind where it was before the migration — or,
//!   where the rules say so, the VM is paused on both and reported;
//! - nothing is left where it does not run, and nothing unfinished in
//!   either journal (unless undecided by the rules);
//! - both audit logs verify, and tell the same story (each records the
//!   migration, and the outcome the other side's implies).
//!
//! The table of cases and outcomes is in SECURITY.md ("Exactly once").

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

mod faults_qemu;
mod support;

use std::time::{Duration, Instant};

use convoy_agent::lab::link::CuttableLink;
use convoy_protocol::audit::{verify_log, AuditEvent};
use convoy_protocol::ctl::{ContentProfile, RecoveryDecision, SimVmSpec, VmInfo, VmState};
use convoy_protocol::model::{MigrationMode, MigrationPlan};
use convoy_protocol::names::VmName;
use rustix::process::Signal;
use support::{AgentProcess, Setup};

/// The link timeout both agents run with (seconds).
const LINK_TIMEOUT: u64 = 2;

/// What goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillSource,
    KillDestination,
    CutLink,
    /// Cut the link, let the destination start waiting for its source
    /// (post-copy recovery), then kill the source.
    RecoveringKillSource,
    /// The same, killing the destination.
    RecoveringKillDestination,
}

/// Where the VM must be once everything is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Runs at the source; nothing at the destination.
    Source,
    /// Runs at the destination; nothing at the source.
    Destination,
    /// Paused on both sides, reported undecided (post-copy: the
    /// destination's copy lacks pages only the source's holds).
    PausedOnBoth,
}

/// One case of the matrix.
#[derive(Debug)]
struct Case {
    /// The point to hold at (`--dangerous-pause-at`).
    point: &'static str,
    /// Whether the point is the destination's.
    at_destination: bool,
    postcopy: bool,
    fault: Fault,
    expect: Expect,
}

/// Two sim cases at a time (they mostly wait for timeouts), a QEMU case
/// alone (a TCG guest takes a core): each takes `weight` of 2 permits.
async fn heavy(weight: u32) -> tokio::sync::SemaphorePermit<'static> {
    static HEAVY: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);
    HEAVY.acquire_many(weight).await.unwrap()
}

fn vm_name() -> VmName {
    "vm".parse().unwrap()
}

fn find(vms: &[VmInfo]) -> Option<&VmInfo> {
    vms.iter().find(|v| v.name == vm_name())
}

async fn list(s: &Setup, a: &AgentProcess) -> Vec<VmInfo> {
    let c = s.client(a).await;
    let l = c.vm_list().await.unwrap();
    c.close().await;
    l
}

/// Asks `a` to recover every unfinished migration.
async fn recover(s: &Setup, a: &AgentProcess) -> Vec<convoy_protocol::ctl::RecoveryReport> {
    let c = s.client(a).await;
    let r = c.recover(None, false).await.unwrap();
    c.close().await;
    r
}

async fn audit(s: &Setup, a: &AgentProcess) -> Vec<AuditEvent> {
    let c = s.client(a).await;
    let bytes = c.audit_log().await.unwrap();
    c.close().await;
    let log = verify_log(&bytes, &s.lab.trust)
        .unwrap_or_else(|e| panic!("{}'s audit log does not verify: {e}", a.id));
    log.records.into_iter().map(|r| r.event).collect()
}

/// Where the VM is: (at the source, at the destination).
async fn whereabouts(
    s: &Setup,
    a: &AgentProcess,
    b: &AgentProcess,
) -> (Option<VmInfo>, Option<VmInfo>) {
    (
        find(&list(s, a).await).cloned(),
        find(&list(s, b).await).cloned(),
    )
}

async fn run(case: Case) {
    let _heavy = heavy(1).await;
    let s = Setup::new(&["a", "b"]).await;
    let recovering = matches!(
        case.fault,
        Fault::RecoveringKillSource | Fault::RecoveringKillDestination
    );
    // A post-copy destination waits for its killed source to come back
    // (long enough for the restart): the source then takes the migration
    // up again from its paused copy.
    let waiting = recovering || (case.postcopy && case.fault == Fault::KillSource);
    let extra = |point: &str| {
        [
            "--link-timeout",
            &LINK_TIMEOUT.to_string(),
            "--recovery-window",
            if waiting { "30" } else { "4" },
            "--source-silence-timeout",
            "5",
            // Last: dropped when the agent is started again.
            "--dangerous-pause-at",
            point,
        ]
        .map(String::from)
        .to_vec()
    };
    // The destination of a recovery case announces that it waits for its
    // source.
    let b_point = if recovering {
        "destination-recovering"
    } else {
        case.point
    };
    let mut a = s.agent("a", &extra(case.point));
    let mut b = s.agent("b", &extra(b_point));
    a.start().await;
    b.start().await;
    let link = CuttableLink::start(b.addr).await.unwrap();

    // A busy VM: several pre-copy rounds.
    let ca = s.client(&a).await;
    ca.vm_create(SimVmSpec {
        name: vm_name(),
        memory_bytes: 32 << 20,
        dirty_pages_per_sec: 4000,
        hot_set_pct: 10,
        content: ContentProfile::Mixed,
        seed: 7,
        attributes: Default::default(),
        disks: Vec::new(),
        service_requests_per_sec: 0,
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = find(&ca.vm_list().await.unwrap()).unwrap().clone();
    assert!(before.counter > 0, "{before:?}");

    let plan = MigrationPlan {
        mode: if case.postcopy {
            MigrationMode::Postcopy
        } else {
            MigrationMode::Precopy
        },
        // Never converged (the handover's round trips alone take 1 ms on
        // loopback), so round 2 happens, and paused after round 3 by
        // force: every phase is passed, at a known round.
        max_downtime_ms: 1,
        max_rounds: 3,
        force_stop: true,
        ..Default::default()
    };
    let ticket = convoy_agent::trust::authz::issue_ticket(
        &s.lab.operator,
        &vm_name(),
        before.subject.clone().unwrap(),
        a.id.clone(),
        b.id.clone(),
        &plan,
        Duration::from_secs(600),
    )
    .unwrap();
    let req = convoy_protocol::ctl::MigrateRequest {
        vm: vm_name(),
        to: "b".parse().unwrap(),
        to_addr: Some(link.addr().to_string()),
        ticket,
    };
    let held = if case.at_destination { &b } else { &a };
    let mark = held.mark();
    let mover = tokio::spawn(async move { ca.migrate(req, |_| {}).await });
    let reached = held
        .wait_for_from(
            mark,
            &format!("paused at {}", case.point),
            Duration::from_secs(60),
        )
        .await;
    assert!(
        reached,
        "never reached {}:\n--- a ---\n{}\n--- b ---\n{}",
        case.point,
        a.output(),
        b.output()
    );

    match case.fault {
        Fault::KillSource => {
            a.stop(Signal::KILL, true).await;
            if case.at_destination {
                b.release();
            }
            a.args.truncate(a.args.len() - 2);
            a.start().await;
        }
        Fault::KillDestination => {
            b.stop(Signal::KILL, true).await;
            if !case.at_destination {
                a.release();
            }
            b.args.truncate(b.args.len() - 2);
            b.start().await;
        }
        Fault::RecoveringKillSource | Fault::RecoveringKillDestination => {
            link.set_up(false);
            let mark = b.mark();
            a.release();
            assert!(
                b.wait_for_from(
                    mark,
                    "paused at destination-recovering",
                    Duration::from_secs(30)
                )
                .await,
                "b never waited for its source\n{}",
                b.output()
            );
            let victim = if case.fault == Fault::RecoveringKillSource {
                &mut a
            } else {
                &mut b
            };
            victim.stop(Signal::KILL, true).await;
            victim.args.truncate(victim.args.len() - 2);
            victim.start().await;
            link.set_up(true);
        }
        Fault::CutLink => {
            link.set_up(false);
            if case.at_destination {
                b.release();
            } else {
                a.release();
            }
            // Longer than the link timeout, the source's silence and the
            // recovery window together.
            tokio::time::sleep(Duration::from_secs(LINK_TIMEOUT * 2 + 6)).await;
            link.set_up(true);
        }
    }
    // The operator's request ends with the migration (or with the killed
    // source's connection).
    let _ = tokio::time::timeout(Duration::from_secs(60), mover).await;

    // Resolve: the agents by themselves, and `recover` on both, until
    // the VM is where the rules put it (or the time is up).
    let end = Instant::now() + Duration::from_secs(60);
    let mut reports = Vec::new();
    let (mut at_a, mut at_b);
    loop {
        reports.extend(recover(&s, &b).await);
        reports.extend(recover(&s, &a).await);
        (at_a, at_b) = whereabouts(&s, &a, &b).await;
        let running = |v: &Option<VmInfo>| v.as_ref().is_some_and(|v| v.state == VmState::Running);
        let settled = match case.expect {
            Expect::Source => running(&at_a) && at_b.is_none(),
            Expect::Destination => running(&at_b) && at_a.is_none(),
            Expect::PausedOnBoth => at_a.is_some() && at_b.is_some(),
        };
        if settled || Instant::now() > end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let story = format!(
        "{case:?}\nat a: {at_a:?}\nat b: {at_b:?}\nreports: {reports:#?}\n--- a ---\n{}\n--- b ---\n{}",
        a.output(),
        b.output()
    );

    let (here, there, runner) = match case.expect {
        Expect::Source => (&at_a, &at_b, Some(&a)),
        Expect::Destination => (&at_b, &at_a, Some(&b)),
        Expect::PausedOnBoth => (&at_a, &at_b, None),
    };
    match runner {
        Some(runner) => {
            let v = here
                .as_ref()
                .unwrap_or_else(|| panic!("no copy runs\n{story}"));
            assert_eq!(v.state, VmState::Running, "{story}");
            assert!(there.is_none(), "a second copy\n{story}");
            // Running: the counter advances, and is continuous.
            let c1 = v.counter;
            tokio::time::sleep(Duration::from_millis(400)).await;
            let c2 = find(&list(&s, runner).await).unwrap().counter;
            assert!(
                c2 > c1,
                "the counter does not advance ({c1} → {c2})\n{story}"
            );
            assert!(c1 >= before.counter, "the counter went back\n{story}");
            // Nothing left undecided on either side.
            for agent in [&a, &b] {
                let left = recover(&s, agent).await;
                assert!(
                    left.is_empty(),
                    "{} still holds {left:?}\n{story}",
                    agent.id
                );
            }
        }
        None => {
            let va = here
                .as_ref()
                .unwrap_or_else(|| panic!("the source's copy went\n{story}"));
            assert!(there.is_some(), "the destination's copy went\n{story}");
            assert_ne!(va.state, VmState::Running, "{story}");
            assert!(
                reports
                    .iter()
                    .any(|r| r.decision == RecoveryDecision::StaysPaused),
                "not reported\n{story}"
            );
        }
    }

    // Both logs verify, both record the migration, and tell the same
    // story.
    let (la, lb) = (audit(&s, &a).await, audit(&s, &b).await);
    let said = |log: &[AuditEvent], what: &[&str]| {
        log.iter().any(|e| match e {
            AuditEvent::Outcome { vm, outcome, .. } => {
                vm == &vm_name() && what.iter().any(|w| outcome.starts_with(w))
            }
            AuditEvent::Resolution { vm, decision, .. } => {
                vm == &vm_name() && what.iter().any(|w| decision.starts_with(w))
            }
            _ => false,
        })
    };
    match case.expect {
        Expect::Source => {
            assert!(
                said(&la, &["aborted", "resumed here"]),
                "a's log does not say the VM stayed or came back\n{story}"
            );
            assert!(
                !said(&lb, &["started", "runs here"]),
                "b's log says it ran there\n{story}"
            );
        }
        Expect::Destination => {
            assert!(
                said(&lb, &["started", "runs here"]),
                "b's log does not say it runs there\n{story}"
            );
            assert!(
                said(&la, &["completed", "discarded here"]),
                "a's log does not say its copy went\n{story}"
            );
            assert!(
                !said(&la, &["resumed here"]),
                "a's log says it resumed\n{story}"
            );
            // A killed post-copy source, restarted, finished the push.
            if case.postcopy
                && matches!(case.fault, Fault::KillSource | Fault::RecoveringKillSource)
            {
                assert!(
                    said(&la, &["post-copy taken up"]),
                    "a's log does not say it took post-copy up again\n{story}"
                );
            }
        }
        Expect::PausedOnBoth => {
            assert!(said(&la, &["stays paused", "in doubt"]), "{story}");
        }
    }
}

macro_rules! case {
    ($name:ident, $point:literal, $at_dest:literal, $postcopy:literal, $fault:ident, $expect:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            run(Case {
                point: $point,
                at_destination: $at_dest,
                postcopy: $postcopy,
                fault: Fault::$fault,
                expect: Expect::$expect,
            })
            .await;
        }
    };
}

// Before Accept: the destination journalled its staging, Accept not sent.
case!(
    before_accept_kill_source,
    "destination-staged",
    true,
    false,
    KillSource,
    Source
);
case!(
    before_accept_kill_destination,
    "destination-staged",
    true,
    false,
    KillDestination,
    Source
);
case!(
    before_accept_cut,
    "destination-staged",
    true,
    false,
    CutLink,
    Source
);
// Mid rounds: the first round went, the second not yet.
case!(
    mid_rounds_kill_source,
    "source-round-2",
    false,
    false,
    KillSource,
    Source
);
case!(
    mid_rounds_kill_destination,
    "source-round-2",
    false,
    false,
    KillDestination,
    Source
);
case!(
    mid_rounds_cut,
    "source-round-2",
    false,
    false,
    CutLink,
    Source
);
// Mid stop-and-copy: the VM paused at the source, its last pages not sent.
case!(
    mid_stop_copy_kill_source,
    "source-stop-copy",
    false,
    false,
    KillSource,
    Source
);
case!(
    mid_stop_copy_kill_destination,
    "source-stop-copy",
    false,
    false,
    KillDestination,
    Source
);
case!(
    mid_stop_copy_cut,
    "source-stop-copy",
    false,
    false,
    CutLink,
    Source
);
// Verified at the destination, Ready about to leave.
case!(
    at_ready_kill_source,
    "destination-ready",
    true,
    false,
    KillSource,
    Source
);
case!(
    at_ready_kill_destination,
    "destination-ready",
    true,
    false,
    KillDestination,
    Source
);
case!(
    at_ready_cut,
    "destination-ready",
    true,
    false,
    CutLink,
    Source
);
// The source committed; Handover not sent.
case!(
    committed_kill_source,
    "source-committed",
    false,
    false,
    KillSource,
    Source
);
case!(
    committed_kill_destination,
    "source-committed",
    false,
    false,
    KillDestination,
    Source
);
case!(
    committed_cut,
    "source-committed",
    false,
    false,
    CutLink,
    Source
);
// The destination journalled the handover; the VM not started.
case!(
    handover_kill_source,
    "destination-handover",
    true,
    false,
    KillSource,
    Destination
);
case!(
    handover_kill_destination,
    "destination-handover",
    true,
    false,
    KillDestination,
    Source
);
case!(
    handover_cut,
    "destination-handover",
    true,
    false,
    CutLink,
    Destination
);
// The destination started the VM and journalled it; Started not sent.
case!(
    started_kill_source,
    "destination-started",
    true,
    false,
    KillSource,
    Destination
);
case!(
    started_kill_destination,
    "destination-started",
    true,
    false,
    KillDestination,
    Destination
);
case!(
    started_cut,
    "destination-started",
    true,
    false,
    CutLink,
    Destination
);
// The source recorded the destination's Started; its copy not wiped.
case!(
    source_started_kill_source,
    "source-started",
    false,
    false,
    KillSource,
    Destination
);
case!(
    source_started_kill_destination,
    "source-started",
    false,
    false,
    KillDestination,
    Destination
);
case!(
    source_started_cut,
    "source-started",
    false,
    false,
    CutLink,
    Destination
);
// Post-copy: switched, the source's push not begun. A killed source,
// restarted, takes the migration up again from its paused copy (the
// destination waits for it); a link cut past both recovery windows
// leaves it paused on both (the destination no longer waits).
case!(
    postcopy_push_kill_source,
    "source-postcopy-push",
    false,
    true,
    KillSource,
    Destination
);
case!(
    postcopy_push_kill_destination,
    "source-postcopy-push",
    false,
    true,
    KillDestination,
    Source
);
case!(
    postcopy_push_cut,
    "source-postcopy-push",
    false,
    true,
    CutLink,
    PausedOnBoth
);
// Post-copy recovery: the link cut mid-push, the destination waits for its
// source's Resume.
case!(
    recovering_kill_source,
    "source-postcopy-push",
    false,
    true,
    RecoveringKillSource,
    Destination
);
case!(
    recovering_kill_destination,
    "source-postcopy-push",
    false,
    true,
    RecoveringKillDestination,
    Source
);

// QEMU (pre-copy): before the commit (the destination staged), after the
// commit, after the destination's start; the source killed, then the
// destination.
macro_rules! qemu_case {
    ($name:ident, $point:literal, $kill_source:literal, $expect:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            faults_qemu::run($point, $kill_source, Expect::$expect).await;
        }
    };
}

qemu_case!(qemu_staged_kill_source, "destination-staged", true, Source);
qemu_case!(
    qemu_staged_kill_destination,
    "destination-staged",
    false,
    Source
);
qemu_case!(qemu_committed_kill_source, "source-committed", true, Source);
qemu_case!(
    qemu_committed_kill_destination,
    "source-committed",
    false,
    Source
);
qemu_case!(
    qemu_started_kill_source,
    "destination-started",
    true,
    Destination
);
qemu_case!(
    qemu_started_kill_destination,
    "destination-started",
    false,
    Destination
);
