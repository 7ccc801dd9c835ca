//! The journal's rules, tried on every step and sequence.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use super::*;
use proptest::prelude::*;

fn record(role: JournalRole) -> JournalRecord {
    let peer: SpiffeId = "spiffe://convoy.internal/agent/b".parse().unwrap();
    let vm: VmName = "web".parse().unwrap();
    match role {
        JournalRole::Source => {
            JournalRecord::claimed(MigrationId([7; 16]), Digest([1; 32]), peer, vm, Some(3), 10)
        }
        JournalRole::Destination => {
            JournalRecord::handed_over(MigrationId([7; 16]), Digest([1; 32]), peer, vm, None, 10)
        }
    }
}

fn run(role: JournalRole, steps: &[JournalStep]) -> JournalRecord {
    let mut r = record(role);
    for (t, s) in (11..).zip(steps) {
        if let Some(n) = r.advance(*s, t).unwrap() {
            r = n;
        }
    }
    r
}

use JournalStep::{Abort, Commit, Complete, Doubt, Start};

#[test]
fn a_completed_migration_hands_the_vm_over_once() {
    let src = run(JournalRole::Source, &[Commit, Start, Complete]);
    assert_eq!(src.phase, JournalPhase::Ended(JournalOutcome::Completed));
    assert_eq!(src.epoch, Epoch(1));
    assert!(!src.held_here());
    assert!(src.is_settled());
    let dst = run(JournalRole::Destination, &[Start, Complete]);
    assert_eq!((dst.phase, dst.epoch), (src.phase, src.epoch));
    assert!(dst.held_here());
}

#[test]
fn a_staged_destination_is_fenced_by_an_abort_and_nothing_moves_a_fence_on() {
    let peer: SpiffeId = "spiffe://convoy.internal/agent/a".parse().unwrap();
    let staged = JournalRecord::staged(
        MigrationId([7; 16]),
        Digest([1; 32]),
        peer,
        "web".parse().unwrap(),
        None,
        10,
    );
    assert!(!staged.held_here() && !staged.is_settled());
    assert_eq!(
        JournalPoint::of(&staged),
        Some(JournalPoint::DestinationStaged)
    );
    let handed = staged.advance(Commit, 11).unwrap().unwrap();
    assert_eq!(
        (handed.phase, handed.epoch),
        (JournalPhase::HandedOver, Epoch(1))
    );
    assert!(handed.held_here());
    let fenced = staged.advance(Abort, 11).unwrap().unwrap();
    assert_eq!(
        (fenced.phase, fenced.epoch),
        (JournalPhase::Ended(JournalOutcome::Failed), Epoch(0))
    );
    assert!(fenced.is_settled() && !fenced.held_here());
    for late in [Commit, Start, Complete, Doubt] {
        assert!(fenced.advance(late, 12).is_err(), "{late:?} after a fence");
    }
    assert_eq!(fenced.advance(Abort, 12).unwrap(), None, "fencing twice");
    // A started copy that died here is fenced too, at the give-back's
    // epoch.
    let started = handed.advance(Start, 12).unwrap().unwrap();
    let back = started.advance(Abort, 13).unwrap().unwrap();
    assert_eq!(
        (back.phase, back.epoch),
        (JournalPhase::Ended(JournalOutcome::RolledBack), Epoch(2))
    );
    assert!(back.advance(Start, 14).is_err() && back.advance(Complete, 14).is_err());
    // Decoding checks the new phase's epoch like the others.
    assert_eq!(JournalRecord::decode(&staged.encode()).unwrap(), staged);
    let mut bad = staged.clone();
    bad.epoch = Epoch(1);
    assert!(JournalRecord::decode(&bad.encode()).is_err());
}

#[test]
fn the_epoch_says_who_holds_the_vm_at_each_step() {
    let claimed = record(JournalRole::Source);
    assert!(claimed.held_here() && !claimed.is_settled());
    let committed = claimed.advance(Commit, 11).unwrap().unwrap();
    assert_eq!(committed.epoch, Epoch(1));
    assert!(!committed.held_here(), "a committed source never resumes");
    let back = committed.advance(Abort, 12).unwrap().unwrap();
    assert_eq!(back.phase, JournalPhase::Ended(JournalOutcome::RolledBack));
    assert_eq!(back.epoch, Epoch(2));
    assert!(back.held_here(), "given back: the source's again");
    let failed = claimed.advance(Abort, 11).unwrap().unwrap();
    assert_eq!(
        (failed.phase, failed.epoch),
        (JournalPhase::Ended(JournalOutcome::Failed), Epoch(0))
    );
    let dst = record(JournalRole::Destination);
    assert!(dst.held_here());
    let gone = dst.advance(Abort, 11).unwrap().unwrap();
    assert!(!gone.held_here() && gone.is_settled());
}

#[test]
fn illegal_steps_name_the_record_and_the_step() {
    let claimed = record(JournalRole::Source);
    for s in [Start, Complete, Doubt] {
        let e = claimed.advance(s, 11).unwrap_err();
        assert_eq!((e.phase, e.step), (JournalPhase::Claimed, s));
    }
    // Only a source commits; a destination is created handed over.
    let e = record(JournalRole::Destination)
        .advance(Commit, 11)
        .unwrap_err();
    assert_eq!(e.role, JournalRole::Destination);
    assert!(e.to_string().contains("Commit") && e.to_string().contains("handed over"));
    // Started is never aborted: the VM ran at the destination.
    let started = run(JournalRole::Source, &[Commit, Start]);
    assert!(started.advance(Abort, 20).is_err());
    assert!(started.advance(Commit, 20).is_err());
    // Settled records take no other decision.
    let done = run(JournalRole::Source, &[Commit, Start, Complete]);
    assert!(done.advance(Abort, 30).is_err());
    assert_eq!(done.advance(Complete, 30).unwrap(), None, "a repeat");
}

#[test]
fn in_doubt_stays_unfinished_until_resolved() {
    let doubt = run(JournalRole::Source, &[Commit, Doubt]);
    assert_eq!(doubt.phase, JournalPhase::Ended(JournalOutcome::InDoubt));
    assert!(!doubt.is_settled());
    assert_eq!(doubt.advance(Doubt, 20).unwrap(), None);
    let done = doubt.advance(Complete, 21).unwrap().unwrap();
    assert!(done.is_settled() && done.epoch == Epoch(1));
    let back = doubt.advance(Abort, 21).unwrap().unwrap();
    assert!(back.is_settled() && back.epoch == Epoch(2));
    // A source that took post-copy up again hears Started: the VM stays
    // the destination's, and only Complete follows.
    let started = doubt.advance(Start, 22).unwrap().unwrap();
    assert_eq!(started.phase, JournalPhase::Started);
    assert_eq!(started.epoch, Epoch(1));
    assert!(started.advance(Abort, 23).is_err());
    // A destination in doubt never starts by that path.
    let theirs = run(JournalRole::Destination, &[Doubt]);
    assert!(theirs.advance(Start, 22).is_err());
}

#[test]
fn points_have_names_and_records_mark_them() {
    for p in JournalPoint::ALL {
        assert_eq!(p.name().parse::<JournalPoint>().unwrap(), p);
    }
    assert!("source-handover".parse::<JournalPoint>().is_err());
    let marks = |role, steps: &[JournalStep]| JournalPoint::of(&run(role, steps));
    assert_eq!(
        marks(JournalRole::Source, &[]),
        Some(JournalPoint::SourceClaimed)
    );
    assert_eq!(
        marks(JournalRole::Source, &[Commit]),
        Some(JournalPoint::SourceCommitted)
    );
    assert_eq!(
        marks(JournalRole::Source, &[Commit, Start]),
        Some(JournalPoint::SourceStarted)
    );
    assert_eq!(
        marks(JournalRole::Destination, &[]),
        Some(JournalPoint::DestinationHandover)
    );
    assert_eq!(
        marks(JournalRole::Destination, &[Start]),
        Some(JournalPoint::DestinationStarted)
    );
    assert_eq!(marks(JournalRole::Source, &[Commit, Doubt]), None);
}

#[test]
fn records_round_trip_and_bad_bytes_are_refused() {
    let r = run(JournalRole::Source, &[Commit]);
    let bytes = r.encode();
    assert_eq!(JournalRecord::decode(&bytes).unwrap(), r);
    let mut long = bytes.clone();
    long.push(0);
    assert_eq!(
        JournalRecord::decode(&long),
        Err(RecordDecodeError::Trailing(1))
    );
    assert_eq!(
        JournalRecord::decode(&[]),
        Err(RecordDecodeError::Format(None))
    );
    let mut other = bytes.clone();
    other[0] = 9;
    assert_eq!(
        JournalRecord::decode(&other),
        Err(RecordDecodeError::Format(Some(9)))
    );
    assert!(matches!(
        JournalRecord::decode(&bytes[..bytes.len() - 1]),
        Err(RecordDecodeError::Malformed(_))
    ));
    assert!(matches!(
        JournalRecord::decode(&vec![JOURNAL_FORMAT; MAX_RECORD_LEN + 1]),
        Err(RecordDecodeError::TooLong(_))
    ));
    // A committed source at epoch 0 would let it resume: refused.
    let forged = JournalRecord {
        epoch: Epoch(0),
        ..r
    };
    assert!(matches!(
        JournalRecord::decode(&forged.encode()),
        Err(RecordDecodeError::Inconsistent { .. })
    ));
}

fn step() -> impl Strategy<Value = JournalStep> {
    prop_oneof![
        Just(Commit),
        Just(Start),
        Just(Abort),
        Just(Complete),
        Just(Doubt)
    ]
}

proptest! {
    /// Whatever decisions are tried, in any order: the epoch never
    /// falls and rises by at most one per step, exactly when the VM
    /// changes hands; every record written decodes to itself; a
    /// record that completed was started first; a source that saw
    /// `Started` never takes the VM back; and once settled a record
    /// never changes.
    #[test]
    fn any_sequence_of_decisions_keeps_the_rules(
        dest in any::<bool>(),
        steps in proptest::collection::vec(step(), 0..12),
    ) {
        // A destination's journal begins at staging.
        let mut r = if dest {
            let s = record(JournalRole::Destination);
            JournalRecord::staged(s.migration, s.ticket, s.peer, s.vm, None, 10)
        } else {
            record(JournalRole::Source)
        };
        let mut started = false;
        for (t, s) in (11..).zip(steps) {
            match r.advance(s, t) {
                Ok(Some(n)) => {
                    prop_assert!(n.epoch >= r.epoch && n.epoch.0 <= r.epoch.0 + 1);
                    let handoff = n.epoch != r.epoch;
                    prop_assert_eq!(handoff, n.epoch.owner() != r.epoch.owner());
                    prop_assert!(!r.is_settled(), "a settled record changed");
                    prop_assert_eq!(JournalRecord::decode(&n.encode()).unwrap(), n.clone());
                    started |= n.phase == JournalPhase::Started;
                    if n.phase == JournalPhase::Ended(JournalOutcome::Completed) {
                        prop_assert!(started || r.phase == JournalPhase::Ended(JournalOutcome::InDoubt));
                    }
                    if started && r.role == JournalRole::Source {
                        prop_assert!(n.phase != JournalPhase::Ended(JournalOutcome::RolledBack)
                            || r.phase == JournalPhase::Ended(JournalOutcome::InDoubt));
                    }
                    r = n;
                }
                Ok(None) => prop_assert!(matches!(r.phase, JournalPhase::Ended(_))),
                Err(e) => prop_assert_eq!((e.role, e.phase, e.step), (r.role, r.phase, s)),
            }
        }
    }
}
