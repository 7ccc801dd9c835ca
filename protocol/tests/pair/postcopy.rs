//! Post-copy and hybrid: the VM runs at the destination first and its owed
//! pages follow; a link lost or a page altered after the switch.

use convoy_protocol::ctl::Outcome;
use convoy_protocol::destination::DestinationEvent;
use convoy_protocol::model::MigrationMode;
use convoy_protocol::source::SourceConfig;

use crate::harness::{assert_postcopy_completed, without_delta, Pair};

#[test]
fn postcopy_runs_the_vm_first_then_fills_and_verifies_every_page() {
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, |c| {
        c.manifest.plan.mode = MigrationMode::Postcopy;
    });
    p.run();
    let s = assert_postcopy_completed(&p);
    let pc = s.postcopy.unwrap();
    assert_eq!(pc.owed, 2048, "every page is owed, zero pages included");
    assert!(pc.fetches > 0 && pc.served > 0, "{pc:?}");
    assert_eq!(s.rounds, 1);
    // Downtime ends when the VM runs there, long before the last page.
    assert!(s.downtime.unwrap() * 5 < s.total, "{s:?}");
}

/// The agent's source serves a Fetch on the task that reads it, not
/// through `ServePages`: the machine counts it, waits for its batch like
/// any other and verifies the same.
#[test]
fn faults_served_by_the_driver_itself_are_counted_and_awaited() {
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, |c| {
        c.manifest.plan.mode = MigrationMode::Postcopy;
    });
    p.serve_directly = true;
    p.run();
    let s = assert_postcopy_completed(&p);
    let pc = s.postcopy.unwrap();
    assert!(p.served_directly > 0, "{pc:?}");
    assert_eq!(pc.fetches, p.served_directly, "{pc:?}");
    assert!(pc.served >= p.served_directly, "{pc:?}");

    // One served as the machine asks the driver to stop: `Finish` waits
    // for its batch (sent after it, the destination would count one batch
    // more than announced and fail).
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, |c| {
        c.manifest.plan.mode = MigrationMode::Postcopy;
    });
    p.serve_directly = true;
    p.late_fetch_at_stop = true;
    p.run();
    let s = assert_postcopy_completed(&p);
    let pc = s.postcopy.unwrap();
    assert!(!p.late_fetch_at_stop, "the machine never asked to stop");
    assert_eq!(pc.fetches, p.served_directly, "{pc:?}");
}

#[test]
fn hybrid_switches_after_the_first_pass_and_owes_only_the_dirty_pages() {
    // The VM that never converges in pre-copy (see above).
    // One pass is long enough for the cold writes to dirty more than
    // 20 ms of downtime can carry, not long enough to dirty everything.
    let mut p = Pair::with(2048, 60, 20e6, 1 << 30, |c| {
        c.manifest.plan.mode = MigrationMode::Hybrid;
        c.manifest.plan.force_stop = false;
    });
    without_delta(&mut p);
    p.run();
    let s = assert_postcopy_completed(&p);
    let pc = s.postcopy.unwrap();
    assert_eq!(s.rounds, 2, "one pre-copy pass, then post-copy");
    assert!(pc.owed > 0 && pc.owed < 2048, "{pc:?}");
}

#[test]
fn hybrid_that_converges_never_switches() {
    let mut p = Pair::with(512, 0, 100e6, 1 << 30, |c| {
        c.manifest.plan.mode = MigrationMode::Hybrid;
    });
    p.run();
    let s = p.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed);
    assert!(s.converged && s.postcopy.is_none());
}

#[test]
fn a_link_lost_after_the_switch_is_in_doubt_and_nothing_is_dropped() {
    let postcopy = |c: &mut SourceConfig| c.manifest.plan.mode = MigrationMode::Postcopy;
    // Lost before the destination read the switch: nothing ran there, and
    // the source keeps its paused copy, in doubt, never resumed by itself.
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, postcopy);
    p.cut_after_src_msgs = Some(2);
    p.run();
    let s = p.summary().clone();
    assert!(matches!(s.outcome, Outcome::InDoubt(_)), "{s:?}");
    assert!(!p.rolled_back && !p.vm.discarded && p.vm.paused);
    assert!(p.staging.is_none());
    assert!(matches!(p.dst_event, Some(DestinationEvent::Failed(_))));

    // Lost once the VM runs there: both keep what they hold.
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, postcopy);
    p.cut_on_running = true;
    p.run();
    let s = p.summary().clone();
    assert!(matches!(s.outcome, Outcome::InDoubt(_)), "{s:?}");
    assert!(!p.rolled_back && !p.vm.discarded && p.vm.paused);
    assert!(p.staging.is_some(), "the running VM is kept");
    assert!(
        matches!(&p.dst_event, Some(DestinationEvent::InDoubt(_))),
        "{:?}",
        p.dst_event
    );
}

#[test]
fn a_page_altered_after_the_switch_stops_the_vm_there_and_never_resumes_it_here() {
    let mut p = Pair::with(512, 0, 50e6, 1 << 30, |c| {
        c.manifest.plan.mode = MigrationMode::Postcopy;
    });
    p.level = 0;
    // No faults: the pushed copy is the only one.
    p.touch.clear();
    let mut done = false;
    p.tamper = Some(Box::new(move |_round, h, payload| {
        if !done && h.compression == convoy_protocol::page::Compression::None && payload.len() > 100
        {
            payload[77] ^= 1;
            done = true;
        }
    }));
    p.run();
    let s = p.summary().clone();
    assert!(matches!(s.outcome, Outcome::InDoubt(_)), "{s:?}");
    assert!(!p.rolled_back && !p.vm.discarded);
    assert!(
        p.staging.is_none(),
        "the VM that ran on a bad page is stopped"
    );
    assert!(matches!(p.dst_event, Some(DestinationEvent::Failed(_))));
}
