//! The source side of a migration (pre-copy, post-copy or hybrid), as a
//! state machine.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Proposed: start / send Propose
//!     Proposed --> Copying: Accept / start dirty log, send round 1
//!     Proposed --> Failed: Reject, timeout, link lost
//!     Copying --> Draining: round sent / send RoundEnd(batches per stream)
//!     Draining --> Copying: RoundApplied, dirty log, downtime too high (throttle when stalled)
//!     Draining --> Failed: timeout, Abort, link lost
//!     Copying --> Pausing: expected downtime ≤ target, or round limit with force_stop
//!     Copying --> Failed: round limit, target not met / cannot converge
//!     Pausing --> FinalCopy: paused / send last dirty pages
//!     FinalCopy --> AwaitReady: sent / send Finish(root, device state)
//!     AwaitReady --> Committing: Ready with our roots / record handover
//!     Committing --> AwaitStarted: recorded / send Handover
//!     AwaitStarted --> Done: Started / discard the local copy
//!     AwaitStarted --> InDoubt: link lost, timeout
//!     Copying --> Pausing: hybrid switch point / post-copy after Accept
//!     Pausing --> Switching: paused / record the switch
//!     Pausing --> SwitchDisks: paused with disk blocks left / send them
//!     SwitchDisks --> Switching: sent / record the switch
//!     Switching --> AwaitRunning: recorded / send PostcopySwitch
//!     AwaitRunning --> PostCopy: PostcopyRunning / push the owed pages
//!     PostCopy --> PostCopy: Fetch / serve on the fault stream
//!     PostCopy --> AwaitReady: pushed and served / send Finish
//!     PostCopy --> Reconnecting: link lost after the switch / dial again
//!     Reconnecting --> AwaitResumed: reconnected / send Resume
//!     AwaitResumed --> PostCopy: Resumed(missing) / push the missing pages
//!     Reconnecting --> InDoubt: no new link within the recovery window
//!     Copying --> Failed: Abort, link lost, cancel, bad message
//!     AwaitReady --> Failed: Abort, wrong roots, timeout
//! ```
//!
//! # Convergence
//! A pre-copy round ends when the destination has *applied* it, not when
//! its last batch went to the transport: the source sends
//! [`Message::RoundEnd`] with its per-stream batch counts and waits for
//! [`Message::RoundApplied`]. Without this, the round's time counted only
//! the handing of data to QUIC (whose send window holds up to 64 MiB), so
//! the rate was overstated and the pause began with that much data still
//! in flight, all of it downtime (150–400 ms measured with a 4 GiB disk).
//! Then the source estimates the dirty rate (pages dirtied per
//! second since the last log) and the expected downtime (pages left × bytes
//! per page ÷ measured send rate). Three controls act on it:
//! - **Hot-page ordering** (`hold_hot_pages`): a page dirtied in two or more
//!   rounds' logs is *held back* for the final round instead of being sent
//!   again each round; a held page that stays clean for a round is released
//!   and sent. The summary counts the sends it deferred and the pages sent
//!   more than once.
//! - **Auto-converge** (`auto_converge`): a round whose dirty log holds at
//!   least half as many pages as the round sent is *stalled*; after two
//!   stalled rounds in a row the source asks the driver to throttle the
//!   guest ([`SourceAction::Throttle`]) in steps of [`THROTTLE_STEPS`].
//! - **An honest end**: at the round limit, unless `force_stop` is set, a
//!   migration that cannot meet its downtime target fails with
//!   [`Reason::CannotConverge`] (naming the dirty rate, the send rate and
//!   the expected downtime) and the VM keeps running here, unthrottled.
//!
//! # Post-copy and hybrid
//! With [`Switchover::Immediately`] the source pauses the VM right after
//! Accept; with [`Switchover::Hybrid`] it first runs pre-copy rounds and
//! pauses at the switch point (a time limit, else the end of the first
//! full pass, or a stall or the round limit). Paused, it durably records
//! the switch ([`SourceAction::CommitSwitch`]) — from then on it never
//! resumes the VM — and sends [`PostcopySwitch`]: the batches sent so far,
//! the device state and the *owed* pages, those whose current version the
//! destination lacks. Once the destination reports the VM running there
//! ([`Message::PostcopyRunning`], which ends the downtime), the source
//! pushes every owed page in the background and serves each [`Fetch`] at
//! once on the fault stream, with the owed pages that follow the faulting
//! one (pre-paging by locality, [`PREPAGE`]). When all are sent it sends
//! `Finish` with the root of the image as paused; the destination checks
//! it and the usual Ready/Sent/Started receipts follow. The source keeps
//! its paused copy until `Started`: after the switch a broken link or a
//! bad root is *in doubt*, never a resume here.
//!
//! With disks, the disk blocks left at the switch go while the VM is
//! paused (the `SwitchDisks` phase) and only memory is owed — unless
//! [`SourceConfig::storage_postcopy`]: then every leaf left is owed, disk
//! blocks too ([`PostcopySwitch::storage`]), pushed and fetched on demand
//! like memory pages, and the pause carries no disk data.
//!
//! # Post-copy recovery
//! With a recovery window ([`SourceConfig::recovery`]), a link that breaks
//! after the switch and before `Handover` (awaiting `PostcopyRunning`, in
//! post-copy, or awaiting `Ready`) does not end the migration: the source
//! asks the driver to dial the destination again
//! ([`SourceAction::Reconnect`]; a new mutually authenticated connection)
//! and sends [`Message::Resume`] with the migration id and the ticket's
//! digest. The destination, whose VM waits for its missing pages
//! meanwhile, answers [`Message::Resumed`] with the owed pages it has not
//! installed; the source counts batches from zero on the new streams,
//! pushes those pages again and serves faults as before, then `Finish`
//! and the receipts follow as usual. The paused copy is kept all along:
//! it is discarded only on `Started`, after the destination checked the
//! root over every page. Without a new link within the window the outcome
//! is in doubt, as without recovery.
//!
//! Every path to `Failed` emits [`SourceAction::RollBack`]: the VM keeps (or
//! resumes) running here. No path after `Handover` is sent resumes the VM:
//! without `Started` the outcome is *in doubt* and the paused copy is kept
//! until someone asks the destination.
//!
//! # Driving it
//! Call [`Source::start`], then feed it what happens (`handle_*`, with the
//! current time) and after every call drain, in this order,
//! [`Source::poll_action`] until `None`, [`Source::poll_event`] until `None`,
//! then arm a timer for [`Source::poll_timeout`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::ctl::{Outcome, Progress};
use crate::digest::{device_state_digest, zero_leaf, Digest, MerkleTree};
use crate::message::{
    Abort, Capabilities, FaultFigures, Fetch, Finish, Handover, Manifest, Message, PostcopySwitch,
    Propose, Reason, RoundEnd, VersionRange,
};
use crate::names::{MigrationId, VmName};
use crate::page::{EncodingStats, PageBitmap, PageIndex};
use crate::receipt::ReceiptKind;

/// When the source hands the VM over before all its pages are there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Switchover {
    /// Pre-copy: stop and copy, never post-copy.
    #[default]
    Never,
    /// Post-copy: switch right after Accept, with no pre-copy round.
    Immediately,
    /// Hybrid: pre-copy until the downtime target is met, else switch to
    /// post-copy `after` the first round started (without a limit: after
    /// the first full pass), or when rounds stall or reach the limit.
    Hybrid {
        /// Pre-copy time before switching.
        after: Option<Duration>,
    },
}

/// Pages after a faulting page sent with it when they are still owed.
pub const PREPAGE: u64 = 15;

/// How the source behaves.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Migration id.
    pub migration: MigrationId,
    /// VM.
    pub vm: VmName,
    /// Its attributes, for the destination's policy.
    pub attributes: crate::vm::VmAttributes,
    /// What will be sent.
    pub manifest: Manifest,
    /// The operator's ticket, forwarded to the destination.
    pub ticket: crate::ticket::SignedTicket,
    /// The destination this source expects (receipts must be its).
    pub peer: crate::names::SpiffeId,
    /// Signs our receipt and checks the destination's.
    pub notary: crate::receipt::Notary,
    /// Features offered.
    pub capabilities: Capabilities,
    /// Pause when the remaining pages are expected to take less than this.
    pub max_downtime: Duration,
    /// At most this many pre-copy rounds (see `force_stop`).
    pub max_rounds: u32,
    /// Pre-copy, post-copy or hybrid. With anything but `Never` the
    /// manifest announces post-copy and a fault stream.
    pub switchover: Switchover,
    /// Throttle the guest in steps when rounds stop shrinking.
    pub auto_converge: bool,
    /// Hold pages dirtied in several rounds back for the final round.
    pub hold_hot_pages: bool,
    /// At the round limit, stop and copy even when the downtime target
    /// cannot be met (otherwise the migration fails and the VM keeps
    /// running here).
    pub force_stop: bool,
    /// How long to wait for Accept.
    pub accept_timeout: Duration,
    /// How long to wait for Ready after Finish (covers draining the streams
    /// and the destination's verification), and for `RoundApplied` after
    /// each pre-copy round's `RoundEnd`.
    pub ready_timeout: Duration,
    /// How long to wait for Started after Handover before declaring the
    /// outcome in doubt.
    pub started_timeout: Duration,
    /// After a post-copy switch, how long a broken link may take to come
    /// back before the outcome is in doubt (zero: no recovery).
    pub recovery: Duration,
    /// Storage post-copy: at the switch, disk blocks left are owed like
    /// memory pages (fetched on demand, pushed in the background) instead
    /// of going while the VM is paused.
    pub storage_postcopy: bool,
}

/// What the driver must do.
#[derive(Debug)]
#[must_use]
#[non_exhaustive]
pub enum SourceAction {
    /// Send on the control stream.
    Send(Box<Message>),
    /// Clear and start the VM's dirty log (before round 1 reads a page).
    StartDirtyLog,
    /// Throttle the guest's CPU to `percent` (0 = unthrottled). The driver
    /// undoes any throttle on [`SourceAction::RollBack`].
    Throttle {
        /// Share of the guest's CPU time taken away, 0..=99.
        percent: u8,
    },
    /// Read and send `pages` over the data streams, then call
    /// [`Source::handle_batch_sent`] per batch and
    /// [`Source::handle_round_sent`] once. With `skip_zero` (the first
    /// round) zero pages are not sent: the destination's staging memory
    /// starts zeroed.
    SendPages {
        /// Round number.
        round: u32,
        /// Pages to send.
        pages: PageBitmap,
        /// Leave zero pages out.
        skip_zero: bool,
    },
    /// Fetch-and-clear the dirty log, then call [`Source::handle_dirty_log`].
    CollectDirtyLog,
    /// Pause the VM, collect the dirty log and the device state, then call
    /// [`Source::handle_paused`].
    PauseVm,
    /// Durably record that the VM is being handed over, then call
    /// [`Source::handle_handover_committed`].
    CommitHandover,
    /// The migration failed before handover: stop the dirty log and resume
    /// the VM if it was paused. It runs here, exactly once.
    RollBack,
    /// The destination runs the VM: discard and wipe the local copy
    /// (after sealing it as a retained image, if the driver called
    /// [`Source::retain_image`]).
    DiscardVm,
    /// The VM is paused for a post-copy switch: durably record that it is
    /// handed over (it must never resume here by itself), then call
    /// [`Source::handle_switch_committed`].
    CommitSwitch,
    /// Post-copy: read `pages` of the paused VM and send them as exactly
    /// one batch on the fault stream (index `data_streams`), then report
    /// it with [`Source::handle_batch_sent`].
    ServePages {
        /// Round number (the post-copy round).
        round: u32,
        /// Ascending, at most one batch's worth.
        pages: Vec<PageIndex>,
    },
    /// Post-copy recovery: the link broke after the switch. Drop the
    /// connection and its streams (report what the old streams had sent
    /// with [`Source::handle_batch_sent`]: only its leaves count now),
    /// dial the destination again, open the control stream and the data
    /// streams on the new connection and call
    /// [`Source::handle_reconnected`]. Keep trying until
    /// [`Source::poll_timeout`], then call [`Source::handle_timeout`].
    Reconnect,
}

/// What the driver may report.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum SourceEvent {
    /// Progress.
    Progress(Progress),
    /// The end, with figures.
    Finished(Box<SourceSummary>),
}

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

/// How pre-copy converged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Convergence {
    /// Last estimated dirty rate, pages per second.
    pub dirty_rate: u64,
    /// Highest guest throttle applied, percent.
    pub throttle: u8,
    /// Page sends of pages already sent before (the re-sent pages).
    pub resent_pages: u64,
    /// Sends deferred by holding hot pages back for the final round.
    pub held_back: u64,
}

/// How a post-copy phase went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PostcopySummary {
    /// Pages owed at the switch.
    pub owed: u64,
    /// Page sends on the fault stream (the asked pages and their pre-paged
    /// neighbours).
    pub served: u64,
    /// Fetch requests received.
    pub fetches: u64,
    /// The destination's figures, from its Ready.
    pub faults: Option<FaultFigures>,
    /// Times the link broke and the migration resumed on a new one.
    #[serde(default)]
    pub recoveries: u32,
}

/// The auto-converge throttle steps, percent of guest CPU taken away.
pub const THROTTLE_STEPS: [u8; 5] = [20, 40, 60, 80, 95];

/// Rounds in whose dirty logs a page must appear to be held back as hot.
pub const HOT_ROUNDS: u8 = 2;

/// One batch the driver wrote to a data stream.
#[derive(Debug, Clone)]
pub struct SentBatch {
    /// Stream index.
    pub stream: u16,
    /// Leaf digests of the pages as read.
    pub leaves: Vec<(PageIndex, Digest)>,
    /// By encoding.
    pub stats: EncodingStats,
    /// Frame bytes.
    pub frame_bytes: u64,
}

/// A message or event the source cannot accept in its phase, or a bad value
/// from the peer. The machine has already failed safely when this is
/// returned.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SourceError {
    /// (phase, message) pair with no transition.
    #[error("unexpected {message} while {phase}")]
    Unexpected {
        /// Phase.
        phase: &'static str,
        /// What arrived.
        message: &'static str,
    },
    /// The destination accepted a version we did not offer.
    #[error("destination chose version {0}, outside our range")]
    Downgrade(u16),
    /// The destination claims capabilities we did not offer.
    #[error("destination accepted capabilities we did not offer")]
    Capabilities,
    /// The destination's roots are not ours.
    #[error("destination holds memory root {theirs}, we sent {ours}")]
    RootMismatch {
        /// Ours.
        ours: Digest,
        /// Theirs.
        theirs: Digest,
    },
    /// The destination's device-state digest is not ours.
    #[error("destination holds a different device state")]
    DeviceStateMismatch,
    /// A batch on a stream that does not exist.
    #[error("batch reported on stream {0}, beyond the manifest")]
    NoSuchStream(u16),
    /// A leaf past the end of memory.
    #[error("leaf for page {0} past the end of memory")]
    LeafOutOfRange(u64),
    /// The destination's Resumed does not fit what was owed.
    #[error("bad Resumed: {0}")]
    BadResume(&'static str),
    /// Device state too large for the protocol.
    #[error("device state of {0} bytes exceeds the limit")]
    DeviceStateTooLarge(usize),
    /// A receipt from the destination is missing, invalid or wrong.
    #[error("destination receipt refused: {0}")]
    Receipt(crate::receipt::ReceiptError),
}

#[derive(Debug)]
enum Phase {
    Idle,
    Proposed {
        deadline: Instant,
    },
    Copying {
        round: u32,
        round_start: Instant,
        sending: bool,
    },
    /// A pre-copy round is sent: waiting for the destination to have
    /// applied it ([`Message::RoundApplied`]).
    Draining {
        round: u32,
        round_start: Instant,
        deadline: Instant,
    },
    Pausing {
        round: u32,
        postcopy: bool,
    },
    /// Paused for a post-copy switch: the disk blocks left go first (the
    /// destination applies them before the VM runs there); the memory
    /// pages left are owed.
    SwitchDisks {
        round: u32,
    },
    FinalCopy {
        round: u32,
    },
    Switching,
    AwaitRunning {
        round: u32,
        deadline: Instant,
    },
    PostCopy {
        round: u32,
        pushing: bool,
    },
    /// Post-copy recovery: dialling the destination again.
    Reconnecting {
        round: u32,
        deadline: Instant,
    },
    /// Post-copy recovery: Resume sent on the new connection.
    AwaitResumed {
        round: u32,
        deadline: Instant,
    },
    AwaitReady {
        deadline: Instant,
    },
    Committing,
    AwaitStarted {
        deadline: Instant,
    },
    Done,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Proposed { .. } => "awaiting Accept",
            Phase::Copying { .. } => "copying",
            Phase::Draining { .. } => "awaiting RoundApplied",
            Phase::Pausing { .. } => "pausing",
            Phase::FinalCopy { .. } => "sending the final round",
            Phase::SwitchDisks { .. } => "sending the disk blocks left before the switch",
            Phase::Switching => "recording the post-copy switch",
            Phase::AwaitRunning { .. } => "awaiting PostcopyRunning",
            Phase::PostCopy { .. } => "post-copy",
            Phase::Reconnecting { .. } => "reconnecting",
            Phase::AwaitResumed { .. } => "awaiting Resumed",
            Phase::AwaitReady { .. } => "awaiting Ready",
            Phase::Committing => "committing the handover",
            Phase::AwaitStarted { .. } => "awaiting Started",
            Phase::Done => "done",
        }
    }
}

/// The source state machine. See the module docs.
#[derive(Debug)]
pub struct Source {
    cfg: SourceConfig,
    phase: Phase,
    actions: VecDeque<SourceAction>,
    events: VecDeque<SourceEvent>,
    tree: MerkleTree,
    batches: Vec<u64>,
    pending: Option<PageBitmap>,
    device_state: Vec<u8>,
    started_at: Option<Instant>,
    paused_at: Option<Instant>,
    converged: bool,
    verified: bool,
    handed_over: bool,
    rounds: u32,
    pages_sent: u64,
    encodings: EncodingStats,
    payload_bytes: u64,
    round_bytes: u64,
    round_pages: u64,
    rate: u64,
    /// When the dirty log was last cleared or collected.
    last_log_at: Option<Instant>,
    /// Per page: rounds whose dirty log held it (saturating).
    dirty_rounds: Vec<u8>,
    /// Pages dirty and not yet sent in that version, held for the end.
    held: PageBitmap,
    /// Pages sent at least once.
    sent: PageBitmap,
    stalled: u8,
    convergence: Convergence,
    /// When pre-copy began (for the hybrid time limit).
    copy_started: Option<Instant>,
    /// Post-copy: the switch was sent (no resume here, ever).
    switched: bool,
    /// When the destination reported the VM running.
    resumed_at: Option<Instant>,
    /// Pages owed at the switch, and those sent since.
    owed: Option<PageBitmap>,
    pushed: PageBitmap,
    /// ServePages actions not yet reported sent.
    serving: u64,
    postcopy: PostcopySummary,
    root: Option<Digest>,
    ticket_digest: Digest,
    receipts: Vec<crate::receipt::SignedReceipt>,
    accepted: Option<Capabilities>,
    /// Per disk, whether the destination holds its base (from `Accept`).
    bases: Vec<bool>,
    /// The image this host will retain, and its key, for Handover.
    retain: Option<crate::reuse::ReuseOffer>,
    disk_blocks_sent: u64,
}

impl Source {
    /// A source that has not started.
    pub fn new(mut cfg: SourceConfig) -> Self {
        // Memory pages, then disk blocks (checked again in `start`).
        let pages = cfg
            .manifest
            .leaf_count()
            .unwrap_or(cfg.manifest.memory.page_count()) as usize;
        let page = cfg.manifest.memory.page_size().bytes();
        cfg.manifest.postcopy = cfg.switchover != Switchover::Never;
        // Reuse is offered only with an image to reuse.
        if cfg.manifest.reuse.is_none() {
            cfg.capabilities = Capabilities(cfg.capabilities.0 & !Capabilities::REUSE.0);
        }
        // The fault stream follows the data streams.
        let streams = usize::from(cfg.manifest.data_streams) + usize::from(cfg.manifest.postcopy);
        Source {
            tree: MerkleTree::filled(pages, zero_leaf(page)),
            batches: vec![0; streams],
            ticket_digest: crate::receipt::ticket_digest(&cfg.ticket),
            cfg,
            phase: Phase::Idle,
            actions: VecDeque::new(),
            events: VecDeque::new(),
            pending: None,
            device_state: Vec::new(),
            started_at: None,
            paused_at: None,
            converged: false,
            verified: false,
            handed_over: false,
            rounds: 0,
            pages_sent: 0,
            encodings: EncodingStats::default(),
            payload_bytes: 0,
            round_bytes: 0,
            round_pages: 0,
            rate: 0,
            last_log_at: None,
            dirty_rounds: Vec::new(),
            held: PageBitmap::empty(pages as u64),
            sent: PageBitmap::empty(pages as u64),
            stalled: 0,
            convergence: Convergence::default(),
            copy_started: None,
            switched: false,
            resumed_at: None,
            owed: None,
            pushed: PageBitmap::empty(pages as u64),
            serving: 0,
            postcopy: PostcopySummary::default(),
            root: None,
            receipts: Vec::new(),
            accepted: None,
            bases: Vec::new(),
            retain: None,
            disk_blocks_sent: 0,
        }
    }

    /// The driver will keep the VM's image after `Started`, sealed under
    /// `offer.key`: the key goes to the destination in Handover (and the
    /// driver must forget it once the image is sealed). Call before the
    /// handover is committed; ignored after.
    pub fn retain_image(&mut self, offer: crate::reuse::ReuseOffer) {
        if !self.handed_over {
            self.retain = Some(offer);
        }
    }

    /// The capabilities the destination accepted, once it has: what the
    /// driver may use (for example [`Capabilities::DELTA`] before pushing
    /// delta pages).
    pub fn accepted_capabilities(&self) -> Option<Capabilities> {
        self.accepted
    }

    /// Per disk of the manifest, whether the destination holds its base
    /// image (empty: none); the driver may then send, in the first round,
    /// the blocks equal to the base's as retained ([`crate::disk`]).
    pub fn accepted_bases(&self) -> &[bool] {
        &self.bases
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<SourceAction> {
        self.actions.pop_front()
    }

    /// The next thing to report.
    pub fn poll_event(&mut self) -> Option<SourceEvent> {
        self.events.pop_front()
    }

    /// When [`Source::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Proposed { deadline }
            | Phase::AwaitRunning { deadline, .. }
            | Phase::AwaitReady { deadline }
            | Phase::Draining { deadline, .. }
            | Phase::Reconnecting { deadline, .. }
            | Phase::AwaitResumed { deadline, .. }
            | Phase::AwaitStarted { deadline } => Some(deadline),
            _ => None,
        }
    }

    /// Whether the machine has finished (any outcome).
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// Whether Handover has been sent (no path back to running here, but
    /// for the destination's explicit Abort).
    pub fn is_handed_over(&self) -> bool {
        self.handed_over
    }

    /// Whether the VM was handed over for post-copy (pages sent from now
    /// on may meet a changed page at the destination: no deltas).
    pub fn is_switched(&self) -> bool {
        self.switched
    }

    /// Sends the proposal.
    pub fn start(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Idle) {
            return;
        }
        self.started_at = Some(now);
        if let Err(e) = self.cfg.manifest.leaf_count() {
            self.finish_failed(now, format!("bad disks: {e}"));
            return;
        }
        if !self.cfg.manifest.disks.is_empty()
            && self.cfg.switchover == Switchover::Immediately
            && !self.cfg.storage_postcopy
        {
            // Without storage post-copy the disk blocks left at the
            // switch go inside the downtime: at an immediate switch, the
            // whole disk. Hybrid sends the blocks left at its switch,
            // after pre-copy rounds moved the rest.
            self.finish_failed(
                now,
                "pure post-copy moves disks only with storage post-copy (disk blocks fetched on \
                 demand): use --storage-postcopy, or pre-copy or hybrid"
                    .into(),
            );
            return;
        }
        self.actions
            .push_back(SourceAction::Send(Box::new(Message::Propose(Propose {
                versions: VersionRange::OURS,
                capabilities: self.cfg.capabilities,
                migration: self.cfg.migration,
                vm: self.cfg.vm.clone(),
                attributes: self.cfg.attributes.clone(),
                manifest: self.cfg.manifest.clone(),
                ticket: self.cfg.ticket.clone(),
            }))));
        self.phase = Phase::Proposed {
            deadline: now + self.cfg.accept_timeout,
        };
    }

    /// A message from the destination's control stream.
    pub fn handle_message(&mut self, now: Instant, msg: Message) -> Result<(), SourceError> {
        let phase = std::mem::replace(&mut self.phase, Phase::Done);
        match (phase, msg) {
            (Phase::Proposed { .. }, Message::Accept(a)) => {
                if !VersionRange::OURS.contains(a.version) {
                    return Err(self.fail(now, SourceError::Downgrade(a.version)));
                }
                if !self.cfg.capabilities.has(a.capabilities) {
                    return Err(self.fail(now, SourceError::Capabilities));
                }
                if let Err(e) = self.check_receipt(&a.receipt, ReceiptKind::Accepted, None) {
                    return Err(self.fail(now, e));
                }
                // A base held only for a disk that names one.
                let disks = &self.cfg.manifest.disks;
                if !a.bases.is_empty()
                    && (a.bases.len() != disks.len()
                        || a.bases
                            .iter()
                            .zip(disks)
                            .any(|(h, d)| *h && d.base.is_none()))
                {
                    return Err(self.fail(now, SourceError::Capabilities));
                }
                self.bases = a.bases;
                self.accepted = Some(a.capabilities);
                self.actions.push_back(SourceAction::StartDirtyLog);
                self.last_log_at = Some(now);
                self.copy_started = Some(now);
                let all = PageBitmap::full(self.tree.len() as u64);
                if self.cfg.switchover == Switchover::Immediately {
                    // Every page is owed, zero pages included: the
                    // destination's memory starts missing, not zeroed.
                    self.pause(0, all, true);
                } else {
                    self.begin_round(now, 1, all, true);
                }
                Ok(())
            }
            (Phase::Proposed { .. }, Message::Reject(r)) => {
                self.finish_failed(now, format!("destination refused: {}", r.reason));
                Ok(())
            }
            (
                Phase::Draining {
                    round, round_start, ..
                },
                Message::RoundApplied(a),
            ) if a.round == round => {
                let secs = now.saturating_duration_since(round_start).as_secs_f64();
                // An empty round measures nothing: keep the last rate.
                if secs > 0.0 && self.round_bytes > 0 {
                    self.rate = (self.round_bytes as f64 / secs) as u64;
                }
                self.phase = Phase::Copying {
                    round,
                    round_start,
                    sending: false,
                };
                self.actions.push_back(SourceAction::CollectDirtyLog);
                Ok(())
            }
            (Phase::AwaitReady { .. }, Message::Ready(r)) => {
                let ours = self.root.unwrap_or(Digest([0; 32]));
                if r.memory_root != ours {
                    return Err(self.fail(
                        now,
                        SourceError::RootMismatch {
                            ours,
                            theirs: r.memory_root,
                        },
                    ));
                }
                if r.device_digest != device_state_digest(&self.device_state) {
                    return Err(self.fail(now, SourceError::DeviceStateMismatch));
                }
                let state = Some((ours, r.device_digest));
                if let Err(e) = self.check_receipt(&r.receipt, ReceiptKind::Ready, state) {
                    return Err(self.fail(now, e));
                }
                self.verified = true;
                self.postcopy.faults = r.faults;
                self.phase = Phase::Committing;
                if self.switched {
                    // Recorded at the switch already.
                    self.handle_handover_committed(now);
                } else {
                    self.actions.push_back(SourceAction::CommitHandover);
                }
                Ok(())
            }
            (Phase::AwaitStarted { .. }, Message::Started(s)) => {
                // The guest ran there while its disks were synced: that is
                // not downtime (bounded by the pause, a lie cannot make it
                // negative).
                if let (false, Some(p)) = (self.switched, self.paused_at) {
                    let synced = Duration::from_millis(u64::from(s.synced_ms));
                    self.resumed_at =
                        Some(p + now.saturating_duration_since(p).saturating_sub(synced));
                }
                // Whatever the receipt, the VM is the destination's now: a
                // bad receipt leaves the outcome in doubt, never resumed.
                match self.check_receipt(&s.receipt, ReceiptKind::Started, self.state()) {
                    Ok(()) => {
                        self.actions.push_back(SourceAction::DiscardVm);
                        self.finish(now, Outcome::Completed);
                        Ok(())
                    }
                    Err(e) => {
                        self.finish(now, Outcome::InDoubt(e.to_string()));
                        Err(e)
                    }
                }
            }
            (Phase::AwaitRunning { .. }, Message::Abort(a)) => {
                // The destination could not start the VM on the switch and
                // discarded what it held: nothing ran there, the VM is ours.
                self.handed_over = false;
                self.switched = false;
                self.actions.push_back(SourceAction::RollBack);
                self.finish(
                    now,
                    Outcome::Aborted(format!("destination could not start: {}", a.reason)),
                );
                Ok(())
            }
            (Phase::AwaitRunning { round, .. }, Message::PostcopyRunning(_)) => {
                self.resumed_at = Some(now);
                self.phase = Phase::PostCopy {
                    round,
                    pushing: true,
                };
                let owed = self
                    .owed
                    .clone()
                    .unwrap_or_else(|| PageBitmap::empty(self.tree.len() as u64));
                self.progress("post-copy", owed.count());
                self.actions.push_back(SourceAction::SendPages {
                    round,
                    pages: owed,
                    skip_zero: false,
                });
                Ok(())
            }
            (Phase::AwaitResumed { round, .. }, Message::Resumed(r)) => self.resume(now, round, r),
            (phase @ Phase::AwaitResumed { .. }, Message::Abort(a)) => {
                // Refused on that connection (the destination may not yet
                // have given the old link up): dial again within the
                // window; past it, in doubt.
                self.phase = phase;
                self.handle_link_lost(now, &format!("resume refused: {}", a.reason));
                Ok(())
            }
            (Phase::PostCopy { round, pushing }, Message::Fetch(f)) => {
                self.phase = Phase::PostCopy { round, pushing };
                self.serve(now, round, &f)
            }
            (
                phase @ (Phase::AwaitReady { .. } | Phase::Committing | Phase::AwaitStarted { .. }),
                Message::Fetch(_),
            ) if self.switched => {
                // Every page is on its way already.
                self.phase = phase;
                Ok(())
            }
            (Phase::AwaitStarted { .. }, Message::Abort(a)) if self.switched => {
                // The VM ran there: never resumed here.
                self.finish(
                    now,
                    Outcome::InDoubt(format!(
                        "destination aborted after the switch: {}",
                        a.reason
                    )),
                );
                Ok(())
            }
            (Phase::AwaitStarted { .. }, Message::Abort(a)) => {
                // The destination says it did not start the VM and has
                // discarded its copy: the VM is ours again. (A destination
                // that lies here could run a second copy, but it could do
                // that with the state it was handed anyway.)
                self.handed_over = false;
                self.actions.push_back(SourceAction::RollBack);
                self.finish(
                    now,
                    Outcome::Aborted(format!("destination could not start: {}", a.reason)),
                );
                Ok(())
            }
            (Phase::Done, _) => {
                self.phase = Phase::Done;
                Ok(())
            }
            (phase, Message::Abort(a)) => {
                self.phase = phase;
                self.finish_failed(now, format!("destination aborted: {}", a.reason));
                Ok(())
            }
            (phase, msg) => {
                let e = SourceError::Unexpected {
                    phase: phase.name(),
                    message: msg.kind(),
                };
                self.phase = phase;
                Err(self.fail(now, e))
            }
        }
    }

    /// The driver wrote one batch of the current round.
    pub fn handle_batch_sent(
        &mut self,
        now: Instant,
        batch: &SentBatch,
    ) -> Result<(), SourceError> {
        if matches!(
            self.phase,
            Phase::Reconnecting { .. } | Phase::AwaitResumed { .. }
        ) {
            // A batch of the broken link: its pages were read from the
            // paused VM, so their leaves stand; whether it arrived, the
            // destination says in Resumed.
            for &(p, d) in &batch.leaves {
                if !self.tree.set_leaf(p.0 as usize, d) {
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
            if !self.tree.set_leaf(p.0 as usize, d) {
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

    /// The dirty log collected after a round.
    pub fn handle_dirty_log(&mut self, now: Instant, dirty: PageBitmap) {
        let Phase::Copying {
            round,
            sending: false,
            ..
        } = self.phase
        else {
            return;
        };
        let dirtied = dirty.count();
        if let Some(last) = self.last_log_at.replace(now) {
            let secs = now.saturating_duration_since(last).as_secs_f64();
            if secs > 0.0 {
                self.convergence.dirty_rate = (dirtied as f64 / secs) as u64;
            }
        }
        // Everything not yet sent in its current version: this log, and the
        // pages held back before.
        let mut left = dirty.clone();
        left.union_with(&self.held);
        let remaining = left.count();
        let page = self.cfg.manifest.memory.page_size().bytes() as f64;
        let per_page = if self.round_pages > 0 {
            (self.round_bytes as f64 / self.round_pages as f64).max(1.0)
        } else {
            page
        };
        // No measured rate (simulated time that did not advance) means the
        // round took no time: the rest will not either.
        let expected = if remaining == 0 || self.rate == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(remaining as f64 * per_page / self.rate as f64)
        };
        self.progress("precopy", remaining);
        if expected <= self.cfg.max_downtime {
            self.converged = true;
            self.pause(round, left, false);
            return;
        }
        if let Switchover::Hybrid { after } = self.cfg.switchover {
            let ran = self
                .copy_started
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
            let due = match after {
                Some(limit) => ran >= limit,
                None => true,
            };
            let stalling = dirtied.saturating_mul(2) >= self.round_pages;
            if due || round >= self.cfg.max_rounds || stalling {
                self.pause(round, left, true);
                return;
            }
        }
        if round >= self.cfg.max_rounds {
            if self.cfg.force_stop {
                self.pause(round, left, false);
            } else {
                let detail = format!(
                    "cannot converge at this dirty rate and bandwidth: the guest dirties {} pages/s, \
                     {} bytes/s are sent, and the {} pages left would take {} ms against a target of {} ms \
                     after {} rounds (throttle {}%); raise --max-downtime, throttle the workload, \
                     use --mode postcopy or hybrid, or pass --force-stop",
                    self.convergence.dirty_rate,
                    self.rate,
                    remaining,
                    expected.as_millis(),
                    self.cfg.max_downtime.as_millis(),
                    round,
                    self.convergence.throttle,
                );
                self.fail_with(now, Reason::CannotConverge(detail.clone()), detail);
            }
            return;
        }
        // Auto-converge: the guest dirties at least half as fast as we send.
        if self.cfg.auto_converge && dirtied.saturating_mul(2) >= self.round_pages {
            self.stalled += 1;
        } else {
            self.stalled = 0;
        }
        if self.stalled >= 2 {
            self.stalled = 0;
            let current = self.convergence.throttle;
            if let Some(&next) = THROTTLE_STEPS.iter().find(|&&t| t > current) {
                self.convergence.throttle = next;
                self.actions
                    .push_back(SourceAction::Throttle { percent: next });
            }
        }
        // Hot-page ordering: pages in several rounds' logs wait for the end.
        let mut send = left;
        if self.cfg.hold_hot_pages {
            if self.dirty_rounds.is_empty() {
                self.dirty_rounds = vec![0; self.tree.len()];
            }
            let mut hot = PageBitmap::empty(dirty.len());
            for p in dirty.iter() {
                if let Some(n) = self.dirty_rounds.get_mut(p.0 as usize) {
                    *n = n.saturating_add(1);
                    if *n >= HOT_ROUNDS {
                        hot.insert(p);
                    }
                }
            }
            send.subtract(&hot);
            self.convergence.held_back += hot.count();
            self.held = hot;
        }
        self.begin_round(now, round + 1, send, false);
    }

    /// The VM is paused; `dirty` was collected after pausing.
    pub fn handle_paused(
        &mut self,
        now: Instant,
        dirty: PageBitmap,
        device_state: Vec<u8>,
    ) -> Result<(), SourceError> {
        let Phase::Pausing { round, postcopy } = self.phase else {
            return Err(SourceError::Unexpected {
                phase: self.phase.name(),
                message: "VM paused",
            });
        };
        if device_state.len() > crate::message::MAX_DEVICE_STATE {
            return Err(self.fail(now, SourceError::DeviceStateTooLarge(device_state.len())));
        }
        self.paused_at = Some(now);
        self.device_state = device_state;
        let mut last = self.pending.take().unwrap_or_else(|| dirty.clone());
        last.union_with(&dirty);
        let round = round + 1;
        self.rounds = round;
        self.round_bytes = 0;
        self.round_pages = 0;
        if postcopy && self.cfg.storage_postcopy {
            // Storage post-copy: every leaf left is owed, disk blocks too.
            self.postcopy.owed = last.count();
            self.owed = Some(last);
            self.begin_switch();
            return Ok(());
        }
        if postcopy {
            // Memory goes by demand paging; without storage post-copy disk
            // blocks are not, so those left go now, inside the downtime,
            // and the switch lists their batches (the destination applies
            // them before the VM runs there).
            // The owed set is over the memory's pages (as the
            // destination reads it).
            let memory = self.cfg.manifest.memory.page_count();
            let mut disks = PageBitmap::empty(last.len());
            let mut owed = PageBitmap::empty(memory);
            for p in last.iter() {
                if p.0 >= memory {
                    disks.insert(p);
                } else {
                    owed.insert(p);
                }
            }
            self.postcopy.owed = owed.count();
            self.owed = Some(owed);
            if disks.count() > 0 {
                self.phase = Phase::SwitchDisks { round };
                self.progress("sending the disk blocks left", disks.count());
                self.actions.push_back(SourceAction::SendPages {
                    round,
                    pages: disks,
                    skip_zero: false,
                });
                return Ok(());
            }
            self.begin_switch();
            return Ok(());
        }
        self.phase = Phase::FinalCopy { round };
        self.progress("stop-and-copy", last.count());
        self.actions.push_back(SourceAction::SendPages {
            round,
            pages: last,
            skip_zero: false,
        });
        Ok(())
    }

    /// Paused, nothing left to send first: record the post-copy switch.
    fn begin_switch(&mut self) {
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
                    storage: self.cfg.storage_postcopy,
                },
            ))));
        self.phase = Phase::AwaitRunning {
            round: self.rounds,
            deadline: now + self.cfg.accept_timeout,
        };
    }

    /// Answers a Fetch: the asked pages, and the owed pages after each
    /// not yet pushed, as one batch on the fault stream.
    fn serve(&mut self, now: Instant, round: u32, f: &Fetch) -> Result<(), SourceError> {
        let count = self.tree.len() as u64;
        let max = self.cfg.manifest.memory.page_size().max_batch_pages();
        self.postcopy.fetches += 1;
        let mut pages = Vec::new();
        for &p in &f.pages {
            if p.0 >= count {
                return Err(self.fail(now, SourceError::LeafOutOfRange(p.0)));
            }
            pages.push(p);
            let owed = self.owed.as_ref();
            for q in p.0 + 1..=(p.0 + PREPAGE).min(count - 1) {
                let q = PageIndex(q);
                if owed.is_some_and(|o| o.contains(q)) && !self.pushed.contains(q) {
                    pages.push(q);
                }
            }
        }
        pages.sort_unstable();
        pages.dedup();
        pages.truncate(max);
        self.serving += 1;
        self.actions
            .push_back(SourceAction::ServePages { round, pages });
        Ok(())
    }

    /// Post-copy recovery: a new connection to the destination is up, with
    /// its control and data streams: ask to resume.
    pub fn handle_reconnected(&mut self, now: Instant) {
        let Phase::Reconnecting { round, .. } = self.phase else {
            return;
        };
        self.postcopy.recoveries += 1;
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
        self.progress("resuming post-copy", self.postcopy.owed);
    }

    /// The destination resumes: push again every owed page it lacks.
    fn resume(
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
        // not the paused page's, and the root check could not tell.
        if owed
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
    fn try_finish_postcopy(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::PostCopy { pushing: false, .. }) || self.serving > 0 {
            return;
        }
        self.send_finish(now);
    }

    /// Each disk's own root (see [`crate::disk`]) over the leaves as sent,
    /// in manifest order: the disks as paused once the summary of
    /// [`SourceEvent::Finished`] says the migration verified.
    pub fn disk_roots(&self) -> Vec<Digest> {
        crate::disk::leaf_ranges(self.cfg.manifest.memory, &self.cfg.manifest.disks)
            .into_iter()
            .map(|r| {
                let leaves: Vec<Digest> = (r.start..r.end)
                    .map(|i| self.tree.leaf(i as usize).unwrap_or(Digest([0; 32])))
                    .collect();
                crate::disk::disk_root(&leaves)
            })
            .collect()
    }

    /// Every page is sent: announce the root of the image as paused.
    fn send_finish(&mut self, now: Instant) {
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
            self.progress("handover", 0);
        }
    }

    /// A deadline from [`Source::poll_timeout`] passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Proposed { deadline } if now >= deadline => self.fail_with(
                now,
                Reason::Timeout,
                "no Accept from the destination in time".into(),
            ),
            Phase::AwaitRunning { deadline, .. } if now >= deadline => self.finish_failed(
                now,
                "the destination did not report the VM running after the switch".into(),
            ),
            Phase::AwaitReady { deadline } if now >= deadline => self.fail_with(
                now,
                Reason::Timeout,
                "no Ready from the destination in time".into(),
            ),
            Phase::Draining {
                round, deadline, ..
            } if now >= deadline => self.fail_with(
                now,
                Reason::Timeout,
                format!("the destination did not confirm round {round} in time"),
            ),
            Phase::AwaitStarted { deadline } if now >= deadline => {
                self.finish_failed(now, "no Started from the destination in time".into())
            }
            Phase::Reconnecting { deadline, .. } if now >= deadline => self.finish_failed(
                now,
                format!(
                    "the link broke after the post-copy switch and the destination could not be \
                     reached again within {} s",
                    self.cfg.recovery.as_secs()
                ),
            ),
            Phase::AwaitResumed { deadline, .. } if now >= deadline => {
                self.finish_failed(now, "the destination did not answer Resume in time".into())
            }
            _ => {}
        }
    }

    /// The connection or a stream broke.
    pub fn handle_link_lost(&mut self, now: Instant, detail: &str) {
        let round = match self.phase {
            Phase::Done => return,
            // Already dialling again: the driver reports its failures by
            // the timeout.
            Phase::Reconnecting { .. } => return,
            Phase::AwaitRunning { round, .. } | Phase::PostCopy { round, .. } if self.switched => {
                Some(round)
            }
            Phase::AwaitReady { .. } | Phase::AwaitResumed { .. } if self.switched => {
                Some(self.rounds)
            }
            _ => None,
        };
        match round {
            Some(round)
                if !self.cfg.recovery.is_zero()
                    && self.postcopy.recoveries < crate::destination::MAX_RECOVERIES =>
            {
                // Lost again while resuming: the same window goes on.
                let deadline = match self.phase {
                    Phase::AwaitResumed { deadline, .. } => deadline,
                    _ => now + self.cfg.recovery,
                };
                self.phase = Phase::Reconnecting { round, deadline };
                self.progress(
                    &format!("link lost ({detail}), reconnecting"),
                    self.postcopy.owed,
                );
                self.actions.push_back(SourceAction::Reconnect);
            }
            _ => self.finish_failed(now, format!("link lost: {detail}")),
        }
    }

    /// The operator (or shutdown) cancels. Refused once handed over.
    pub fn cancel(&mut self, now: Instant) -> bool {
        match self.phase {
            Phase::Done | Phase::AwaitStarted { .. } => false,
            _ if self.handed_over => false,
            _ => {
                self.fail_with(now, Reason::Cancelled, "cancelled".into());
                true
            }
        }
    }

    /// Memory root and device digest handed over.
    fn state(&self) -> crate::receipt::StateDigests {
        self.root
            .map(|r| (r, device_state_digest(&self.device_state)))
    }

    /// Checks one of the destination's receipts and keeps it.
    fn check_receipt(
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

    fn begin_round(&mut self, now: Instant, round: u32, pages: PageBitmap, skip_zero: bool) {
        self.rounds = round;
        self.round_bytes = 0;
        self.round_pages = 0;
        self.phase = Phase::Copying {
            round,
            round_start: now,
            sending: true,
        };
        self.actions.push_back(SourceAction::SendPages {
            round,
            pages,
            skip_zero,
        });
    }

    fn pause(&mut self, round: u32, left: PageBitmap, postcopy: bool) {
        self.held = PageBitmap::empty(left.len());
        self.pending = Some(left);
        self.phase = Phase::Pausing { round, postcopy };
        self.actions.push_back(SourceAction::PauseVm);
    }

    fn progress(&mut self, phase: &str, remaining: u64) {
        self.events.push_back(SourceEvent::Progress(Progress {
            phase: phase.into(),
            round: self.rounds,
            pages_sent: self.pages_sent,
            remaining_pages: remaining,
            total_pages: self.tree.len() as u64,
            payload_bytes: self.payload_bytes,
            rate_bytes_per_sec: self.rate,
        }));
    }

    /// Fails with a protocol error from the peer: tell it, roll back.
    fn fail(&mut self, now: Instant, e: SourceError) -> SourceError {
        let reason = match e {
            SourceError::RootMismatch { .. } | SourceError::DeviceStateMismatch => {
                Reason::RootMismatch
            }
            SourceError::DeviceStateTooLarge(_) => Reason::Internal(e.to_string()),
            _ => Reason::ProtocolViolation(e.to_string()),
        };
        self.fail_with(now, reason, e.to_string());
        e
    }

    fn fail_with(&mut self, now: Instant, reason: Reason, detail: String) {
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
    fn finish_failed(&mut self, now: Instant, detail: String) {
        if self.handed_over {
            self.finish(now, Outcome::InDoubt(detail));
        } else {
            self.actions.push_back(SourceAction::RollBack);
            self.finish(now, Outcome::Aborted(detail));
        }
    }

    fn finish(&mut self, now: Instant, outcome: Outcome) {
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
