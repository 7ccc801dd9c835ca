//! The migration journal's record and its rules, without I/O: what an
//! agent writes durably about a migration in progress ([`JournalRecord`]),
//! which decision may follow which ([`JournalRecord::advance`]), and who
//! holds the VM after each ([`Epoch`]). The agent stores one record per
//! migration and role, and commits every change to disk *before* it acts
//! on the decision the change records.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Claimed: source claims the VM (epoch 0)
//!     Claimed --> Committed: Commit: handover or post-copy switch decided (epoch 1)
//!     Claimed --> Failed: Abort: ended before any handoff (epoch 0)
//!     [*] --> Staged: destination accepts the proposal (epoch 0)
//!     Staged --> HandedOver: Commit: Handover or PostcopySwitch received (epoch 1)
//!     Staged --> Failed: Abort: staging discarded, or fenced (epoch 0)
//!     Committed --> Started: Start: the destination confirmed Started
//!     HandedOver --> Started: Start: the VM runs here
//!     Committed --> RolledBack: Abort: the destination gave the VM back (epoch 2)
//!     HandedOver --> RolledBack: Abort: the VM could not start here, given back (epoch 2)
//!     Started --> RolledBack: Abort: (destination) the copy died here; fenced so the source resumes (epoch 2)
//!     Committed --> InDoubt: Doubt
//!     HandedOver --> InDoubt: Doubt
//!     Started --> Completed: Complete
//!     InDoubt --> Completed: Complete (resolution)
//!     InDoubt --> Started: Start (source: post-copy taken up again, Started heard)
//!     InDoubt --> RolledBack: Abort (resolution, epoch 2)
//! ```
//!
//! # The ownership epoch
//! Every handoff of the VM between the two hosts raises the epoch by one:
//! the source's commit (0 → 1) and a give-back after it (1 → 2). Both
//! sides apply the same rules to the same decisions, so they agree on the
//! epoch without sending it: an even epoch is the source's, an odd one the
//! destination's ([`Epoch::owner`]). A source whose record has an odd
//! epoch must never resume the VM by itself; a destination whose record
//! has none, or an even epoch, never ran it.
//!
//! # Fences
//! A destination's record that ended failed (from `Staged`) or rolled back
//! is a *fence*: no later `Handover`, `PostcopySwitch` or `Resume` can move
//! it on ([`JournalRecord::advance`] refuses), so a copy here never runs
//! for that migration. A destination journals its staging at `Accept`, so
//! that every migration a source can commit has a record here to fence
//! ([`crate::indoubt`]).
//!
//! # Settled and unfinished
//! A record is *settled* once its outcome is completed, failed or rolled
//! back: nothing about it remains to decide, and the agent may compact it.
//! Every other record — a migration in progress, or one in doubt — is
//! *unfinished* and must be kept until someone resolves it.
//!
//! # Points
//! The records that mark a step other agents or the VM act on are named
//! ([`JournalPoint`]: `source-claimed`, `destination-staged`,
//! `source-committed`, `destination-handover`, `destination-started`,
//! `source-started`), for
//! tests that stop or fail an agent right there.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::digest::Digest;
use crate::names::{MigrationId, SpiffeId, VmName};

/// The first byte of every encoded record: the format it is in.
pub const JOURNAL_FORMAT: u8 = 1;

/// The most bytes an encoded record may take (a record is a few hundred
/// bytes; its longest part is the peer's SPIFFE ID).
pub const MAX_RECORD_LEN: usize = 4096;

/// Which side of the migration this agent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum JournalRole {
    /// The VM leaves this host.
    Source,
    /// The VM arrives on this host.
    Destination,
}

impl JournalRole {
    /// `source` or `destination`.
    pub fn name(self) -> &'static str {
        match self {
            JournalRole::Source => "source",
            JournalRole::Destination => "destination",
        }
    }
}

impl std::fmt::Display for JournalRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How many times the VM changed hands in this migration (see the module
/// docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch of a claim: the source holds the VM.
    pub const CLAIMED: Epoch = Epoch(0);

    /// Who holds the VM at this epoch: the source when even.
    pub fn owner(self) -> JournalRole {
        if self.0 % 2 == 0 {
            JournalRole::Source
        } else {
            JournalRole::Destination
        }
    }

    /// The epoch after one more handoff.
    #[must_use]
    pub fn next(self) -> Epoch {
        Epoch(self.0.saturating_add(1))
    }
}

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// How a migration ended, as its journal records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JournalOutcome {
    /// The VM runs at the destination; the source's copy is discarded.
    Completed,
    /// Ended before any handoff: the VM stayed with the source.
    Failed,
    /// Handed over, then given back before it ran at the destination: the
    /// source holds it again.
    RolledBack,
    /// Handed over and not confirmed: someone must decide (not settled).
    InDoubt,
}

/// Where a migration stands in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JournalPhase {
    /// Source: the VM is claimed for the migration; it may still resume
    /// here.
    Claimed,
    /// Destination: the proposal is accepted and a copy is being staged;
    /// it never runs without a handover.
    Staged,
    /// Source: the handover (or the post-copy switch) is decided; from
    /// now on the VM never resumes here by itself.
    Committed,
    /// Destination: `Handover` (or `PostcopySwitch`) arrived and is
    /// recorded; the VM may run here.
    HandedOver,
    /// The VM runs at the destination: started there (destination), or
    /// confirmed by its `Started` (source).
    Started,
    /// The migration ended.
    Ended(JournalOutcome),
}

impl JournalPhase {
    /// A short name for logs (`claimed`, `ended: in doubt`, …).
    pub fn name(self) -> &'static str {
        match self {
            JournalPhase::Claimed => "claimed",
            JournalPhase::Staged => "staged",
            JournalPhase::Committed => "committed",
            JournalPhase::HandedOver => "handed over",
            JournalPhase::Started => "started",
            JournalPhase::Ended(JournalOutcome::Completed) => "completed",
            JournalPhase::Ended(JournalOutcome::Failed) => "failed",
            JournalPhase::Ended(JournalOutcome::RolledBack) => "rolled back",
            JournalPhase::Ended(JournalOutcome::InDoubt) => "in doubt",
        }
    }

    /// The epoch a record of `role` in this phase has; `None` when no
    /// record of that role is ever in it.
    pub fn epoch(self, role: JournalRole) -> Option<Epoch> {
        use JournalPhase as P;
        use JournalRole as R;
        Some(match (role, self) {
            (R::Source, P::Claimed | P::Ended(JournalOutcome::Failed)) => Epoch(0),
            (R::Destination, P::Staged | P::Ended(JournalOutcome::Failed)) => Epoch(0),
            (R::Source, P::Committed) | (R::Destination, P::HandedOver) => Epoch(1),
            (_, P::Started | P::Ended(JournalOutcome::Completed | JournalOutcome::InDoubt)) => {
                Epoch(1)
            }
            (_, P::Ended(JournalOutcome::RolledBack)) => Epoch(2),
            _ => return None,
        })
    }
}

impl std::fmt::Display for JournalPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A decision that moves a record on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JournalStep {
    /// Source: hand the VM over (pre-copy `Handover`, or the post-copy
    /// switch).
    Commit,
    /// The VM runs at the destination.
    Start,
    /// The migration is given up: before a handoff the VM stays with the
    /// source; after one it goes back to the source.
    Abort,
    /// The migration completed.
    Complete,
    /// Handed over and not confirmed.
    Doubt,
}

/// A decision that may not follow the record's phase.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("journal: {step:?} is not allowed for a {role} record that is {phase}")]
pub struct TransitionError {
    /// The record's role.
    pub role: JournalRole,
    /// Its phase.
    pub phase: JournalPhase,
    /// The decision refused.
    pub step: JournalStep,
}

/// Why bytes are not a journal record.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RecordDecodeError {
    /// Longer than [`MAX_RECORD_LEN`].
    #[error("journal record of {0} bytes, more than {MAX_RECORD_LEN}")]
    TooLong(usize),
    /// Not in [`JOURNAL_FORMAT`].
    #[error("journal record in unknown format {0:?}")]
    Format(Option<u8>),
    /// Not a record.
    #[error("malformed journal record: {0}")]
    Malformed(String),
    /// Bytes after the record.
    #[error("{0} bytes after the journal record")]
    Trailing(usize),
    /// Phase, role and epoch disagree.
    #[error("journal record {phase} with role {role} and epoch {epoch} is impossible")]
    Inconsistent {
        /// Role.
        role: JournalRole,
        /// Phase.
        phase: JournalPhase,
        /// Epoch.
        epoch: Epoch,
    },
}

/// A named point of a migration, reached when its record is committed:
/// where a test may pause the agent or make the journal fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum JournalPoint {
    /// The source claimed the VM (before it dials the destination).
    SourceClaimed,
    /// The destination accepted the proposal (before `Accept` is sent).
    DestinationStaged,
    /// The source committed the handover or the post-copy switch (before
    /// `Handover` or `PostcopySwitch` is sent).
    SourceCommitted,
    /// The destination recorded `Handover` or `PostcopySwitch` (before
    /// its VM runs).
    DestinationHandover,
    /// The destination started the VM (before it sends `Started`).
    DestinationStarted,
    /// The source learnt of `Started` (before it wipes its copy).
    SourceStarted,
}

impl JournalPoint {
    /// Every point.
    pub const ALL: [JournalPoint; 6] = [
        JournalPoint::SourceClaimed,
        JournalPoint::DestinationStaged,
        JournalPoint::SourceCommitted,
        JournalPoint::DestinationHandover,
        JournalPoint::DestinationStarted,
        JournalPoint::SourceStarted,
    ];

    /// Its name on the command line (`source-committed`, …).
    pub fn name(self) -> &'static str {
        match self {
            JournalPoint::SourceClaimed => "source-claimed",
            JournalPoint::DestinationStaged => "destination-staged",
            JournalPoint::SourceCommitted => "source-committed",
            JournalPoint::DestinationHandover => "destination-handover",
            JournalPoint::DestinationStarted => "destination-started",
            JournalPoint::SourceStarted => "source-started",
        }
    }

    /// The point a record marks once committed, if any.
    pub fn of(r: &JournalRecord) -> Option<JournalPoint> {
        Some(match (r.role, r.phase) {
            (JournalRole::Source, JournalPhase::Claimed) => JournalPoint::SourceClaimed,
            (JournalRole::Destination, JournalPhase::Staged) => JournalPoint::DestinationStaged,
            (JournalRole::Source, JournalPhase::Committed) => JournalPoint::SourceCommitted,
            (JournalRole::Source, JournalPhase::Started) => JournalPoint::SourceStarted,
            (JournalRole::Destination, JournalPhase::HandedOver) => {
                JournalPoint::DestinationHandover
            }
            (JournalRole::Destination, JournalPhase::Started) => JournalPoint::DestinationStarted,
            _ => return None,
        })
    }
}

impl std::fmt::Display for JournalPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Not a point's name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown point {0:?}: one of source-claimed, destination-staged, source-committed, destination-handover, destination-started, source-started")]
pub struct UnknownPoint(pub String);

impl std::str::FromStr for JournalPoint {
    type Err = UnknownPoint;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JournalPoint::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownPoint(s.to_owned()))
    }
}

/// What an agent records about one migration it takes part in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalRecord {
    /// The migration.
    pub migration: MigrationId,
    /// The digest of the operator's ticket
    /// ([`crate::receipt::ticket_digest`]).
    pub ticket: Digest,
    /// Our side.
    pub role: JournalRole,
    /// The other agent.
    pub peer: SpiffeId,
    /// The VM.
    pub vm: VmName,
    /// The VM's incarnation on this host, when the host numbers them.
    pub incarnation: Option<u64>,
    /// Where it stands.
    pub phase: JournalPhase,
    /// Handoffs so far.
    pub epoch: Epoch,
    /// When this phase was recorded, seconds since the Unix epoch.
    pub at_unix: u64,
    /// Source: the address it dialled the destination at (`HOST:PORT`),
    /// so that a restarted source can ask it about a migration in doubt
    /// even when the address was given for this migration only.
    pub peer_addr: Option<String>,
}

impl JournalRecord {
    /// The source's first record: the VM claimed for `migration`.
    pub fn claimed(
        migration: MigrationId,
        ticket: Digest,
        peer: SpiffeId,
        vm: VmName,
        incarnation: Option<u64>,
        at_unix: u64,
    ) -> JournalRecord {
        JournalRecord {
            migration,
            ticket,
            role: JournalRole::Source,
            peer,
            vm,
            incarnation,
            phase: JournalPhase::Claimed,
            epoch: Epoch::CLAIMED,
            at_unix,
            peer_addr: None,
        }
    }

    /// The destination's first record: the proposal accepted, a copy
    /// staged that may run only after a handover.
    pub fn staged(
        migration: MigrationId,
        ticket: Digest,
        peer: SpiffeId,
        vm: VmName,
        incarnation: Option<u64>,
        at_unix: u64,
    ) -> JournalRecord {
        JournalRecord {
            role: JournalRole::Destination,
            phase: JournalPhase::Staged,
            ..JournalRecord::claimed(migration, ticket, peer, vm, incarnation, at_unix)
        }
    }

    /// A destination's record of a handover with no staging record before
    /// it (tests, and records of earlier agents).
    pub fn handed_over(
        migration: MigrationId,
        ticket: Digest,
        peer: SpiffeId,
        vm: VmName,
        incarnation: Option<u64>,
        at_unix: u64,
    ) -> JournalRecord {
        JournalRecord {
            phase: JournalPhase::HandedOver,
            epoch: Epoch::CLAIMED.next(),
            ..JournalRecord::staged(migration, ticket, peer, vm, incarnation, at_unix)
        }
    }

    /// The record after `step`, recorded at `at_unix`; `Ok(None)` when
    /// `step` is the one that already ended it (nothing to write); an
    /// error when `step` may not follow. The epoch rises by one at each
    /// handoff: the commit, and a give-back after it.
    pub fn advance(
        &self,
        step: JournalStep,
        at_unix: u64,
    ) -> Result<Option<JournalRecord>, TransitionError> {
        use JournalOutcome as O;
        use JournalPhase as P;
        use JournalRole as R;
        use JournalStep as S;
        let refuse = || TransitionError {
            role: self.role,
            phase: self.phase,
            step,
        };
        let next = match (self.role, self.phase, step) {
            (R::Source, P::Claimed, S::Commit) => P::Committed,
            (R::Source, P::Claimed, S::Abort) | (R::Destination, P::Staged, S::Abort) => {
                P::Ended(O::Failed)
            }
            (R::Destination, P::Staged, S::Commit) => P::HandedOver,
            // A destination whose started copy died fences it: the
            // source may then resume its own.
            (R::Destination, P::Started, S::Abort) => P::Ended(O::RolledBack),
            (R::Source, P::Committed, S::Start) | (R::Destination, P::HandedOver, S::Start) => {
                P::Started
            }
            (R::Source, P::Committed, S::Abort) | (R::Destination, P::HandedOver, S::Abort) => {
                P::Ended(O::RolledBack)
            }
            (R::Source, P::Committed, S::Doubt) | (R::Destination, P::HandedOver, S::Doubt) => {
                P::Ended(O::InDoubt)
            }
            (_, P::Started, S::Complete) => P::Ended(O::Completed),
            // A source in doubt that took post-copy up again (restarted,
            // or after its window) and heard `Started`.
            (R::Source, P::Ended(O::InDoubt), S::Start) => P::Started,
            // Resolution of a migration in doubt (a later step decides
            // which, by asking the other side).
            (_, P::Ended(O::InDoubt), S::Complete) => P::Ended(O::Completed),
            (_, P::Ended(O::InDoubt), S::Abort) => P::Ended(O::RolledBack),
            // The decision that ended it, again: nothing changes.
            (_, P::Ended(O::Completed), S::Complete)
            | (_, P::Ended(O::Failed | O::RolledBack), S::Abort)
            | (_, P::Ended(O::InDoubt), S::Doubt) => return Ok(None),
            _ => return Err(refuse()),
        };
        let epoch = next.epoch(self.role).ok_or_else(refuse)?;
        Ok(Some(JournalRecord {
            phase: next,
            epoch,
            at_unix,
            ..self.clone()
        }))
    }

    /// Nothing about this migration is left to decide: completed, failed
    /// or rolled back (a record in doubt is not settled).
    pub fn is_settled(&self) -> bool {
        matches!(
            self.phase,
            JournalPhase::Ended(
                JournalOutcome::Completed | JournalOutcome::Failed | JournalOutcome::RolledBack
            )
        )
    }

    /// Whether this host holds the VM by the record's epoch. A source that
    /// committed does not, whatever happens to its links.
    pub fn held_here(&self) -> bool {
        self.epoch.owner() == self.role
    }

    /// The record's bytes: [`JOURNAL_FORMAT`], then postcard.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![JOURNAL_FORMAT];
        // Serializing into a Vec cannot fail for this type.
        if let Ok(body) = postcard::to_stdvec(self) {
            out.extend_from_slice(&body);
        }
        out
    }

    /// Parses a record written by [`JournalRecord::encode`]: bounded,
    /// whole, and consistent (phase, role and epoch agree).
    pub fn decode(bytes: &[u8]) -> Result<JournalRecord, RecordDecodeError> {
        if bytes.len() > MAX_RECORD_LEN {
            return Err(RecordDecodeError::TooLong(bytes.len()));
        }
        let body = match bytes.split_first() {
            Some((&JOURNAL_FORMAT, body)) => body,
            Some((&other, _)) => return Err(RecordDecodeError::Format(Some(other))),
            None => return Err(RecordDecodeError::Format(None)),
        };
        let (r, rest): (JournalRecord, &[u8]) = postcard::take_from_bytes(body)
            .map_err(|e| RecordDecodeError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(RecordDecodeError::Trailing(rest.len()));
        }
        if r.phase.epoch(r.role) != Some(r.epoch) {
            return Err(RecordDecodeError::Inconsistent {
                role: r.role,
                phase: r.phase,
                epoch: r.epoch,
            });
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests;
