//! The migration journal: each agent commits every decision about a
//! migration — the claim, the commit, the handover, Started, the outcome —
//! before acting on it, in that order across both agents. A commit that
//! cannot be recorded sends no `Handover` and the VM runs on at the
//! source; a destination that cannot record the handover never runs the
//! VM and gives it back. A migration paused right after a point has done
//! exactly what that point says and nothing after it; an unfinished
//! record outlives a restart and is audited then.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use convoy_agent::config::AgentConfig;
use convoy_agent::host::journal::JournalPoint;
use convoy_agent::lab::Lab;
use convoy_protocol::audit::AuditEvent;
use convoy_protocol::ctl::{Outcome, VmState};
use convoy_protocol::journal::{Epoch, JournalOutcome, JournalPhase, JournalRecord, JournalRole};
use convoy_protocol::model::{MigrationMode, MigrationPlan};
use convoy_protocol::receipt::ReceiptKind;
use convoy_tests::{eventually, lab_with, migrate, sim_spec, uffd_or_skip};

/// Every record committed, by agent, in the order they were committed.
type Seen = Arc<Mutex<Vec<(String, JournalRecord)>>>;

/// A lab of agents a and b whose journals report to `seen`, each agent
/// further adjusted by `tweak`, with a 16 MiB dirtying VM `web` on a.
async fn lab_watching(
    seen: &Seen,
    tweak: impl Fn(&str, &mut AgentConfig),
) -> (tempfile::TempDir, Lab) {
    let seen = seen.clone();
    let (dir, lab) = lab_with(&["a", "b"], move |name, cfg| {
        let (seen, agent) = (seen.clone(), name.to_owned());
        cfg.dangerous().watch_journal(Arc::new(move |r| {
            seen.lock().unwrap().push((agent.clone(), r.clone()));
        }));
        tweak(name, cfg);
    })
    .await;
    let a = lab.client("a").await.unwrap();
    a.vm_create(sim_spec("web", 16 << 20, 2000)).await.unwrap();
    a.close().await;
    (dir, lab)
}

/// The phases and epochs `agent` committed, in order.
fn committed(seen: &Seen, agent: &str) -> Vec<(JournalPhase, Epoch)> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(n, _)| n == agent)
        .map(|(_, r)| (r.phase, r.epoch))
        .collect()
}

/// Waits (up to 5 s) until `agent`'s commits are `expected`; panics
/// with those it has.
async fn commits_become(seen: &Seen, agent: &str, expected: &[(JournalPhase, Epoch)]) {
    assert!(
        eventually(Duration::from_secs(5), || async {
            committed(seen, agent) == expected
        })
        .await,
        "{:?}",
        committed(seen, agent)
    );
}

/// Where `agent`'s record in `phase` is in the order of all commits.
fn position(seen: &Seen, agent: &str, phase: JournalPhase) -> usize {
    seen.lock()
        .unwrap()
        .iter()
        .position(|(n, r)| n == agent && r.phase == phase)
        .unwrap_or_else(|| panic!("{agent} never committed {phase}"))
}

const COMPLETED: JournalPhase = JournalPhase::Ended(JournalOutcome::Completed);

/// Migrates `web` from a to b with `plan` and checks what both journals
/// committed, in what order, and what they keep.
async fn journalled_in_order(plan: MigrationPlan) {
    let seen = Seen::default();
    let (_dir, lab) = lab_watching(&seen, |_, _| {}).await;
    let a = lab.client("a").await.unwrap();
    let req = lab.migrate_request("web", "a", "b", plan).unwrap();
    let report = a.migrate(req.clone(), |_| {}).await.unwrap();
    assert_eq!(report.outcome, Outcome::Completed, "{report:?}");
    // The destination records its outcome after the source's.
    assert!(
        eventually(Duration::from_secs(5), || async {
            committed(&seen, "b").last().map(|c| c.0) == Some(COMPLETED)
        })
        .await
    );
    assert_eq!(
        committed(&seen, "a"),
        [
            (JournalPhase::Claimed, Epoch(0)),
            (JournalPhase::Committed, Epoch(1)),
            (JournalPhase::Started, Epoch(1)),
            (COMPLETED, Epoch(1)),
        ]
    );
    assert_eq!(
        committed(&seen, "b"),
        [
            (JournalPhase::Staged, Epoch(0)),
            (JournalPhase::HandedOver, Epoch(1)),
            (JournalPhase::Started, Epoch(1)),
            (COMPLETED, Epoch(1)),
        ]
    );
    // Each decision was on disk before the other side could act on it.
    let order = [
        ("a", JournalPhase::Claimed),
        ("b", JournalPhase::Staged),
        ("a", JournalPhase::Committed),
        ("b", JournalPhase::HandedOver),
        ("b", JournalPhase::Started),
        ("a", JournalPhase::Started),
        ("a", COMPLETED),
    ];
    let at: Vec<usize> = order.iter().map(|(n, p)| position(&seen, n, *p)).collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{order:?} at {at:?}");
    // What the journals keep: one settled record each, describing it.
    let (ra, rb) = (lab.journal("a").unwrap(), lab.journal("b").unwrap());
    assert_eq!((ra.len(), rb.len()), (1, 1), "{ra:?} {rb:?}");
    let ticket = convoy_protocol::receipt::ticket_digest(&req.ticket);
    for (r, role, peer) in [
        (&ra[0], JournalRole::Source, "b"),
        (&rb[0], JournalRole::Destination, "a"),
    ] {
        assert_eq!(r.role, role);
        assert_eq!(r.migration.to_string(), report.migration);
        assert_eq!(r.ticket, ticket);
        assert_eq!(r.peer, lab.agent(peer).unwrap().id);
        assert_eq!(r.vm.as_str(), "web");
        assert!(r.incarnation.is_some());
        assert!(r.is_settled());
    }
    let file = lab.pki.dir().join("state/a/journal.redb");
    assert_eq!(convoy_agent::private::mode_of(&file).unwrap(), 0o600);
    a.close().await;
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_precopy_migration_commits_each_decision_before_the_next_step() {
    journalled_in_order(MigrationPlan::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postcopy_migration_commits_the_switch_before_the_vm_runs_there() {
    if !uffd_or_skip() {
        return;
    }
    journalled_in_order(MigrationPlan {
        mode: MigrationMode::Postcopy,
        ..MigrationPlan::default()
    })
    .await;
}

/// Whether `web` runs on `agent`, its counter moving.
async fn runs_on(lab: &Lab, agent: &str) -> bool {
    let c = lab.client(agent).await.unwrap();
    let Some(v) = c.vm_list().await.unwrap().into_iter().next() else {
        return false;
    };
    let c0 = v.counter;
    let moving = v.state == VmState::Running
        && eventually(Duration::from_secs(5), || async {
            c.vm_list().await.unwrap()[0].counter > c0
        })
        .await;
    c.close().await;
    moving
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_cannot_be_recorded_sends_no_handover_and_the_vm_stays() {
    let seen = Seen::default();
    let (_dir, mut lab) = lab_watching(&seen, |name, cfg| {
        if name == "a" {
            cfg.dangerous()
                .fail_journal_at(JournalPoint::SourceCommitted);
        }
    })
    .await;
    let a = lab.client("a").await.unwrap();
    let report = a
        .migrate(migrate(&lab, "web", "a", "b"), |_| {})
        .await
        .unwrap();
    assert!(
        matches!(&report.outcome, Outcome::Aborted(w) if w.contains("could not be recorded")),
        "{report:?}"
    );
    // No Sent receipt was signed, so no Handover left; the destination
    // never recorded one and holds nothing.
    let kinds: Vec<ReceiptKind> = report
        .receipts
        .iter()
        .map(|r| r.verify(&lab.trust).unwrap().receipt.kind)
        .collect();
    assert!(!kinds.contains(&ReceiptKind::Sent), "{kinds:?}");
    // b staged a copy, and fenced it when no handover came (as its side
    // of the migration ends, just after a's).
    let fenced = [
        (JournalPhase::Staged, Epoch(0)),
        (JournalPhase::Ended(JournalOutcome::Failed), Epoch(0)),
    ];
    commits_become(&seen, "b", &fenced).await;
    assert!(lab.journal("b").unwrap().iter().all(|r| r.is_settled()));
    assert!(runs_on(&lab, "a").await, "the VM runs on at the source");
    let b = lab.client("b").await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            b.vm_list().await.unwrap().is_empty()
        })
        .await
    );
    // The disk is dead: no migration starts any more (fail closed).
    let again = a.migrate(migrate(&lab, "web", "a", "b"), |_| {}).await;
    assert!(
        matches!(&again, Err(e) if e.to_string().contains("journal")),
        "{again:?}"
    );
    assert!(runs_on(&lab, "a").await);
    // Only the claim reached the disk: unfinished, kept across a restart,
    // and audited then.
    assert_eq!(committed(&seen, "a"), [(JournalPhase::Claimed, Epoch(0))]);
    a.close().await;
    b.close().await;
    lab.restart("a").await.unwrap();
    let log = convoy_tests::live_audit_log(&lab, "a");
    let found: Vec<_> = log
        .records
        .iter()
        .filter_map(|r| match &r.event {
            AuditEvent::Unfinished {
                migration,
                role,
                phase,
                epoch,
                ..
            } => Some((migration.to_string(), role.clone(), phase.clone(), *epoch)),
            _ => None,
        })
        .collect();
    assert_eq!(
        found,
        [(
            report.migration.clone(),
            "source".into(),
            "claimed".into(),
            0
        )]
    );
    // Then the restarted agent settles it alone (its disk takes records
    // again): claimed and never committed, so the destination cannot run
    // it, and the record ends as failed. (The resolution runs as the agent
    // starts, so the record may be read either side of it: waited for.)
    let ended = [
        (JournalPhase::Claimed, Epoch(0)),
        (JournalPhase::Ended(JournalOutcome::Failed), Epoch(0)),
    ];
    commits_become(&seen, "a", &ended).await;
    let kept = lab.journal("a").unwrap();
    assert_eq!(kept.len(), 1);
    assert!(kept[0].is_settled(), "{:?}", kept[0]);
    // Audited just after the record.
    let resolved = || -> Vec<String> {
        convoy_tests::live_audit_log(&lab, "a")
            .records
            .into_iter()
            .filter_map(|r| match r.event {
                AuditEvent::Resolution { reason, .. } => Some(reason),
                _ => None,
            })
            .collect()
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            let r = resolved();
            r.len() == 1 && r[0].contains("never committed")
        })
        .await,
        "{:?}",
        resolved()
    );
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_cannot_record_the_handover_never_runs_the_vm() {
    let seen = Seen::default();
    let (_dir, lab) = lab_watching(&seen, |name, cfg| {
        if name == "b" {
            cfg.dangerous()
                .fail_journal_at(JournalPoint::DestinationHandover);
        }
    })
    .await;
    let a = lab.client("a").await.unwrap();
    let report = a
        .migrate(migrate(&lab, "web", "a", "b"), |_| {})
        .await
        .unwrap();
    assert!(
        matches!(&report.outcome, Outcome::Aborted(w) if w.contains("could not be recorded")),
        "{report:?}"
    );
    // b staged a copy; its journal failed from the handover on, so
    // nothing after the staging is recorded, and the VM never ran there.
    assert_eq!(committed(&seen, "b"), [(JournalPhase::Staged, Epoch(0))]);
    // Handed over, then given back: the give-back is a handoff too, and
    // is on disk before the VM resumes here.
    assert_eq!(
        committed(&seen, "a"),
        [
            (JournalPhase::Claimed, Epoch(0)),
            (JournalPhase::Committed, Epoch(1)),
            (JournalPhase::Ended(JournalOutcome::RolledBack), Epoch(2)),
        ]
    );
    assert!(runs_on(&lab, "a").await);
    let b = lab.client("b").await.unwrap();
    assert!(b.vm_list().await.unwrap().is_empty());
    a.close().await;
    b.close().await;
    lab.shutdown().await;
}

/// Starts a migration of `web` from a to b that pauses at `point`, and
/// returns once `agent` committed `phase`, with the lab and the stuck
/// migration's task.
async fn paused_at(
    point: JournalPoint,
    agent: &'static str,
    phase: JournalPhase,
) -> (tempfile::TempDir, Lab, Seen, tokio::task::JoinHandle<()>) {
    let seen = Seen::default();
    let (dir, lab) = lab_watching(&seen, move |_, cfg| {
        cfg.dangerous().pause_at(point);
    })
    .await;
    let a = lab.client("a").await.unwrap();
    let req = migrate(&lab, "web", "a", "b");
    let stuck = tokio::spawn(async move {
        let r = a.migrate(req, |_| {}).await;
        panic!("a paused migration ended: {r:?}");
    });
    assert!(
        eventually(Duration::from_secs(20), || async {
            committed(&seen, agent).last().map(|c| c.0) == Some(phase)
        })
        .await,
        "{agent} never committed {phase}"
    );
    // Long enough for anything that was not stopped to happen.
    tokio::time::sleep(Duration::from_millis(500)).await;
    (dir, lab, seen, stuck)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_after_the_commit_the_source_has_sent_no_handover() {
    let (_dir, lab, seen, stuck) =
        paused_at(JournalPoint::SourceCommitted, "a", JournalPhase::Committed).await;
    // Committed and stopped there: the VM is paused at the source, the
    // destination holds staging only and recorded only that.
    assert_eq!(committed(&seen, "b"), [(JournalPhase::Staged, Epoch(0))]);
    let a = lab.client("a").await.unwrap();
    assert_eq!(a.vm_list().await.unwrap()[0].state, VmState::Paused);
    let b = lab.client("b").await.unwrap();
    assert_eq!(b.vm_list().await.unwrap()[0].state, VmState::Incoming);
    stuck.abort();
    let unfinished = lab.journal("a").unwrap();
    assert_eq!(unfinished[0].phase, JournalPhase::Committed);
    assert!(!unfinished[0].held_here());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_after_the_handover_is_recorded_the_destination_has_not_run_the_vm() {
    let (_dir, lab, seen, stuck) = paused_at(
        JournalPoint::DestinationHandover,
        "b",
        JournalPhase::HandedOver,
    )
    .await;
    assert_eq!(
        committed(&seen, "a"),
        [
            (JournalPhase::Claimed, Epoch(0)),
            (JournalPhase::Committed, Epoch(1)),
        ]
    );
    let b = lab.client("b").await.unwrap();
    let there = &b.vm_list().await.unwrap()[0];
    assert_eq!(there.state, VmState::Incoming, "recorded, not started");
    assert_eq!(there.counter_at_start, None);
    stuck.abort();
}
