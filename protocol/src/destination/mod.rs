//! The destination side of a migration, as a state machine.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> AwaitPropose
//!     AwaitPropose --> Preparing: Propose acceptable / reserve staging
//!     AwaitPropose --> Done: Propose refused / send Reject
//!     Preparing --> Receiving: staging ready / send Accept
//!     Receiving --> Receiving: RoundEnd / send RoundApplied once its batches are applied
//!     Receiving --> Draining: Finish
//!     Draining --> AwaitHandover: all batches applied, roots match / send Ready
//!     Draining --> Done: roots differ / send Abort, discard staging
//!     AwaitHandover --> Starting: Handover / start the VM
//!     Starting --> Done: started (disks synced) / send Started
//!     Starting --> Done: started, disks not synced / in doubt, nothing sent
//!     Receiving --> Done: Abort, link lost, bad message / discard staging
//!     AwaitHandover --> Done: Abort, link lost, timeout / discard staging
//!     Receiving --> SwitchDraining: PostcopySwitch
//!     SwitchDraining --> PostcopyStarting: pre-switch batches applied / start on demand paging
//!     PostcopyStarting --> PostCopy: running / send PostcopyRunning
//!     PostCopy --> Draining: Finish
//!     PostCopy --> Recovering: link lost after the switch / keep the VM, await Resume
//!     Recovering --> PostCopy: Resume from the same source and ticket / send Resumed(missing)
//!     Recovering --> Done: no Resume within the recovery window / in doubt
//!     Receiving --> Recovering: link lost in pre-copy / keep staging, await Resume
//!     Recovering --> Receiving: Resume / send PrecopyResumed(confirmed, held)
//!     Recovering --> Done: pre-copy, no Resume within the window / discard staging
//! ```
//!
//! # Post-copy
//! When the manifest announces post-copy, one more data stream is
//! accepted: the fault stream (index `data_streams`). On
//! [`PostcopySwitch`] the destination applies exactly the batches sent
//! before it, then asks the driver to start the VM on demand paging
//! ([`DestinationAction::StartPostcopy`]): the owed pages are missing, and
//! a page the VM touches is asked for with [`Destination::request_pages`].
//! Every later batch fills only pages still missing, and the leaf of a
//! page is the digest of the bytes *installed* (the running VM may have
//! changed the page since); a second copy of a page already present (a
//! push that crossed a fault) is dropped and gives no leaf. `Finish` then carries the root of the image as
//! paused at the source, checked as in pre-copy before `Ready`. The VM that
//! runs here since the switch is the only running copy: a broken link or a
//! late timeout leaves it *in doubt* ([`DestinationEvent::InDoubt`]), kept;
//! only a root mismatch discards it, since it ran on memory that is not
//! the source's.
//!
//! # Post-copy recovery
//! With a recovery window ([`DestinationConfig::recovery`]), a link that
//! breaks after the switch and before `Handover` is not the end: the
//! machine waits ([`DestinationAction::AwaitResume`]) while the VM keeps
//! running on the pages it has, a vCPU that touches a missing page waiting
//! for it. The source dials again and sends [`Message::Resume`]; the
//! driver hands it over with [`Destination::handle_resume`], which accepts
//! only the peer the migration came from and the same ticket. The answer,
//! [`Message::Resumed`], lists the owed pages not installed here; batches
//! count from zero on the new streams; the pages the VM asked for and still
//! lacks are asked again. A batch of the broken link that the driver
//! applies late is reported with [`Destination::handle_stale_batch_applied`]
//! (its leaves count, its sequence does not). Then post-copy goes on, and
//! the root check at `Finish` covers every page as before. No Resume within
//! the window: in doubt, as without recovery.
//!
//! # Pre-copy recovery
//! With a recovery window, a link that breaks while pages are received
//! before `Finish` or a switch keeps the staging copy and waits for a
//! `Resume` the same way (the VM still runs at the source). The answer,
//! [`Message::PrecopyResumed`], names the last round confirmed with
//! `RoundApplied` and the pages installed since: the source sends again
//! only the rest of its round. Batches of the broken link applied late
//! count (their pages are installed); the root check at `Finish` covers
//! every page as always. No `Resume` within the window: the staging copy
//! is discarded, as when a link breaks without a window.
//!
//! Pages are written into a *staging* image, never into a running VM. The
//! driver decodes batches with [`crate::page::StreamReceiver`] (which
//! enforces order and striping), writes them to staging, hashes the staging
//! pages, and reports the leaves with [`Destination::handle_batch_applied`].
//! The VM starts only after the root over those leaves equals the source's
//! and the source has handed over; a staging image is discarded on every
//! other path.
//!
//! # Driving it
//! Feed it what happens (`handle_*`, with the current time); after every
//! call drain [`Destination::poll_action`] until `None`, then
//! [`Destination::poll_event`], then arm a timer for
//! [`Destination::poll_timeout`].
//!
//! # Parts
//! - `config`: [`DestinationConfig`], the limits and timeouts.
//! - `driver`: what the destination asks of its driver
//!   ([`DestinationAction`]) and how a migration ends
//!   ([`DestinationEvent`]).
//! - `control`: every (phase, message) pair the destination accepts from
//!   the source's control stream, and the typed refusal of the rest.
//! - `admit`: `Propose` checked, staging prepared, `Accept` or `Reject`.
//! - `receive`: data streams, batches applied, rounds confirmed.
//! - `postcopy`: the switch, pages the VM asks for.
//! - `recovery`: a broken link after the switch, `Resume`
//!   ([`ResumeRefused`], [`MAX_RECOVERIES`]).
//! - `handover`: the root check and `Ready`, `Handover`, the start of the
//!   VM, the receipts.
//! - `error`: [`DestinationError`], and how a failure ends the migration.

use std::collections::VecDeque;
use std::time::Instant;

use crate::digest::{Digest, MerkleTree};
use crate::message::{
    Abort, FaultFigures, Finish, Message, PostcopySwitch, Propose, Reason, RoundEnd,
};
use crate::names::MigrationId;
use crate::page::PageBitmap;

mod admit;
mod config;
mod control;
mod driver;
mod error;
mod handover;
mod postcopy;
mod receive;
mod recovery;

#[cfg(test)]
mod tests;

pub use config::{DestinationConfig, BOOKKEEPING_PER_LEAF};
pub use driver::{DestinationAction, DestinationEvent};
pub use error::{DestinationError, LocalFailure};
pub use handover::StartTimes;
pub use recovery::{ResumeRefused, MAX_RECOVERIES};

#[derive(Debug)]
enum Phase {
    AwaitPropose,
    Preparing,
    Receiving,
    SwitchDraining(PostcopySwitch),
    PostcopyStarting {
        since: Instant,
    },
    PostCopy,
    /// Post-copy recovery: waiting for the source to reconnect.
    Recovering {
        deadline: Instant,
    },
    Draining(Finish),
    AwaitHandover {
        deadline: Instant,
        device_state: Vec<u8>,
        device_digest: Digest,
    },
    Starting,
    Done,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::AwaitPropose => "awaiting Propose",
            Phase::Preparing => "preparing staging",
            Phase::Receiving => "receiving pages",
            Phase::SwitchDraining(_) => "draining before the post-copy switch",
            Phase::PostcopyStarting { .. } => "starting the VM on demand paging",
            Phase::PostCopy => "post-copy",
            Phase::Recovering { .. } => "waiting for the source to reconnect",
            Phase::Draining(_) => "draining the data streams",
            Phase::AwaitHandover { .. } => "awaiting Handover",
            Phase::Starting => "starting the VM",
            Phase::Done => "done",
        }
    }

    fn has_staging(&self) -> bool {
        matches!(
            self,
            Phase::Preparing
                | Phase::Receiving
                | Phase::SwitchDraining(_)
                | Phase::PostcopyStarting { .. }
                | Phase::PostCopy
                | Phase::Recovering { .. }
                | Phase::Draining(_)
                | Phase::AwaitHandover { .. }
        )
    }

    fn takes_batches(&self) -> bool {
        matches!(
            self,
            Phase::Receiving | Phase::SwitchDraining(_) | Phase::PostCopy | Phase::Draining(_)
        )
    }
}

/// The destination state machine. See the module docs.
#[derive(Debug)]
pub struct Destination {
    cfg: DestinationConfig,
    phase: Phase,
    actions: VecDeque<DestinationAction>,
    events: VecDeque<DestinationEvent>,
    proposal: Option<Propose>,
    tree: Option<MerkleTree>,
    applied: Vec<u64>,
    /// A pre-copy round the source ended, to confirm once applied.
    round_end: Option<RoundEnd>,
    opened: Vec<bool>,
    root: Option<Digest>,
    handover_at: Option<Instant>,
    /// When the parts of our share of a pre-copy pause began and ended.
    pause: handover::PauseClock,
    receipts: Vec<crate::receipt::SignedReceipt>,
    started_receipt: Option<crate::receipt::SignedReceipt>,
    /// The VM runs here since a post-copy switch.
    switched: bool,
    /// After a post-copy switch: the digest of the device state the VM
    /// started from here (`Finish` must name the same).
    switch_state: Option<Digest>,
    faults: Option<FaultFigures>,
    /// The key the source handed over with the VM (it retains the image).
    handed_key: Option<crate::reuse::ReuseOffer>,
    /// After the switch: owed pages not installed yet.
    missing: Option<PageBitmap>,
    /// After the switch: pages the VM asked for (asked again on resume
    /// while still missing).
    asked: std::collections::BTreeSet<u64>,
    /// Times the migration resumed on a new connection: before the
    /// switch, and after it (each phase up to [`MAX_RECOVERIES`], as the
    /// source counts them).
    recoveries: [u32; 2],
    /// Pre-copy: the last round confirmed with RoundApplied, and the
    /// pages installed since (what a resumed round need not send again).
    confirmed: u32,
    fresh: Option<PageBitmap>,
    /// How many receipts were kept before Ready was signed.
    ready_at: Option<usize>,
    /// When the source was last heard from (a message or a batch).
    heard: Option<Instant>,
}

impl Destination {
    /// A destination waiting for a proposal.
    pub fn new(cfg: DestinationConfig) -> Self {
        Destination {
            cfg,
            phase: Phase::AwaitPropose,
            actions: VecDeque::new(),
            events: VecDeque::new(),
            proposal: None,
            tree: None,
            applied: Vec::new(),
            round_end: None,
            opened: Vec::new(),
            root: None,
            handover_at: None,
            pause: handover::PauseClock::default(),
            receipts: Vec::new(),
            started_receipt: None,
            switched: false,
            switch_state: None,
            faults: None,
            handed_key: None,
            missing: None,
            asked: std::collections::BTreeSet::new(),
            recoveries: [0; 2],
            confirmed: 0,
            fresh: None,
            ready_at: None,
            heard: None,
        }
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<DestinationAction> {
        self.actions.pop_front()
    }

    /// The next outcome.
    pub fn poll_event(&mut self) -> Option<DestinationEvent> {
        self.events.pop_front()
    }

    /// When [`Destination::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::AwaitHandover { deadline, .. } | Phase::Recovering { deadline, .. } => {
                Some(deadline)
            }
            _ => self.silence_deadline(),
        }
    }

    /// While the source owes us something and the VM does not run here:
    /// when its silence becomes too long.
    fn silence_deadline(&self) -> Option<Instant> {
        let waiting = matches!(
            self.phase,
            Phase::Receiving | Phase::SwitchDraining(_) | Phase::Draining(_)
        );
        if !waiting || self.switched || self.cfg.silence.is_zero() {
            return None;
        }
        Some(self.heard? + self.cfg.silence)
    }

    /// The source was heard from at `now`.
    pub(super) fn heard(&mut self, now: Instant) {
        self.heard = Some(self.heard.map_or(now, |h| h.max(now)));
    }

    /// Whether the machine has finished.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// The accepted proposal.
    pub fn proposal(&self) -> Option<&Propose> {
        self.proposal.as_ref()
    }

    /// The migration id, once proposed.
    pub fn migration(&self) -> Option<MigrationId> {
        self.proposal.as_ref().map(|p| p.migration)
    }

    fn data_streams(&self) -> usize {
        self.proposal
            .as_ref()
            .map_or(0, |p| usize::from(p.manifest.data_streams))
    }

    /// A deadline from [`Destination::poll_timeout`] passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.silence_deadline().is_some_and(|d| now >= d) {
            self.actions
                .push_back(DestinationAction::Send(Message::Abort(Abort {
                    reason: Reason::Timeout,
                })));
            self.give_up(
                format!(
                    "the source sent nothing for {} s while {}",
                    self.cfg.silence.as_secs(),
                    self.phase.name()
                ),
                false,
            );
            return;
        }
        if let Phase::Recovering { deadline } = self.phase {
            if now >= deadline && self.switched {
                self.in_doubt(format!(
                    "the link broke after the post-copy switch and the source did not come back \
                     within {} s",
                    self.cfg.recovery.as_secs()
                ));
            } else if now >= deadline {
                // Pre-copy: the VM runs at the source; the copy goes.
                self.give_up(
                    format!(
                        "the link broke during pre-copy and the source did not come back within \
                         {} s",
                        self.cfg.recovery.as_secs()
                    ),
                    false,
                );
            }
            return;
        }
        if let Phase::AwaitHandover { deadline, .. } = self.phase {
            if now >= deadline {
                self.actions
                    .push_back(DestinationAction::Send(Message::Abort(Abort {
                        reason: Reason::Timeout,
                    })));
                self.give_up("no Handover from the source in time".into(), false);
            }
        }
    }

    /// The connection or a stream broke. Before Handover the staging copy
    /// is discarded (the source still runs the VM or keeps it in doubt);
    /// after it, the VM is ours and starting continues.
    pub fn handle_link_lost(&mut self, now: Instant, detail: &str) {
        self.link_lost(now, detail, true);
    }

    /// The source ended the connection on purpose (it closed it, or
    /// finished its control stream): not a broken link. Before a switch
    /// nothing will come back on a new one, so a pre-copy migration is
    /// not waited for; after it, as [`Destination::handle_link_lost`].
    pub fn handle_link_closed(&mut self, now: Instant, detail: &str) {
        self.link_lost(now, detail, self.switched);
    }

    fn link_lost(&mut self, now: Instant, detail: &str, recover: bool) {
        if recover && self.recoverable() {
            // The VM keeps what it has; a vCPU on a missing page waits.
            self.round_end = None;
            self.phase = Phase::Recovering {
                deadline: now + self.cfg.recovery,
            };
            self.actions.push_back(DestinationAction::AwaitResume);
            return;
        }
        if matches!(self.phase, Phase::Recovering { .. }) {
            return;
        }
        if self.phase.has_staging() {
            let detail = if self.switched {
                format!("link lost after the post-copy switch: {detail}")
            } else {
                format!("link lost: {detail}")
            };
            self.give_up(detail, false);
        } else if let Phase::AwaitPropose = self.phase {
            self.events
                .push_back(DestinationEvent::Failed(format!("link lost: {detail}")));
            self.phase = Phase::Done;
        }
    }
}
