//! Post-copy: the switch (recorded, then sent with the owed pages), serving
//! the destination's faults with pre-paging, pushing the owed pages, and
//! post-copy recovery on a new link.

use std::time::Instant;

use crate::message::{Fetch, Message, PostcopySwitch};
use crate::page::{PageBitmap, PageIndex};

use super::{FaultServing, Phase, Source, SourceAction, SourceError};

/// Pages after a faulting page sent with it when they are still owed.
pub const PREPAGE: u64 = 15;

/// The pages that answer a Fetch of `asked` among `count` leaves: each
/// asked page, and after each the next [`PREPAGE`] pages that
/// `unpushed` says are owed and not yet pushed; in order, without
/// duplicates, at most `max`. `Err` names a page past the last leaf.
pub fn fetch_pages(
    asked: &[PageIndex],
    count: u64,
    max: usize,
    mut unpushed: impl FnMut(PageIndex) -> bool,
) -> Result<Vec<PageIndex>, u64> {
    let mut pages = Vec::new();
    for &p in asked {
        if p.0 >= count {
            return Err(p.0);
        }
        pages.push(p);
        for q in p.0 + 1..=(p.0 + PREPAGE).min(count - 1) {
            let q = PageIndex(q);
            if unpushed(q) {
                pages.push(q);
            }
        }
    }
    pages.sort_unstable();
    pages.dedup();
    pages.truncate(max);
    Ok(pages)
}

impl Source {
    /// Paused, nothing left to send first: record the post-copy switch.
    pub(super) fn begin_switch(&mut self) {
        self.phase = Phase::Switching;
        self.progress("switching to post-copy", self.postcopy.owed);
        self.actions.push_back(SourceAction::CommitSwitch);
    }

    /// The post-copy switch is durably recorded: hand the VM over.
    pub fn handle_switch_committed(&mut self, now: Instant) {
        let Phase::Switching = self.phase else {
            return;
        };
        let streams = usize::from(self.cfg.manifest.data_streams);
        let owed = self
            .owed
            .as_ref()
            .map(|o| o.words().to_vec())
            .unwrap_or_default();
        self.handed_over = true;
        self.switched = true;
        self.actions
            .push_back(SourceAction::Send(Box::new(Message::PostcopySwitch(
                PostcopySwitch {
                    batches: self.batches[..streams.min(self.batches.len())].to_vec(),
                    device_state: self.device_state.clone(),
                    owed,
                    storage: self.cfg.plan().storage_postcopy,
                },
            ))));
        self.phase = Phase::AwaitRunning {
            round: self.rounds,
            deadline: now + self.cfg.accept_timeout,
        };
    }

    /// Answers a Fetch: the asked pages, and the owed pages after each
    /// not yet pushed, as one batch on the fault stream.
    pub(super) fn serve(&mut self, now: Instant, round: u32, f: &Fetch) -> Result<(), SourceError> {
        let count = self.tree.len() as u64;
        let max = self.cfg.manifest.memory.page_size().max_batch_pages();
        let (owed, pushed) = (self.owed.as_ref(), &self.pushed);
        let pages = fetch_pages(&f.pages, count, max, |q| {
            owed.is_some_and(|o| o.contains(q)) && !pushed.contains(q)
        })
        .map_err(|p| self.fail(now, SourceError::LeafOutOfRange(p)))?;
        self.postcopy.fetches += 1;
        self.serving += 1;
        self.actions
            .push_back(SourceAction::ServePages { round, pages });
        Ok(())
    }

    /// The round whose faults the driver may serve itself as they arrive
    /// ([`Source::handle_fetches_served`]): post-copy's, until every owed
    /// page is pushed and every fault served.
    pub fn serving_faults(&self) -> Option<u32> {
        match self.phase {
            Phase::PostCopy { round, .. } if self.faults == FaultServing::Open => Some(round),
            _ => None,
        }
    }

    /// The driver served `n` Fetches itself, with [`fetch_pages`], while
    /// [`Source::serving_faults`] said so; their batches are reported
    /// sent after this call, as the batches of [`SourceAction::ServePages`].
    /// (Outside post-copy it counts nothing: the link broke meanwhile,
    /// and `Resumed` says what the destination holds.)
    pub fn handle_fetches_served(&mut self, n: u64) {
        if matches!(self.phase, Phase::PostCopy { .. }) {
            self.postcopy.fetches += n;
            self.serving += n;
        }
    }

    /// The driver stopped serving Fetches itself
    /// ([`SourceAction::StopFaults`]); `n` were served that way since it
    /// last reported them. `Finish` goes once their batches are reported
    /// sent too.
    pub fn handle_faults_stopped(&mut self, now: Instant, n: u64) {
        if self.faults != FaultServing::Stopping {
            return;
        }
        self.faults = FaultServing::Stopped;
        self.handle_fetches_served(n);
        self.try_finish_postcopy(now);
    }

    /// Recovery (post-copy, or pre-copy before the pause): a new
    /// connection to the destination is up, with its control and data
    /// streams: ask to resume.
    pub fn handle_reconnected(&mut self, now: Instant) {
        let Phase::Reconnecting { round, .. } = self.phase else {
            return;
        };
        if self.switched {
            self.postcopy.recoveries += 1;
        } else {
            self.convergence.recoveries += 1;
        }
        self.actions
            .push_back(SourceAction::Send(Box::new(Message::Resume(
                crate::message::Resume {
                    migration: self.cfg.migration,
                    ticket: self.ticket_digest,
                },
            ))));
        let deadline = match self.phase {
            Phase::Reconnecting { deadline, .. } => deadline.max(now + self.cfg.accept_timeout),
            _ => now + self.cfg.accept_timeout,
        };
        self.phase = Phase::AwaitResumed { round, deadline };
        if self.switched {
            self.progress("resuming post-copy", self.postcopy.owed);
        } else {
            self.progress("resuming pre-copy", self.round_set.count());
        }
    }

    /// The destination resumes: push again every owed page it lacks.
    pub(super) fn resume(
        &mut self,
        now: Instant,
        round: u32,
        r: crate::message::Resumed,
    ) -> Result<(), SourceError> {
        // Over what was owed: the memory's pages, or every leaf.
        let owed = self
            .owed
            .clone()
            .unwrap_or_else(|| PageBitmap::empty(self.cfg.manifest.memory.page_count()));
        let count = owed.len();
        if r.missing.len() as u64 != count.div_ceil(64) {
            return Err(self.fail(
                now,
                SourceError::BadResume("the bitmap does not fit what was owed"),
            ));
        }
        let missing = PageBitmap::from_words(r.missing, count);
        if missing.iter().any(|p| !owed.contains(p)) {
            return Err(self.fail(now, SourceError::BadResume("a page that was never owed")));
        }
        // Each owed page the destination says it holds must have been
        // sent since the switch: else the leaf both sides hold for it is
        // not the paused page's, and the root check could not tell. (A
        // restarted source does not know what was sent; its leaves are
        // the paused image's, so the root check tells.)
        if !self.restarted
            && owed
                .iter()
                .any(|p| !missing.contains(p) && !self.pushed.contains(p))
        {
            return Err(self.fail(
                now,
                SourceError::BadResume("the destination holds an owed page never sent"),
            ));
        }
        // Batches count from zero on the new streams; what the old ones
        // carried is in the destination's missing set.
        for b in &mut self.batches {
            *b = 0;
        }
        self.serving = 0;
        // The new link's driver may serve faults itself again.
        self.faults = FaultServing::Open;
        // Pre-paging sends only what the destination still lacks.
        self.pushed = PageBitmap::empty(self.tree.len() as u64);
        for p in owed.iter().filter(|p| !missing.contains(*p)) {
            self.pushed.insert(p);
        }
        // A link lost before PostcopyRunning: the VM runs there now.
        self.resumed_at.get_or_insert(now);
        self.progress("post-copy (resumed)", missing.count());
        self.phase = Phase::PostCopy {
            round,
            pushing: true,
        };
        self.actions.push_back(SourceAction::SendPages {
            round,
            pages: missing,
            skip_zero: false,
        });
        Ok(())
    }

    /// Post-copy: once every owed page is pushed and every fault served,
    /// send Finish with the root of the image as paused.
    pub(super) fn try_finish_postcopy(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::PostCopy { pushing: false, .. }) || self.serving > 0 {
            return;
        }
        match self.faults {
            // A batch the driver serves after `Finish` would be one more
            // than it counts: first no more of those.
            FaultServing::Open => {
                self.faults = FaultServing::Stopping;
                self.actions.push_back(SourceAction::StopFaults);
            }
            FaultServing::Stopping => {}
            FaultServing::Stopped => self.send_finish(now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetch_brings_its_pages_and_the_unpushed_ones_after_each_in_order() {
        let unpushed = |q: PageIndex| q.0 % 2 == 0;
        let pages = fetch_pages(&[PageIndex(10), PageIndex(3)], 20, 64, unpushed).unwrap();
        let want: Vec<u64> = [3, 4, 6, 8, 10, 12, 14, 16, 18].into();
        assert_eq!(pages.iter().map(|p| p.0).collect::<Vec<_>>(), want);
        // Never past the last leaf, never more than the batch holds.
        let pages = fetch_pages(&[PageIndex(19)], 20, 64, |_| true).unwrap();
        assert_eq!(pages, vec![PageIndex(19)]);
        let pages = fetch_pages(&[PageIndex(0)], 100, 4, |_| true).unwrap();
        assert_eq!(pages.len(), 4);
        assert_eq!(fetch_pages(&[PageIndex(20)], 20, 64, |_| true), Err(20));
    }
}
