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
//!     Committing --> Failed: cannot record / send Abort, roll back
//!     AwaitStarted --> Done: Started / discard the local copy
//!     AwaitStarted --> InDoubt: link lost, timeout
//!     Copying --> Pausing: hybrid switch point / post-copy after Accept
//!     Pausing --> Switching: paused / record the switch
//!     Pausing --> SwitchDisks: paused with disk blocks left / send them
//!     SwitchDisks --> Switching: sent / record the switch
//!     Switching --> AwaitRunning: recorded / send PostcopySwitch
//!     Switching --> Failed: cannot record / send Abort, roll back
//!     AwaitRunning --> PostCopy: PostcopyRunning / push the owed pages
//!     PostCopy --> PostCopy: Fetch / serve on the fault stream
//!     PostCopy --> AwaitReady: pushed and served / send Finish
//!     PostCopy --> Reconnecting: link lost after the switch / dial again
//!     Reconnecting --> AwaitResumed: reconnected / send Resume
//!     AwaitResumed --> PostCopy: Resumed(missing) / push the missing pages
//!     Reconnecting --> InDoubt: no new link within the recovery window
//!     Copying --> Reconnecting: link lost before the pause / dial again
//!     Draining --> Reconnecting: link lost before the pause / dial again
//!     AwaitResumed --> Copying: PrecopyResumed(confirmed, held) / send what it lacks
//!     Reconnecting --> Failed: pre-copy, no new link within the window / roll back
//!     Copying --> Failed: Abort, link lost (no window), cancel, bad message
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
//! second since the last log) and the expected downtime: pages left × bytes
//! per page ÷ measured send rate, plus the handover's two round trips
//! (`Finish`/`Ready`, `Handover`/`Started`), each the shortest control
//! exchange measured (`Propose` to `Accept`, `RoundEnd` to `RoundApplied`).
//! The send rate leaves that round trip out of each round's time. On a
//! long path the round trips are most of the pause, and without them the
//! pause overran its target by them (300 ms at 150 ms RTT). Three controls
//! act on the estimate:
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
//! the plan's [`storage_postcopy`](crate::model::MigrationPlan::storage_postcopy):
//! then every leaf left is owed, disk
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
//! # Pre-copy recovery
//! With a recovery window, a link that breaks in a pre-copy round (while
//! sending it, or awaiting its `RoundApplied`) does not end the migration
//! either: the VM keeps running here, its dirty log on, and the source
//! dials again and sends [`Message::Resume`] as above. The destination,
//! which kept its staging copy, answers [`Message::PrecopyResumed`]: the
//! last round it confirmed and the pages it installed since. If it
//! confirmed the current round, the round is over (its `RoundApplied` was
//! lost) and the next dirty log follows. Otherwise the source sends again,
//! on fresh streams (fresh delta caches), the pages of the current round
//! that are not both reported sent by its driver and held there, with
//! any dirty log collected while the link was down; nothing the
//! destination already installed in the round goes twice. Every page
//! either side is unsure of is sent again, so the leaves of both sides
//! stay those of the same bytes; the root check at `Finish` still covers
//! every page. A link lost once the VM is paused for the final round
//! rolls back as before (the downtime must not wait for a new link), and
//! without a new link within the window the migration fails and the VM
//! runs on here. [`Convergence::recoveries`] counts the resumptions and
//! [`Convergence::recovery_resent`] the pages they sent again.
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
//!
//! # Parts
//! - `config`: [`SourceConfig`] and [`Switchover`], what the caller asks for.
//! - `driver`: what the source asks of its driver ([`SourceAction`]), what
//!   it reports ([`SourceEvent`]) and what the driver reports sending
//!   ([`SentBatch`]).
//! - `control`: every (phase, message) pair the source accepts from the
//!   destination's control stream, and the typed refusal of the rest.
//! - `sent`: the batches and rounds the driver reports sent, and where the
//!   end of a round leads.
//! - `precopy`: rounds, convergence control on each dirty log, and the
//!   pause that ends pre-copy.
//! - `postcopy`: the switch, serving faults, pushing owed pages, and
//!   post-copy recovery.
//! - `resume`: pre-copy recovery, the round carried on over a new link.
//! - `restart`: a source restarted after the post-copy switch, from the
//!   paused image.
//! - `handover`: `Finish`, the destination's receipts, and the handover.
//! - `outcome`: how a migration ends and its [`SourceSummary`].
//! - `error`: [`SourceError`] and the `Abort` it sends.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::ctl::Progress;
use crate::digest::{zero_leaf, Digest, MerkleTree};
use crate::message::{Capabilities, Message, Propose, Reason, VersionRange};
#[cfg(doc)]
use crate::message::{Fetch, PostcopySwitch};
use crate::page::{EncodingStats, PageBitmap};

mod config;
mod control;
mod driver;
mod error;
mod handover;
mod outcome;
mod postcopy;
mod precopy;
mod restart;
mod resume;
mod sent;

pub use crate::model::{ramp_pages, RAMP_HOLD_ROUNDS, RAMP_START_MS};
pub use crate::model::{Convergence, PostcopySummary};
pub use config::{SourceConfig, Switchover};
pub use control::TRUSTED_ROUND_TRIPS;
pub use driver::{SentBatch, SourceAction, SourceEvent};
pub use error::SourceError;
pub use outcome::SourceSummary;
pub use postcopy::{fetch_pages, PREPAGE};
pub use precopy::{HOT_ROUNDS, THROTTLE_STEPS};

/// Post-copy: who serves the destination's Fetches
/// ([`SourceAction::StopFaults`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FaultServing {
    /// The driver may serve them as it reads them.
    Open,
    /// Asked to stop: waiting for [`Source::handle_faults_stopped`].
    Stopping,
    /// Only through the machine (`ServePages`), so that `Finish` counts
    /// every batch.
    Stopped,
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
    /// Recovery (post-copy, or pre-copy before the pause): dialling the
    /// destination again.
    Reconnecting {
        round: u32,
        deadline: Instant,
    },
    /// Recovery: Resume sent on the new connection.
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
    /// In a pre-copy pause: when `Finish` went, `Ready` came and
    /// `Handover` went ([`crate::model::PauseParts`]).
    pause_marks: [Option<Instant>; 3],
    /// How long pausing the VM and reading its dirty log and device state
    /// took, at the start of the pause.
    pause_read: Duration,
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
    /// The phase and the pages left last reported (periodic samples
    /// repeat them).
    last_phase: String,
    last_remaining: u64,
    /// When the dirty log was last cleared or collected.
    last_log_at: Option<Instant>,
    /// Per page: rounds whose dirty log held it (saturating).
    dirty_rounds: Vec<u8>,
    /// Pages dirty and not yet sent in that version, held for the end.
    held: PageBitmap,
    /// Pages sent at least once.
    sent: PageBitmap,
    /// The current pre-copy round: the pages it was asked to send, whether
    /// zero pages were left out, when it began, and the pages the driver
    /// reported sent in it (on any link).
    round_set: PageBitmap,
    round_skip_zero: bool,
    round_began: Option<Instant>,
    round_sent: PageBitmap,
    /// The current round's RoundEnd was sent (only then may the
    /// destination have confirmed it).
    round_ended: bool,
    /// When the current round's RoundEnd went (on this link): its
    /// RoundApplied measures a round trip.
    round_end_at: Option<Instant>,
    /// Probes in flight (number, when it went), oldest first, at most
    /// [`PROBES_IN_FLIGHT`], and how many were sent
    /// ([`crate::message::Capabilities::PROBE`]).
    probes: std::collections::VecDeque<(u32, Instant)>,
    probes_sent: u32,
    /// The shortest control round trip measured so far.
    round_trip: Option<Duration>,
    /// Control round trips measured (the shortest is `round_trip`).
    round_trips: u32,
    /// The shortest wait, beyond the path's round trip, from a round's
    /// `RoundEnd` to its `RoundApplied`: the destination still applying
    /// what was in flight. Measured only where probes time the path.
    apply_lag: Option<Duration>,
    /// Pre-copy recovery: dirty logs collected while the link was down,
    /// sent once it is back.
    carried: Option<PageBitmap>,
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
    /// ServePages actions (and Fetches the driver served itself) not yet
    /// reported sent.
    serving: u64,
    /// Post-copy: whether the driver may still serve Fetches itself.
    faults: FaultServing,
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
    /// Restarted after the switch ([`Source::restarted_after_switch`]):
    /// what was pushed before is unknown here.
    restarted: bool,
}

impl Source {
    /// A source that has not started.
    pub fn new(mut cfg: SourceConfig) -> Self {
        let records_us = crate::units::micros(cfg.durable_records);
        // Memory pages, then disk blocks (checked again in `start`).
        let pages = crate::page::saturating_usize(
            cfg.manifest
                .leaf_count()
                .unwrap_or(cfg.manifest.memory.page_count()),
        );
        let page = cfg.manifest.memory.page_size().bytes();
        cfg.manifest.postcopy = cfg.switchover() != Switchover::Never;
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
            pause_marks: [None; 3],
            pause_read: Duration::ZERO,
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
            last_phase: String::new(),
            last_remaining: 0,
            last_log_at: None,
            dirty_rounds: Vec::new(),
            held: PageBitmap::empty(pages as u64),
            sent: PageBitmap::empty(pages as u64),
            round_set: PageBitmap::empty(pages as u64),
            round_skip_zero: false,
            round_began: None,
            round_sent: PageBitmap::empty(pages as u64),
            round_ended: false,
            round_end_at: None,
            probes: std::collections::VecDeque::new(),
            probes_sent: 0,
            round_trip: None,
            round_trips: 0,
            apply_lag: None,
            carried: None,
            stalled: 0,
            convergence: Convergence {
                records_us,
                ..Convergence::default()
            },
            copy_started: None,
            switched: false,
            resumed_at: None,
            owed: None,
            pushed: PageBitmap::empty(pages as u64),
            serving: 0,
            faults: FaultServing::Open,
            postcopy: PostcopySummary::default(),
            root: None,
            receipts: Vec::new(),
            accepted: None,
            bases: Vec::new(),
            retain: None,
            disk_blocks_sent: 0,
            restarted: false,
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
            && self.cfg.switchover() == Switchover::Immediately
            && !self.cfg.plan().storage_postcopy
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
            Phase::Reconnecting { deadline, .. } if now >= deadline => {
                let when = if self.switched {
                    "after the post-copy switch"
                } else {
                    "during pre-copy"
                };
                self.finish_failed(
                    now,
                    format!(
                        "the link broke {when} and the destination could not be reached again \
                         within {} s",
                        self.cfg.recovery.as_secs()
                    ),
                )
            }
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
            // Pre-copy, the VM still running here: the round goes on over
            // a new link.
            Phase::Copying { round, .. }
            | Phase::Draining { round, .. }
            | Phase::AwaitResumed { round, .. }
                if !self.switched =>
            {
                Some(round)
            }
            _ => None,
        };
        let recoveries = if self.switched {
            self.postcopy.recoveries
        } else {
            self.convergence.recoveries
        };
        match round {
            Some(round)
                if !self.cfg.recovery.is_zero()
                    && recoveries < crate::destination::MAX_RECOVERIES =>
            {
                // Lost again while resuming: the same window goes on.
                let deadline = match self.phase {
                    Phase::AwaitResumed { deadline, .. } => deadline,
                    _ => now + self.cfg.recovery,
                };
                self.phase = Phase::Reconnecting { round, deadline };
                let left = if self.switched {
                    self.postcopy.owed
                } else {
                    self.round_set.count()
                };
                self.progress(&format!("link lost ({detail}), reconnecting"), left);
                self.actions.push_back(SourceAction::Reconnect);
            }
            _ => self.finish_failed(now, format!("link lost: {detail}")),
        }
    }

    /// Something failed here, not the link (a page that cannot be read, a
    /// batch that cannot be built): a new link would not help. Before the
    /// handover the migration fails and the VM runs on here; after it,
    /// the outcome is in doubt.
    pub fn handle_local_failure(&mut self, now: Instant, detail: &str) {
        if matches!(self.phase, Phase::Done) {
            return;
        }
        self.fail_with(
            now,
            Reason::Internal(detail.into()),
            format!("failed at the source: {detail}"),
        );
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

    fn progress(&mut self, phase: &str, remaining: u64) {
        phase.clone_into(&mut self.last_phase);
        self.last_remaining = remaining;
        let p = self.snapshot();
        self.events.push_back(SourceEvent::Progress(p));
    }

    /// The figures of now, under the phase (and pages left) last
    /// reported: what a periodic sample of the migration shows.
    pub fn snapshot(&self) -> Progress {
        Progress {
            phase: self.last_phase.clone(),
            round: self.rounds,
            pages_sent: self.pages_sent,
            remaining_pages: self.last_remaining,
            total_pages: self.tree.len() as u64,
            payload_bytes: self.payload_bytes,
            rate_bytes_per_sec: self.rate,
            sample: None,
        }
    }

    /// The guest's dirty rate last estimated, pages per second.
    pub fn dirty_rate(&self) -> u64 {
        self.convergence.dirty_rate
    }

    /// Pages served on post-copy faults so far.
    pub fn faults_served(&self) -> u64 {
        self.postcopy.served
    }
}
