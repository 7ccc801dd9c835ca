//! The bookkeeping the migrations in progress hold at once
//! (`--max-bookkeeping`): each one's Merkle tree, 64 bytes per page or disk
//! block ([`convoy_protocol::destination::BOOKKEEPING_PER_LEAF`]), at the
//! destination and at the source of a sim VM (a QEMU source keeps no tree:
//! QEMU's stream carries the memory). The state machine refuses one
//! proposal bigger than the limit; this refuses the proposal, or the
//! migrate request, that would take the migrations in progress together
//! past it, before anything is reserved for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The bytes of bookkeeping the incoming migrations hold.
#[derive(Debug)]
pub(crate) struct Bookkeeping {
    limit: u64,
    used: Arc<AtomicU64>,
}

impl Bookkeeping {
    pub(crate) fn new(limit: u64) -> Self {
        Bookkeeping {
            limit,
            used: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Takes `bytes`, or `None` when the migrations in progress hold too
    /// much already (`Err` carries what they hold).
    pub(crate) fn take(&self, bytes: u64) -> Result<BookkeepingGrant, u64> {
        let limit = self.limit;
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= limit)
            })
            .map(|_| BookkeepingGrant {
                used: self.used.clone(),
                bytes,
            })
    }

    /// Takes the bookkeeping of a migration over `leaves` pages and disk
    /// blocks ([`convoy_protocol::destination::BOOKKEEPING_PER_LEAF`] each),
    /// or says why not.
    pub(crate) fn take_leaves(&self, leaves: u64) -> Result<BookkeepingGrant, BookkeepingRefused> {
        let need = leaves.saturating_mul(convoy_protocol::destination::BOOKKEEPING_PER_LEAF);
        self.take(need).map_err(|held| BookkeepingRefused {
            need,
            held,
            limit: self.limit,
        })
    }
}

/// A migration whose bookkeeping would take the migrations in progress
/// past the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "this migration needs {need} bytes of bookkeeping; the migrations in progress here hold \
     {held} of the {limit} allowed (--max-bookkeeping)"
)]
pub struct BookkeepingRefused {
    /// Bytes this migration needs.
    pub need: u64,
    /// Bytes the migrations in progress hold.
    pub held: u64,
    /// The agent's limit.
    pub limit: u64,
}

/// Bookkeeping one migration holds; dropping it gives the bytes back.
#[derive(Debug)]
pub(crate) struct BookkeepingGrant {
    used: Arc<AtomicU64>,
    bytes: u64,
}

impl Drop for BookkeepingGrant {
    fn drop(&mut self) {
        self.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_together_stay_under_the_limit_and_give_back_what_they_took() {
        let b = Bookkeeping::new(100);
        let first = b.take(60).expect("fits");
        assert_eq!(b.take(41).map(|_| ()), Err(60), "together past the limit");
        let second = b.take(40).expect("fits exactly");
        drop(first);
        assert!(b.take(60).is_ok(), "the first migration's bytes came back");
        drop(second);
        assert!(b.take(u64::MAX).is_err(), "no overflow past the limit");
    }
}
