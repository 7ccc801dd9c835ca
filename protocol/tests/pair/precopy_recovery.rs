//! Pre-copy recovery: a link lost in a pre-copy round resumes on a new
//! link within the recovery window, sending again only what the
//! destination lacks; a link lost once the VM is paused, a lying answer
//! or a window that passes roll back, the VM running on at the source.

use std::time::Duration;

use convoy_protocol::ctl::Outcome;
use convoy_protocol::destination::DestinationEvent;
use convoy_protocol::message::{Message, PrecopyResumed};
use convoy_protocol::model::MigrationMode;
use convoy_protocol::page::PageBitmap;
use convoy_protocol::source::SourceAction;
use convoy_protocol::source::{SourceConfig, SourceError, SourceSummary};

use crate::harness::{accepted_by_hand, root_of, Pair};

/// Pre-copy with a 10 s recovery window.
fn recovering(c: &mut SourceConfig) {
    c.recovery = Duration::from_secs(10);
}

fn assert_precopy_completed(p: &Pair) -> SourceSummary {
    let s = p.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
    assert!(s.verified);
    let image = p.paused_image.as_ref().unwrap();
    assert_eq!(
        p.staging.as_ref().unwrap(),
        image,
        "the destination holds exactly the paused image"
    );
    assert_eq!(s.memory_root, Some(root_of(image)));
    assert_eq!(p.started, Some(p.vm.counter));
    assert!(p.vm.discarded && !p.rolled_back);
    assert!(matches!(
        p.dst_event,
        Some(DestinationEvent::Started { .. })
    ));
    assert!(p.resume_refusals.is_empty(), "{:?}", p.resume_refusals);
    assert!(p.src_errors.is_empty(), "{:?}", p.src_errors);
    assert!(p.dst_errors.is_empty(), "{:?}", p.dst_errors);
    s
}

#[test]
fn a_link_lost_in_round_one_resumes_and_sends_only_what_the_destination_lacks() {
    // An idle VM, so that the only pages sent again are the round's: cut
    // after 40 of round 1's 128 batches were applied there (the rest of
    // the round was on the wire, lost).
    let mut p = Pair::with(2048, 0, 50e6, 1 << 30, recovering);
    p.cut_after_precopy_batches = Some(40);
    p.run();
    let s = assert_precopy_completed(&p);
    assert_eq!(s.convergence.recoveries, 1, "{:?}", s.convergence);
    assert_eq!(p.dst.recoveries(), 1);
    let installed = p.installed_at_cut.unwrap();
    assert!(installed > 0);
    assert_eq!(
        s.convergence.recovery_resent,
        2048 - installed,
        "every page installed before the cut goes once, the rest again"
    );
}

#[test]
fn a_busy_vm_cut_at_any_point_of_its_rounds_resumes_and_verifies() {
    for n in [1, 60, 127, 128, 150] {
        let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
        p.cut_after_precopy_batches = Some(n);
        p.run();
        let s = assert_precopy_completed(&p);
        assert_eq!(s.convergence.recoveries, 1, "cut after {n} batches");
    }
    // The same with the destination noticing the break only when the
    // source is back on a new connection.
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
    p.cut_after_precopy_batches = Some(60);
    p.dst_notices_late = true;
    p.run();
    assert_precopy_completed(&p);
}

#[test]
fn a_link_that_flaps_again_and_again_still_converges_or_fails_honestly() {
    // Cut five times, each soon after the last resume: each resumes.
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
    p.cut_after_precopy_batches = Some(20);
    p.later_precopy_cuts = vec![140, 110, 80, 50];
    p.run();
    let s = assert_precopy_completed(&p);
    assert_eq!(s.convergence.recoveries, 5, "{:?}", s.convergence);
    // More breaks than a migration resumes from (8): it ends, rolled back,
    // the VM running here, the destination's copy gone.
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
    p.cut_after_precopy_batches = Some(5);
    p.later_precopy_cuts = (1..=10).rev().map(|k| 5 + 5 * k).collect();
    p.run();
    let s = p.summary().clone();
    assert!(
        matches!(&s.outcome, Outcome::Aborted(w) if w.contains("link lost")),
        "{s:?}"
    );
    assert_eq!(s.convergence.recoveries, 8);
    assert!(p.rolled_back && !p.vm.paused && !p.vm.discarded);
    assert!(p.staging.is_none() && p.started.is_none());
}

#[test]
fn a_lost_round_applied_ends_the_round_on_the_new_link_with_nothing_sent_again() {
    let mut p = Pair::with(2048, 0, 50e6, 1 << 30, recovering);
    p.cut_on_round_applied = Some(1);
    p.run();
    let s = assert_precopy_completed(&p);
    assert_eq!(s.convergence.recoveries, 1);
    assert_eq!(s.convergence.recovery_resent, 0, "{:?}", s.convergence);
    // And a busy VM, whose dirty log goes on over the new link.
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
    p.cut_on_round_applied = Some(2);
    p.run();
    assert_precopy_completed(&p);
}

#[test]
fn a_link_down_past_the_window_rolls_back_and_the_destination_discards() {
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
    p.cut_after_precopy_batches = Some(40);
    p.outage = Duration::from_secs(60);
    p.run();
    let s = p.summary().clone();
    assert!(
        matches!(&s.outcome, Outcome::Aborted(w) if w.contains("during pre-copy") && w.contains("within 10 s")),
        "{s:?}"
    );
    assert!(p.rolled_back && !p.vm.paused && !p.vm.discarded);
    assert!(p.staging.is_none() && p.started.is_none());
    assert!(
        matches!(&p.dst_event, Some(DestinationEvent::Failed(w)) if w.contains("did not come back")),
        "{:?}",
        p.dst_event
    );
}

#[test]
fn without_a_window_or_once_paused_a_lost_link_rolls_back() {
    // No recovery window: as before.
    let mut p = Pair::new(2048, 60, 50e6, 1 << 30);
    p.cut_after_precopy_batches = Some(40);
    p.run();
    assert!(matches!(p.summary().outcome, Outcome::Aborted(_)));
    assert!(p.rolled_back && p.staging.is_none() && p.started.is_none());
    assert_eq!(p.summary().convergence.recoveries, 0);
    // Paused for the final round (Propose, RoundEnd ×n, Finish): the
    // downtime does not wait for a new link.
    let mut p = Pair::with(512, 5, 50e6, 1 << 30, recovering);
    p.cut_after_src_msgs = Some(3);
    p.run();
    let s = p.summary().clone();
    assert!(matches!(s.outcome, Outcome::Aborted(_)), "{s:?}");
    assert!(p.rolled_back && !p.vm.paused && !p.vm.discarded);
    assert_eq!(s.convergence.recoveries, 0);
}

/// A pre-copy migration cut after 40 batches whose PrecopyResumed `tamper`
/// alters: the source refuses it (saying `why`) and rolls back.
fn a_bad_precopy_resumed_rolls_back(
    tamper: fn(&mut convoy_protocol::message::PrecopyResumed),
    why: &str,
) {
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
    p.cut_after_precopy_batches = Some(40);
    p.tamper_back = Some(Box::new(move |m| {
        if let Message::PrecopyResumed(r) = m {
            tamper(r);
        }
    }));
    p.run();
    let s = p.summary().clone();
    assert!(matches!(s.outcome, Outcome::Aborted(_)), "{s:?}");
    assert!(
        p.src_errors
            .iter()
            .any(|e| matches!(e, SourceError::BadResume(w) if w.contains(why))),
        "{why}: {:?} {s:?}",
        p.src_errors
    );
    assert!(p.rolled_back && !p.vm.paused && !p.vm.discarded);
    assert!(p.staging.is_none() && p.started.is_none());
}

#[test]
fn a_precopy_resumed_that_does_not_fit_or_claims_too_much_rolls_back() {
    a_bad_precopy_resumed_rolls_back(
        |r| {
            r.held.pop();
        },
        "does not fit",
    );
    a_bad_precopy_resumed_rolls_back(|r| r.confirmed = 7, "not in");
    a_bad_precopy_resumed_rolls_back(|r| r.confirmed = 1, "after the round it confirmed");
    // A destination that claims to hold every page of round 1 lies in a
    // way the source cannot see at once: the pages it lacks are not sent
    // again, and the root check before the handover finds it; the VM runs
    // on here.
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
    p.cut_after_precopy_batches = Some(40);
    p.tamper_back = Some(Box::new(|m| {
        if let Message::PrecopyResumed(r) = m {
            r.held.iter_mut().for_each(|w| *w = u64::MAX);
        }
    }));
    p.run();
    let s = p.summary().clone();
    assert!(
        matches!(&s.outcome, Outcome::Aborted(w) if w.contains("root mismatch")),
        "{s:?}"
    );
    assert!(p.rolled_back && !p.vm.paused && !p.vm.discarded);
    assert!(p.started.is_none());
}

#[test]
fn a_destination_confirming_a_round_the_source_never_ended_is_refused() {
    // Accepted: round 1 is being sent (its RoundEnd not yet) when the
    // link breaks. A destination that says it confirmed round 1 would let
    // the pages still to send never go, both roots agreeing on what it
    // holds: refused, and the VM runs on here.
    let mut p = accepted_by_hand(recovering);
    let now = p.now;
    p.src.handle_link_lost(now, "cut");
    let mut reconnect = false;
    while let Some(a) = p.src.poll_action() {
        reconnect |= matches!(a, SourceAction::Reconnect);
    }
    assert!(
        reconnect,
        "a link lost while sending round 1 is dialled again"
    );
    p.src.handle_reconnected(now);
    while p.src.poll_action().is_some() {}
    let lie = Message::PrecopyResumed(PrecopyResumed {
        confirmed: 1,
        held: PageBitmap::empty(64).words().to_vec(),
    });
    let e = p.src.handle_message(now, lie).unwrap_err();
    assert!(
        matches!(&e, SourceError::BadResume(w) if w.contains("never ended")),
        "{e}"
    );
    let mut rolled_back = false;
    while let Some(a) = p.src.poll_action() {
        rolled_back |= matches!(a, SourceAction::RollBack);
    }
    assert!(rolled_back);
}

#[test]
fn a_switch_lost_with_the_link_is_given_back_since_nothing_ran_there() {
    // Post-copy: Propose, then PostcopySwitch, lost with the link. The
    // destination, still in pre-copy, answers the Resume with
    // PrecopyResumed: it never ran the VM, which runs on here.
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, |c| {
        c.manifest.plan.mode = MigrationMode::Postcopy;
        recovering(c);
    });
    p.cut_after_src_msgs = Some(2);
    p.run();
    let s = p.summary().clone();
    assert!(
        matches!(&s.outcome, Outcome::Aborted(w) if w.contains("never ran the VM")),
        "{s:?}"
    );
    assert!(p.rolled_back && !p.vm.paused && !p.vm.discarded);
    assert!(p.staging.is_none() && p.started.is_none());
    assert!(
        matches!(&p.dst_event, Some(DestinationEvent::Failed(_))),
        "{:?}",
        p.dst_event
    );
}

#[test]
fn a_source_back_after_a_long_outage_is_not_taken_for_a_silent_one() {
    // The destination ends migrations whose source says nothing for 60 s;
    // a 70 s outage within a 120 s window resumes, and goes on.
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, |c| {
        c.recovery = Duration::from_secs(120);
    });
    p.cut_after_precopy_batches = Some(40);
    p.outage = Duration::from_secs(70);
    p.run();
    let s = assert_precopy_completed(&p);
    assert_eq!(s.convergence.recoveries, 1);
}

#[test]
fn a_failure_at_the_source_is_not_taken_for_the_link_and_is_not_retried() {
    // A page that cannot be read, with a recovery window: no new link
    // would help, so the migration fails at once, says why to the
    // destination, and the VM runs on here.
    let mut p = accepted_by_hand(recovering);
    let now = p.now;
    p.src.handle_local_failure(now, "page 7 could not be read");
    let (mut abort, mut rolled_back, mut reconnect) = (false, false, false);
    while let Some(a) = p.src.poll_action() {
        match a {
            SourceAction::Send(m) => abort |= matches!(*m, Message::Abort(_)),
            SourceAction::RollBack => rolled_back = true,
            SourceAction::Reconnect => reconnect = true,
            _ => {}
        }
    }
    assert!(abort && rolled_back && !reconnect);
    p.drain_src();
    let s = p.summary();
    assert!(
        matches!(&s.outcome, Outcome::Aborted(w) if w.contains("page 7 could not be read")),
        "{s:?}"
    );
    assert_eq!(s.convergence.recoveries, 0);
}

#[test]
fn each_phase_resumes_as_often_on_both_sides() {
    // Hybrid: eight breaks in pre-copy (the most a phase resumes from),
    // then one after the switch. The destination counts each phase's
    // breaks apart, as the source does, so it takes the post-copy Resume
    // the source makes (counted together, it refused it: the VM was left
    // in doubt).
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, |c| {
        c.manifest.plan.mode = MigrationMode::Hybrid;
        recovering(c);
    });
    p.cut_after_precopy_batches = Some(5);
    p.later_precopy_cuts = (1..=7).rev().map(|k| 5 + 5 * k).collect();
    p.cut_after_postcopy_batches = Some(3);
    p.run();
    let s = p.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
    assert!(s.verified);
    assert_eq!(s.convergence.recoveries, 8, "{:?}", s.convergence);
    assert_eq!(s.postcopy.map(|pc| pc.recoveries), Some(1), "{s:?}");
    assert_eq!(p.dst.recoveries(), 9);
    assert_eq!(
        p.staging.as_ref().unwrap(),
        p.paused_image.as_ref().unwrap()
    );
}
