//! What the driver reports sending: each batch (its leaves into the Merkle
//! tree, the figures) and the end of a round, which moves the phase on.

use std::time::Instant;

use crate::message::{Message, RoundEnd};

use super::{Phase, SentBatch, Source, SourceAction, SourceError};

impl Source {
    /// The driver wrote one batch of the current round.
    pub fn handle_batch_sent(
        &mut self,
        now: Instant,
        batch: &SentBatch,
    ) -> Result<(), SourceError> {
        if self.switched
            && matches!(
                self.phase,
                Phase::Reconnecting { .. } | Phase::AwaitResumed { .. }
            )
        {
            // A batch of the broken link: its pages were read from the
            // paused VM, so their leaves stand; whether it arrived, the
            // destination says in Resumed. (Before the switch such a
            // batch counts like any other of its round: whether it
            // arrived, the destination says in PrecopyResumed.)
            for &(p, d) in &batch.leaves {
                if !self.tree.set_leaf(crate::page::saturating_usize(p.0), d) {
                    return Err(SourceError::LeafOutOfRange(p.0));
                }
                self.pushed.insert(p);
            }
            self.tree.fold_if_due();
            self.payload_bytes += batch.frame_bytes;
            return Ok(());
        }
        let Some(count) = self.batches.get_mut(usize::from(batch.stream)) else {
            return Err(SourceError::NoSuchStream(batch.stream));
        };
        *count += 1;
        let memory_pages = self.cfg.manifest.memory.page_count();
        // Retained leaves are not sent: memory pages of a retained image,
        // or disk blocks a base holds. The stats count them per batch, so
        // they go to the memory's pages of the batch first (a batch holds
        // leaves of both only where the disks begin).
        let memory_in_batch = batch
            .leaves
            .iter()
            .filter(|(p, _)| p.0 < memory_pages)
            .count() as u64;
        let mut unsent = batch.stats.retained.saturating_sub(memory_in_batch);
        for &(p, d) in &batch.leaves {
            if !self.tree.set_leaf(crate::page::saturating_usize(p.0), d) {
                return Err(SourceError::LeafOutOfRange(p.0));
            }
            if p.0 >= memory_pages {
                if unsent > 0 {
                    unsent -= 1;
                } else {
                    self.disk_blocks_sent += 1;
                }
            }
            if self.sent.contains(p) {
                self.convergence.resent_pages += 1;
            } else {
                self.sent.insert(p);
            }
            if !self.switched && p.0 < self.round_sent.len() {
                self.round_sent.insert(p);
            }
        }
        self.tree.fold_if_due();
        if self.switched {
            for &(p, _) in &batch.leaves {
                self.pushed.insert(p);
            }
            if batch.stream == self.cfg.manifest.data_streams {
                self.serving = self.serving.saturating_sub(1);
                self.postcopy.served += batch.stats.pages();
            }
        }
        // Retained pages cost no bytes: they are not sent.
        let sent = batch.stats.pages() - batch.stats.retained;
        self.pages_sent += sent;
        self.round_pages += sent;
        self.encodings.add(&batch.stats);
        self.payload_bytes += batch.frame_bytes;
        self.round_bytes += batch.frame_bytes;
        self.try_finish_postcopy(now);
        Ok(())
    }

    /// The driver finished sending round `round`; `skipped_zero` zero pages
    /// of the first round were left out.
    pub fn handle_round_sent(&mut self, now: Instant, round: u32, skipped_zero: u64) {
        self.encodings.zero += skipped_zero;
        match self.phase {
            Phase::Copying {
                round: r,
                round_start,
                sending: true,
            } if r == round => {
                // The round counts as done once the destination applied
                // it: a pause now would otherwise wait for what is still
                // in flight, and the rate would be the send buffers'.
                self.phase = Phase::Draining {
                    round,
                    round_start,
                    deadline: now + self.cfg.ready_timeout,
                };
                self.round_ended = true;
                self.round_end_at = Some(now);
                // Before RoundEnd on the ordered control stream: its answer
                // comes before RoundApplied, so the round's decision has it.
                self.send_probe(now);
                self.actions
                    .push_back(SourceAction::Send(Box::new(Message::RoundEnd(RoundEnd {
                        round,
                        batches: self.batches.clone(),
                    }))));
            }
            Phase::PostCopy {
                round: r,
                pushing: true,
            } if r == round => {
                self.phase = Phase::PostCopy {
                    round,
                    pushing: false,
                };
                self.try_finish_postcopy(now);
            }
            Phase::FinalCopy { round: r } if r == round => self.send_finish(now),
            Phase::SwitchDisks { round: r } if r == round => self.begin_switch(),
            _ => {}
        }
    }
}
