//! The end of the copy: `Finish` with the root of the image as paused, the
//! destination's receipts checked and kept, the handover recorded and
//! sent with our `Sent` receipt.

use std::time::{Duration, Instant};

use crate::digest::{device_state_digest, Digest};
use crate::message::{Finish, Handover, Message, Reason};
use crate::receipt::ReceiptKind;

#[cfg(doc)]
use super::SourceEvent;
use super::{Phase, Source, SourceAction, SourceError};

impl Source {
    /// Each disk's own root (see [`crate::disk`]) over the leaves as sent,
    /// in manifest order: the disks as paused once the summary of
    /// [`SourceEvent::Finished`] says the migration verified.
    pub fn disk_roots(&self) -> Vec<Digest> {
        crate::disk::leaf_ranges(self.cfg.manifest.memory, &self.cfg.manifest.disks)
            .into_iter()
            .map(|r| {
                let leaves: Vec<Digest> = (r.start..r.end)
                    .map(|i| {
                        self.tree
                            .leaf(crate::page::saturating_usize(i))
                            .unwrap_or(Digest([0; 32]))
                    })
                    .collect();
                crate::disk::disk_root(&leaves)
            })
            .collect()
    }

    /// Leaves set since the tree was last rehashed: what the root at
    /// `Finish` (inside the pause) still has to fold in.
    pub fn unfolded_leaves(&self) -> usize {
        self.tree.pending()
    }

    /// Every page is sent: announce the root of the image as paused.
    pub(super) fn send_finish(&mut self, now: Instant) {
        let root = self.tree.root();
        self.root = Some(root);
        self.actions
            .push_back(SourceAction::Send(Box::new(Message::Finish(Finish {
                batches: self.batches.clone(),
                rounds: self.rounds,
                device_state: self.device_state.clone(),
                memory_root: root,
            }))));
        self.phase = Phase::AwaitReady {
            deadline: now + self.cfg.ready_timeout,
        };
        self.pause_marks[0] = Some(now);
        self.progress("verify", 0);
    }

    /// The handover is durably recorded; tell the destination.
    pub fn handle_handover_committed(&mut self, now: Instant) {
        if let Phase::Committing = self.phase {
            let sent = self.cfg.notary.sign(
                now,
                ReceiptKind::Sent,
                self.cfg.migration,
                self.ticket_digest,
                self.state(),
            );
            let receipt = match sent {
                Ok(r) => r,
                Err(e) => {
                    // Not handed over yet: the VM resumes here.
                    self.fail_with(now, Reason::Internal(e.to_string()), e.to_string());
                    return;
                }
            };
            self.receipts.push(receipt.clone());
            self.handed_over = true;
            self.actions
                .push_back(SourceAction::Send(Box::new(Message::Handover(Handover {
                    receipt,
                    reuse: self.retain.take().map(Box::new),
                }))));
            self.phase = Phase::AwaitStarted {
                deadline: now + self.cfg.started_timeout,
            };
            self.pause_marks[2] = Some(now);
            self.progress("handover", 0);
        }
    }

    /// The handover ([`SourceAction::CommitHandover`]) or the post-copy
    /// switch ([`SourceAction::CommitSwitch`]) could not be recorded
    /// durably: it is not made. Nothing was handed over yet, so the
    /// migration fails and the VM resumes here; the destination is told
    /// (`Abort`) and discards what it holds. Ignored in any other phase.
    pub fn handle_commit_failed(&mut self, now: Instant, detail: &str) {
        if matches!(self.phase, Phase::Committing | Phase::Switching) && !self.handed_over {
            let why = format!("the handover could not be recorded: {detail}");
            self.fail_with(now, Reason::Internal(why.clone()), why);
        }
    }

    /// The pre-copy pause's parts, once `Started` came at `now` after the
    /// guest had run `synced` there (not downtime: taken off the start's
    /// part, as off the downtime); from the pause through each mark (a
    /// mark missing, or a post-copy switch: zero). The destination's
    /// `share` is bounded by the parts it falls in.
    pub(super) fn note_pause_parts(
        &mut self,
        now: Instant,
        synced: Duration,
        share: crate::message::DestinationPause,
    ) {
        let (Some(p), [Some(f), Some(r), Some(h)], false) =
            (self.paused_at, self.pause_marks, self.switched)
        else {
            return;
        };
        let us = |a: Instant, b: Instant| crate::units::micros(b.saturating_duration_since(a));
        let ours = crate::model::PauseParts {
            last_round_us: us(p, f),
            verify_us: us(f, r),
            commit_us: us(r, h),
            start_us: us(h, now).saturating_sub(crate::units::micros(synced)),
            device_state_us: crate::units::micros(self.pause_read).min(us(p, f)),
            ..Default::default()
        };
        self.convergence.pause = share.put_in(ours);
    }

    /// Memory root and device digest handed over.
    pub(super) fn state(&self) -> crate::receipt::StateDigests {
        self.root
            .map(|r| (r, device_state_digest(&self.device_state)))
    }

    /// Checks one of the destination's receipts and keeps it.
    pub(super) fn check_receipt(
        &mut self,
        r: &crate::receipt::SignedReceipt,
        kind: ReceiptKind,
        state: crate::receipt::StateDigests,
    ) -> Result<(), SourceError> {
        self.cfg
            .notary
            .check(
                r,
                &self.cfg.peer,
                kind,
                self.cfg.migration,
                self.ticket_digest,
                state,
            )
            .map_err(SourceError::Receipt)?;
        self.receipts.push(r.clone());
        Ok(())
    }
}
