//! The `Pair` harness: source and destination state machines driven against
//! each other in memory, with a simulated dirtying VM, a simulated link
//! (bandwidth and latency) and simulated time. Tamper hooks alter data in
//! flight; the tests set its public fields before [`Pair::run`] and read
//! them after.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use convoy_protocol::ctl::Outcome;
use convoy_protocol::delta::PageCache;
use convoy_protocol::destination::{
    Destination, DestinationAction, DestinationConfig, DestinationError, DestinationEvent,
    StartTimes,
};
use convoy_protocol::digest::{leaf_digest, Digest, MerkleTree};
use convoy_protocol::fuzz::InsecureCrypto;
use convoy_protocol::message::{Capabilities, Manifest, Message};
use convoy_protocol::names::MigrationId;
use convoy_protocol::page::{
    stream_for, BatchBuilder, BatchHeader, Compressor, MemoryGeometry, PageBitmap, PageData,
    PageIndex, PageSize, StreamReceiver,
};
use convoy_protocol::receipt::{ticket_digest, ReceiptKind, SignedReceipt};
use convoy_protocol::reuse::{RetainedImage, ReuseError, ReuseKey, ReuseOffer};
use convoy_protocol::source::{
    fetch_pages, SentBatch, Source, SourceAction, SourceConfig, SourceError, SourceEvent,
    SourceSummary,
};

pub const PAGE: usize = 4096;
pub const SRC: &str = "spiffe://pair.test/agent/source";
pub const DST: &str = "spiffe://pair.test/agent/destination";

/// A receipt signed by `who` for the Pair's migration.
pub fn receipt_by(
    who: &str,
    now: Instant,
    kind: ReceiptKind,
    state: convoy_protocol::receipt::StateDigests,
) -> SignedReceipt {
    InsecureCrypto::notary(who, now)
        .sign(
            now,
            kind,
            MigrationId([1; 16]),
            ticket_digest(&dummy_ticket()),
            state,
        )
        .unwrap()
}

pub fn dummy_ticket() -> convoy_protocol::ticket::SignedTicket {
    convoy_protocol::ticket::SignedTicket::from_parts(vec![], vec![], vec![])
}

pub fn handover() -> Message {
    Message::Handover(convoy_protocol::message::Handover {
        receipt: convoy_protocol::receipt::SignedReceipt::from_parts(vec![], vec![], vec![]),
        reuse: None,
    })
}

/// A tiny deterministic PRNG for the workload.
pub struct Rng(u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

pub struct SimVm {
    pub pages: Vec<Vec<u8>>,
    pub dirty: PageBitmap,
    pub logging: bool,
    pub paused: bool,
    pub discarded: bool,
    pub counter: u64,
    /// Writes per simulated millisecond.
    pub rate_per_ms: u64,
    /// Auto-converge throttle, percent of writes withheld.
    pub throttle: u8,
    pub hot_pages: u64,
    pub rng: Rng,
    pub carry: Duration,
}

impl SimVm {
    pub fn new(n: usize, rate_per_ms: u64) -> Self {
        let mut rng = Rng(42);
        let pages = (0..n)
            .map(|i| match i % 4 {
                0 => vec![0u8; PAGE],
                1 => (0..PAGE).map(|b| (b % 13) as u8).collect(),
                _ => (0..PAGE / 8)
                    .flat_map(|_| rng.next().to_le_bytes())
                    .collect(),
            })
            .collect();
        SimVm {
            pages,
            dirty: PageBitmap::empty(n as u64),
            logging: false,
            paused: false,
            discarded: false,
            counter: 0,
            rate_per_ms,
            throttle: 0,
            hot_pages: (n as u64 / 10).max(1),
            rng,
            carry: Duration::ZERO,
        }
    }

    pub fn advance(&mut self, dt: Duration) {
        if self.paused || self.discarded {
            return;
        }
        self.carry += dt;
        let ms = self.carry.as_millis() as u64;
        self.carry -= Duration::from_millis(ms);
        let n = self.pages.len() as u64;
        for _ in 0..ms {
            self.counter += 1;
            let writes = self.rate_per_ms * u64::from(100 - self.throttle) / 100;
            for _ in 0..writes {
                let r = self.rng.next();
                let page = if r % 10 < 9 {
                    (r >> 8) % self.hot_pages
                } else {
                    (r >> 8) % n
                };
                let off = ((r >> 40) as usize % (PAGE / 8)) * 8;
                self.pages[page as usize][off..off + 8]
                    .copy_from_slice(&self.counter.to_le_bytes());
                if self.logging {
                    self.dirty.insert(PageIndex(page));
                }
            }
        }
    }

    pub fn take_dirty(&mut self) -> PageBitmap {
        std::mem::replace(&mut self.dirty, PageBitmap::empty(self.pages.len() as u64))
    }
}

pub type Tamper = Box<dyn FnMut(u32, &mut BatchHeader, &mut Vec<u8>)>;
pub type ControlTamper = Box<dyn FnMut(&mut Message)>;

pub struct Pair {
    pub now: Instant,
    pub src: Source,
    pub dst: Destination,
    pub vm: SimVm,
    pub staging: Option<Vec<Vec<u8>>>,
    pub started: Option<u64>,
    pub paused_image: Option<Vec<Vec<u8>>>,
    pub streams: u16,
    /// Bytes per second on the link.
    pub bandwidth: f64,
    /// Extra delay of the data streams behind the control stream.
    pub data_lag: Duration,
    /// How long the destination takes to make its staging before it
    /// accepts (a host busy with other migrations).
    pub accept_delay: Duration,
    pub latency: Duration,
    /// At each pause: the leaves the source's and the destination's trees
    /// had yet to fold in (what their roots inside the pause would cost).
    pub unfolded_at_pause: Vec<(usize, usize)>,
    /// How long each side's durable record in the pause takes (the
    /// source's before `Handover`, the destination's before its VM runs).
    pub record: Duration,
    /// How long the destination's root check and `Ready` receipt take
    /// (between its last batch applied and `Ready` written).
    pub check: Duration,
    /// How long pausing the VM and reading its dirty log and device state
    /// take (inside the pause).
    pub pause_read: Duration,
    pub to_dst: VecDeque<(Instant, Message)>,
    pub to_src: VecDeque<(Instant, Message)>,
    pub data: VecDeque<(Instant, u16, BatchHeader, Bytes)>,
    pub receivers: Vec<StreamReceiver>,
    pub seqs: Vec<u64>,
    /// Post-copy: the source switched (no deltas from then on).
    pub switched: bool,
    /// Post-copy: pages the destination does not hold yet.
    pub missing: Option<PageBitmap>,
    /// Post-copy: pages the destination VM touches right after the switch.
    pub touch: Vec<u64>,
    /// Cut the link once the destination reports the VM running.
    pub cut_on_running: bool,
    /// Cut the link once the destination applied this many batches after
    /// the switch.
    pub cut_after_postcopy_batches: Option<usize>,
    pub postcopy_batches: usize,
    /// Cut the link once the destination applied this many batches before
    /// any switch (pre-copy), and the pages it had installed then.
    pub cut_after_precopy_batches: Option<usize>,
    /// After that cut, the next ones (batch counts, the first last).
    pub later_precopy_cuts: Vec<usize>,
    pub precopy_batches: usize,
    pub installed_at_cut: Option<u64>,
    pub precopy_pages_installed: u64,
    /// Cut the link as the destination sends RoundApplied for this round
    /// (the message is lost).
    pub cut_on_round_applied: Option<u32>,
    /// How long a cut link stays down before the source may dial again.
    pub outage: Duration,
    /// Post-copy recovery: when the source dials again.
    pub reconnect_at: Option<Instant>,
    /// Pages the destination VM touches while the link is down.
    pub touch_in_outage: Vec<u64>,
    /// Alters the first message of a new connection (the Resume).
    pub tamper_resume: Option<ControlTamper>,
    /// The source's page cache of each stream, for delta pages.
    pub caches: Vec<PageCache>,
    pub tamper: Option<Tamper>,
    /// Alters a control message the source sends.
    pub tamper_control: Option<ControlTamper>,
    /// Alters the destination's control messages on the way.
    pub tamper_back: Option<ControlTamper>,
    /// zstd level of the source's compressor.
    pub level: i32,
    /// Cut the link once the source has sent this many control messages.
    pub cut_after_src_msgs: Option<usize>,
    pub src_msgs: usize,
    pub link_up: bool,
    pub src_summary: Option<SourceSummary>,
    pub dst_event: Option<DestinationEvent>,
    pub src_errors: Vec<SourceError>,
    pub dst_errors: Vec<DestinationError>,
    pub rolled_back: bool,
    /// Resumes the destination refused.
    pub resume_refusals: Vec<String>,
    /// The identity a Resume arrives from.
    pub resume_peer: &'static str,
    /// The destination does not notice a cut before the source is back.
    pub dst_notices_late: bool,
    /// Source: seal the image under this key at DiscardVm (retention).
    pub retain: Option<ReuseOffer>,
    /// Source: the image it sealed when the VM left.
    pub retained_here: Option<RetainedImage>,
    /// Source: the leaves of the image verified when the VM arrived (what
    /// the destination retained), compared in round 1 when reusing.
    pub arrival_leaves: Option<Vec<Digest>>,
    /// Destination: the image it retained when the VM left it.
    pub held_image: Option<RetainedImage>,
    /// Destination: the offered key, when it holds the offered image.
    pub reuse_key: Option<ReuseKey>,
    /// The source's configuration (for a restart).
    pub src_cfg: SourceConfig,
    /// The device state the source paused with.
    pub paused_state: Option<Vec<u8>>,
    /// At a cut after the switch, the source process dies: a new one is
    /// made from the paused image ([`Source::restarted_after_switch`]).
    pub restart_source_at_cut: bool,
    /// The source's driver serves each Fetch itself while the machine
    /// says so ([`Source::serving_faults`]), as the agent's control
    /// reader does, instead of waiting for `ServePages`.
    pub serve_directly: bool,
    /// Fetches served that way.
    pub served_directly: u64,
    /// One more served that way as the machine asks to stop
    /// (`StopFaults`), counted in its answer.
    pub late_fetch_at_stop: bool,
    /// The round of the last Fetch served directly.
    pub fault_round: u32,
}

impl Pair {
    pub fn new(pages: usize, rate_per_ms: u64, bandwidth: f64, max_memory: u64) -> Self {
        Pair::with(pages, rate_per_ms, bandwidth, max_memory, |_| {})
    }

    /// A pair whose source configuration `tweak` adjusts.
    pub fn with(
        pages: usize,
        rate_per_ms: u64,
        bandwidth: f64,
        max_memory: u64,
        tweak: impl FnOnce(&mut SourceConfig),
    ) -> Self {
        let now = Instant::now();
        let geometry = MemoryGeometry::new(PageSize::SIZE_4K, pages as u64).unwrap();
        let streams = 2;
        let mut cfg = SourceConfig {
            migration: MigrationId([1; 16]),
            vm: "vm".parse().unwrap(),
            attributes: Default::default(),
            manifest: Manifest {
                memory: geometry,
                data_streams: streams,
                qemu: None,
                postcopy: false,
                start_paused: false,
                plan: convoy_protocol::model::MigrationPlan {
                    // 20 ms of pages, and the handover's two round
                    // trips over the 5 ms (each way) control link.
                    max_downtime_ms: 40,
                    max_rounds: 10,
                    force_stop: true,
                    ..Default::default()
                },
                reuse: None,
                disks: Vec::new(),
            },
            ticket: convoy_protocol::ticket::SignedTicket::from_parts(vec![], vec![], vec![]),
            peer: DST.parse().unwrap(),
            notary: InsecureCrypto::notary(SRC, now),
            capabilities: Capabilities::OURS,
            accept_timeout: Duration::from_secs(5),
            ready_timeout: Duration::from_secs(5),
            started_timeout: Duration::from_secs(5),
            recovery: Duration::ZERO,
            durable_records: Duration::ZERO,
        };
        tweak(&mut cfg);
        // Both sides wait for a broken link alike.
        let recovery = cfg.recovery;
        let src_cfg = cfg.clone();
        let src = Source::new(cfg);
        let dst = Destination::new(DestinationConfig {
            max_memory_bytes: max_memory,
            max_disk_bytes: 1 << 30,
            capabilities: Capabilities::OURS,
            handover_timeout: Duration::from_secs(5),
            peer: SRC.parse().unwrap(),
            notary: InsecureCrypto::notary(DST, now),
            recovery,
            silence: Duration::from_secs(60),
            max_bookkeeping_bytes: 1 << 30,
        });
        Pair {
            now,
            src,
            dst,
            vm: SimVm::new(pages, rate_per_ms),
            staging: None,
            started: None,
            paused_image: None,
            streams,
            bandwidth,
            latency: Duration::from_millis(5),
            unfolded_at_pause: Vec::new(),
            record: Duration::ZERO,
            check: Duration::ZERO,
            pause_read: Duration::ZERO,
            data_lag: Duration::ZERO,
            accept_delay: Duration::ZERO,
            to_dst: VecDeque::new(),
            to_src: VecDeque::new(),
            data: VecDeque::new(),
            receivers: (0..streams)
                .map(|s| StreamReceiver::new(s, streams, geometry))
                .chain([StreamReceiver::unstriped(streams, geometry)])
                .collect(),
            seqs: vec![0; usize::from(streams) + 1],
            switched: false,
            missing: None,
            touch: vec![1, 2, 500, 900],
            cut_on_running: false,
            serve_directly: false,
            served_directly: 0,
            late_fetch_at_stop: false,
            fault_round: 0,
            cut_after_postcopy_batches: None,
            postcopy_batches: 0,
            cut_after_precopy_batches: None,
            later_precopy_cuts: Vec::new(),
            precopy_batches: 0,
            installed_at_cut: None,
            precopy_pages_installed: 0,
            cut_on_round_applied: None,
            outage: Duration::from_secs(2),
            reconnect_at: None,
            touch_in_outage: Vec::new(),
            tamper_resume: None,
            caches: (0..streams)
                .map(|_| PageCache::new(pages * PAGE, PageSize::SIZE_4K))
                .collect(),
            tamper: None,
            tamper_control: None,
            tamper_back: None,
            level: 1,
            cut_after_src_msgs: None,
            src_msgs: 0,
            link_up: true,
            src_summary: None,
            dst_event: None,
            src_errors: Vec::new(),
            dst_errors: Vec::new(),
            rolled_back: false,
            resume_refusals: Vec::new(),
            resume_peer: SRC,
            dst_notices_late: false,
            retain: None,
            retained_here: None,
            arrival_leaves: None,
            held_image: None,
            reuse_key: None,
            src_cfg,
            paused_state: None,
            restart_source_at_cut: false,
        }
    }

    pub fn tick(&mut self, dt: Duration) {
        self.now += dt;
        self.vm.advance(dt);
    }

    pub fn send_pages(&mut self, round: u32, pages: PageBitmap, skip_zero: bool) {
        let mut skipped = 0;
        let mut comp = Compressor::new(self.level).unwrap();
        let delta = !self.switched
            && self
                .src
                .accepted_capabilities()
                .is_some_and(|c| c.has(Capabilities::DELTA));
        let reusing = round == 1
            && self
                .src
                .accepted_capabilities()
                .is_some_and(|c| c.has(Capabilities::REUSE));
        for s in 0..self.streams {
            let mine: Vec<PageIndex> = pages
                .iter()
                .filter(|p| stream_for(*p, self.streams) == s)
                .collect();
            for chunk in mine.chunks(16) {
                let mut b = BatchBuilder::new(PageSize::SIZE_4K);
                for &p in chunk {
                    let bytes = &self.vm.pages[p.0 as usize];
                    let fill = |buf: &mut [u8]| buf.copy_from_slice(bytes);
                    let cache = &mut self.caches[usize::from(s)];
                    if reusing {
                        let held = self
                            .arrival_leaves
                            .as_ref()
                            .and_then(|l| l.get(p.0 as usize).copied());
                        let cache = delta.then_some(cache);
                        if !b.push_nonzero_reusing_with(p, held, cache, fill).unwrap() {
                            skipped += 1;
                        }
                        continue;
                    }
                    let added = match (delta, skip_zero) {
                        (true, true) => b.push_nonzero_delta_with(p, cache, fill),
                        (true, false) => b.push_delta_with(p, cache, fill).map(|()| true),
                        (false, true) => b.push_nonzero_with(p, fill),
                        (false, false) => b.push_with(p, fill).map(|()| true),
                    }
                    .unwrap();
                    if !added {
                        skipped += 1;
                    }
                }
                if b.pages() == 0 {
                    continue;
                }
                let frame_bytes = self.transmit(s, round, b, &mut comp);
                // Transmitting takes time, during which the VM runs on.
                self.tick(Duration::from_secs_f64(frame_bytes as f64 / self.bandwidth));
                if self.switched {
                    // Faults are answered while the push goes on.
                    self.deliver();
                }
            }
        }
        self.src.handle_round_sent(self.now, round, skipped);
    }

    /// One batch on the fault stream.
    pub fn serve_pages(&mut self, round: u32, pages: Vec<PageIndex>) {
        let mut comp = Compressor::new(self.level).unwrap();
        let mut b = BatchBuilder::new(PageSize::SIZE_4K);
        for p in pages {
            let bytes = &self.vm.pages[p.0 as usize];
            b.push_with(p, |buf| buf.copy_from_slice(bytes)).unwrap();
        }
        self.transmit(self.streams, round, b, &mut comp);
    }

    /// Encodes a batch for stream `s`, reports it sent, puts it on the
    /// link (through the tamper hook); returns its frame bytes.
    pub fn transmit(&mut self, s: u16, round: u32, b: BatchBuilder, comp: &mut Compressor) -> u64 {
        let seq = self.seqs[usize::from(s)];
        self.seqs[usize::from(s)] += 1;
        let enc = b.finish(seq, round, comp).unwrap();
        let frame_bytes = (enc.payload.len() + 32) as u64;
        self.src
            .handle_batch_sent(
                self.now,
                &SentBatch {
                    stream: s,
                    leaves: enc.leaves,
                    stats: enc.stats,
                    frame_bytes,
                },
            )
            .unwrap();
        let mut header = enc.header;
        let mut payload = enc.payload;
        if let Some(t) = self.tamper.as_mut() {
            t(round, &mut header, &mut payload);
        }
        self.data.push_back((
            self.now + self.latency + self.data_lag,
            s,
            header,
            Bytes::from(payload),
        ));
        frame_bytes
    }

    pub fn drain_src(&mut self) {
        while let Some(a) = self.src.poll_action() {
            match a {
                SourceAction::Send(mut m) => {
                    if let Some(t) = self.tamper_control.as_mut() {
                        t(&mut m);
                    }
                    // Probes come and go beside the sequence the cut
                    // hooks count.
                    if !matches!(*m, Message::Probe(_)) {
                        self.src_msgs += 1;
                    }
                    if self.link_up {
                        self.to_dst.push_back((self.now + self.latency, *m));
                    }
                    if self.cut_after_src_msgs == Some(self.src_msgs) {
                        self.link_up = false;
                    }
                }
                SourceAction::StartDirtyLog => {
                    self.vm.logging = true;
                    self.vm.take_dirty();
                }
                SourceAction::SendPages {
                    round,
                    pages,
                    skip_zero,
                } => self.send_pages(round, pages, skip_zero),
                SourceAction::CollectDirtyLog => {
                    let d = self.vm.take_dirty();
                    self.src.handle_dirty_log(self.now, d);
                }
                SourceAction::PauseVm => {
                    self.unfolded_at_pause
                        .push((self.src.unfolded_leaves(), self.dst.unfolded_leaves()));
                    self.vm.paused = true;
                    self.paused_image = Some(self.vm.pages.clone());
                    let d = self.vm.take_dirty();
                    let state = self.vm.counter.to_le_bytes().to_vec();
                    self.paused_state = Some(state.clone());
                    let paused = self.now;
                    self.now += self.pause_read;
                    self.src.handle_paused(self.now, paused, d, state).unwrap();
                }
                SourceAction::CommitHandover => {
                    self.now += self.record;
                    self.src.handle_handover_committed(self.now);
                }
                SourceAction::CommitSwitch => {
                    self.switched = true;
                    self.src.handle_switch_committed(self.now);
                }
                SourceAction::ServePages { round, pages } => self.serve_pages(round, pages),
                // Fetches served directly here were reported at once, but
                // for one served as the machine asked to stop.
                SourceAction::StopFaults if self.late_fetch_at_stop => {
                    self.late_fetch_at_stop = false;
                    self.src.handle_faults_stopped(self.now, 1);
                    self.serve_pages(self.fault_round, vec![PageIndex(0)]);
                    self.served_directly += 1;
                }
                SourceAction::StopFaults => self.src.handle_faults_stopped(self.now, 0),
                SourceAction::Reconnect => {
                    // Streams of the new link count from zero.
                    self.reconnect_at = Some(self.now + self.outage);
                }
                SourceAction::Throttle { percent } => {
                    assert!(percent < 100);
                    self.vm.throttle = percent;
                }
                SourceAction::RollBack => {
                    self.rolled_back = true;
                    self.vm.throttle = 0;
                    self.vm.logging = false;
                    self.vm.paused = false;
                }
                SourceAction::DiscardVm => {
                    if let Some(offer) = self.retain.take() {
                        let image = self.vm.pages.clone();
                        let geometry =
                            MemoryGeometry::new(PageSize::SIZE_4K, image.len() as u64).unwrap();
                        self.retained_here = Some(
                            RetainedImage::seal(
                                offer.image,
                                "vm".parse().unwrap(),
                                geometry,
                                &offer.key,
                                |p, buf| buf.copy_from_slice(&image[p.0 as usize]),
                            )
                            .unwrap(),
                        );
                    }
                    self.vm.discarded = true;
                }
            }
        }
        while let Some(e) = self.src.poll_event() {
            if let SourceEvent::Finished(s) = e {
                self.src_summary = Some(*s);
            }
        }
    }

    pub fn drain_dst(&mut self) {
        while let Some(a) = self.dst.poll_action() {
            match a {
                DestinationAction::Send(mut m) => {
                    if let Some(t) = self.tamper_back.as_mut() {
                        t(&mut m);
                    }
                    let running = matches!(m, Message::PostcopyRunning(_));
                    if let Message::RoundApplied(a) = &m {
                        if self.cut_on_round_applied == Some(a.round) {
                            self.link_up = false;
                        }
                    }
                    if self.link_up {
                        // Nothing else is on the way back before Accept:
                        // delaying it keeps the stream in order.
                        let work = match m {
                            Message::Accept(_) => self.accept_delay,
                            Message::Ready(_) => self.check,
                            _ => Duration::ZERO,
                        };
                        if matches!(m, Message::Ready(_)) {
                            self.dst.note_ready_written(self.now + work);
                        }
                        self.to_src.push_back((self.now + self.latency + work, m));
                    }
                    if running && self.cut_on_running {
                        self.link_up = false;
                    }
                }
                DestinationAction::PrepareStaging { manifest, vm, .. } => {
                    let n = manifest.memory.page_count() as usize;
                    self.staging = Some(vec![vec![0u8; PAGE]; n]);
                    let held = match (&manifest.reuse, &self.held_image) {
                        (Some(offer), Some(img)) => {
                            img.id() == offer.image
                                && *img.vm() == vm
                                && img.geometry() == manifest.memory
                        }
                        _ => false,
                    };
                    if held {
                        self.reuse_key = manifest.reuse.map(|o| o.key);
                        for r in &mut self.receivers {
                            r.accept_retained();
                        }
                    }
                    self.dst.handle_staging_ready_reusing(self.now, held);
                    for s in 0..self.streams {
                        self.dst.handle_stream_opened(s).unwrap();
                    }
                }
                DestinationAction::StartVm { device_state } => {
                    let mut c = [0u8; 8];
                    c.copy_from_slice(&device_state);
                    self.started = Some(u64::from_le_bytes(c));
                    self.now += self.record;
                    let times = StartTimes {
                        record: self.record,
                        ..StartTimes::default()
                    };
                    self.dst.handle_started_after(self.now, times);
                }
                DestinationAction::DiscardStaging => self.staging = None,
                DestinationAction::StartPostcopy { device_state, owed } => {
                    // Owed pages are dropped: they read as missing.
                    let staging = self.staging.as_mut().unwrap();
                    for p in owed.iter() {
                        staging[p.0 as usize].fill(0);
                    }
                    let mut c = [0u8; 8];
                    c.copy_from_slice(&device_state);
                    self.started = Some(u64::from_le_bytes(c));
                    let asked: Vec<PageIndex> = self
                        .touch
                        .iter()
                        .map(|&p| PageIndex(p))
                        .filter(|p| owed.contains(*p))
                        .collect();
                    self.missing = Some(owed);
                    self.dst.handle_postcopy_started(self.now);
                    self.dst.request_pages(&asked);
                }
                DestinationAction::TrustVm => self.dst.handle_started(self.now),
                DestinationAction::AwaitResume => {
                    // The VM runs on, and touches what it touches.
                    let asked: Vec<PageIndex> = self
                        .touch_in_outage
                        .iter()
                        .map(|&p| PageIndex(p))
                        .filter(|p| self.missing.as_ref().is_some_and(|m| m.contains(*p)))
                        .collect();
                    self.dst.request_pages(&asked);
                }
            }
        }
        while let Some(e) = self.dst.poll_event() {
            self.dst_event = Some(e);
        }
    }

    pub fn deliver(&mut self) -> bool {
        let mut progressed = false;
        while let Some((at, _)) = self.to_dst.front() {
            if *at > self.now {
                break;
            }
            let (_, mut m) = self.to_dst.pop_front().unwrap();
            if let Message::Resume(_) = m {
                if let Some(t) = self.tamper_resume.as_mut() {
                    t(&mut m);
                }
            }
            if let Message::Resume(r) = &m {
                // The first message of a new connection, from its peer,
                // perhaps before the destination noticed the old link
                // broke: the driver then gives it up first.
                let peer = self.resume_peer.parse().unwrap();
                if !self.dst.is_recovering() && self.dst.resume_acceptable(&peer, r).is_ok() {
                    self.dst.handle_link_lost(self.now, "the source came back");
                    self.drain_dst();
                }
                if let Err(e) =
                    self.dst
                        .handle_resume(self.now, &self.resume_peer.parse().unwrap(), r)
                {
                    self.resume_refusals.push(e.to_string());
                }
            } else if let Err(e) = self.dst.handle_message(self.now, m) {
                self.dst_errors.push(e);
            }
            progressed = true;
            self.drain_dst();
        }
        while let Some((at, ..)) = self.data.front() {
            if *at > self.now {
                break;
            }
            let (_, s, header, payload) = self.data.pop_front().unwrap();
            progressed = true;
            if !self.link_up || self.staging.is_none() {
                continue;
            }
            match self.receivers[usize::from(s)].receive(&header, &payload) {
                Ok(batch) => {
                    let staging = self.staging.as_mut().unwrap();
                    let mut leaves = Vec::new();
                    let installing = self.dst.is_switched();
                    let mut bad = None;
                    for (idx, data) in batch.pages() {
                        let page = &mut staging[idx.0 as usize];
                        if installing {
                            // Only missing pages are filled, and only the
                            // bytes installed give the page its leaf (a
                            // second copy that arrives later is dropped).
                            let mut got = vec![0u8; PAGE];
                            data.write_to(&mut got).unwrap();
                            let missing = self.missing.as_mut().unwrap();
                            if missing.contains(idx) {
                                page.copy_from_slice(&got);
                                missing.remove(idx);
                                leaves.push((idx, leaf_digest(&got)));
                            }
                        } else if let PageData::Retained = data {
                            let opened = match (&self.held_image, &self.reuse_key) {
                                (Some(img), Some(key)) => img.open_into(key, idx, page),
                                _ => Err(ReuseError::NoSuchPage(idx.0)),
                            };
                            if let Err(e) = opened {
                                bad = Some(e);
                                break;
                            }
                            leaves.push((idx, leaf_digest(page)));
                        } else {
                            data.write_to(page).unwrap();
                            leaves.push((idx, leaf_digest(page)));
                        }
                    }
                    if let Some(e) = bad {
                        let e = self.dst.handle_bad_input(e.into());
                        self.dst_errors.push(e);
                    } else if let Err(e) = self
                        .dst
                        .handle_batch_applied(self.now, s, batch.seq, &leaves)
                    {
                        self.dst_errors.push(e);
                    } else if installing {
                        self.postcopy_batches += 1;
                        if self.cut_after_postcopy_batches == Some(self.postcopy_batches) {
                            self.link_up = false;
                        }
                    } else {
                        self.precopy_batches += 1;
                        self.precopy_pages_installed += leaves.len() as u64;
                        if self.cut_after_precopy_batches == Some(self.precopy_batches) {
                            self.installed_at_cut = Some(self.precopy_pages_installed);
                            self.link_up = false;
                            self.cut_after_precopy_batches = self.later_precopy_cuts.pop();
                        }
                    }
                }
                Err(e) => {
                    let e = self.dst.handle_bad_input(e.into());
                    self.dst_errors.push(e);
                }
            }
            self.drain_dst();
        }
        while let Some((at, _)) = self.to_src.front() {
            if *at > self.now {
                break;
            }
            let (_, m) = self.to_src.pop_front().unwrap();
            if let (true, Message::Fetch(f), Some(round)) =
                (self.serve_directly, &m, self.src.serving_faults())
            {
                // No pre-paging here: the asked pages alone.
                let count = self.vm.pages.len() as u64;
                if let Ok(pages) = fetch_pages(&f.pages, count, 64, |_| false) {
                    self.fault_round = round;
                    self.src.handle_fetches_served(1);
                    self.serve_pages(round, pages);
                    self.served_directly += 1;
                    progressed = true;
                    self.drain_src();
                    continue;
                }
            }
            if let Err(e) = self.src.handle_message(self.now, m) {
                self.src_errors.push(e);
            }
            progressed = true;
            self.drain_src();
        }
        progressed
    }

    /// Runs until both sides are finished (or 10 simulated minutes pass).
    pub fn run(&mut self) {
        self.src.start(self.now);
        self.drain_src();
        let end = self.now + Duration::from_secs(600);
        while self.now < end && !(self.src.is_finished() && self.dst.is_finished()) {
            if self.deliver() {
                continue;
            }
            if !self.link_up {
                if self.restart_source_at_cut && self.switched {
                    // The source dies with its link; a new one takes up
                    // the migration from the paused image.
                    self.restart_source_at_cut = false;
                    let image = self.paused_image.as_ref().unwrap();
                    let leaves: Vec<Digest> = image.iter().map(|p| leaf_digest(p)).collect();
                    let state = self.paused_state.clone().unwrap();
                    self.src = Source::restarted_after_switch(
                        self.src_cfg.clone(),
                        &leaves,
                        state,
                        self.now,
                    )
                    .unwrap();
                } else {
                    self.src.handle_link_lost(self.now, "cut");
                }
                self.drain_src();
                if !self.dst_notices_late {
                    self.dst.handle_link_lost(self.now, "cut");
                    self.drain_dst();
                }
                self.link_up = true; // deliver nothing more, but stop cutting
                self.to_dst.clear();
                self.to_src.clear();
                self.data.clear();
                continue;
            }
            if let Some(at) = self.reconnect_at.filter(|at| *at <= self.now) {
                let _ = at;
                self.reconnect_at = None;
                // A new connection: fresh streams.
                let geometry =
                    MemoryGeometry::new(PageSize::SIZE_4K, self.vm.pages.len() as u64).unwrap();
                self.receivers = (0..self.streams)
                    .map(|s| StreamReceiver::new(s, self.streams, geometry))
                    .chain([StreamReceiver::unstriped(self.streams, geometry)])
                    .collect();
                self.seqs.iter_mut().for_each(|s| *s = 0);
                // New encoders: empty delta caches.
                let pages = self.vm.pages.len();
                self.caches = (0..self.streams)
                    .map(|_| PageCache::new(pages * PAGE, PageSize::SIZE_4K))
                    .collect();
                self.src.handle_reconnected(self.now);
                self.drain_src();
                continue;
            }
            let next = [
                self.reconnect_at,
                self.to_dst.front().map(|m| m.0),
                self.to_src.front().map(|m| m.0),
                self.data.front().map(|m| m.0),
                self.src.poll_timeout(),
                self.dst.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min();
            let Some(next) = next else { break };
            if next > self.now {
                self.tick(next - self.now);
            }
            if self.src.poll_timeout().is_some_and(|t| t <= self.now) {
                self.src.handle_timeout(self.now);
                self.drain_src();
            }
            if self.dst.poll_timeout().is_some_and(|t| t <= self.now) {
                self.dst.handle_timeout(self.now);
                self.drain_dst();
            }
        }
    }

    pub fn summary(&self) -> &SourceSummary {
        self.src_summary.as_ref().expect("source finished")
    }
}

pub fn root_of(pages: &[Vec<u8>]) -> convoy_protocol::digest::Digest {
    let mut t = MerkleTree::filled(pages.len(), leaf_digest(&[0u8; PAGE]));
    for (i, p) in pages.iter().enumerate() {
        t.set_leaf(i, leaf_digest(p));
    }
    t.root()
}

/// A Pair whose destination does not offer [`Capabilities::DELTA`].
pub fn without_delta(p: &mut Pair) {
    p.dst = Destination::new(DestinationConfig {
        max_memory_bytes: 1 << 30,
        max_disk_bytes: 1 << 30,
        capabilities: Capabilities::ZSTD,
        handover_timeout: Duration::from_secs(5),
        peer: SRC.parse().unwrap(),
        notary: InsecureCrypto::notary(DST, p.now),
        recovery: Duration::ZERO,
        silence: Duration::from_secs(60),
        max_bookkeeping_bytes: 1 << 30,
    });
}

/// A 64-page idle pair whose source the test drives by hand: started and
/// accepted, with the destination's side played by the test.
pub fn accepted_without_a_destination() -> Pair {
    accepted_by_hand(|_| {})
}

/// [`accepted_without_a_destination`], its source configuration adjusted
/// by `tweak`.
pub fn accepted_by_hand(tweak: impl FnOnce(&mut SourceConfig)) -> Pair {
    let mut p = Pair::with(64, 0, 50e6, 1 << 30, tweak);
    p.src.start(p.now);
    p.drain_src();
    p.to_dst.clear();
    p.src
        .handle_message(
            p.now,
            Message::Accept(convoy_protocol::message::Accept {
                version: convoy_protocol::message::PROTOCOL_VERSION,
                // What a source without a reuse offer offers.
                capabilities: Capabilities(Capabilities::ZSTD.0 | Capabilities::DELTA.0),
                receipt: receipt_by(DST, p.now, ReceiptKind::Accepted, None),
                bases: Vec::new(),
            }),
        )
        .unwrap();
    p
}

pub fn assert_postcopy_completed(p: &Pair) -> SourceSummary {
    let s = p.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
    assert!(s.verified);
    assert_eq!(
        p.staging.as_ref().unwrap(),
        p.paused_image.as_ref().unwrap(),
        "the destination holds exactly the paused image"
    );
    assert_eq!(
        s.memory_root,
        Some(root_of(p.paused_image.as_ref().unwrap()))
    );
    assert!(
        p.missing.as_ref().unwrap().is_empty(),
        "a page never arrived"
    );
    assert_eq!(p.started, Some(p.vm.counter));
    assert!(p.vm.discarded && !p.rolled_back);
    assert!(matches!(
        p.dst_event,
        Some(DestinationEvent::Started { .. })
    ));
    s
}
