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

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::digest::{device_state_digest, zero_leaf, Digest, MerkleTree};
use crate::message::{
    Abort, Accept, Capabilities, FaultFigures, Fetch, Finish, Manifest, Message, PostcopyRunning,
    PostcopySwitch, Propose, Ready, Reason, Reject, RoundApplied, RoundEnd, Started, VersionRange,
    MAX_DATA_STREAMS, MAX_FETCH,
};
use crate::names::{MigrationId, VmName};
use crate::page::{BatchError, PageBitmap, PageIndex};
use crate::receipt::ReceiptKind;
use crate::DecodeError;

/// Limits and timeouts of the destination.
#[derive(Debug, Clone)]
pub struct DestinationConfig {
    /// Largest guest memory accepted.
    pub max_memory_bytes: u64,
    /// Most disk bytes (all disks of the VM together) accepted.
    pub max_disk_bytes: u64,
    /// Features offered.
    pub capabilities: Capabilities,
    /// How long to wait for Handover after Ready.
    pub handover_timeout: Duration,
    /// The connected source (its `Sent` receipt must be its own).
    pub peer: crate::names::SpiffeId,
    /// Signs our receipts and checks the source's.
    pub notary: crate::receipt::Notary,
    /// After a post-copy switch, how long to wait for the source to come
    /// back on a new connection when the link breaks (zero: no recovery).
    pub recovery: Duration,
}

/// What the driver must do.
#[derive(Debug)]
#[must_use]
///
/// Not `#[non_exhaustive]`: the drivers in this workspace match it
/// exhaustively, so a new variant breaks their build instead of being
/// dropped at run time.
pub enum DestinationAction {
    /// Send on the control stream.
    Send(Message),
    /// Check the ticket against the connected source, then reserve a
    /// zeroed staging image for the VM, then call
    /// [`Destination::handle_staging_ready`] (or `_failed`).
    PrepareStaging {
        /// VM.
        vm: VmName,
        /// Its manifest.
        manifest: Manifest,
        /// The migration id the source proposed.
        migration: MigrationId,
        /// The operator's ticket, as proposed.
        ticket: crate::ticket::SignedTicket,
        /// The VM's attributes, as proposed (bounds checked), for the
        /// policy.
        attributes: crate::vm::VmAttributes,
    },
    /// Start the VM from staging with this device state, then call
    /// [`Destination::handle_started`].
    StartVm {
        /// Device state.
        device_state: Vec<u8>,
    },
    /// Drop and wipe the staging image (after a post-copy switch: stop
    /// the VM that runs from it, too).
    DiscardStaging,
    /// Post-copy: make the `owed` pages of staging missing, start the VM
    /// from it on demand paging with this device state, then call
    /// [`Destination::handle_postcopy_started`] (or
    /// [`Destination::handle_start_failed`]). From now on a batch fills
    /// only pages still missing, and reports a leaf only for the pages it
    /// installed: the digest of the bytes installed.
    StartPostcopy {
        /// Device state.
        device_state: Vec<u8>,
        /// Pages whose current version is still to come: over the
        /// memory's pages, or (storage post-copy) over every leaf, disk
        /// blocks after the memory's pages; an owed disk block is fetched
        /// when the guest writes it.
        owed: PageBitmap,
    },
    /// Post-copy: the VM that runs since the switch is verified and handed
    /// over; record it as ours, then call [`Destination::handle_started`].
    TrustVm,
    /// Post-copy recovery: the link broke after the switch. Drop the
    /// connection and its streams (report batches its decoders still apply
    /// with [`Destination::handle_stale_batch_applied`]), keep the VM, and
    /// pass the first message of a new connection that carries a Resume
    /// for this migration to [`Destination::handle_resume`] until
    /// [`Destination::poll_timeout`].
    AwaitResume,
}

/// How a destination migration ended.
#[derive(Debug, Clone, PartialEq, Eq)]
///
/// Not `#[non_exhaustive]`: the drivers in this workspace match it
/// exhaustively, so a new variant breaks their build instead of being
/// dropped at run time.
pub enum DestinationEvent {
    /// The VM runs here.
    Started {
        /// The root it was verified against.
        memory_root: Digest,
        /// Our receipts and the source's `Sent`, all verified.
        receipts: Vec<crate::receipt::SignedReceipt>,
    },
    /// Nothing is left here.
    Failed(String),
    /// After a post-copy switch, the migration could not finish: the VM
    /// runs (or waits for pages) here and is kept; the source keeps its
    /// paused copy. Someone must decide.
    InDoubt(String),
}

/// Most times one migration resumes on a new link: a fault that breaks
/// every link (a local one taken for the link's) ends in doubt, not in an
/// endless loop.
pub const MAX_RECOVERIES: u32 = 8;

/// Why a Resume was refused (the migration itself goes on waiting).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("resume refused: {0}")]
pub struct ResumeRefused(pub &'static str);

/// A message or report the destination cannot accept. The machine has
/// already failed safely when this is returned.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DestinationError {
    /// Staging failed here, not the source's fault (a disk write failed,
    /// say): the source is told `Internal` and keeps the VM.
    #[error("staging failed here: {0}")]
    Staging(String),
    /// (phase, message) pair with no transition.
    #[error("unexpected {message} while {phase}")]
    Unexpected {
        /// Phase.
        phase: &'static str,
        /// What arrived.
        message: &'static str,
    },
    /// A data stream index outside the manifest, or opened twice.
    #[error("data stream {0} is not expected")]
    BadStream(u16),
    /// A batch reported out of sequence (a driver bug or a replay).
    #[error("stream {stream}: batch {got} applied, expected {expected}")]
    BatchSequence {
        /// Stream.
        stream: u16,
        /// Expected.
        expected: u64,
        /// Got.
        got: u64,
    },
    /// The source's Finish disagrees with what arrived.
    #[error("Finish announces {announced} batches on stream {stream}, {applied} arrived")]
    BatchCount {
        /// Stream.
        stream: u16,
        /// Announced.
        announced: u64,
        /// Applied.
        applied: u64,
    },
    /// Finish lists the wrong number of streams.
    #[error("Finish lists {0} streams")]
    StreamCount(usize),
    /// A leaf past the end of memory.
    #[error("page {0} past the end of memory")]
    PageOutOfRange(u64),
    /// A batch that did not decode.
    #[error("bad page batch: {0}")]
    Batch(#[from] BatchError),
    /// The post-copy switch does not fit the manifest.
    #[error("bad post-copy switch: {0}")]
    BadSwitch(&'static str),
    /// A frame or message that did not decode.
    #[error("undecodable message: {0}")]
    Decode(#[from] DecodeError),
    /// A receipt could not be signed, or the source's is invalid.
    #[error("receipt: {0}")]
    Receipt(crate::receipt::ReceiptError),
    /// A page the source sent as retained that this host cannot open: it
    /// holds no such image, or the page does not authenticate.
    #[error("retained page: {0}")]
    Retained(#[from] crate::reuse::ReuseError),
    /// The staging image does not hash to the source's root.
    #[error("memory root mismatch: staging {staging}, source {source_root}")]
    RootMismatch {
        /// Recomputed over staging.
        staging: Digest,
        /// Announced.
        source_root: Digest,
    },
}

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
    receipts: Vec<crate::receipt::SignedReceipt>,
    started_receipt: Option<crate::receipt::SignedReceipt>,
    /// The VM runs here since a post-copy switch.
    switched: bool,
    faults: Option<FaultFigures>,
    /// The key the source handed over with the VM (it retains the image).
    handed_key: Option<crate::reuse::ReuseOffer>,
    /// After the switch: owed pages not installed yet.
    missing: Option<PageBitmap>,
    /// After the switch: pages the VM asked for (asked again on resume
    /// while still missing).
    asked: std::collections::BTreeSet<u64>,
    /// Times the migration resumed on a new connection.
    recoveries: u32,
    /// How many receipts were kept before Ready was signed.
    ready_at: Option<usize>,
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
            receipts: Vec::new(),
            started_receipt: None,
            switched: false,
            faults: None,
            handed_key: None,
            missing: None,
            asked: std::collections::BTreeSet::new(),
            recoveries: 0,
            ready_at: None,
        }
    }

    /// Times the migration resumed on a new connection after its link
    /// broke.
    pub fn recoveries(&self) -> u32 {
        self.recoveries
    }

    /// Whether the machine waits for the source to reconnect.
    pub fn is_recovering(&self) -> bool {
        matches!(self.phase, Phase::Recovering { .. })
    }

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
        let pages = self.proposal.as_ref()?.manifest.memory.page_count() as usize;
        (0..tree.len().min(pages)).map(|i| tree.leaf(i)).collect()
    }

    /// Whether the VM runs here since a post-copy switch.
    pub fn is_switched(&self) -> bool {
        self.switched
    }

    /// Post-copy: the VM waits for `pages`; ask the source for them.
    /// Ignored outside the post-copy phase (they are all on their way).
    pub fn request_pages(&mut self, pages: &[PageIndex]) {
        let recovering = matches!(self.phase, Phase::Recovering { .. });
        if !matches!(self.phase, Phase::PostCopy) && !recovering {
            return;
        }
        for p in pages {
            if self.missing.as_ref().is_some_and(|m| m.contains(*p)) {
                self.asked.insert(p.0);
            }
        }
        if recovering {
            // Asked again once the source is back.
            return;
        }
        for chunk in pages.chunks(MAX_FETCH) {
            self.actions
                .push_back(DestinationAction::Send(Message::Fetch(Fetch {
                    pages: chunk.to_vec(),
                })));
        }
    }

    /// Post-copy figures to report in Ready.
    pub fn set_fault_figures(&mut self, f: FaultFigures) {
        self.faults = Some(f);
    }

    /// Post-copy: the VM runs here on demand paging.
    pub fn handle_postcopy_started(&mut self, now: Instant) {
        if let Phase::PostcopyStarting { since } = self.phase {
            let ms = now.saturating_duration_since(since).as_millis();
            self.actions
                .push_back(DestinationAction::Send(Message::PostcopyRunning(
                    PostcopyRunning {
                        start_ms: u32::try_from(ms).unwrap_or(u32::MAX),
                    },
                )));
            self.phase = Phase::PostCopy;
        }
    }

    fn data_streams(&self) -> usize {
        self.proposal
            .as_ref()
            .map_or(0, |p| usize::from(p.manifest.data_streams))
    }

    /// No stream has more batches applied than `announced` says it sent.
    fn check_counts(&mut self, announced: &[u64]) -> Result<(), DestinationError> {
        let over = announced
            .iter()
            .zip(&self.applied)
            .enumerate()
            .find(|(_, (a, b))| b > a);
        match over {
            Some((s, (&announced, &applied))) => Err(self.fail(DestinationError::BatchCount {
                stream: s as u16,
                announced,
                applied,
            })),
            None => Ok(()),
        }
    }

    /// Confirms the ended round once every batch it announced is applied.
    fn try_confirm_round(&mut self) {
        let done = self.round_end.as_ref().is_some_and(|r| {
            r.batches
                .iter()
                .zip(&self.applied)
                .all(|(sent, applied)| applied >= sent)
        });
        // Taken only once done: a tuple would take it at every call.
        if let Some(r) = done.then(|| self.round_end.take()).flatten() {
            self.actions
                .push_back(DestinationAction::Send(Message::RoundApplied(
                    RoundApplied { round: r.round },
                )));
        }
    }

    /// Starts the VM once every batch sent before the switch is applied.
    fn try_switch(&mut self, now: Instant) -> Result<(), DestinationError> {
        let Phase::SwitchDraining(m) = &self.phase else {
            return Ok(());
        };
        let streams = self.data_streams();
        if self.applied.get(..streams) != Some(&m.batches[..]) {
            return Ok(());
        }
        let Phase::SwitchDraining(m) = std::mem::replace(&mut self.phase, Phase::Done) else {
            return Ok(());
        };
        let count = self.proposal.as_ref().map_or(0, |p| {
            if m.storage {
                p.manifest
                    .leaf_count()
                    .unwrap_or(p.manifest.memory.page_count())
            } else {
                p.manifest.memory.page_count()
            }
        });
        self.switched = true;
        let owed = PageBitmap::from_words(m.owed, count);
        self.missing = Some(owed.clone());
        self.actions.push_back(DestinationAction::StartPostcopy {
            device_state: m.device_state,
            owed,
        });
        self.phase = Phase::PostcopyStarting { since: now };
        Ok(())
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
            _ => None,
        }
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

    /// A message from the source's control stream.
    pub fn handle_message(&mut self, now: Instant, msg: Message) -> Result<(), DestinationError> {
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

    fn propose(&mut self, p: Propose) {
        let refuse = |me: &mut Self, reason: Reason| {
            me.actions
                .push_back(DestinationAction::Send(Message::Reject(Reject {
                    reason: reason.clone(),
                })));
            me.events
                .push_back(DestinationEvent::Failed(format!("refused: {reason}")));
            me.phase = Phase::Done;
        };
        let Some(version) = VersionRange::OURS.negotiate(p.versions) else {
            return refuse(self, Reason::UnsupportedVersion);
        };
        let _ = version;
        if p.manifest.qemu.is_some() {
            // A stream migration is driven elsewhere (see `crate::stream`);
            // its manifest never reaches a page-batch destination.
            return refuse(
                self,
                Reason::Unacceptable("a QEMU stream migration to a page-batch destination".into()),
            );
        }
        let streams = p.manifest.data_streams;
        if streams == 0 || streams > MAX_DATA_STREAMS {
            return refuse(
                self,
                Reason::Unacceptable(format!("{streams} data streams (1..={MAX_DATA_STREAMS})")),
            );
        }
        if p.manifest.memory.bytes() > self.cfg.max_memory_bytes {
            return refuse(
                self,
                Reason::Unacceptable(format!(
                    "{} bytes of memory exceeds this agent's limit of {}",
                    p.manifest.memory.bytes(),
                    self.cfg.max_memory_bytes
                )),
            );
        }
        if let Err(e) = p.attributes.validate() {
            return refuse(self, Reason::Unacceptable(e.to_string()));
        }
        if let Err(e) = p.manifest.leaf_count() {
            return refuse(self, Reason::Unacceptable(e.to_string()));
        }
        let disk_bytes: u64 = p.manifest.disks.iter().map(|d| d.bytes).sum();
        if disk_bytes > self.cfg.max_disk_bytes {
            return refuse(
                self,
                Reason::Unacceptable(format!(
                    "{disk_bytes} bytes of disks exceeds this agent's limit of {}",
                    self.cfg.max_disk_bytes
                )),
            );
        }
        if p.manifest.start_paused && p.manifest.postcopy {
            return refuse(
                self,
                Reason::Unacceptable("a VM demand-paged in cannot start paused".into()),
            );
        }
        // After a post-copy switch, one more: the fault stream.
        let all = usize::from(streams) + usize::from(p.manifest.postcopy);
        self.applied = vec![0; all];
        self.opened = vec![false; all];
        self.actions.push_back(DestinationAction::PrepareStaging {
            vm: p.vm.clone(),
            manifest: p.manifest.clone(),
            migration: p.migration,
            ticket: p.ticket.clone(),
            attributes: p.attributes.clone(),
        });
        self.proposal = Some(p);
        self.phase = Phase::Preparing;
    }

    /// Staging is reserved and zeroed: accept, with a signed `Accepted`
    /// receipt.
    pub fn handle_staging_ready(&mut self, now: Instant) {
        self.handle_staging_ready_reusing(now, false);
    }

    /// [`Destination::handle_staging_ready`] for a proposal that offers a
    /// retained image ([`crate::message::Manifest::reuse`]): `held` says
    /// this host holds that image, for that VM and geometry, and opens its
    /// pages with the offered key. Only then is
    /// [`Capabilities::REUSE`] accepted (and the driver must then accept
    /// retained pages on its receivers,
    /// [`crate::page::StreamReceiver::accept_retained`]).
    pub fn handle_staging_ready_reusing(&mut self, now: Instant, held: bool) {
        self.handle_staging_ready_holding(now, held, Vec::new());
    }

    /// [`Destination::handle_staging_ready_reusing`], and `bases`: for each
    /// of the manifest's disks, the leaves of the base image it was staged
    /// as a copy of, when this host holds that base (same name, root and
    /// size; [`crate::disk`]), else `None`. The tree starts from those
    /// leaves, so a block the source leaves out must equal the base's or
    /// the root check fails; the driver must accept retained blocks and
    /// take a retained block's leaf from what it staged. Leaves of the
    /// wrong count are not held.
    pub fn handle_staging_ready_holding(
        &mut self,
        now: Instant,
        held: bool,
        bases: Vec<Option<Vec<Digest>>>,
    ) {
        let Phase::Preparing = self.phase else {
            return;
        };
        let Some(p) = &self.proposal else {
            return;
        };
        let page = p.manifest.memory.page_size().bytes();
        // Memory pages, then disk blocks (checked at Propose).
        let leaves = p
            .manifest
            .leaf_count()
            .unwrap_or(p.manifest.memory.page_count());
        let mut tree = MerkleTree::filled(leaves as usize, zero_leaf(page));
        let version = VersionRange::OURS
            .negotiate(p.versions)
            .unwrap_or(crate::message::PROTOCOL_VERSION);
        // Only for disks that name a base, and nothing when none is held;
        // a held disk's leaves start as its base's.
        let ranges = crate::disk::leaf_ranges(p.manifest.memory, &p.manifest.disks);
        let mut bases: Vec<bool> = p
            .manifest
            .disks
            .iter()
            .zip(ranges)
            .zip(bases.into_iter().chain(std::iter::repeat(None)))
            .map(|((d, r), leaves)| match leaves {
                Some(l) if d.base.is_some() && l.len() as u64 == r.end - r.start => {
                    for (i, leaf) in l.into_iter().enumerate() {
                        tree.set_leaf(r.start as usize + i, leaf);
                    }
                    true
                }
                _ => false,
            })
            .collect();
        tree.fold_if_due();
        self.tree = Some(tree);
        if !bases.contains(&true) {
            bases.clear();
        }
        let mut capabilities = self.cfg.capabilities.intersect(p.capabilities);
        if !(held && p.manifest.reuse.is_some()) {
            capabilities = Capabilities(capabilities.0 & !Capabilities::REUSE.0);
        }
        let receipt = match self.sign(now, ReceiptKind::Accepted, None) {
            Ok(r) => r,
            Err(e) => {
                self.handle_staging_failed(Reason::Internal(e.to_string()));
                self.actions.push_back(DestinationAction::DiscardStaging);
                return;
            }
        };
        self.actions
            .push_back(DestinationAction::Send(Message::Accept(Accept {
                version,
                capabilities,
                receipt,
                bases,
            })));
        self.phase = Phase::Receiving;
    }

    /// Staging could not be reserved.
    pub fn handle_staging_failed(&mut self, reason: Reason) {
        if let Phase::Preparing = self.phase {
            self.actions
                .push_back(DestinationAction::Send(Message::Reject(Reject {
                    reason: reason.clone(),
                })));
            self.events
                .push_back(DestinationEvent::Failed(format!("refused: {reason}")));
            self.phase = Phase::Done;
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
    fn set_leaves(&mut self, leaves: &[(PageIndex, Digest)]) -> Result<(), u64> {
        if let Some(tree) = self.tree.as_mut() {
            for &(p, d) in leaves {
                if !tree.set_leaf(p.0 as usize, d) {
                    return Err(p.0);
                }
            }
            tree.fold_if_due();
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

    /// Post-copy recovery: a batch of a broken link, applied after the
    /// link was given up. Its pages are installed, so their leaves count;
    /// its place in the old stream's sequence no longer matters.
    pub fn handle_stale_batch_applied(
        &mut self,
        leaves: &[(PageIndex, Digest)],
    ) -> Result<(), DestinationError> {
        if !self.switched || self.tree.is_none() {
            return Ok(());
        }
        if let Err(p) = self.set_leaves(leaves) {
            return Err(self.fail(DestinationError::PageOutOfRange(p)));
        }
        Ok(())
    }

    /// Whether a link lost now would be recovered from (rather than end
    /// the migration).
    fn recoverable(&self) -> bool {
        self.switched
            && !self.cfg.recovery.is_zero()
            && self.recoveries < MAX_RECOVERIES
            && matches!(
                self.phase,
                Phase::PostCopy | Phase::Draining(_) | Phase::AwaitHandover { .. }
            )
    }

    /// Post-copy recovery: whether a Resume from `peer` would be accepted:
    /// from the agent the migration came from, for this migration and
    /// ticket, while recovering or in a phase a broken link is recovered
    /// from. (The source may see the break, and come back, before this
    /// side noticed it: the driver then gives the old link up first, with
    /// [`Destination::handle_link_lost`], and resumes.)
    pub fn resume_acceptable(
        &self,
        peer: &crate::names::SpiffeId,
        r: &crate::message::Resume,
    ) -> Result<(), ResumeRefused> {
        if !matches!(self.phase, Phase::Recovering { .. }) && !self.recoverable() {
            return Err(ResumeRefused("no migration waits to be resumed"));
        }
        if *peer != self.cfg.peer {
            return Err(ResumeRefused("the migration came from another agent"));
        }
        if Some(r.migration) != self.migration() || r.ticket != self.ticket_digest() {
            return Err(ResumeRefused("not the migration or ticket waiting here"));
        }
        Ok(())
    }

    /// Post-copy recovery: the first message of a new connection from
    /// `peer` asks to resume. Accepted only while recovering (see
    /// [`Destination::resume_acceptable`]); a refusal changes nothing here
    /// (the migration waits for its own source) and the driver answers it
    /// with an Abort on that connection only. The driver must have
    /// reported every batch of the broken link its decoders applied
    /// ([`Destination::handle_stale_batch_applied`]) first: the missing
    /// set sent back is read now.
    pub fn handle_resume(
        &mut self,
        peer: &crate::names::SpiffeId,
        r: &crate::message::Resume,
    ) -> Result<(), ResumeRefused> {
        self.resume_acceptable(peer, r)?;
        let Phase::Recovering { .. } = self.phase else {
            return Err(ResumeRefused("the broken link was not given up first"));
        };
        self.recoveries += 1;
        // The new streams count from zero; nothing is expected on them yet.
        self.applied.iter_mut().for_each(|a| *a = 0);
        self.opened.iter_mut().for_each(|o| *o = false);
        // A Ready signed before the link broke is void: Finish comes again.
        if let Some(n) = self.ready_at.take() {
            self.receipts.truncate(n);
        }
        self.root = None;
        let missing = self.missing.clone().unwrap_or_else(|| PageBitmap::empty(0));
        self.actions
            .push_back(DestinationAction::Send(Message::Resumed(
                crate::message::Resumed {
                    missing: missing.words().to_vec(),
                },
            )));
        // (A VM still being started when the link broke reports nothing
        // more: Resumed tells the source it runs.)
        self.phase = Phase::PostCopy;
        // What the VM waits for, first.
        let asked: Vec<PageIndex> = self.asked.iter().map(|&p| PageIndex(p)).collect();
        for chunk in asked.chunks(MAX_FETCH) {
            self.actions
                .push_back(DestinationAction::Send(Message::Fetch(Fetch {
                    pages: chunk.to_vec(),
                })));
        }
        Ok(())
    }

    fn try_verify(&mut self, now: Instant) -> Result<(), DestinationError> {
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
        self.root = Some(staging);
        let device_digest = device_state_digest(&f.device_state);
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

    /// The VM runs.
    pub fn handle_started(&mut self, now: Instant) {
        self.handle_started_synced(now, Duration::ZERO);
    }

    /// [`Destination::handle_started`] for a VM that ran `synced` before
    /// its disks were on stable storage (the driver starts it first and
    /// says Started only once they are: the source discards its copy on
    /// Started).
    pub fn handle_started_synced(&mut self, now: Instant, synced: Duration) {
        if let Phase::Starting = self.phase {
            let ms = self
                .handover_at
                .map(|h| now.saturating_duration_since(h).as_millis())
                .unwrap_or(0);
            let Some(receipt) = self.started_receipt.take() else {
                // Unreachable: Starting is entered only with a receipt.
                return;
            };
            self.actions
                .push_back(DestinationAction::Send(Message::Started(Started {
                    start_ms: u32::try_from(ms).unwrap_or(u32::MAX),
                    synced_ms: u32::try_from(synced.as_millis()).unwrap_or(u32::MAX),
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

    /// A data stream carried a batch that did not decode, or a stream
    /// carried bytes that are not a message: the source is faulty or
    /// hostile.
    pub fn handle_bad_input(&mut self, e: DestinationError) -> DestinationError {
        self.fail(e)
    }

    /// A deadline from [`Destination::poll_timeout`] passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Phase::Recovering { deadline } = self.phase {
            if now >= deadline {
                self.in_doubt(format!(
                    "the link broke after the post-copy switch and the source did not come back \
                     within {} s",
                    self.cfg.recovery.as_secs()
                ));
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
        if self.recoverable() {
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

    fn ticket_digest(&self) -> Digest {
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
    fn sign(
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
    fn check(
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

    fn fail(&mut self, e: DestinationError) -> DestinationError {
        if matches!(self.phase, Phase::Starting) {
            // Handover received: the VM is ours, a late bad message changes
            // nothing.
            return e;
        }
        let reason = match e {
            DestinationError::RootMismatch { .. } => Reason::RootMismatch,
            DestinationError::Staging(ref why) => Reason::Internal(why.clone()),
            _ => Reason::ProtocolViolation(e.to_string()),
        };
        let mismatch = reason == Reason::RootMismatch;
        self.actions
            .push_back(DestinationAction::Send(Message::Abort(Abort { reason })));
        if self.phase.has_staging() {
            self.give_up(e.to_string(), mismatch);
        } else {
            self.events
                .push_back(DestinationEvent::Failed(e.to_string()));
            self.phase = Phase::Done;
        }
        e
    }

    /// Ends without the VM becoming ours. Before a post-copy switch the
    /// staging copy is discarded. After it the VM runs here and is the only
    /// running copy, so it is kept, in doubt — unless it ran on memory that
    /// is not the source's (`bad_memory`: a root mismatch), then it stops.
    fn give_up(&mut self, detail: String, bad_memory: bool) {
        if self.switched && !bad_memory {
            self.in_doubt(detail);
        } else {
            self.discard(detail);
        }
    }

    /// After the switch: keep the VM, report the outcome in doubt.
    fn in_doubt(&mut self, detail: String) {
        self.tree = None;
        self.events.push_back(DestinationEvent::InDoubt(detail));
        self.phase = Phase::Done;
    }

    fn discard(&mut self, detail: String) {
        self.tree = None;
        self.actions.push_back(DestinationAction::DiscardStaging);
        self.events.push_back(DestinationEvent::Failed(detail));
        self.phase = Phase::Done;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::InsecureCrypto;
    use crate::model::{MigrationMode, MigrationPlan};
    use crate::page::MemoryGeometry;

    /// A hybrid migration of 16 pages and one 16-block disk, admitted and
    /// receiving.
    fn receiving(plan: &MigrationPlan, now: Instant) -> Destination {
        let mut d = Destination::new(DestinationConfig {
            max_memory_bytes: 1 << 30,
            max_disk_bytes: 1 << 30,
            capabilities: Capabilities::OURS,
            handover_timeout: Duration::from_secs(1),
            peer: "spiffe://t/agent/a".parse().unwrap(),
            notary: InsecureCrypto::notary("spiffe://t/agent/b", now),
            recovery: Duration::ZERO,
        });
        let propose = Message::Propose(Propose {
            versions: VersionRange::OURS,
            capabilities: Capabilities::OURS,
            migration: MigrationId([1; 16]),
            vm: "vm".parse().unwrap(),
            attributes: Default::default(),
            manifest: Manifest {
                memory: MemoryGeometry::from_bytes(16 * 4096).unwrap(),
                data_streams: plan.streams,
                qemu: None,
                postcopy: true,
                reuse: None,
                disks: vec![crate::disk::DiskGeometry {
                    name: "d".parse().unwrap(),
                    bytes: 16 * 4096,
                    base: None,
                }],
                start_paused: false,
                plan: plan.clone(),
            },
            ticket: crate::ticket::SignedTicket {
                body: Vec::new(),
                signature: Vec::new(),
                chain: Vec::new(),
            },
        });
        d.handle_message(now, propose).unwrap();
        while let Some(a) = d.poll_action() {
            if let DestinationAction::PrepareStaging { .. } = a {
                d.handle_staging_ready(now);
            }
        }
        d
    }

    fn switch(streams: u16, storage: bool) -> Message {
        // 16 pages, or 32 leaves with the disk: one bitmap word either way.
        Message::PostcopySwitch(PostcopySwitch {
            batches: vec![0; usize::from(streams)],
            device_state: Vec::new(),
            owed: vec![0],
            storage,
        })
    }

    #[test]
    fn a_switch_must_carry_the_admitted_plan_s_storage_flag() {
        let now = Instant::now();
        let plan = MigrationPlan {
            mode: MigrationMode::Hybrid,
            copy_storage: true,
            ..MigrationPlan::default()
        };
        // Storage post-copy the plan did not grant.
        let mut d = receiving(&plan, now);
        let err = d
            .handle_message(now, switch(plan.streams, true))
            .unwrap_err();
        assert!(
            matches!(err, DestinationError::BadSwitch(m) if m.contains("storage")),
            "{err}"
        );
        // And the plan's storage post-copy withheld from the switch.
        let plan = MigrationPlan {
            storage_postcopy: true,
            ..plan
        };
        let mut d = receiving(&plan, now);
        let err = d
            .handle_message(now, switch(plan.streams, false))
            .unwrap_err();
        assert!(
            matches!(err, DestinationError::BadSwitch(m) if m.contains("storage")),
            "{err}"
        );
        // The switch the plan grants is taken.
        let mut d = receiving(&plan, now);
        d.handle_message(now, switch(plan.streams, true)).unwrap();
    }
}
