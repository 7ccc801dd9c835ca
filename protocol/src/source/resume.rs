//! Pre-copy recovery: the destination's [`PrecopyResumed`] checked, and
//! the round it interrupted carried on with only what the destination
//! lacks.

use std::time::Instant;

use crate::message::PrecopyResumed;
use crate::page::PageBitmap;

use super::{Phase, Source, SourceAction, SourceError};

impl Source {
    /// The destination resumes a pre-copy migration in round `round`.
    pub(super) fn resume_precopy(
        &mut self,
        now: Instant,
        round: u32,
        r: PrecopyResumed,
    ) -> Result<(), SourceError> {
        let count = self.tree.len() as u64;
        if r.held.len() as u64 != count.div_ceil(64) {
            return Err(self.fail(
                now,
                SourceError::BadResume("the bitmap does not fit the image"),
            ));
        }
        let held = PageBitmap::from_words(r.held, count);
        // A RoundEnd or probe of the broken link measures no round trip.
        self.round_end_at = None;
        self.probes.clear();
        // Batches count from zero on the new streams.
        for b in &mut self.batches {
            *b = 0;
        }
        let began = self.round_began.unwrap_or(now);
        if r.confirmed == round {
            // The round was applied there and its RoundApplied lost: the
            // round is over, and nothing came after it. Only a round we
            // ended can have been confirmed: else the pages it had yet to
            // send would never go, and both roots would agree on what the
            // destination holds.
            if !self.round_ended {
                return Err(self.fail(
                    now,
                    SourceError::BadResume("the destination confirms a round never ended"),
                ));
            }
            if held.count() > 0 {
                return Err(self.fail(
                    now,
                    SourceError::BadResume("pages installed after the round it confirmed"),
                ));
            }
            self.measure_round(now, began);
            self.progress("pre-copy (resumed)", 0);
            self.phase = Phase::Copying {
                round,
                round_start: began,
                sending: false,
            };
            self.actions.push_back(SourceAction::CollectDirtyLog);
            return Ok(());
        }
        if r.confirmed.checked_add(1) != Some(round) {
            return Err(self.fail(
                now,
                SourceError::BadResume("the destination names a round this migration is not in"),
            ));
        }
        if held.iter().any(|p| !self.round_set.contains(p)) {
            return Err(self.fail(
                now,
                SourceError::BadResume("the destination holds a page the round did not send"),
            ));
        }
        // Sent again: every page of the round the destination does not
        // hold, or that the driver never reported sending (its leaf here
        // would not be the bytes there), and the dirty logs of the outage.
        let mut done = held;
        done.intersect_with(&self.round_sent);
        let mut again = self.round_set.clone();
        again.subtract(&done);
        if let Some(c) = self.carried.take() {
            again.union_with(&c);
            // Part of the round now: held after another break, not a
            // page the round never sent.
            self.round_set.union_with(&c);
        }
        // Its RoundEnd goes again, with the new streams' counts.
        self.round_ended = false;
        self.convergence.recovery_resent += again.count();
        self.progress("pre-copy (resumed)", again.count());
        self.phase = Phase::Copying {
            round,
            round_start: began,
            sending: true,
        };
        self.actions.push_back(SourceAction::SendPages {
            round,
            pages: again,
            skip_zero: self.round_skip_zero,
        });
        Ok(())
    }
}
