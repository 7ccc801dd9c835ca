//! Resolving a migration left in doubt: what each side decides, from its
//! own journal and a signed answer from the other side.
//!
//! A migration is *in doubt* at the source once it has committed (it sent,
//! or may have sent, `Handover` or `PostcopySwitch`) and never received
//! `Started`: the VM may run at the destination, or nowhere. It stays
//! paused at the source until the destination says which. Two agents and
//! no coordinator must be enough, so the rules are these (the reasoning is
//! in SECURITY.md, "Exactly once"):
//!
//! 1. **A destination that journalled the handover runs the VM**. With
//!    the whole verified state it answers [`Verdict::RunsHere`] and the
//!    source discards its copy; in post-copy, with pages still owed, it
//!    answers [`Verdict::NeedsPages`] and the source keeps its copy, paused,
//!    for post-copy recovery (discarding it would lose the VM).
//! 2. **A source resumes its paused copy only on the destination's signed
//!    [`Verdict::Fenced`]**: the destination holds no copy it will ever run
//!    for that migration and epoch, and journalled that promise *before*
//!    answering (so a `Handover` or `Resume` that arrives late is refused).
//!    A destination fences only when it did not journal the handover, or
//!    journalled it but holds no copy any more (a sim VM that died with its
//!    agent: it cannot run what it does not have).
//! 3. **Anything else stays paused on both sides and is reported**: no
//!    answer, an answer about another migration, epoch or ticket, an
//!    answer signed by anyone but the ticket's destination, or
//!    [`Verdict::Unknown`] (the destination has no record: it may have
//!    finished and compacted it). Paused on both beats running on both.
//!    The operator who knows the other host is gone for good may resume
//!    here anyway (`convoyctl recover --force-resume-here`), audited as
//!    such.
//!
//! Before the commit nothing is in doubt: the destination cannot run the
//! VM without `Handover` (or the switch), so a source that restarts with
//! a claim and no commit resumes its VM ([`source_at_start`]), and a
//! destination that restarts with staging and no handover fences it and
//! discards it ([`destination_at_start`]).
//!
//! The *epoch* counts handoffs of the VM's ownership: a migration's
//! commit hands ownership over at epoch `n + 1`. An answer names the epoch
//! it is about, so an answer about another handoff of the same migration
//! (post-copy recovery reconnects, for one) is never taken for this one.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::journal::{Epoch, JournalOutcome, JournalPhase, JournalRecord, JournalRole};
use crate::names::{MigrationId, SpiffeId};
use crate::signed::{Signable, Signed};

/// Signatures over statements cover this prefix, then the body.
pub const STATEMENT_CONTEXT: &[u8] = b"convoy in-doubt statement v1\0";

/// Largest encoded statement body.
pub const MAX_STATEMENT_BODY: usize = 1024;

/// What one side asks the other about a migration it holds in doubt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inquiry {
    /// The migration.
    pub migration: MigrationId,
    /// Digest of the operator's signed ticket.
    pub ticket: Digest,
    /// The ownership epoch the asker's journal holds for it.
    pub epoch: u64,
}

/// What the answering side says about a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Verdict {
    /// The VM runs here, or was handed over to run here and will, with
    /// its whole verified state: the asker must never resume its copy and
    /// may discard it.
    RunsHere,
    /// The VM runs here in post-copy and still needs pages the asker owes:
    /// the asker must neither resume nor discard its copy.
    NeedsPages,
    /// No copy here will ever run for this migration and epoch, and the
    /// promise is journalled: the asker may resume its own.
    Fenced,
    /// No record of this migration (never seen, or finished and
    /// compacted): the asker decides nothing from it.
    Unknown,
    /// As [`Verdict::NeedsPages`], and this side waits for the asker's
    /// `Resume` (post-copy recovery): the asker may take the migration up
    /// again from its paused copy and push what is missing.
    AwaitsResume,
}

/// A signed answer to an [`Inquiry`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    /// The migration asked about.
    pub migration: MigrationId,
    /// Digest of its ticket.
    pub ticket: Digest,
    /// The epoch asked about.
    pub epoch: u64,
    /// The answer.
    pub verdict: Verdict,
    /// When it was signed, seconds since the Unix epoch.
    pub at_unix: u64,
}

impl Signable for Statement {
    const CONTEXT: &'static [u8] = STATEMENT_CONTEXT;
    const MAX_BODY: usize = MAX_STATEMENT_BODY;
}

/// A statement, its signature and the signer's chain.
pub type SignedStatement = Signed<Statement>;

/// Where a migration stands in the source's journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceStanding {
    /// The VM was claimed; nothing that lets the destination run it left.
    Claimed,
    /// Committed at `epoch`: `Handover` or `PostcopySwitch` may have left.
    Committed {
        /// The epoch the commit handed ownership over at.
        epoch: u64,
    },
    /// The outcome is known (completed, rolled back, resolved).
    Finished,
}

/// Where a migration stands in the destination's journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationStanding {
    /// Staging (receiving, or verified and Ready); no handover journalled.
    Staging {
        /// The epoch the source would hand ownership over at.
        epoch: u64,
    },
    /// The handover (or post-copy switch) is journalled at `epoch`:
    /// ownership is here.
    HandedOver {
        /// The epoch.
        epoch: u64,
        /// What this host holds of the VM.
        held: Held,
    },
    /// A promise never to run `epoch` is journalled.
    Fenced {
        /// The epoch.
        epoch: u64,
    },
    /// Nothing journalled for this migration.
    Unknown,
}

/// What a destination that journalled the handover holds of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// The whole state, verified (the memory root checked at `Ready`, or
    /// at `Finish` after post-copy).
    Complete,
    /// A post-copy VM still waiting for pages the source owes.
    Incomplete,
    /// As [`Held::Incomplete`], and the migration here waits for (or will
    /// take) the source's `Resume`.
    Waiting,
    /// Nothing: the copy died (a sim VM lives in its agent's process).
    Gone,
}

impl SourceStanding {
    /// Where a source's journal record puts the migration. A record of
    /// the other role is not a source's: `None`.
    pub fn of(r: &JournalRecord) -> Option<SourceStanding> {
        if r.role != JournalRole::Source {
            return None;
        }
        Some(match r.phase {
            JournalPhase::Claimed => SourceStanding::Claimed,
            JournalPhase::Committed | JournalPhase::Ended(JournalOutcome::InDoubt) => {
                SourceStanding::Committed { epoch: r.epoch.0 }
            }
            // `Started` at the source is the destination's confirmation:
            // only the wipe of the copy here is left.
            _ => SourceStanding::Finished,
        })
    }
}

impl DestinationStanding {
    /// Where a destination's journal record (`None`: no record) puts the
    /// migration, given what this host holds of the VM (asked only when
    /// the record says the VM was handed over and not yet completed: a
    /// completed one was confirmed to the source, and whatever became of
    /// the VM since, it is not the source's again). A fence is a record that
    /// ended failed or rolled back: the journal refuses to move it on
    /// ([`crate::journal`]), so the epoch it was about never runs here.
    pub fn of(r: Option<&JournalRecord>, held: impl FnOnce() -> Held) -> DestinationStanding {
        let Some(r) = r.filter(|r| r.role == JournalRole::Destination) else {
            return DestinationStanding::Unknown;
        };
        let handoff = Epoch::CLAIMED.next().0;
        match r.phase {
            JournalPhase::Staged => DestinationStanding::Staging { epoch: handoff },
            JournalPhase::HandedOver
            | JournalPhase::Started
            | JournalPhase::Ended(JournalOutcome::InDoubt) => DestinationStanding::HandedOver {
                epoch: handoff,
                held: held(),
            },
            // Completed: `Started` was sent and ownership passed for good.
            // Whatever became of the VM since (deleted, moved on), the
            // source must not resume its copy.
            JournalPhase::Ended(JournalOutcome::Completed) => DestinationStanding::HandedOver {
                epoch: handoff,
                held: Held::Complete,
            },
            JournalPhase::Ended(JournalOutcome::Failed | JournalOutcome::RolledBack) => {
                DestinationStanding::Fenced { epoch: handoff }
            }
            // Not a destination's phase (a decoded record never has it).
            JournalPhase::Claimed | JournalPhase::Committed => DestinationStanding::Unknown,
        }
    }
}

/// What a restarted source does with one journalled migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceStep {
    /// Nothing left: the VM never left, resume it here (and record the
    /// roll-back).
    ResumeHere,
    /// In doubt: keep the VM paused and ask the destination.
    Ask,
    /// Finished: nothing to do.
    Nothing,
}

/// What a restarted source does with one journalled migration.
pub fn source_at_start(standing: SourceStanding) -> SourceStep {
    match standing {
        SourceStanding::Claimed => SourceStep::ResumeHere,
        SourceStanding::Committed { .. } => SourceStep::Ask,
        SourceStanding::Finished => SourceStep::Nothing,
    }
}

/// What a restarted destination does with one journalled migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationStep {
    /// Ownership is here and the VM is here: run it (in post-copy, it
    /// waits on its missing pages until the source reconnects).
    RunHere,
    /// Journal a fence for `epoch`, then discard whatever is staged: the
    /// source still holds the VM (or may, and asks).
    FenceAndDiscard {
        /// The epoch to fence.
        epoch: u64,
    },
    /// Ownership is here but the copy is gone: nothing runs until the
    /// source asks (the answer fences, and the source resumes its copy).
    AwaitSource,
    /// Nothing to do.
    Nothing,
}

/// What a restarted destination does with one journalled migration.
pub fn destination_at_start(standing: DestinationStanding) -> DestinationStep {
    match standing {
        DestinationStanding::Staging { epoch } => DestinationStep::FenceAndDiscard { epoch },
        DestinationStanding::HandedOver {
            held: Held::Complete | Held::Incomplete | Held::Waiting,
            ..
        } => DestinationStep::RunHere,
        DestinationStanding::HandedOver {
            held: Held::Gone, ..
        } => DestinationStep::AwaitSource,
        DestinationStanding::Fenced { .. } | DestinationStanding::Unknown => {
            DestinationStep::Nothing
        }
    }
}

/// The destination's answer to `inquiry`: the verdict, and the epoch it
/// must journal a fence for *before* the answer leaves (`Some` whenever
/// the verdict is a new [`Verdict::Fenced`]).
pub fn destination_answer(standing: DestinationStanding, inquiry: &Inquiry) -> Answer {
    match standing {
        DestinationStanding::Staging { .. } => Answer {
            verdict: Verdict::Fenced,
            fence_first: Some(inquiry.epoch),
        },
        DestinationStanding::HandedOver {
            epoch,
            held: Held::Complete,
        } if epoch == inquiry.epoch => Answer {
            verdict: Verdict::RunsHere,
            fence_first: None,
        },
        DestinationStanding::HandedOver {
            epoch,
            held: Held::Incomplete,
        } if epoch == inquiry.epoch => Answer {
            verdict: Verdict::NeedsPages,
            fence_first: None,
        },
        DestinationStanding::HandedOver {
            epoch,
            held: Held::Waiting,
        } if epoch == inquiry.epoch => Answer {
            verdict: Verdict::AwaitsResume,
            fence_first: None,
        },
        // Handed over at this epoch but the copy is gone: it can never
        // run here, so the promise costs nothing and frees the source.
        DestinationStanding::HandedOver {
            epoch,
            held: Held::Gone,
        } if epoch == inquiry.epoch => Answer {
            verdict: Verdict::Fenced,
            fence_first: Some(epoch),
        },
        // Another epoch: this host owns a later (or earlier) handoff; it
        // says nothing about the one asked.
        DestinationStanding::HandedOver { .. } => Answer {
            verdict: Verdict::Unknown,
            fence_first: None,
        },
        DestinationStanding::Fenced { epoch } if epoch == inquiry.epoch => Answer {
            verdict: Verdict::Fenced,
            fence_first: None,
        },
        DestinationStanding::Fenced { .. } | DestinationStanding::Unknown => Answer {
            verdict: Verdict::Unknown,
            fence_first: None,
        },
    }
}

/// The destination's answer and what it journals first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// What it says.
    pub verdict: Verdict,
    /// The epoch to fence, durably, before the answer leaves.
    pub fence_first: Option<u64>,
}

/// What the source decides about a migration in doubt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceDecision {
    /// The VM runs at the destination: discard the paused copy here.
    DiscardHere,
    /// The destination fenced the epoch: resume the VM here.
    ResumeHere,
    /// The destination runs the VM in post-copy and waits for the pages
    /// it lacks: take the migration up again from the paused copy here
    /// (keeping it until `Started`).
    ResumePostcopy,
    /// Keep the VM paused here and report why.
    StayPaused(Undecided),
}

/// Why the source could not decide.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Undecided {
    /// No answer (unreachable, refused, or the answer did not verify).
    #[error("no valid answer from the destination: {0}")]
    NoAnswer(String),
    /// The answer was signed by someone else than the ticket's destination.
    #[error("the answer is signed by {signer}, not the destination {expected}")]
    WrongSigner {
        /// Who signed.
        signer: SpiffeId,
        /// The ticket's destination.
        expected: SpiffeId,
    },
    /// The answer is about another migration, ticket or epoch.
    #[error("the answer is about another migration, ticket or epoch")]
    NotThisQuestion,
    /// The destination runs the VM in post-copy and still needs pages from
    /// here: keep the copy and let post-copy recovery finish.
    #[error("the destination runs the VM and still needs pages from here (post-copy)")]
    DestinationNeedsPages,
    /// The destination has no record of the migration.
    #[error(
        "the destination has no record of this migration (it may have finished and forgotten it)"
    )]
    UnknownThere,
}

/// What the source decides from its `inquiry`, the ticket's `destination`
/// and the opened answer (`Err`: why there is none).
pub fn source_decides(
    inquiry: &Inquiry,
    destination: &SpiffeId,
    answer: Result<(Statement, SpiffeId), String>,
) -> SourceDecision {
    let (statement, signer) = match answer {
        Ok(a) => a,
        Err(why) => return SourceDecision::StayPaused(Undecided::NoAnswer(why)),
    };
    if &signer != destination {
        return SourceDecision::StayPaused(Undecided::WrongSigner {
            signer,
            expected: destination.clone(),
        });
    }
    if statement.migration != inquiry.migration
        || statement.ticket != inquiry.ticket
        || statement.epoch != inquiry.epoch
    {
        return SourceDecision::StayPaused(Undecided::NotThisQuestion);
    }
    match statement.verdict {
        Verdict::RunsHere => SourceDecision::DiscardHere,
        Verdict::NeedsPages => SourceDecision::StayPaused(Undecided::DestinationNeedsPages),
        Verdict::Fenced => SourceDecision::ResumeHere,
        Verdict::Unknown => SourceDecision::StayPaused(Undecided::UnknownThere),
        Verdict::AwaitsResume => SourceDecision::ResumePostcopy,
    }
}

#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::InsecureCrypto;

    fn inquiry() -> Inquiry {
        Inquiry {
            migration: MigrationId([7; 16]),
            ticket: Digest([9; 32]),
            epoch: 3,
        }
    }

    fn dest() -> SpiffeId {
        "spiffe://example.org/agent/b".parse().unwrap()
    }

    fn answered(verdict: Verdict, tweak: impl FnOnce(&mut Statement)) -> (Statement, SpiffeId) {
        let q = inquiry();
        let mut s = Statement {
            migration: q.migration,
            ticket: q.ticket,
            epoch: q.epoch,
            verdict,
            at_unix: 1_700_000_000,
        };
        tweak(&mut s);
        (s, dest())
    }

    /// Every standing a destination can be in, for `epoch` 3 and others.
    fn standings() -> Vec<DestinationStanding> {
        let mut v = vec![DestinationStanding::Unknown];
        for epoch in [2, 3, 4] {
            v.push(DestinationStanding::Staging { epoch });
            v.push(DestinationStanding::Fenced { epoch });
            for held in [Held::Complete, Held::Incomplete, Held::Waiting, Held::Gone] {
                v.push(DestinationStanding::HandedOver { epoch, held });
            }
        }
        v
    }

    /// The invariant, over every standing: the source resumes only when
    /// the destination will never run the VM, and discards only when the
    /// destination holds it and runs it.
    #[test]
    fn the_source_resumes_only_what_the_destination_fenced_and_discards_only_what_runs_there() {
        let q = inquiry();
        for standing in standings() {
            let answer = destination_answer(standing, &q);
            let after = match answer.fence_first {
                Some(epoch) => DestinationStanding::Fenced { epoch },
                None => standing,
            };
            let (s, signer) = answered(answer.verdict, |_| {});
            let decision = source_decides(&q, &dest(), Ok((s, signer)));
            let runs_there = matches!(
                after,
                DestinationStanding::HandedOver {
                    epoch: 3,
                    held: Held::Complete
                }
            );
            let never_runs_there = matches!(after, DestinationStanding::Fenced { epoch: 3 });
            let waits_for_pages = matches!(
                after,
                DestinationStanding::HandedOver {
                    epoch: 3,
                    held: Held::Waiting
                }
            );
            match decision {
                SourceDecision::ResumeHere => assert!(never_runs_there, "{standing:?}"),
                SourceDecision::DiscardHere => assert!(runs_there, "{standing:?}"),
                // Post-copy taken up again: only for a destination that
                // runs the VM and waits for its pages (the copy here is
                // kept, paused, until Started).
                SourceDecision::ResumePostcopy => assert!(waits_for_pages, "{standing:?}"),
                SourceDecision::StayPaused(_) => {
                    assert!(!never_runs_there && !runs_there, "{standing:?}")
                }
            }
            // A fence is journalled only where the VM does not run.
            if answer.fence_first.is_some() {
                assert!(
                    !matches!(
                        standing,
                        DestinationStanding::HandedOver {
                            held: Held::Complete | Held::Incomplete | Held::Waiting,
                            ..
                        }
                    ),
                    "{standing:?}"
                );
            }
        }
    }

    #[test]
    fn a_restarted_side_acts_alone_only_before_the_commit_or_with_the_vm_in_hand() {
        assert_eq!(
            source_at_start(SourceStanding::Claimed),
            SourceStep::ResumeHere
        );
        assert_eq!(
            source_at_start(SourceStanding::Committed { epoch: 3 }),
            SourceStep::Ask
        );
        assert_eq!(
            source_at_start(SourceStanding::Finished),
            SourceStep::Nothing
        );
        assert_eq!(
            destination_at_start(DestinationStanding::Staging { epoch: 3 }),
            DestinationStep::FenceAndDiscard { epoch: 3 }
        );
        assert_eq!(
            destination_at_start(DestinationStanding::HandedOver {
                epoch: 3,
                held: Held::Incomplete
            }),
            DestinationStep::RunHere
        );
        assert_eq!(
            destination_at_start(DestinationStanding::HandedOver {
                epoch: 3,
                held: Held::Gone
            }),
            DestinationStep::AwaitSource
        );
    }

    /// Every record a destination's journal can hold, reached by every
    /// sequence of up to four decisions from the staging record.
    fn destination_records() -> Vec<JournalRecord> {
        use crate::journal::JournalStep as S;
        let first = JournalRecord::staged(
            MigrationId([7; 16]),
            Digest([9; 32]),
            "spiffe://example.org/agent/a".parse().unwrap(),
            "web".parse().unwrap(),
            None,
            1,
        );
        let mut seen = vec![first.clone()];
        let mut frontier = vec![first];
        for _ in 0..4 {
            let mut next = Vec::new();
            for r in &frontier {
                for step in [S::Commit, S::Start, S::Abort, S::Complete, S::Doubt] {
                    if let Ok(Some(n)) = r.advance(step, 2) {
                        if !seen.iter().any(|x| x.phase == n.phase) {
                            seen.push(n.clone());
                            next.push(n);
                        }
                    }
                }
            }
            frontier = next;
        }
        seen
    }

    #[test]
    fn a_destination_fences_only_what_its_journal_can_keep_from_running() {
        use crate::journal::JournalStep as S;
        let q = Inquiry {
            migration: MigrationId([7; 16]),
            ticket: Digest([9; 32]),
            epoch: 1,
        };
        let records = destination_records();
        assert!(records.len() >= 6, "{records:?}");
        for r in &records {
            for held in [Held::Complete, Held::Incomplete, Held::Waiting, Held::Gone] {
                let standing = DestinationStanding::of(Some(r), || held);
                let a = destination_answer(standing, &q);
                if a.verdict == Verdict::Fenced {
                    // The fence is journalled as an abort (or already is
                    // one): afterwards nothing lets the copy run.
                    let fenced = match a.fence_first {
                        Some(_) => r.advance(S::Abort, 3).unwrap().unwrap_or_else(|| r.clone()),
                        None => r.clone(),
                    };
                    assert!(!fenced.held_here(), "{r:?} fenced yet held");
                    for late in [S::Commit, S::Start] {
                        assert!(fenced.advance(late, 4).is_err(), "{late:?} after {r:?}");
                    }
                    assert_eq!(
                        DestinationStanding::of(Some(&fenced), || held),
                        DestinationStanding::Fenced { epoch: 1 }
                    );
                }
                if a.verdict == Verdict::RunsHere {
                    let completed = r.phase == JournalPhase::Ended(JournalOutcome::Completed);
                    assert!(
                        r.held_here() && (held == Held::Complete || completed),
                        "{r:?}"
                    );
                }
            }
        }
        assert_eq!(
            DestinationStanding::of(None, || Held::Complete),
            DestinationStanding::Unknown
        );
        let src = JournalRecord::claimed(
            MigrationId([7; 16]),
            Digest([9; 32]),
            dest(),
            "web".parse().unwrap(),
            None,
            1,
        );
        assert_eq!(
            DestinationStanding::of(Some(&src), || Held::Complete),
            DestinationStanding::Unknown,
            "a source's record says nothing about a destination"
        );
        assert_eq!(SourceStanding::of(&src), Some(SourceStanding::Claimed));
        let committed = src.advance(S::Commit, 2).unwrap().unwrap();
        assert_eq!(
            SourceStanding::of(&committed),
            Some(SourceStanding::Committed { epoch: 1 })
        );
        let doubt = committed.advance(S::Doubt, 3).unwrap().unwrap();
        assert_eq!(
            SourceStanding::of(&doubt),
            Some(SourceStanding::Committed { epoch: 1 })
        );
        let back = doubt.advance(S::Abort, 4).unwrap().unwrap();
        assert_eq!(SourceStanding::of(&back), Some(SourceStanding::Finished));
    }

    #[test]
    fn answers_about_something_else_or_from_someone_else_decide_nothing() {
        let q = inquiry();
        let stay = |d: SourceDecision| matches!(d, SourceDecision::StayPaused(_));
        assert!(stay(source_decides(&q, &dest(), Err("unreachable".into()))));
        for tweak in [
            (|s: &mut Statement| s.epoch = 4) as fn(&mut Statement),
            |s| s.migration = MigrationId([8; 16]),
            |s| s.ticket = Digest([1; 32]),
        ] {
            let a = answered(Verdict::Fenced, tweak);
            assert_eq!(
                source_decides(&q, &dest(), Ok(a)),
                SourceDecision::StayPaused(Undecided::NotThisQuestion)
            );
        }
        let (s, _) = answered(Verdict::Fenced, |_| {});
        let other: SpiffeId = "spiffe://example.org/agent/c".parse().unwrap();
        assert!(matches!(
            source_decides(&q, &dest(), Ok((s, other))),
            SourceDecision::StayPaused(Undecided::WrongSigner { .. })
        ));
        let a = answered(Verdict::Unknown, |_| {});
        assert_eq!(
            source_decides(&q, &dest(), Ok(a)),
            SourceDecision::StayPaused(Undecided::UnknownThere)
        );
    }

    #[test]
    fn statements_are_signed_and_bound_to_their_kind() {
        let signer = InsecureCrypto("spiffe://example.org/agent/b".into());
        let (s, _) = answered(Verdict::RunsHere, |_| {});
        let signed = SignedStatement::sign(&s, &signer).unwrap();
        let (opened, who) = signed.open(&signer, 1_700_000_000).unwrap();
        assert_eq!((opened, who), (s, dest()));
        // The same body under a receipt's context does not verify.
        let receipt: Signed<crate::receipt::Receipt> =
            Signed::from_parts(signed.body.clone(), signed.signature.clone(), signed.chain);
        assert!(receipt.open(&signer, 1_700_000_000).is_err());
    }
}
