//! Receiving pages: data streams opened, batches applied in sequence, their
//! leaves set in the tree, and the pre-copy rounds the source ends
//! confirmed once applied (`RoundApplied`).

use std::time::Instant;

use crate::digest::Digest;
use crate::message::{Message, RoundApplied};
use crate::page::{PageBitmap, PageIndex};

use super::{Destination, DestinationAction, DestinationError, Phase};

impl Destination {
    /// No stream has more batches applied than `announced` says it sent.
    pub(super) fn check_counts(&mut self, announced: &[u64]) -> Result<(), DestinationError> {
        let over = announced
            .iter()
            .zip(&self.applied)
            .enumerate()
            .find(|(_, (a, b))| b > a);
        match over {
            Some((s, (&announced, &applied))) => Err(self.fail(DestinationError::BatchCount {
                stream: u16::try_from(s).unwrap_or(u16::MAX),
                announced,
                applied,
            })),
            None => Ok(()),
        }
    }

    /// Confirms the ended round once every batch it announced is applied.
    pub(super) fn try_confirm_round(&mut self) {
        let done = self.round_end.as_ref().is_some_and(|r| {
            r.batches
                .iter()
                .zip(&self.applied)
                .all(|(sent, applied)| applied >= sent)
        });
        // Taken only once done: a tuple would take it at every call.
        if let Some(r) = done.then(|| self.round_end.take()).flatten() {
            // The source decides on its pause only after this round is
            // confirmed: rehashing the round's leaves now keeps the root
            // at `Finish` (inside the pause) to the last round's pages.
            if let Some(t) = self.tree.as_mut() {
                t.root();
            }
            // What a resumed round would not need again starts afresh.
            self.confirmed = r.round;
            if let Some(f) = self.fresh.as_mut() {
                *f = PageBitmap::empty(f.len());
            }
            self.actions
                .push_back(DestinationAction::Send(Message::RoundApplied(
                    RoundApplied { round: r.round },
                )));
        }
    }

    /// A data stream announced itself as `stream`.
    pub fn handle_stream_opened(&mut self, stream: u16) -> Result<(), DestinationError> {
        match self.opened.get_mut(usize::from(stream)) {
            Some(o) if !*o && self.phase.takes_batches() => {
                *o = true;
                Ok(())
            }
            _ => Err(self.fail(DestinationError::BadStream(stream))),
        }
    }

    /// The driver wrote batch `seq` of `stream` to staging; `leaves` are the
    /// digests of the staging pages it wrote.
    pub fn handle_batch_applied(
        &mut self,
        now: Instant,
        stream: u16,
        seq: u64,
        leaves: &[(PageIndex, Digest)],
    ) -> Result<(), DestinationError> {
        self.heard(now);
        if !self.phase.takes_batches() {
            return Err(self.fail(DestinationError::Unexpected {
                phase: self.phase.name(),
                message: "PageBatch",
            }));
        }
        let Some(count) = self.applied.get_mut(usize::from(stream)) else {
            return Err(self.fail(DestinationError::BadStream(stream)));
        };
        if *count != seq {
            let expected = *count;
            return Err(self.fail(DestinationError::BatchSequence {
                stream,
                expected,
                got: seq,
            }));
        }
        *count += 1;
        if let Err(p) = self.set_leaves(leaves) {
            return Err(self.fail(DestinationError::PageOutOfRange(p)));
        }
        self.try_confirm_round();
        if let Phase::SwitchDraining(m) = &self.phase {
            // Nothing is sent after the switch before we say we run (the
            // fault stream, not in the switch's list, has sent nothing).
            let mut announced = m.batches.clone();
            announced.resize(self.applied.len(), 0);
            self.check_counts(&announced)?;
            return self.try_switch(now);
        }
        if let Phase::Draining(f) = &self.phase {
            let announced = f.batches.clone();
            self.check_counts(&announced)?;
        }
        self.try_verify(now)
    }

    /// Sets the leaves of pages written to staging (after the switch: of
    /// pages installed, no longer missing); `Err(page)` past the end.
    pub(super) fn set_leaves(&mut self, leaves: &[(PageIndex, Digest)]) -> Result<(), u64> {
        if let Some(tree) = self.tree.as_mut() {
            for &(p, d) in leaves {
                if !tree.set_leaf(crate::page::saturating_usize(p.0), d) {
                    return Err(p.0);
                }
            }
            if matches!(self.phase, Phase::Draining(_)) {
                // The source is paused, waiting on these: each batch's
                // paths are rehashed as it lands, while the next is on
                // its way, so that the root that ends the pause covers
                // one batch, not the whole last round.
                tree.root();
            } else {
                tree.fold_if_due();
            }
            if !self.switched {
                let fresh = self
                    .fresh
                    .get_or_insert_with(|| PageBitmap::empty(tree.len() as u64));
                for &(p, _) in leaves {
                    fresh.insert(p);
                }
            }
        }
        if let Some(m) = self.missing.as_mut() {
            for &(p, _) in leaves {
                if m.contains(p) {
                    m.remove(p);
                    self.asked.remove(&p.0);
                }
            }
        }
        Ok(())
    }
}
