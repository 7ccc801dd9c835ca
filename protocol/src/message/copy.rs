//! The copy: the first frame of each data stream ([`DataStreamOpen`]),
//! the end of each pre-copy round and its confirmation ([`RoundEnd`],
//! [`RoundApplied`]), and the end of the copy ([`Finish`]).

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::names::MigrationId;

/// Largest device-state blob (2 MiB; must fit in one frame).
pub const MAX_DEVICE_STATE: usize = 2 << 20;

/// First frame of every data stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataStreamOpen {
    /// The migration this stream belongs to.
    pub migration: MigrationId,
    /// Its index, `0..data_streams`.
    pub stream: u16,
}

/// The first message of a page migration's extra connection, a *lane*
/// ([`crate::model::MigrationPlan::lanes`]: the plan's `connections`
/// beyond the first, and one more with post-copy), on its first
/// bidirectional stream: its data streams carry some of the migration's.
/// The destination answers with the same message when the lane joined,
/// or an [`super::Abort`] when it did not (then the source puts those
/// streams on its first connection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lane {
    /// The migration the lane belongs to (from the same source agent).
    pub migration: MigrationId,
    /// Its number, `1..=lanes` (the first connection is 0).
    pub lane: u16,
}

/// Source → destination: every batch of pre-copy round `round` is sent,
/// `batches` per data stream so far. The destination answers
/// [`RoundApplied`] once it has applied as many; only then does the
/// source measure the round and decide whether to pause, so that the
/// pause never waits for data still in flight (up to the send window)
/// and the rate it plans with is the rate the destination applies at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundEnd {
    /// The round.
    pub round: u32,
    /// Batches sent so far on each data stream.
    pub batches: Vec<u64>,
}

/// Destination → source: every batch of round `round` is applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundApplied {
    /// The round.
    pub round: u32,
}

/// Source → destination: every page has been sent; here is the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finish {
    /// Batches sent on each data stream, in stream order.
    pub batches: Vec<u64>,
    /// Copy rounds, the final one included.
    pub rounds: u32,
    /// The paused VM's device state.
    pub device_state: Vec<u8>,
    /// Merkle root over the memory image as paused.
    pub memory_root: Digest,
}
