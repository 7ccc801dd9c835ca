//! The end of the copy: the root over staging checked against `Finish`'s
//! (then `Ready`), `Handover` and the start of the VM (then `Started`), and
//! the receipts signed and checked on the way.

use std::time::{Duration, Instant};

use crate::digest::{device_state_digest, Digest};
use crate::message::{Abort, DestinationPause, Message, Ready, Reason, Started};
use crate::names::MigrationId;
use crate::receipt::ReceiptKind;
use crate::units::micros32;

use super::{Destination, DestinationAction, DestinationError, DestinationEvent, Phase};

/// What the driver measured while it started the VM after `Handover`
/// (zero: not measured).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartTimes {
    /// Recording the handover durably, before the VM may run here.
    pub record: Duration,
    /// Starting the VM from staging with its device state.
    pub start: Duration,
    /// From the VM running to Started: its disks put on stable storage
    /// and its start recorded, which the guest did not wait for (not
    /// downtime).
    pub synced: Duration,
}

/// When the parts of the destination's share of a pre-copy pause began
/// and ended (each from the `now` it was told).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct PauseClock {
    /// `Finish` came.
    pub(super) finish: Option<Instant>,
    /// Its last batch was applied: the root check began.
    pub(super) drained: Option<Instant>,
    /// `Ready` was written ([`Destination::note_ready_written`]).
    pub(super) ready_written: Option<Instant>,
}

impl PauseClock {
    /// Our share of the pause, with what the driver measured of the start.
    fn share(&self, t: StartTimes) -> DestinationPause {
        let us = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
            (Some(a), Some(b)) => micros32(b.saturating_duration_since(a)),
            _ => 0,
        };
        DestinationPause {
            drain_us: us(self.finish, self.drained),
            check_us: us(self.drained, self.ready_written),
            record_us: micros32(t.record),
            start_us: micros32(t.start),
        }
    }
}

impl Destination {
    /// The key of the image the source retained when it handed the VM
    /// over (from Handover): keep it with the VM, with
    /// [`Destination::verified_leaves`], to offer when the VM migrates
    /// back. Taken once.
    pub fn take_reuse_key(&mut self) -> Option<crate::reuse::ReuseOffer> {
        self.handed_key.take()
    }

    /// The leaf digest of every memory page of the image whose root was
    /// verified (after Ready): what a VM that migrates back compares its
    /// pages with, to send unchanged ones as retained (a retained image
    /// holds memory only; disk blocks follow in the tree and are left out).
    pub fn verified_leaves(&self) -> Option<Vec<Digest>> {
        self.root?;
        let tree = self.tree.as_ref()?;
        let pages =
            crate::page::saturating_usize(self.proposal.as_ref()?.manifest.memory.page_count());
        (0..tree.len().min(pages)).map(|i| tree.leaf(i)).collect()
    }

    /// Leaves set since the tree was last rehashed: what the root check at
    /// `Finish` (inside the source's pause) still has to fold in.
    pub fn unfolded_leaves(&self) -> usize {
        self.tree
            .as_ref()
            .map_or(0, crate::digest::MerkleTree::pending)
    }

    pub(super) fn try_verify(&mut self, now: Instant) -> Result<(), DestinationError> {
        let Phase::Draining(f) = &self.phase else {
            return Ok(());
        };
        if f.batches != self.applied {
            return Ok(());
        }
        let Phase::Draining(f) = std::mem::replace(&mut self.phase, Phase::Done) else {
            return Ok(());
        };
        let staging = match self.tree.as_mut() {
            Some(t) => t.root(),
            None => Digest([0; 32]),
        };
        if staging != f.memory_root {
            self.phase = Phase::Draining(f.clone());
            return Err(self.fail(DestinationError::RootMismatch {
                staging,
                source_root: f.memory_root,
            }));
        }
        let device_digest = device_state_digest(&f.device_state);
        if self.switch_state.is_some_and(|d| d != device_digest) {
            // The receipts would vouch for a state the VM never ran from.
            self.phase = Phase::Draining(f);
            return Err(self.fail(DestinationError::SwitchStateMismatch));
        }
        self.root = Some(staging);
        self.pause.drained = Some(now);
        self.ready_at = Some(self.receipts.len());
        let receipt = match self.sign(now, ReceiptKind::Ready, Some((staging, device_digest))) {
            Ok(r) => r,
            Err(e) => {
                self.phase = Phase::Draining(f);
                return Err(self.fail(e));
            }
        };
        self.actions
            .push_back(DestinationAction::Send(Message::Ready(Ready {
                memory_root: staging,
                device_digest,
                receipt,
                faults: self.faults,
            })));
        self.phase = Phase::AwaitHandover {
            deadline: now + self.cfg.handover_timeout,
            device_state: f.device_state,
            device_digest,
        };
        Ok(())
    }

    /// `Ready` was written to the source at `now`: the end of the root
    /// check's part of the pause (what it took inside the call that
    /// signed it, which a state machine without a clock cannot see).
    pub fn note_ready_written(&mut self, now: Instant) {
        if self.pause.drained.is_some() && self.pause.ready_written.is_none() {
            self.pause.ready_written = Some(now);
        }
    }

    /// The VM runs.
    pub fn handle_started(&mut self, now: Instant) {
        self.handle_started_after(now, StartTimes::default());
    }

    /// [`Destination::handle_started`], with what the driver measured of
    /// the start: the driver starts the VM first and says Started only
    /// once its disks are on stable storage and its start recorded
    /// (`times.synced`: the source discards its copy on Started).
    pub fn handle_started_after(&mut self, now: Instant, times: StartTimes) {
        if let Phase::Starting = self.phase {
            let ms = self
                .handover_at
                .map(|h| now.saturating_duration_since(h).as_millis())
                .unwrap_or(0);
            let Some(receipt) = self.started_receipt.take() else {
                // Unreachable: Starting is entered only with a receipt.
                return;
            };
            // After a post-copy switch the downtime ended there: no share.
            let pause = if self.switched {
                DestinationPause::default()
            } else {
                self.pause.share(times)
            };
            self.actions
                .push_back(DestinationAction::Send(Message::Started(Started {
                    start_ms: u32::try_from(ms).unwrap_or(u32::MAX),
                    synced_ms: u32::try_from(times.synced.as_millis()).unwrap_or(u32::MAX),
                    pause,
                    receipt,
                })));
            self.events.push_back(DestinationEvent::Started {
                memory_root: self.root.unwrap_or(Digest([0; 32])),
                receipts: self.receipts.clone(),
            });
            self.phase = Phase::Done;
        }
    }

    /// The VM runs here but its disks could not be made durable: it is
    /// not confirmed (no Started, so the source keeps its paused copy) and
    /// not given back (it ran here, so the source must not resume it): in
    /// doubt, for an operator.
    pub fn handle_start_unconfirmed(&mut self, detail: &str) {
        if let Phase::Starting = self.phase {
            self.events.push_back(DestinationEvent::InDoubt(format!(
                "started, but not confirmed: {detail}"
            )));
            self.phase = Phase::Done;
        }
    }

    /// The VM could not be started after Handover: tell the source, which
    /// takes it back.
    pub fn handle_start_failed(&mut self, detail: &str) {
        if let Phase::PostcopyStarting { .. } = self.phase {
            // The VM never ran here: the source may take it back.
            self.switched = false;
            self.phase = Phase::Starting;
        }
        if let Phase::Starting = self.phase {
            self.actions.push_back(DestinationAction::DiscardStaging);
            self.actions
                .push_back(DestinationAction::Send(Message::Abort(Abort {
                    reason: Reason::Internal(format!("start failed: {detail}")),
                })));
            self.events
                .push_back(DestinationEvent::Failed(format!("start failed: {detail}")));
            self.phase = Phase::Done;
        }
    }

    pub(super) fn ticket_digest(&self) -> Digest {
        self.proposal.as_ref().map_or(Digest([0; 32]), |p| {
            crate::receipt::ticket_digest(&p.ticket)
        })
    }

    fn migration_id(&self) -> MigrationId {
        self.proposal
            .as_ref()
            .map_or(MigrationId([0; 16]), |p| p.migration)
    }

    /// Signs one of our receipts and keeps it.
    pub(super) fn sign(
        &mut self,
        now: Instant,
        kind: ReceiptKind,
        state: crate::receipt::StateDigests,
    ) -> Result<crate::receipt::SignedReceipt, DestinationError> {
        let r = self
            .cfg
            .notary
            .sign(now, kind, self.migration_id(), self.ticket_digest(), state)
            .map_err(DestinationError::Receipt)?;
        self.receipts.push(r.clone());
        Ok(r)
    }

    /// Checks the source's receipt and keeps it.
    pub(super) fn check(
        &mut self,
        r: &crate::receipt::SignedReceipt,
        kind: ReceiptKind,
        state: crate::receipt::StateDigests,
    ) -> Result<(), DestinationError> {
        self.cfg
            .notary
            .check(
                r,
                &self.cfg.peer,
                kind,
                self.migration_id(),
                self.ticket_digest(),
                state,
            )
            .map_err(DestinationError::Receipt)?;
        self.receipts.push(r.clone());
        Ok(())
    }
}
