//! The source's control messages: every (phase, message) pair the
//! destination accepts, and a typed refusal
//! ([`DestinationError::Unexpected`]) that names both for the rest.

use std::time::Instant;

use crate::message::{Message, Reason};
use crate::receipt::ReceiptKind;

use super::{Destination, DestinationAction, DestinationError, Phase};

impl Destination {
    /// A message from the source's control stream.
    pub fn handle_message(&mut self, now: Instant, msg: Message) -> Result<(), DestinationError> {
        self.heard(now);
        // Answered at once, whatever is still in flight (see
        // `Capabilities::PROBE`); after the end, ignored. Before a
        // proposal it is unexpected like anything else: a connection
        // must begin with one.
        if let (Message::Probe(p), false) = (&msg, matches!(self.phase, Phase::AwaitPropose)) {
            if !matches!(self.phase, Phase::Done) {
                self.actions
                    .push_back(DestinationAction::Send(Message::Probe(*p)));
            }
            return Ok(());
        }
        let phase = std::mem::replace(&mut self.phase, Phase::Done);
        match (phase, msg) {
            (Phase::AwaitPropose, Message::Propose(p)) => {
                self.propose(p);
                Ok(())
            }
            (Phase::Receiving, Message::RoundEnd(r)) => {
                self.phase = Phase::Receiving;
                if self.round_end.is_some() {
                    // The source waits for our answer before another round.
                    return Err(self.fail(DestinationError::Unexpected {
                        phase: "applying a round",
                        message: "RoundEnd",
                    }));
                }
                if r.batches.len() != self.applied.len() {
                    return Err(self.fail(DestinationError::StreamCount(r.batches.len())));
                }
                self.check_counts(&r.batches)?;
                self.round_end = Some(r);
                self.try_confirm_round();
                Ok(())
            }
            (Phase::Receiving, Message::PostcopySwitch(m)) => {
                let Some(p) = &self.proposal else {
                    return Err(self.fail(DestinationError::BadSwitch("no proposal")));
                };
                // Storage post-copy owes disk blocks too: the bitmap is
                // over every leaf.
                let count = if m.storage {
                    p.manifest
                        .leaf_count()
                        .unwrap_or(p.manifest.memory.page_count())
                } else {
                    p.manifest.memory.page_count()
                };
                if !p.manifest.postcopy {
                    return Err(self.fail(DestinationError::BadSwitch(
                        "the manifest did not announce post-copy",
                    )));
                }
                // Disk blocks may be owed only when the admitted plan says.
                if m.storage != p.manifest.plan.storage_postcopy {
                    return Err(self.fail(DestinationError::BadSwitch(
                        "the switch's storage post-copy differs from the plan",
                    )));
                }
                if m.batches.len() != usize::from(p.manifest.data_streams) {
                    return Err(self.fail(DestinationError::StreamCount(m.batches.len())));
                }
                if m.owed.len() as u64 != count.div_ceil(64) {
                    return Err(self.fail(DestinationError::BadSwitch(
                        "the owed bitmap does not fit the memory (and disks)",
                    )));
                }
                self.check_counts(&m.batches)?;
                self.phase = Phase::SwitchDraining(m);
                self.try_switch(now)
            }
            (Phase::Receiving | Phase::PostCopy, Message::Finish(f)) => {
                let streams = self.applied.len();
                if f.batches.len() != streams {
                    return Err(self.fail(DestinationError::StreamCount(f.batches.len())));
                }
                self.check_counts(&f.batches)?;
                self.phase = Phase::Draining(f);
                self.pause.finish = Some(now);
                self.try_verify(now)
            }
            (
                Phase::AwaitHandover {
                    device_state,
                    device_digest,
                    deadline,
                },
                Message::Handover(h),
            ) => {
                let state = self.root.map(|r| (r, device_digest));
                let checked = self
                    .check(&h.receipt, ReceiptKind::Sent, state)
                    // Signed before the start, so a started VM always has one.
                    .and_then(|()| self.sign(now, ReceiptKind::Started, state));
                if self.switched {
                    if let Err(e) = checked {
                        // The VM already runs here; a bad Sent receipt
                        // leaves the outcome in doubt, the VM kept.
                        self.in_doubt(format!("the source's Sent receipt: {e}"));
                        return Err(e);
                    }
                }
                match checked {
                    Ok(started) => self.started_receipt = Some(started),
                    Err(e) => {
                        self.phase = Phase::AwaitHandover {
                            device_state,
                            device_digest,
                            deadline,
                        };
                        return Err(self.fail(e));
                    }
                }
                self.handover_at = Some(now);
                self.handed_key = h.reuse.map(|r| *r);
                self.phase = Phase::Starting;
                if self.switched {
                    self.actions.push_back(DestinationAction::TrustVm);
                } else {
                    self.actions
                        .push_back(DestinationAction::StartVm { device_state });
                }
                Ok(())
            }
            (Phase::Done, _) => Ok(()),
            (Phase::Starting, _) => {
                // Handover received: the VM is ours; nothing the source says
                // now can make us drop it.
                self.phase = Phase::Starting;
                Ok(())
            }
            (phase, Message::Abort(a)) => {
                self.phase = phase;
                let bad_memory = a.reason == Reason::RootMismatch;
                self.give_up(format!("source aborted: {}", a.reason), bad_memory);
                Ok(())
            }
            (phase, msg) => {
                let e = DestinationError::Unexpected {
                    phase: phase.name(),
                    message: msg.kind(),
                };
                self.phase = phase;
                Err(self.fail(e))
            }
        }
    }
}
