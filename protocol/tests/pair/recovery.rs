//! Post-copy recovery: a link lost after the switch resumes on a new link
//! within the recovery window, only from the same source and ticket.

use std::time::Duration;

use convoy_protocol::ctl::Outcome;
use convoy_protocol::destination::DestinationEvent;
use convoy_protocol::digest::Digest;
use convoy_protocol::fuzz::InsecureCrypto;
use convoy_protocol::message::Message;
use convoy_protocol::model::MigrationMode;
use convoy_protocol::receipt::ReceiptKind;
use convoy_protocol::source::{SourceConfig, SourceError};

use crate::harness::{assert_postcopy_completed, Pair};

/// The kinds of a source's receipts, in order.
fn receipt_kinds(s: &convoy_protocol::source::SourceSummary) -> Vec<ReceiptKind> {
    s.receipts
        .iter()
        .map(|r| {
            r.verify(&InsecureCrypto(String::new()))
                .unwrap()
                .receipt
                .kind
        })
        .collect()
}

/// Post-copy with a 10 s recovery window.
fn recovering(c: &mut SourceConfig) {
    c.manifest.plan.mode = MigrationMode::Postcopy;
    c.recovery = Duration::from_secs(10);
}

#[test]
fn a_link_lost_in_postcopy_resumes_on_a_new_link_and_every_page_verifies() {
    // Cut in the middle of the push: some pages are installed, some are
    // on the wire and lost, the rest not sent yet; the VM touches missing
    // pages while the link is down.
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
    p.cut_after_postcopy_batches = Some(20);
    p.touch_in_outage = vec![1500, 1501, 2000];
    p.run();
    let s = assert_postcopy_completed(&p);
    let pc = s.postcopy.unwrap();
    assert_eq!(pc.recoveries, 1, "{pc:?}");
    assert_eq!(p.dst.recoveries(), 1);
    assert!(p.resume_refusals.is_empty(), "{:?}", p.resume_refusals);
    assert!(p.src_errors.is_empty() && p.dst_errors.is_empty());
    // Asked again once resumed: the fault stream served more than the
    // pages the VM touched before the cut.
    assert!(pc.fetches >= 2, "{pc:?}");
    // Receipts as without a cut: one Ready, the one for the root checked
    // on the new link.
    assert_eq!(
        receipt_kinds(&s),
        [
            ReceiptKind::Accepted,
            ReceiptKind::Ready,
            ReceiptKind::Sent,
            ReceiptKind::Started
        ]
    );

    // Cut before the source heard that the VM runs there, and a cut at
    // every later point: each resumes and verifies.
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
    p.cut_on_running = true;
    p.run();
    let s = assert_postcopy_completed(&p);
    assert_eq!(s.postcopy.unwrap().recoveries, 1);
    for n in [1, 60, 120] {
        let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
        p.cut_after_postcopy_batches = Some(n);
        p.run();
        let s = assert_postcopy_completed(&p);
        assert_eq!(s.postcopy.unwrap().recoveries, 1, "cut after {n} batches");
    }
}

#[test]
fn a_source_back_before_the_destination_noticed_the_break_resumes() {
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
    p.cut_after_postcopy_batches = Some(20);
    p.dst_notices_late = true;
    p.run();
    let s = assert_postcopy_completed(&p);
    assert_eq!(s.postcopy.unwrap().recoveries, 1);
    assert!(p.resume_refusals.is_empty(), "{:?}", p.resume_refusals);
}

#[test]
fn a_link_that_stays_down_past_the_recovery_window_is_in_doubt_on_both_sides() {
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
    p.cut_after_postcopy_batches = Some(20);
    p.outage = Duration::from_secs(60);
    p.run();
    let s = p.summary().clone();
    assert!(
        matches!(&s.outcome, Outcome::InDoubt(w) if w.contains("within 10 s")),
        "{s:?}"
    );
    assert!(!p.rolled_back && !p.vm.discarded && p.vm.paused);
    assert!(p.staging.is_some(), "the running VM is kept");
    assert!(
        matches!(&p.dst_event, Some(DestinationEvent::InDoubt(w)) if w.contains("did not come back")),
        "{:?}",
        p.dst_event
    );
}

#[test]
fn only_the_source_with_the_same_ticket_resumes_a_migration() {
    // A Resume for another ticket is refused; the migration waits on for
    // its own source, which then resumes it.
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
    p.cut_after_postcopy_batches = Some(20);
    let mut first = true;
    p.tamper_resume = Some(Box::new(move |m| {
        if let Message::Resume(r) = m {
            if first {
                first = false;
                // Deliver a forged one first, then the real one.
                let mut forged = r.clone();
                forged.ticket = Digest([0xEE; 32]);
                *m = Message::Resume(forged);
            }
        }
    }));
    p.run();
    assert_eq!(p.resume_refusals.len(), 1, "{:?}", p.resume_refusals);
    // The forged Resume was the source's only one: no answer, so the
    // source gives up in doubt and the destination waits its window out.
    let s = p.summary().clone();
    assert!(matches!(s.outcome, Outcome::InDoubt(_)), "{s:?}");
    assert!(matches!(p.dst_event, Some(DestinationEvent::InDoubt(_))));

    // The right ticket from another agent (its own mutual TLS identity):
    // refused the same way.
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
    p.cut_after_postcopy_batches = Some(20);
    p.resume_peer = "spiffe://pair.test/agent/intruder";
    p.run();
    assert_eq!(p.resume_refusals.len(), 1, "{:?}", p.resume_refusals);
    assert!(p.resume_refusals[0].contains("another agent"));
    assert!(matches!(p.dst_event, Some(DestinationEvent::InDoubt(_))));
    assert!(p.staging.is_some(), "the running VM is kept");
}

/// A post-copy migration cut by `cut`, whose Resumed `tamper` alters:
/// the source refuses it (saying `why`) and is left in doubt, never
/// resumed here.
fn a_bad_resumed_leaves_the_source_in_doubt(
    cut: impl FnOnce(&mut Pair),
    tamper: fn(&mut convoy_protocol::message::Resumed),
    why: &str,
) {
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
    cut(&mut p);
    p.tamper_back = Some(Box::new(move |m| {
        if let Message::Resumed(r) = m {
            tamper(r);
        }
    }));
    p.run();
    let s = p.summary().clone();
    assert!(matches!(s.outcome, Outcome::InDoubt(_)), "{s:?}");
    assert!(
        p.src_errors
            .iter()
            .any(|e| matches!(e, SourceError::BadResume(w) if w.contains(why))),
        "{:?}",
        p.src_errors
    );
    assert!(!p.rolled_back && !p.vm.discarded, "never resumed here");
}

#[test]
fn a_resumed_that_does_not_fit_or_claims_pages_never_sent_leaves_the_source_in_doubt() {
    a_bad_resumed_leaves_the_source_in_doubt(
        |p| p.cut_after_postcopy_batches = Some(20),
        |r| {
            r.missing.pop();
        },
        "does not fit",
    );
    // Cut before the push began; then the destination says it lacks
    // nothing, while most owed pages were never sent: the roots would
    // agree on stale leaves, so the source refuses it.
    a_bad_resumed_leaves_the_source_in_doubt(
        |p| p.cut_on_running = true,
        |r| r.missing.iter_mut().for_each(|w| *w = 0),
        "never sent",
    );
}

#[test]
fn a_source_restarted_after_the_switch_pushes_what_the_destination_lacks_and_verifies() {
    // The source process dies mid-push (its link with it); a new one,
    // from the paused image, dials again and finishes the migration.
    for (cut, mode) in [
        (20, MigrationMode::Postcopy),
        (1, MigrationMode::Postcopy),
        (5, MigrationMode::Hybrid),
    ] {
        let mut p = Pair::with(2048, 60, 50e6, 1 << 30, |c| {
            recovering(c);
            c.manifest.plan.mode = mode;
            // A pause no pre-copy can meet (the handover alone takes
            // 20 ms): hybrid switches rather than pause by pre-copy.
            c.manifest.plan.max_downtime_ms = 15;
        });
        p.cut_after_postcopy_batches = Some(cut);
        p.touch_in_outage = vec![1500, 1501, 2000];
        p.restart_source_at_cut = true;
        p.run();
        let s = assert_postcopy_completed(&p);
        assert_eq!(s.postcopy.unwrap().recoveries, 1, "{mode:?}, cut {cut}");
        assert_eq!(p.dst.recoveries(), 1);
        assert!(p.resume_refusals.is_empty(), "{:?}", p.resume_refusals);
        assert!(p.src_errors.is_empty() && p.dst_errors.is_empty());
        // The new source's receipts: the root checked on the new link,
        // then the handover (its Accepted receipt died with the first).
        assert_eq!(
            receipt_kinds(&s),
            [ReceiptKind::Ready, ReceiptKind::Sent, ReceiptKind::Started]
        );
    }
}

#[test]
fn a_restarted_source_takes_the_destinations_word_and_the_root_check_catches_a_lie() {
    // Cut before the push began; the destination then says it lacks
    // nothing. The first source refuses that (the pages were never sent);
    // a restarted one cannot know, so the root over the paused image
    // must catch it: never verified, never resumed here, never wiped.
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
    p.cut_on_running = true;
    p.restart_source_at_cut = true;
    p.tamper_back = Some(Box::new(|m| {
        if let Message::Resumed(r) = m {
            r.missing.iter_mut().for_each(|w| *w = 0);
        }
    }));
    p.run();
    let s = p.summary().clone();
    assert!(matches!(s.outcome, Outcome::InDoubt(_)), "{s:?}");
    assert!(!s.verified);
    assert!(
        p.dst_errors.iter().any(|e| matches!(
            e,
            convoy_protocol::destination::DestinationError::RootMismatch { .. }
        )),
        "{:?}",
        p.dst_errors
    );
    assert!(
        !p.rolled_back && !p.vm.discarded,
        "never resumed or wiped here"
    );
}

#[test]
fn a_source_cannot_restart_without_post_copy_a_window_or_the_right_image() {
    let leaves = vec![Digest([0; 32]); 2048];
    let p = Pair::with(2048, 0, 50e6, 1 << 30, recovering);
    assert!(convoy_protocol::source::Source::restarted_after_switch(
        p.src_cfg.clone(),
        &leaves,
        vec![],
        p.now
    )
    .is_ok());
    let bad = [
        ("post-copy", {
            let mut c = p.src_cfg.clone();
            c.manifest.plan.mode = MigrationMode::Precopy;
            c
        }),
        ("window", {
            let mut c = p.src_cfg.clone();
            c.recovery = Duration::ZERO;
            c
        }),
    ];
    for (why, cfg) in bad {
        let e =
            convoy_protocol::source::Source::restarted_after_switch(cfg, &leaves, vec![], p.now)
                .unwrap_err();
        assert!(e.to_string().contains(why), "{e}");
    }
    let e = convoy_protocol::source::Source::restarted_after_switch(
        p.src_cfg.clone(),
        &leaves[1..],
        vec![],
        p.now,
    )
    .unwrap_err();
    assert!(e.to_string().contains("do not fit"), "{e}");
}

#[test]
fn a_restarted_source_never_rolls_back_whatever_the_destination_answers() {
    // A destination that says it is still in pre-copy (PrecopyResumed)
    // after it signed that it runs the VM: the first source would take
    // the VM back (the switch was lost); a restarted one must not.
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
    p.cut_after_postcopy_batches = Some(20);
    p.restart_source_at_cut = true;
    p.tamper_back = Some(Box::new(|m| {
        if let Message::Resumed(_) = m {
            *m = Message::PrecopyResumed(convoy_protocol::message::PrecopyResumed {
                confirmed: 0,
                held: vec![0; 32],
            });
        }
    }));
    p.run();
    let s = p.summary().clone();
    assert!(matches!(s.outcome, Outcome::InDoubt(_)), "{s:?}");
    assert!(
        !p.rolled_back && !p.vm.discarded,
        "never resumed or wiped here"
    );
}

#[test]
fn after_the_switch_finish_must_name_the_device_state_the_vm_started_from() {
    // Receipts must not vouch for a device state the VM never ran from.
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
    p.tamper_control = Some(Box::new(|m| {
        if let Message::Finish(f) = m {
            f.device_state.push(1);
        }
    }));
    p.run();
    assert!(
        p.dst_errors.iter().any(|e| matches!(
            e,
            convoy_protocol::destination::DestinationError::SwitchStateMismatch
        )),
        "{:?}",
        p.dst_errors
    );
    let s = p.summary().clone();
    assert!(
        !s.verified && !matches!(s.outcome, Outcome::Completed),
        "{s:?}"
    );
    assert!(!p.rolled_back && !p.vm.discarded);
    assert!(
        matches!(&p.dst_event, Some(DestinationEvent::InDoubt(_))),
        "the VM running there is kept, in doubt: {:?}",
        p.dst_event
    );
}
