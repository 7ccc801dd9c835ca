//! How a migration ends at the source: a failure rolls back before the
//! handover and is in doubt after it; either way the figures go out in a
//! [`SourceSummary`].

use std::time::{Duration, Instant};

use crate::ctl::Outcome;
use crate::digest::Digest;
use crate::message::{Abort, Message, Reason};
use crate::model::{Convergence, PostcopySummary};
use crate::page::EncodingStats;

use super::{Phase, Source, SourceAction, SourceEvent};

/// Figures of a finished migration.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceSummary {
    /// Outcome.
    pub outcome: Outcome,
    /// Whether the destination confirmed our roots.
    pub verified: bool,
    /// Whether pre-copy met the downtime target.
    pub converged: bool,
    /// Rounds, the final one included.
    pub rounds: u32,
    /// Pages sent (repeats count).
    pub pages_sent: u64,
    /// Of those, disk blocks (see [`crate::disk`]).
    pub disk_blocks_sent: u64,
    /// By encoding.
    pub encodings: EncodingStats,
    /// Data frame bytes.
    pub payload_bytes: u64,
    /// Start to finish.
    pub total: Duration,
    /// Pause to Started (or to the end, if it never started).
    pub downtime: Option<Duration>,
    /// Convergence figures.
    pub convergence: Convergence,
    /// After a post-copy switch: what was owed and how it went.
    pub postcopy: Option<PostcopySummary>,
    /// Root handed over.
    pub memory_root: Option<Digest>,
    /// Receipts verified from the destination, and our own `Sent`.
    pub receipts: Vec<crate::receipt::SignedReceipt>,
}

impl Source {
    pub(super) fn fail_with(&mut self, now: Instant, reason: Reason, detail: String) {
        if !self.handed_over {
            self.actions
                .push_back(SourceAction::Send(Box::new(Message::Abort(Abort {
                    reason,
                }))));
        }
        self.finish_failed(now, detail);
    }

    /// Ends unsuccessfully: rolls back before handover; after it, never —
    /// the outcome is in doubt.
    pub(super) fn finish_failed(&mut self, now: Instant, detail: String) {
        if self.handed_over {
            self.finish(now, Outcome::InDoubt(detail));
        } else {
            self.actions.push_back(SourceAction::RollBack);
            self.finish(now, Outcome::Aborted(detail));
        }
    }

    pub(super) fn finish(&mut self, now: Instant, outcome: Outcome) {
        self.phase = Phase::Done;
        let start = self.started_at.unwrap_or(now);
        self.events
            .push_back(SourceEvent::Finished(Box::new(SourceSummary {
                verified: self.verified && outcome == Outcome::Completed,
                outcome,
                converged: self.converged,
                rounds: self.rounds,
                pages_sent: self.pages_sent,
                disk_blocks_sent: self.disk_blocks_sent,
                encodings: self.encodings,
                payload_bytes: self.payload_bytes,
                total: now.saturating_duration_since(start),
                downtime: self
                    .paused_at
                    .map(|p| self.resumed_at.unwrap_or(now).saturating_duration_since(p)),
                convergence: self.convergence,
                postcopy: self.switched.then_some(self.postcopy),
                memory_root: self.root,
                receipts: self.receipts.clone(),
            })));
    }
}
