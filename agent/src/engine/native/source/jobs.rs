//! What the driver hands the streams (a round's pages, faults to serve, what
//! the destination already holds) and what the streams report back.

use std::sync::Arc;

use bytes::Bytes;
use convoy_protocol::page::{PageBitmap, PageIndex};
use convoy_protocol::source::SentBatch;
use tokio::sync::mpsc;

/// Pages per batch: one stripe (128 KiB at 4 KiB pages).
// CAST: STRIPE_PAGES is 64.
#[allow(clippy::cast_possible_truncation)]
pub(super) const BATCH_PAGES: usize = convoy_protocol::page::STRIPE_PAGES as usize;

pub(super) enum StreamOut {
    Batch {
        head: Bytes,
        payload: Bytes,
        info: SentBatch,
    },
    RoundDone {
        round: u32,
        skipped: u64,
    },
}

/// An encoder thread's end of its stream's queue to the writer task.
///
/// A full queue parks the thread until the writer has taken a frame
/// (the writer unparks it after each one: [`Outbox::taken`]), instead of
/// waiting inside the channel as `blocking_send` does. Waiting there
/// holds, for a moment, the lock the writer takes on every frame; an
/// encoder at `SCHED_IDLE` (post-copy, [`crate::engine::priority`])
/// preempted inside it would hold a runtime worker, and the fault path
/// with it, until the idle thread ran again. `try_send` takes no lock.
pub(super) struct Outbox {
    tx: mpsc::Sender<StreamOut>,
}

/// The writer's handle to wake its encoder.
#[derive(Clone, Debug)]
pub(super) struct Taken(std::thread::Thread);

impl Taken {
    /// Wakes `encoder`, the thread that sends into the queue.
    pub(super) fn new(encoder: std::thread::Thread) -> Self {
        Self(encoder)
    }

    /// A frame left the queue: room for the encoder.
    pub(super) fn taken(&self) {
        self.0.unpark();
    }
}

impl Outbox {
    /// Longest park without news: a safety net, never needed (an unpark
    /// that comes first is kept for the next park).
    const PARK: std::time::Duration = std::time::Duration::from_millis(50);

    pub(super) fn new(tx: mpsc::Sender<StreamOut>) -> Self {
        Self { tx }
    }

    /// Queues `out`, parking while the queue is full; an error once the
    /// writer is gone.
    pub(super) fn send(&self, mut out: StreamOut) -> Result<(), StreamError> {
        loop {
            match self.tx.try_send(out) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(StreamError::WriterGone),
                Err(mpsc::error::TrySendError::Full(back)) => {
                    out = back;
                    std::thread::park_timeout(Self::PARK);
                }
            }
        }
    }
}

/// Why a data stream stopped: its encoder thread or its writer task.
#[derive(Debug, thiserror::Error)]
pub(super) enum StreamError {
    /// A batch could not be built or compressed.
    #[error(transparent)]
    Build(#[from] convoy_protocol::page::BuildError),
    /// A batch's frame head could not be encoded.
    #[error(transparent)]
    Head(#[from] convoy_protocol::message::EncodeError),
    /// A page or block could not be read (never sent as zeros).
    #[error(transparent)]
    Read(#[from] crate::backend::BackendError),
    /// The writer task ended (the stream broke).
    #[error("writer gone")]
    WriterGone,
    /// The stream could not take a frame.
    #[error(transparent)]
    Write(#[from] quinn::WriteError),
    /// A lane (an extra connection of the link) ended.
    #[error("lane {lane} lost: {error}")]
    Lane {
        /// Its number.
        lane: u16,
        /// How it ended.
        #[source]
        error: quinn::ConnectionError,
    },
}

pub(super) enum EngineEvent {
    Sent(SentBatch),
    RoundDone { round: u32, skipped: u64 },
    StreamFailed(StreamError),
}

pub(super) struct Job {
    pub(super) round: u32,
    pub(super) pages: Arc<PageBitmap>,
    pub(super) skip_zero: bool,
    /// Deltas allowed (not after a post-copy switch: the destination's
    /// copy of a page may have changed since).
    pub(super) delta: bool,
    /// After a post-copy switch: this push is background to the faults
    /// ([`crate::engine::priority`]).
    pub(super) background: bool,
    /// The first round: what the destination holds already.
    pub(super) held: Option<Arc<Held>>,
    /// After a post-copy switch: pages taken on this link (by the fault
    /// stream: left out of the push).
    pub(super) served: Option<Arc<Served>>,
}

/// Pages taken since a post-copy push began on its link: served on the
/// fault stream (each fault brings up to `PREPAGE` owed pages after it)
/// or read by the push's encoders. The push leaves out what the faults
/// took first, and the faults bring after theirs only pages no one took.
/// Without it a page went twice, as a fault's and as the push's: up to a
/// quarter of a 1 GiB push on loopback, nine tenths of a 256 MiB one under
/// a 20 MiB/s cap. A page past the end is never taken: the set is made
/// for its push's pages.
/// The VM is paused at the source, so both copies are the same bytes;
/// the destination installs the first and keeps it. A link that breaks
/// takes its set with it: what the destination still lacks, it says in
/// `Resumed`, and the new link pushes all of it.
pub(super) struct Served(Vec<std::sync::atomic::AtomicU64>);

impl Served {
    /// None of `leaves` pages served yet.
    pub(super) fn new(leaves: u64) -> Self {
        let words = usize::try_from(leaves.div_ceil(64)).unwrap_or(0);
        Served(
            (0..words)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
        )
    }

    /// Takes `p`: `true` if no one had (a page past the end is never
    /// taken). The faults take what they serve; the push's encoders take
    /// each page before they read it, and leave out one taken already.
    pub(super) fn claim(&self, p: PageIndex) -> bool {
        usize::try_from(p.0 / 64)
            .ok()
            .and_then(|i| self.0.get(i))
            .is_some_and(|w| {
                let bit = 1 << (p.0 % 64);
                // Acquire-release: an encoder that finds a page taken by a
                // fault sees the Fetch counted before it (`FaultSlot`).
                w.fetch_or(bit, std::sync::atomic::Ordering::AcqRel) & bit == 0
            })
    }

    /// Whether `p` was served.
    pub(super) fn contains(&self, p: PageIndex) -> bool {
        usize::try_from(p.0 / 64)
            .ok()
            .and_then(|i| self.0.get(i))
            .is_some_and(|w| w.load(std::sync::atomic::Ordering::Relaxed) & (1 << (p.0 % 64)) != 0)
    }
}

/// What the destination holds before the first round: the image it
/// retained of the VM (memory), and the bases it started disks from.
#[derive(Default)]
pub(super) struct Held {
    /// The retained image's leaves, page by page.
    pub(super) pages: Option<Arc<Vec<convoy_protocol::digest::Digest>>>,
    /// Disks started from a base there: their leaves, and the base's.
    pub(super) bases: Vec<(std::ops::Range<u64>, Arc<crate::backend::base::BaseIndex>)>,
    /// Disks started from a base there that this host cannot vouch for
    /// (its base is gone or changed): every block goes, zero ones too,
    /// since the destination's blocks are not zero.
    pub(super) whole: Vec<std::ops::Range<u64>>,
}

/// What the destination holds of one leaf.
pub(super) enum HeldLeaf {
    /// A page of the retained image (its leaf, if it has the page).
    Page(Option<convoy_protocol::digest::Digest>),
    /// A block of a base the disk started from there.
    Base(convoy_protocol::digest::Digest),
    /// A block of a disk started from a base there, not known here.
    Unknown,
}

impl Held {
    pub(super) fn leaf(&self, p: PageIndex) -> Option<HeldLeaf> {
        if self.whole.iter().any(|r| r.contains(&p.0)) {
            return Some(HeldLeaf::Unknown);
        }
        for (r, base) in &self.bases {
            if r.contains(&p.0) {
                let i = usize::try_from(p.0 - r.start).ok()?;
                return base.leaves.get(i).copied().map(HeldLeaf::Base);
            }
        }
        let pages = self.pages.as_ref()?;
        Some(HeldLeaf::Page(
            pages
                .get(convoy_protocol::page::saturating_usize(p.0))
                .copied(),
        ))
    }

    pub(super) fn is_empty(&self) -> bool {
        self.pages.is_none() && self.bases.is_empty() && self.whole.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_is_taken_once_and_pages_past_the_end_never() {
        let s = Served::new(130);
        for p in [0, 63, 64, 129] {
            assert!(!s.contains(PageIndex(p)));
            assert!(s.claim(PageIndex(p)), "{p}");
            assert!(s.contains(PageIndex(p)));
            assert!(!s.claim(PageIndex(p)), "{p} twice");
        }
        assert!(!s.contains(PageIndex(1)) && !s.contains(PageIndex(128)));
        // Past the end: neither kept nor a panic.
        assert!(!s.claim(PageIndex(192)));
        assert!(!s.contains(PageIndex(192)) && !s.contains(PageIndex(u64::MAX)));
    }
}
