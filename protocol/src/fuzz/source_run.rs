//! The body of the `source_sequence` target: a source state machine driven
//! by an honest fake driver and fed a hostile destination's messages, with
//! time, a broken link, a cancel and the driver's reports interleaved as
//! the input says. It checks, independently of the machine, that a handover
//! and a completion follow only from a valid sequence of the destination's
//! messages with matching receipts and digests, that the VM is never
//! both handed over and resumed here, and that no `Finish` goes before the
//! batches of the Fetches the driver served itself (it serves some in
//! post-copy, as the agent's control reader does, and some as the machine
//! asks it to stop).
//!
//! An input is two configuration bytes, then operations: one byte each
//! (its low 3 bits, see [`op`]), some followed by an operand.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::InsecureCrypto;
use crate::ctl::Outcome;
use crate::digest::{device_state_digest, zero_leaf, Digest, MerkleTree};
use crate::frame::split_frame;
use crate::message::{Capabilities, Manifest, Message};
use crate::model::{MigrationMode, MigrationPlan};
use crate::names::{MigrationId, SpiffeId};
use crate::page::{stream_for, EncodingStats, MemoryGeometry, PageBitmap, PageIndex, PageSize};
use crate::receipt::{Notary, ReceiptKind, StateDigests};
use crate::source::{SentBatch, Source, SourceAction, SourceConfig, SourceEvent};
use crate::ticket::SignedTicket;

/// The source's identity in `source_sequence`.
pub const SOURCE_ID: &str = "spiffe://fuzz/agent/source";
/// The destination's identity in `source_sequence` (receipts must be its).
pub const DESTINATION_ID: &str = "spiffe://fuzz/agent/destination";
/// The migration of `source_sequence`.
pub const SOURCE_MIGRATION: MigrationId = MigrationId([5; 16]);

/// The operations of a `source_sequence` input (the low 3 bits of a byte).
pub mod op {
    /// A destination message follows, as a frame (length prefix, body).
    pub const MESSAGE: u8 = 0;
    /// Time passes: one operand byte, in tens of milliseconds; a deadline
    /// that passed fires.
    pub const WAIT: u8 = 1;
    /// The link breaks.
    pub const LINK_LOST: u8 = 2;
    /// The driver sends a few batches of the job in hand (operand: how
    /// many, less one, in the low 2 bits), or does a job that is not
    /// sending pages.
    pub const DRIVER_PART: u8 = 3;
    /// The driver does the job in hand (operand: which pages are dirty
    /// when it collects a dirty log or pauses, and the device state; for
    /// a commit, [`super::COMMIT_FAILS`] makes it fail).
    pub const DRIVER_JOB: u8 = 4;
    /// The driver does every job, those they lead to included (operand as
    /// for [`DRIVER_JOB`]).
    pub const DRIVER_ALL: u8 = 5;
    /// The next deadline passes.
    pub const TIMEOUT: u8 = 6;
    /// The operator cancels.
    pub const CANCEL: u8 = 7;
}

/// The operand with which the driver cannot record a commit (its
/// journal fails).
pub const COMMIT_FAILS: u8 = 0xff;

/// Actions drained after one operation before the machine is deemed to
/// loop.
const MAX_ACTIONS: usize = 10_000;
/// Jobs the driver does for one [`op::DRIVER_ALL`].
const MAX_JOBS: usize = 1_000;

/// The leaf the fake driver reports for `page` (the VM never changes:
/// dirty pages are sent again with the same contents).
pub fn fuzz_leaf(page: u64) -> Digest {
    Digest(*blake3::hash(&page.to_le_bytes()).as_bytes())
}

/// The ticket the source forwards (the source never checks it).
pub fn source_ticket() -> SignedTicket {
    SignedTicket::from_parts(vec![], vec![], vec![])
}

/// What the driver has been asked to do and has not done yet.
#[derive(Debug)]
enum Job {
    /// Batches to send, then the end of the round (not for served pages).
    Pages {
        round: u32,
        batches: VecDeque<(u16, Vec<PageIndex>)>,
        end_round: bool,
    },
    Collect,
    Pause,
    CommitHandover,
    CommitSwitch,
    StopFaults,
    /// A Fetch the driver served itself (counted with
    /// `handle_fetches_served`): its batch, reported sent, on the link
    /// it was served on.
    Served {
        pages: Vec<PageIndex>,
        link: u32,
    },
    Reconnect,
}

/// A source under test and what the test saw. See the module docs.
#[derive(Debug)]
pub struct SourceRun {
    now: Instant,
    src: Source,
    /// Checks the destination's receipts independently of the machine.
    checker: Notary,
    peer: SpiffeId,
    ticket: Digest,
    data_streams: u16,
    jobs: VecDeque<Job>,
    sent: Vec<Message>,
    /// The leaves the driver reported sent.
    tree: MerkleTree,
    device_state: Option<Vec<u8>>,
    /// The root of the last Finish (checked against `tree`).
    finish_root: Option<Digest>,
    accept_valid: bool,
    ready_valid: bool,
    started_valid: bool,
    /// The destination reported the VM running there after the switch.
    running_there: bool,
    /// The operation in hand fed an Abort.
    aborting: bool,
    switched: bool,
    /// Links lost so far: the driver's served batches belong to one.
    link: u32,
    /// Fetches the driver served itself on this link whose batches it
    /// has not reported: no `Finish` may go meanwhile (it counts them).
    served_unreported: u64,
    handed_over: bool,
    rolled_back: bool,
    discarded: bool,
    outcome: Option<Outcome>,
}

/// `input` split after `n` bytes, or `None` when shorter.
fn take<'a>(input: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if input.len() < n {
        return None;
    }
    let (head, rest) = input.split_at(n);
    *input = rest;
    Some(head)
}

impl SourceRun {
    /// A started source configured by the first two bytes of `data`, and
    /// the rest of `data`. Byte 0: bits 0–1 the mode (pre-copy, post-copy,
    /// hybrid, hybrid after 50 ms), bit 2 a recovery window, bit 3
    /// force-stop, bit 4 auto-converge, bit 5 hot-page holding, bit 6 a
    /// disk of 8 blocks, bit 7 storage post-copy. Byte 1: pages (low 6
    /// bits, plus one) and data streams (high 2 bits, plus one).
    pub fn new(data: &[u8]) -> Option<(SourceRun, &[u8])> {
        let [flags, shape, rest @ ..] = data else {
            return None;
        };
        let now = Instant::now();
        let (mode, postcopy_after_ms) = match flags & 3 {
            0 => (MigrationMode::Precopy, None),
            1 => (MigrationMode::Postcopy, None),
            2 => (MigrationMode::Hybrid, None),
            _ => (MigrationMode::Hybrid, Some(50)),
        };
        let bit = |n: u8| flags & (1 << n) != 0;
        let data_streams = u16::from(shape >> 6) + 1;
        let memory = MemoryGeometry::new(PageSize::SIZE_4K, u64::from(shape & 63) + 1).ok()?;
        let disks = if bit(6) {
            vec![crate::disk::DiskGeometry {
                name: "disk".parse().ok()?,
                bytes: 8 * 4096,
                base: None,
            }]
        } else {
            Vec::new()
        };
        let manifest = Manifest {
            memory,
            data_streams,
            qemu: None,
            postcopy: false,
            start_paused: false,
            plan: MigrationPlan {
                streams: data_streams,
                max_downtime_ms: 20,
                max_rounds: 5,
                mode,
                copy_storage: bit(6),
                postcopy_after_ms,
                force_stop: bit(3),
                auto_converge: bit(4),
                hold_hot_pages: bit(5),
                storage_postcopy: bit(7),
                ..MigrationPlan::default()
            },
            reuse: None,
            disks,
        };
        let leaves = crate::page::saturating_usize(manifest.leaf_count().ok()?);
        let peer: SpiffeId = DESTINATION_ID.parse().ok()?;
        let second = Duration::from_secs(1);
        let mut src = Source::new(SourceConfig {
            migration: SOURCE_MIGRATION,
            vm: "vm".parse().ok()?,
            attributes: Default::default(),
            manifest,
            ticket: source_ticket(),
            peer: peer.clone(),
            notary: InsecureCrypto::notary(SOURCE_ID, now),
            capabilities: Capabilities::OURS,
            accept_timeout: second,
            ready_timeout: second,
            started_timeout: second,
            recovery: if bit(2) { second } else { Duration::ZERO },
            durable_records: Duration::ZERO,
        });
        src.start(now);
        let mut run = SourceRun {
            now,
            src,
            checker: InsecureCrypto::notary(SOURCE_ID, now),
            peer,
            ticket: crate::receipt::ticket_digest(&source_ticket()),
            data_streams,
            jobs: VecDeque::new(),
            sent: Vec::new(),
            tree: MerkleTree::filled(leaves, zero_leaf(4096)),
            device_state: None,
            finish_root: None,
            accept_valid: false,
            ready_valid: false,
            started_valid: false,
            running_there: false,
            aborting: false,
            switched: false,
            link: 0,
            served_unreported: 0,
            handed_over: false,
            rolled_back: false,
            discarded: false,
            outcome: None,
        };
        run.drain();
        Some((run, rest))
    }

    /// Does the operation at the start of `input` and consumes it; `false`
    /// at the end of the input or on an operation cut short.
    pub fn step(&mut self, input: &mut &[u8]) -> bool {
        let Some(&[code]) = take(input, 1) else {
            return false;
        };
        self.aborting = false;
        match code & 7 {
            op::MESSAGE => {
                let Ok(Some((frame, used))) = split_frame(input) else {
                    return false;
                };
                let m = Message::decode(Bytes::copy_from_slice(frame));
                *input = &input[used..];
                if let Ok(m) = m {
                    self.message(m);
                }
            }
            op::WAIT => {
                let Some(&[tens]) = take(input, 1) else {
                    return false;
                };
                self.now += Duration::from_millis(10 * u64::from(tens));
                if self.src.poll_timeout().is_some_and(|t| t <= self.now) {
                    self.src.handle_timeout(self.now);
                }
            }
            op::LINK_LOST => {
                // What the old link's faults carried, `Resumed` says.
                self.link += 1;
                self.served_unreported = 0;
                self.src.handle_link_lost(self.now, "fuzz");
            }
            op::DRIVER_PART | op::DRIVER_JOB | op::DRIVER_ALL => {
                let Some(&[arg]) = take(input, 1) else {
                    return false;
                };
                match code & 7 {
                    op::DRIVER_PART => self.job(arg, Some(usize::from(arg & 3) + 1)),
                    op::DRIVER_JOB => self.job(arg, None),
                    _ => self.all_jobs(arg),
                }
            }
            op::TIMEOUT => {
                if let Some(t) = self.src.poll_timeout() {
                    self.now = self.now.max(t);
                }
                self.src.handle_timeout(self.now);
            }
            _ => {
                let refused = !self.src.cancel(self.now);
                self.drain();
                assert!(refused || self.rolled_back, "a cancel did not roll back");
            }
        }
        self.drain();
        true
    }

    /// Messages the source sent since the last call.
    pub fn take_sent(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.sent)
    }

    /// How the migration ended, once it has.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    /// The end of the input: the driver does what is left and every
    /// deadline passes; the machine must then have finished.
    pub fn finish(mut self) {
        for _ in 0..64 {
            if self.outcome.is_some() {
                return;
            }
            self.all_jobs(0);
            if self.outcome.is_some() {
                return;
            }
            match self.src.poll_timeout() {
                Some(t) => {
                    self.now = self.now.max(t);
                    self.src.handle_timeout(self.now);
                    self.drain();
                }
                None if self.jobs.is_empty() => {
                    panic!("the source waits for nothing and has not finished: {self:?}")
                }
                None => {}
            }
        }
        panic!("the source did not finish: {self:?}");
    }

    /// The digests a receipt after `Finish` attests.
    fn state(&self) -> StateDigests {
        let device = self.device_state.as_deref().unwrap_or_default();
        self.finish_root.map(|r| (r, device_state_digest(device)))
    }

    fn receipt_ok(&self, r: &crate::receipt::SignedReceipt, kind: ReceiptKind) -> bool {
        let state = match kind {
            ReceiptKind::Accepted => None,
            _ => self.state(),
        };
        self.checker
            .check(r, &self.peer, kind, SOURCE_MIGRATION, self.ticket, state)
            .is_ok()
    }

    fn message(&mut self, m: Message) {
        // A driver that serves Fetches itself while the machine says so
        // (as the agent's does): those whose first page is even, here.
        if let (Message::Fetch(f), Some(_)) = (&m, self.src.serving_faults()) {
            let count = self.tree.len() as u64;
            let max = PageSize::SIZE_4K.max_batch_pages();
            let pages = crate::source::fetch_pages(&f.pages, count, max, |_| false);
            if let (Some(first), Ok(pages)) = (f.pages.first(), pages) {
                if first.0 % 2 == 0 {
                    self.src.handle_fetches_served(1);
                    self.served_unreported += 1;
                    self.jobs.push_back(Job::Served {
                        pages,
                        link: self.link,
                    });
                    return;
                }
            }
        }
        let mut accepted_running = false;
        match &m {
            Message::Accept(a) => {
                self.accept_valid |= self.receipt_ok(&a.receipt, ReceiptKind::Accepted);
            }
            Message::Ready(r) => {
                let valid = self.finish_root == Some(r.memory_root)
                    && self.state().map(|s| s.1) == Some(r.device_digest)
                    && self.receipt_ok(&r.receipt, ReceiptKind::Ready);
                self.ready_valid |= valid && self.accept_valid;
            }
            Message::Started(s) => {
                let valid = self.receipt_ok(&s.receipt, ReceiptKind::Started);
                self.started_valid |= valid && self.ready_valid;
            }
            Message::Abort(_) => self.aborting = true,
            Message::PostcopyRunning(_) | Message::Resumed(_) => accepted_running = true,
            _ => {}
        }
        let ok = self.src.handle_message(self.now, m).is_ok();
        if accepted_running && ok && self.switched && self.outcome.is_none() {
            self.running_there = true;
        }
    }

    /// Pages dirty in a log collected with operand `arg`: none for 0.
    fn dirty(&self, arg: u8) -> PageBitmap {
        let n = self.tree.len() as u64;
        let mut d = PageBitmap::empty(n);
        for p in 0..n {
            if (p * 7 + u64::from(arg)) % 8 < u64::from(arg >> 5) {
                d.insert(PageIndex(p));
            }
        }
        d
    }

    fn report(&mut self, stream: u16, pages: &[PageIndex]) {
        let leaves: Vec<(PageIndex, Digest)> = pages.iter().map(|&p| (p, fuzz_leaf(p.0))).collect();
        for &(p, d) in &leaves {
            self.tree.set_leaf(crate::page::saturating_usize(p.0), d);
        }
        let n = leaves.len() as u64;
        let batch = SentBatch {
            stream,
            leaves,
            stats: EncodingStats {
                raw: n,
                ..EncodingStats::default()
            },
            frame_bytes: 32 + 4096 * n,
        };
        // An honest driver's report; a machine that is done may refuse it.
        let _ = self.src.handle_batch_sent(self.now, &batch);
    }

    /// Does (part of) the job in hand.
    fn job(&mut self, arg: u8, limit: Option<usize>) {
        let Some(job) = self.jobs.pop_front() else {
            return;
        };
        match job {
            Job::Pages {
                round,
                batches: mut batches_left,
                end_round,
            } => {
                let n = limit.unwrap_or(usize::MAX);
                for _ in 0..n {
                    let Some((stream, pages)) = batches_left.pop_front() else {
                        break;
                    };
                    self.report(stream, &pages);
                    self.now += Duration::from_millis(1);
                }
                if !batches_left.is_empty() {
                    self.jobs.push_front(Job::Pages {
                        round,
                        batches: batches_left,
                        end_round,
                    });
                } else if end_round {
                    self.src.handle_round_sent(self.now, round, 0);
                }
            }
            Job::Collect => {
                let d = self.dirty(arg);
                self.src.handle_dirty_log(self.now, d);
            }
            // Served as the machine asked to stop (0-2 Fetches).
            Job::StopFaults => {
                let n = u64::from(arg % 3);
                self.src.handle_faults_stopped(self.now, n);
                for _ in 0..n {
                    self.served_unreported += 1;
                    self.jobs.push_back(Job::Served {
                        pages: vec![PageIndex(0)],
                        link: self.link,
                    });
                }
            }
            Job::Served { pages, link } => {
                self.report(self.data_streams, &pages);
                if link == self.link {
                    self.served_unreported -= 1;
                }
            }
            Job::Pause => {
                let d = self.dirty(arg);
                let state = vec![arg; usize::from(arg % 32) + 1];
                if self
                    .src
                    .handle_paused(self.now, self.now, d, state.clone())
                    .is_ok()
                {
                    self.device_state = Some(state);
                }
            }
            // The driver's journal fails: nothing may be handed over.
            Job::CommitHandover | Job::CommitSwitch if arg == COMMIT_FAILS => {
                self.src.handle_commit_failed(self.now, "the disk is gone")
            }
            Job::CommitHandover => self.src.handle_handover_committed(self.now),
            Job::CommitSwitch => {
                self.switched = true;
                self.src.handle_switch_committed(self.now);
            }
            Job::Reconnect => self.src.handle_reconnected(self.now),
        }
        self.drain();
    }

    fn all_jobs(&mut self, arg: u8) {
        for _ in 0..MAX_JOBS {
            if self.jobs.is_empty() {
                return;
            }
            self.job(arg, None);
        }
        panic!("the driver's jobs do not end: {:?}", self.jobs);
    }

    /// Drains the machine's actions and events, checking each.
    fn drain(&mut self) {
        let mut n = 0;
        while let Some(a) = self.src.poll_action() {
            n += 1;
            assert!(n <= MAX_ACTIONS, "poll_action does not end");
            assert!(self.outcome.is_none(), "an action after the end: {a:?}");
            self.action(a);
        }
        while let Some(e) = self.src.poll_event() {
            n += 1;
            assert!(n <= MAX_ACTIONS, "poll_event does not end");
            if let SourceEvent::Finished(s) = e {
                self.finished(s.outcome, s.verified);
            }
        }
    }

    fn action(&mut self, a: SourceAction) {
        match a {
            SourceAction::Send(m) => {
                match &*m {
                    Message::Handover(_) => {
                        assert!(
                            self.accept_valid && self.ready_valid,
                            "Handover without a valid Accept and Ready"
                        );
                        assert!(!self.rolled_back, "Handover after a rollback");
                        self.handed_over = true;
                    }
                    Message::Finish(f) => {
                        assert_eq!(
                            self.served_unreported, 0,
                            "Finish before the batches of Fetches the driver served"
                        );
                        let root = self.tree.root();
                        assert_eq!(f.memory_root, root, "Finish names another root");
                        self.finish_root = Some(root);
                        // A new Finish: Ready and Started must be about it.
                        self.ready_valid = false;
                        self.started_valid = false;
                    }
                    Message::PostcopySwitch(_) => {
                        assert!(self.switched, "PostcopySwitch before it was recorded");
                        assert!(self.accept_valid, "PostcopySwitch without a valid Accept");
                    }
                    _ => {}
                }
                self.sent.push(*m);
            }
            SourceAction::StartDirtyLog => {
                assert!(self.accept_valid, "copying without a valid Accept");
            }
            SourceAction::Throttle { percent } => assert!(percent < 100),
            SourceAction::SendPages { round, pages, .. } => {
                let mut by_stream: Vec<Vec<PageIndex>> =
                    vec![Vec::new(); usize::from(self.data_streams)];
                for p in pages.iter() {
                    let s = stream_for(p, self.data_streams);
                    if let Some(v) = by_stream.get_mut(usize::from(s)) {
                        v.push(p);
                    }
                }
                let mut batches = VecDeque::new();
                for (s, pages) in (0..).zip(by_stream) {
                    for chunk in pages.chunks(16) {
                        batches.push_back((s, chunk.to_vec()));
                    }
                }
                self.jobs.push_back(Job::Pages {
                    round,
                    batches,
                    end_round: true,
                });
            }
            SourceAction::ServePages { round, pages } => {
                assert!(self.switched, "pages served before the switch");
                assert!(pages.len() <= PageSize::SIZE_4K.max_batch_pages());
                self.jobs.push_back(Job::Pages {
                    round,
                    batches: VecDeque::from([(self.data_streams, pages)]),
                    end_round: false,
                });
            }
            SourceAction::CollectDirtyLog => self.jobs.push_back(Job::Collect),
            SourceAction::StopFaults => self.jobs.push_back(Job::StopFaults),
            SourceAction::PauseVm => self.jobs.push_back(Job::Pause),
            SourceAction::CommitHandover => {
                assert!(self.ready_valid, "handover committed without a valid Ready");
                self.jobs.push_back(Job::CommitHandover);
            }
            SourceAction::CommitSwitch => self.jobs.push_back(Job::CommitSwitch),
            SourceAction::Reconnect => {
                // Before the switch only while pre-copy rounds go on.
                assert!(
                    self.switched || !self.handed_over,
                    "reconnecting after a pre-copy handover"
                );
                self.jobs.push_back(Job::Reconnect);
            }
            SourceAction::RollBack => {
                assert!(!self.rolled_back, "a second rollback");
                assert!(!self.discarded, "a rollback after the VM was discarded");
                assert!(!self.running_there, "a rollback after the VM ran there");
                if self.handed_over || self.switched {
                    assert!(
                        self.aborting,
                        "a rollback after the handover, without the destination's Abort"
                    );
                }
                self.rolled_back = true;
            }
            SourceAction::DiscardVm => {
                assert!(!self.rolled_back, "the VM discarded after a rollback");
                assert!(
                    self.started_valid,
                    "the VM discarded without a valid Started"
                );
                self.discarded = true;
            }
        }
    }

    fn finished(&mut self, outcome: Outcome, verified: bool) {
        assert!(self.outcome.is_none(), "a second end");
        match &outcome {
            Outcome::Completed => {
                assert!(
                    self.accept_valid && self.ready_valid && self.started_valid,
                    "completed without a valid Accept, Ready and Started"
                );
                assert!(self.handed_over && self.discarded && verified);
            }
            Outcome::Aborted(_) => {
                assert!(self.rolled_back, "aborted without a rollback");
                assert!(!self.discarded && !self.running_there);
            }
            Outcome::InDoubt(_) => {
                assert!(
                    self.handed_over || self.switched,
                    "in doubt before the handover"
                );
                assert!(!self.rolled_back && !self.discarded);
            }
        }
        assert!(
            !verified || self.ready_valid,
            "verified without a valid Ready"
        );
        self.outcome = Some(outcome);
    }
}
