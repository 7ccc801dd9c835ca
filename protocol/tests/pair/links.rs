//! Lost links and timeouts in pre-copy: before handover the VM rolls back
//! at the source; after it, the outcome is in doubt and nothing resumes.

use convoy_protocol::ctl::Outcome;

use crate::harness::{accepted_without_a_destination, Pair};

#[test]
fn link_lost_before_handover_rolls_back() {
    let mut p = Pair::new(512, 5, 50e6, 1 << 30);
    // Propose, then the link dies during copying.
    p.cut_after_src_msgs = Some(1);
    p.run();
    assert!(matches!(p.summary().outcome, Outcome::Aborted(_)));
    assert!(p.rolled_back && !p.vm.paused && !p.vm.discarded);
    assert!(p.staging.is_none() && p.started.is_none());
}

#[test]
fn link_lost_after_handover_is_in_doubt_and_never_resumes() {
    let mut p = Pair::new(512, 5, 50e6, 1 << 30);
    // Propose, RoundEnd (round 1), Finish, Handover: cut right after
    // Handover leaves.
    p.cut_after_src_msgs = Some(4);
    p.run();
    assert!(
        matches!(p.summary().outcome, Outcome::InDoubt(_)),
        "{:?}",
        p.summary()
    );
    assert!(
        !p.rolled_back,
        "a handed-over VM must never resume by itself"
    );
    assert!(p.vm.paused && !p.vm.discarded, "the paused copy is kept");
    // The destination never got Handover: it discarded, nothing runs twice.
    assert!(p.started.is_none());
}

#[test]
fn no_accept_times_out() {
    let mut p = Pair::new(64, 0, 50e6, 1 << 30);
    p.cut_after_src_msgs = Some(0); // never cut; drop destination answers instead
    p.src.start(p.now);
    p.drain_src();
    p.to_dst.clear();
    let t = p.src.poll_timeout().unwrap();
    p.tick(t - p.now);
    p.src.handle_timeout(p.now);
    p.drain_src();
    assert!(matches!(p.summary().outcome, Outcome::Aborted(ref m) if m.contains("Accept")));
    assert!(p.rolled_back);
}

#[test]
fn a_destination_that_never_confirms_a_round_times_out_and_rolls_back() {
    let mut p = accepted_without_a_destination();
    p.drain_src();
    let deadline = p.src.poll_timeout().expect("a deadline while draining");
    p.src.handle_timeout(deadline);
    p.drain_src();
    assert!(
        matches!(&p.summary().outcome, Outcome::Aborted(w) if w.contains("did not confirm round 1")),
        "{:?}",
        p.summary()
    );
    assert!(p.rolled_back && !p.vm.paused);
}
