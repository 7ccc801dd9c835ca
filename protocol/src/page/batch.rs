//! The page-batch format on the wire: the header that lists a batch's
//! pages as runs, how each run and the payload are carried, and what a
//! batch carried by encoding.

use serde::{Deserialize, Serialize};

/// How the payload of a batch is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Compression {
    /// The pages' bytes back to back.
    None,
    /// The pages' bytes back to back, compressed as one zstd frame.
    Zstd,
}

/// How the pages of a run are carried.
///
/// The order of the variants is the wire encoding: `Data` is 0 and `Zero`
/// is 1, as `false` and `true` were when a run had a `zero` flag, so a
/// batch without deltas is encoded as before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RunKind {
    /// Whole pages, `page_size` bytes each in the payload.
    Data,
    /// All-zero pages; nothing in the payload.
    Zero,
    /// Deltas against the version of each page sent before (see
    /// [`crate::delta`]), each a `u16` LE length and that many bytes.
    Delta,
    /// Pages the destination holds in the image it retained when the VM
    /// left it ([`crate::reuse`]); nothing in the payload.
    Retained,
}

/// A run of consecutive pages in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// Pages between the end of the previous run (or page 0) and this run.
    pub gap: u64,
    /// Pages in the run, at least one.
    pub len: u32,
    /// How the run's pages are carried.
    pub kind: RunKind,
}

/// The header of a page batch; the payload follows it in the same frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchHeader {
    /// Position of the batch on its stream, from 0, without gaps.
    pub seq: u64,
    /// Copy round the pages were read in (1 = bulk).
    pub round: u32,
    /// The pages, ascending.
    pub runs: Vec<Run>,
    /// How the payload is carried.
    pub compression: Compression,
}

/// What a batch carried, by page encoding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodingStats {
    /// Zero pages (no bytes).
    pub zero: u64,
    /// Pages sent raw.
    pub raw: u64,
    /// Whole pages sent inside a zstd block.
    pub zstd: u64,
    /// Pages sent as a delta against their previous version (raw or inside
    /// a zstd block).
    pub delta: u64,
    /// Pages not sent because the destination holds them in the image it
    /// retained ([`RunKind::Retained`]).
    pub retained: u64,
}

impl EncodingStats {
    /// Adds `other`.
    pub fn add(&mut self, other: &EncodingStats) {
        self.zero += other.zero;
        self.raw += other.raw;
        self.zstd += other.zstd;
        self.delta += other.delta;
        self.retained += other.retained;
    }

    /// All pages, the retained ones included.
    pub fn pages(&self) -> u64 {
        self.zero + self.raw + self.zstd + self.delta + self.retained
    }
}

/// A zstd failure. zstd names its error and gives nothing more, so its
/// words are kept as they came (the errors holding this are `Clone` and
/// `Eq`, which `std::io::Error` is not).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ZstdError(String);

impl From<std::io::Error> for ZstdError {
    fn from(e: std::io::Error) -> ZstdError {
        ZstdError(e.to_string())
    }
}
