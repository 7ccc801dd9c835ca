//! The `Pair` harness: source and destination state machines driven against
//! each other in memory, with a simulated dirtying VM, a simulated link
//! (bandwidth and latency) and simulated time. Tamper hooks alter data in
//! flight.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use convoy_protocol::ctl::Outcome;
use convoy_protocol::delta::PageCache;
use convoy_protocol::destination::{
    Destination, DestinationAction, DestinationConfig, DestinationError, DestinationEvent,
};
use convoy_protocol::digest::{leaf_digest, Digest, MerkleTree};
use convoy_protocol::fuzz::InsecureCrypto;
use convoy_protocol::message::{Capabilities, Manifest, Message, Reason};
use convoy_protocol::names::MigrationId;
use convoy_protocol::page::{
    stream_for, BatchBuilder, BatchHeader, Compressor, MemoryGeometry, PageBitmap, PageData,
    PageIndex, PageSize, RunKind, StreamReceiver,
};
use convoy_protocol::receipt::{ticket_digest, ReceiptKind, SignedReceipt};
use convoy_protocol::reuse::{RetainedId, RetainedImage, ReuseError, ReuseKey, ReuseOffer};
use convoy_protocol::source::{
    SentBatch, Source, SourceAction, SourceConfig, SourceError, SourceEvent, SourceSummary,
    Switchover,
};

const PAGE: usize = 4096;
const SRC: &str = "spiffe://pair.test/agent/source";
const DST: &str = "spiffe://pair.test/agent/destination";

/// A receipt signed by `who` for the Pair's migration.
fn receipt_by(
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

fn dummy_ticket() -> convoy_protocol::ticket::SignedTicket {
    convoy_protocol::ticket::SignedTicket {
        body: vec![],
        signature: vec![],
        chain: vec![],
    }
}

fn handover() -> Message {
    Message::Handover(convoy_protocol::message::Handover {
        receipt: convoy_protocol::receipt::SignedReceipt {
            body: vec![],
            signature: vec![],
            chain: vec![],
        },
        reuse: None,
    })
}

/// A tiny deterministic PRNG for the workload.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

struct SimVm {
    pages: Vec<Vec<u8>>,
    dirty: PageBitmap,
    logging: bool,
    paused: bool,
    discarded: bool,
    counter: u64,
    /// Writes per simulated millisecond.
    rate_per_ms: u64,
    /// Auto-converge throttle, percent of writes withheld.
    throttle: u8,
    hot_pages: u64,
    rng: Rng,
    carry: Duration,
}

impl SimVm {
    fn new(n: usize, rate_per_ms: u64) -> Self {
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

    fn advance(&mut self, dt: Duration) {
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

    fn take_dirty(&mut self) -> PageBitmap {
        std::mem::replace(&mut self.dirty, PageBitmap::empty(self.pages.len() as u64))
    }
}

type Tamper = Box<dyn FnMut(u32, &mut BatchHeader, &mut Vec<u8>)>;
type ControlTamper = Box<dyn FnMut(&mut Message)>;

struct Pair {
    now: Instant,
    src: Source,
    dst: Destination,
    vm: SimVm,
    staging: Option<Vec<Vec<u8>>>,
    started: Option<u64>,
    paused_image: Option<Vec<Vec<u8>>>,
    streams: u16,
    /// Bytes per second on the link.
    bandwidth: f64,
    /// Extra delay of the data streams behind the control stream.
    data_lag: Duration,
    latency: Duration,
    to_dst: VecDeque<(Instant, Message)>,
    to_src: VecDeque<(Instant, Message)>,
    data: VecDeque<(Instant, u16, BatchHeader, Bytes)>,
    receivers: Vec<StreamReceiver>,
    seqs: Vec<u64>,
    /// Post-copy: the source switched (no deltas from then on).
    switched: bool,
    /// Post-copy: pages the destination does not hold yet.
    missing: Option<PageBitmap>,
    /// Post-copy: pages the destination VM touches right after the switch.
    touch: Vec<u64>,
    /// Cut the link once the destination reports the VM running.
    cut_on_running: bool,
    /// Cut the link once the destination applied this many batches after
    /// the switch.
    cut_after_postcopy_batches: Option<usize>,
    postcopy_batches: usize,
    /// How long a cut link stays down before the source may dial again.
    outage: Duration,
    /// Post-copy recovery: when the source dials again.
    reconnect_at: Option<Instant>,
    /// Pages the destination VM touches while the link is down.
    touch_in_outage: Vec<u64>,
    /// Alters the first message of a new connection (the Resume).
    tamper_resume: Option<ControlTamper>,
    /// The source's page cache of each stream, for delta pages.
    caches: Vec<PageCache>,
    tamper: Option<Tamper>,
    /// Alters a control message the source sends.
    tamper_control: Option<ControlTamper>,
    /// Alters the destination's control messages on the way.
    tamper_back: Option<ControlTamper>,
    /// zstd level of the source's compressor.
    level: i32,
    /// Cut the link once the source has sent this many control messages.
    cut_after_src_msgs: Option<usize>,
    src_msgs: usize,
    link_up: bool,
    src_summary: Option<SourceSummary>,
    dst_event: Option<DestinationEvent>,
    src_errors: Vec<SourceError>,
    dst_errors: Vec<DestinationError>,
    rolled_back: bool,
    /// Resumes the destination refused.
    resume_refusals: Vec<String>,
    /// The identity a Resume arrives from.
    resume_peer: &'static str,
    /// The destination does not notice a cut before the source is back.
    dst_notices_late: bool,
    /// Source: seal the image under this key at DiscardVm (retention).
    retain: Option<ReuseOffer>,
    /// Source: the image it sealed when the VM left.
    retained_here: Option<RetainedImage>,
    /// Source: the leaves of the image verified when the VM arrived (what
    /// the destination retained), compared in round 1 when reusing.
    arrival_leaves: Option<Vec<Digest>>,
    /// Destination: the image it retained when the VM left it.
    held_image: Option<RetainedImage>,
    /// Destination: the offered key, when it holds the offered image.
    reuse_key: Option<ReuseKey>,
}

impl Pair {
    fn new(pages: usize, rate_per_ms: u64, bandwidth: f64, max_memory: u64) -> Self {
        Pair::with(pages, rate_per_ms, bandwidth, max_memory, |_| {})
    }

    /// A pair whose source configuration `tweak` adjusts.
    fn with(
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
                plan: convoy_protocol::model::MigrationPlan::default(),
                reuse: None,
                disks: Vec::new(),
            },
            ticket: convoy_protocol::ticket::SignedTicket {
                body: vec![],
                signature: vec![],
                chain: vec![],
            },
            peer: DST.parse().unwrap(),
            notary: InsecureCrypto::notary(SRC, now),
            capabilities: Capabilities::OURS,
            max_downtime: Duration::from_millis(20),
            max_rounds: 10,
            switchover: Switchover::Never,
            auto_converge: false,
            hold_hot_pages: false,
            force_stop: true,
            accept_timeout: Duration::from_secs(5),
            ready_timeout: Duration::from_secs(5),
            started_timeout: Duration::from_secs(5),
            recovery: Duration::ZERO,
            storage_postcopy: false,
        };
        tweak(&mut cfg);
        // Both sides wait for a broken link alike.
        let recovery = cfg.recovery;
        let src = Source::new(cfg);
        let dst = Destination::new(DestinationConfig {
            max_memory_bytes: max_memory,
            max_disk_bytes: 1 << 30,
            capabilities: Capabilities::OURS,
            handover_timeout: Duration::from_secs(5),
            peer: SRC.parse().unwrap(),
            notary: InsecureCrypto::notary(DST, now),
            recovery,
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
            data_lag: Duration::ZERO,
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
            cut_after_postcopy_batches: None,
            postcopy_batches: 0,
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
        }
    }

    fn tick(&mut self, dt: Duration) {
        self.now += dt;
        self.vm.advance(dt);
    }

    fn send_pages(&mut self, round: u32, pages: PageBitmap, skip_zero: bool) {
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
    fn serve_pages(&mut self, round: u32, pages: Vec<PageIndex>) {
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
    fn transmit(&mut self, s: u16, round: u32, b: BatchBuilder, comp: &mut Compressor) -> u64 {
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

    fn drain_src(&mut self) {
        while let Some(a) = self.src.poll_action() {
            match a {
                SourceAction::Send(mut m) => {
                    if let Some(t) = self.tamper_control.as_mut() {
                        t(&mut m);
                    }
                    self.src_msgs += 1;
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
                    self.vm.paused = true;
                    self.paused_image = Some(self.vm.pages.clone());
                    let d = self.vm.take_dirty();
                    let state = self.vm.counter.to_le_bytes().to_vec();
                    self.src.handle_paused(self.now, d, state).unwrap();
                }
                SourceAction::CommitHandover => self.src.handle_handover_committed(self.now),
                SourceAction::CommitSwitch => {
                    self.switched = true;
                    self.src.handle_switch_committed(self.now);
                }
                SourceAction::ServePages { round, pages } => self.serve_pages(round, pages),
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

    fn drain_dst(&mut self) {
        while let Some(a) = self.dst.poll_action() {
            match a {
                DestinationAction::Send(mut m) => {
                    if let Some(t) = self.tamper_back.as_mut() {
                        t(&mut m);
                    }
                    let running = matches!(m, Message::PostcopyRunning(_));
                    if self.link_up {
                        self.to_src.push_back((self.now + self.latency, m));
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
                    self.dst.handle_started(self.now);
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

    fn deliver(&mut self) -> bool {
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
                if let Err(e) = self
                    .dst
                    .handle_resume(&self.resume_peer.parse().unwrap(), r)
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
            if let Err(e) = self.src.handle_message(self.now, m) {
                self.src_errors.push(e);
            }
            progressed = true;
            self.drain_src();
        }
        progressed
    }

    /// Runs until both sides are finished (or 10 simulated minutes pass).
    fn run(&mut self) {
        self.src.start(self.now);
        self.drain_src();
        let end = self.now + Duration::from_secs(600);
        while self.now < end && !(self.src.is_finished() && self.dst.is_finished()) {
            if self.deliver() {
                continue;
            }
            if !self.link_up {
                self.src.handle_link_lost(self.now, "cut");
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

    fn summary(&self) -> &SourceSummary {
        self.src_summary.as_ref().expect("source finished")
    }
}

fn root_of(pages: &[Vec<u8>]) -> convoy_protocol::digest::Digest {
    let mut t = MerkleTree::filled(pages.len(), leaf_digest(&[0u8; PAGE]));
    for (i, p) in pages.iter().enumerate() {
        t.set_leaf(i, leaf_digest(p));
    }
    t.root()
}

#[test]
fn idle_vm_moves_in_one_round_and_verifies() {
    let mut p = Pair::new(512, 0, 100e6, 1 << 30);
    p.run();
    let s = p.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed);
    assert!(s.verified && s.converged);
    assert_eq!(s.rounds, 2, "bulk round plus an empty final round");
    // A quarter of the pages are zero and cost nothing in round 1.
    assert_eq!(s.encodings.zero, 128);
    assert_eq!(s.pages_sent, 384);
    assert_eq!(p.staging.as_ref().unwrap(), &p.vm.pages);
    assert_eq!(s.memory_root, Some(root_of(&p.vm.pages)));
    assert!(p.vm.discarded);
    assert!(!p.rolled_back);
}

#[test]
fn dirtying_vm_converges_and_destination_holds_the_paused_image() {
    // 60 writes per simulated ms, 90% into a 10% hot set, 50 MB/s link.
    let mut p = Pair::new(2048, 60, 50e6, 1 << 30);
    p.run();
    let s = p.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
    assert!(s.rounds > 2, "a dirtying VM needs several rounds: {s:?}");
    assert!(s.converged);
    let paused = p.paused_image.as_ref().unwrap();
    assert_eq!(p.staging.as_ref().unwrap(), paused);
    assert_eq!(s.memory_root, Some(root_of(paused)));
    // The device counter continues: the destination starts at the value the
    // source paused with.
    assert_eq!(p.started, Some(p.vm.counter));
    assert!(p.vm.discarded && !p.rolled_back);
    assert!(s.downtime.unwrap() < s.total);
    // Hot pages change in a few 8-byte words a round: most go as deltas.
    assert!(s.encodings.delta > 0, "{:?}", s.encodings);
}

/// A Pair whose destination does not offer [`Capabilities::DELTA`].
fn without_delta(p: &mut Pair) {
    p.dst = Destination::new(DestinationConfig {
        max_memory_bytes: 1 << 30,
        max_disk_bytes: 1 << 30,
        capabilities: Capabilities::ZSTD,
        handover_timeout: Duration::from_secs(5),
        peer: SRC.parse().unwrap(),
        notary: InsecureCrypto::notary(DST, p.now),
        recovery: Duration::ZERO,
    });
}

#[test]
fn deltas_go_only_to_a_destination_that_accepted_them_and_save_bytes() {
    let run = |rate: u64, delta: bool| {
        let mut p = Pair::new(2048, rate, 50e6, 1 << 30);
        if !delta {
            without_delta(&mut p);
        }
        p.run();
        let s = p.summary().clone();
        assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
        assert_eq!(
            p.staging.as_ref().unwrap(),
            p.paused_image.as_ref().unwrap()
        );
        s
    };
    let (with, without) = (run(60, true), run(60, false));
    assert_eq!(without.encodings.delta, 0);
    assert!(with.encodings.delta > 0);
    // Bytes after the bulk round, which an idle VM's migration is.
    let bulk = run(0, true).payload_bytes;
    let (with, without) = (with.payload_bytes - bulk, without.payload_bytes - bulk);
    assert!(
        with * 4 < without,
        "{with} vs {without} bytes after the bulk round"
    );
}

/// Flips the last literal byte of every non-empty delta in a raw batch;
/// returns how many it flipped.
fn flip_delta_literals(h: &BatchHeader, payload: &mut [u8]) -> usize {
    let mut off = 0;
    let mut flipped = 0;
    for run in &h.runs {
        for _ in 0..run.len {
            match run.kind {
                RunKind::Data => off += PAGE,
                RunKind::Delta => {
                    let len = usize::from(u16::from_le_bytes([payload[off], payload[off + 1]]));
                    off += 2 + len;
                    if len > 0 {
                        payload[off - 1] ^= 0x10;
                        flipped += 1;
                    }
                }
                _ => {}
            }
        }
    }
    flipped
}

#[test]
fn an_altered_delta_is_caught_by_the_root_check() {
    let mut p = Pair::new(2048, 60, 50e6, 1 << 30);
    p.level = 0;
    let flipped = std::rc::Rc::new(std::cell::Cell::new(0));
    let counter = flipped.clone();
    p.tamper = Some(Box::new(move |_round, h, payload| {
        counter.set(counter.get() + flip_delta_literals(h, payload));
    }));
    p.run();
    let s = p.summary().clone();
    assert!(flipped.get() > 0, "no delta to alter");
    assert!(
        matches!(s.outcome, Outcome::Aborted(ref m) if m.contains("root")),
        "{s:?}"
    );
    assert!(p.rolled_back && !p.vm.discarded && p.started.is_none());
    assert!(matches!(
        p.dst_errors.as_slice(),
        [DestinationError::RootMismatch { .. }]
    ));
}

#[test]
fn too_fast_a_dirty_rate_hits_the_round_limit_but_still_completes() {
    // 400 writes per ms on a slow link never converges to 20 ms downtime
    // when pages go whole (with deltas, 8-byte writes are cheap enough to
    // converge).
    let mut p = Pair::new(2048, 400, 5e6, 1 << 30);
    without_delta(&mut p);
    p.run();
    let s = p.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed);
    assert!(!s.converged);
    assert_eq!(s.rounds, 11, "10 pre-copy rounds and the final one");
    assert_eq!(
        p.staging.as_ref().unwrap(),
        p.paused_image.as_ref().unwrap()
    );
}

#[test]
fn a_vm_that_cannot_converge_fails_honestly_and_keeps_running() {
    // The busy VM of the previous test, without force_stop or throttling.
    let mut p = Pair::with(2048, 400, 5e6, 1 << 30, |c| c.force_stop = false);
    without_delta(&mut p);
    p.run();
    let s = p.summary().clone();
    let Outcome::Aborted(why) = &s.outcome else {
        panic!("{s:?}")
    };
    assert!(why.contains("cannot converge at this dirty rate"), "{why}");
    assert!(why.contains("against a target of 20 ms"), "{why}");
    assert!(s.convergence.dirty_rate > 0);
    assert_eq!(s.rounds, 10);
    assert!(p.rolled_back && !p.vm.paused && !p.vm.discarded);
    assert!(p.staging.is_none(), "the destination discarded its staging");
    assert!(matches!(p.dst_event, Some(DestinationEvent::Failed(_))));
}

#[test]
fn auto_converge_throttles_a_busy_vm_until_it_converges() {
    let run = |auto: bool| {
        let mut p = Pair::with(2048, 400, 20e6, 1 << 30, |c| {
            c.force_stop = false;
            c.auto_converge = auto;
            c.max_downtime = Duration::from_millis(100);
            c.max_rounds = 30;
        });
        without_delta(&mut p);
        p.run();
        p
    };
    // Unthrottled, this workload never meets the target...
    let p = run(false);
    let s = p.summary();
    assert!(matches!(s.outcome, Outcome::Aborted(_)), "{s:?}");
    assert_eq!(s.convergence.throttle, 0);
    // ...throttled in steps, it does, and the image is exact.
    let p = run(true);
    let s = p.summary();
    assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
    assert!(s.converged && s.verified);
    assert!(s.convergence.throttle >= 20, "{:?}", s.convergence);
    assert_eq!(
        p.staging.as_ref().unwrap(),
        p.paused_image.as_ref().unwrap()
    );
}

#[test]
fn hot_pages_are_held_back_and_fewer_pages_are_sent_twice() {
    let run = |hold: bool| {
        let mut p = Pair::with(4096, 60, 30e6, 1 << 30, |c| {
            c.hold_hot_pages = hold;
            c.max_rounds = 30;
        });
        // Whole pages, so that every re-send costs what it would without
        // deltas.
        without_delta(&mut p);
        p.run();
        let s = p.summary().clone();
        assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
        assert!(s.verified);
        assert_eq!(
            p.staging.as_ref().unwrap(),
            p.paused_image.as_ref().unwrap()
        );
        s
    };
    let plain = run(false);
    let held = run(true);
    assert_eq!(plain.convergence.held_back, 0);
    assert!(held.convergence.held_back > 0, "{:?}", held.convergence);
    assert!(
        held.convergence.resent_pages < plain.convergence.resent_pages,
        "held {:?} plain {:?}",
        held.convergence,
        plain.convergence
    );
}

#[test]
fn a_page_altered_in_flight_aborts_and_the_vm_runs_at_the_source() {
    // Idle, so the altered page is never re-sent and overwritten.
    let mut p = Pair::new(512, 0, 50e6, 1 << 30);
    p.level = 0;
    let mut done = false;
    p.tamper = Some(Box::new(move |_round, h, payload| {
        if !done && h.compression == convoy_protocol::page::Compression::None && !payload.is_empty()
        {
            payload[100] ^= 1;
            done = true;
        }
    }));
    p.run();
    let s = p.summary().clone();
    assert!(
        matches!(s.outcome, Outcome::Aborted(ref m) if m.contains("root")),
        "{s:?}"
    );
    assert!(!s.verified);
    assert!(p.rolled_back && !p.vm.paused && !p.vm.discarded);
    assert!(p.staging.is_none(), "staging discarded");
    assert!(p.started.is_none());
    assert!(matches!(
        p.dst_errors.as_slice(),
        [DestinationError::RootMismatch { .. }]
    ));
}

#[test]
fn a_duplicated_batch_is_refused_and_nothing_starts() {
    let mut p = Pair::new(512, 0, 50e6, 1 << 30);
    let mut n = 0;
    p.tamper = Some(Box::new(move |_r, h, _| {
        n += 1;
        if n == 3 {
            h.seq -= 1;
        }
    }));
    p.run();
    assert!(matches!(p.summary().outcome, Outcome::Aborted(_)));
    assert!(p.rolled_back && p.started.is_none() && p.staging.is_none());
    assert!(matches!(
        p.dst_errors.first(),
        Some(DestinationError::Batch(_))
    ));
}

#[test]
fn a_destination_that_lacks_capacity_rejects_and_the_vm_stays() {
    let mut p = Pair::new(512, 5, 50e6, 4096 * 100);
    p.run();
    assert!(matches!(p.summary().outcome, Outcome::Aborted(ref m) if m.contains("refused")));
    assert!(p.rolled_back && !p.vm.paused);
    assert_eq!(p.summary().pages_sent, 0);
    assert!(matches!(p.dst_event, Some(DestinationEvent::Failed(_))));
}

#[test]
fn an_illegal_message_is_a_typed_error_naming_phase_and_message() {
    let mut p = Pair::new(64, 0, 50e6, 1 << 30);
    p.src.start(p.now);
    p.drain_src();
    let err = p.src.handle_message(p.now, handover()).unwrap_err();
    assert_eq!(
        err,
        SourceError::Unexpected {
            phase: "awaiting Accept",
            message: "Handover"
        }
    );
    p.drain_src();
    assert!(p.rolled_back);
    assert!(p.src.is_finished());

    let mut d = Destination::new(DestinationConfig {
        max_memory_bytes: 1 << 30,
        max_disk_bytes: 1 << 30,
        capabilities: Capabilities::OURS,
        handover_timeout: Duration::from_secs(1),
        peer: SRC.parse().unwrap(),
        notary: InsecureCrypto::notary(DST, Instant::now()),
        recovery: Duration::ZERO,
    });
    let err = d.handle_message(Instant::now(), handover()).unwrap_err();
    assert_eq!(
        err,
        DestinationError::Unexpected {
            phase: "awaiting Propose",
            message: "Handover"
        }
    );
}

#[test]
fn link_lost_before_handover_rolls_back() {
    let mut p = Pair::new(512, 5, 50e6, 1 << 30);
    // Propose, then the link dies during copying.
    p.cut_after_src_msgs = Some(1);
    p.run();
    assert!(matches!(p.summary().outcome, Outcome::Aborted(_)));
    assert!(p.rolled_back && !p.vm.paused && !p.vm.discarded);
    assert!(p.staging.is_none() && p.started.is_none());
}

#[test]
fn link_lost_after_handover_is_in_doubt_and_never_resumes() {
    let mut p = Pair::new(512, 5, 50e6, 1 << 30);
    // Propose, RoundEnd (round 1), Finish, Handover: cut right after
    // Handover leaves.
    p.cut_after_src_msgs = Some(4);
    p.run();
    assert!(
        matches!(p.summary().outcome, Outcome::InDoubt(_)),
        "{:?}",
        p.summary()
    );
    assert!(
        !p.rolled_back,
        "a handed-over VM must never resume by itself"
    );
    assert!(p.vm.paused && !p.vm.discarded, "the paused copy is kept");
    // The destination never got Handover: it discarded, nothing runs twice.
    assert!(p.started.is_none());
}

#[test]
fn no_accept_times_out() {
    let mut p = Pair::new(64, 0, 50e6, 1 << 30);
    p.cut_after_src_msgs = Some(0); // never cut; drop destination answers instead
    p.src.start(p.now);
    p.drain_src();
    p.to_dst.clear();
    let t = p.src.poll_timeout().unwrap();
    p.tick(t - p.now);
    p.src.handle_timeout(p.now);
    p.drain_src();
    assert!(matches!(p.summary().outcome, Outcome::Aborted(ref m) if m.contains("Accept")));
    assert!(p.rolled_back);
}

/// A 64-page idle pair whose source the test drives by hand: started and
/// accepted, with the destination's side played by the test.
fn accepted_without_a_destination() -> Pair {
    let mut p = Pair::new(64, 0, 50e6, 1 << 30);
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

#[test]
fn a_wrong_root_in_ready_makes_the_source_abort() {
    let mut p = accepted_without_a_destination();
    // The harness sends the pages synchronously: one drain ends round 1,
    // which the source measures once the destination says it applied it;
    // the next reaches AwaitReady, whose deadline is armed.
    p.drain_src();
    assert!(!p.src.is_finished(), "awaiting RoundApplied");
    p.to_dst.clear();
    p.src
        .handle_message(
            p.now,
            Message::RoundApplied(convoy_protocol::message::RoundApplied { round: 1 }),
        )
        .unwrap();
    p.drain_src();
    assert!(p.src.poll_timeout().is_some() && !p.src.is_finished());
    let err = p.src.handle_message(
        p.now,
        Message::Ready(convoy_protocol::message::Ready {
            memory_root: convoy_protocol::digest::Digest([9; 32]),
            device_digest: convoy_protocol::digest::Digest([9; 32]),
            receipt: receipt_by(
                DST,
                p.now,
                ReceiptKind::Ready,
                Some((
                    convoy_protocol::digest::Digest([9; 32]),
                    convoy_protocol::digest::Digest([9; 32]),
                )),
            ),
            faults: None,
        }),
    );
    assert!(
        matches!(err, Err(SourceError::RootMismatch { .. })),
        "{err:?}"
    );
    p.drain_src();
    assert!(p.rolled_back);
    let _ = Reason::RootMismatch;
}

#[test]
fn both_sides_end_with_each_others_verified_receipts() {
    let mut p = Pair::new(256, 5, 50e6, 1 << 30);
    p.run();
    let s = p.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed);
    // Source: Accepted, Ready, our Sent, Started.
    let verifier = InsecureCrypto("unused".into());
    let kinds: Vec<_> = s
        .receipts
        .iter()
        .map(|r| r.verify(&verifier).unwrap().receipt.kind)
        .collect();
    assert_eq!(
        kinds,
        vec![
            ReceiptKind::Accepted,
            ReceiptKind::Ready,
            ReceiptKind::Sent,
            ReceiptKind::Started
        ]
    );
    let Some(DestinationEvent::Started {
        receipts,
        memory_root,
    }) = &p.dst_event
    else {
        panic!("destination did not start: {:?}", p.dst_event);
    };
    assert_eq!(Some(*memory_root), s.memory_root);
    // Destination: its own Accepted and Ready, the source's Sent, its Started.
    let signers: Vec<_> = receipts
        .iter()
        .map(|r| r.verify(&verifier).unwrap().signer.to_string())
        .collect();
    assert_eq!(signers, vec![DST, DST, SRC, DST]);
}

#[test]
fn a_receipt_from_the_wrong_agent_aborts_before_handover() {
    let mut p = Pair::new(64, 0, 50e6, 1 << 30);
    p.src.start(p.now);
    p.drain_src();
    p.to_dst.clear();
    // Accepted, but signed by an agent that is not the destination.
    let err = p.src.handle_message(
        p.now,
        Message::Accept(convoy_protocol::message::Accept {
            version: convoy_protocol::message::PROTOCOL_VERSION,
            capabilities: Capabilities(Capabilities::ZSTD.0 | Capabilities::DELTA.0),
            receipt: receipt_by(
                "spiffe://pair.test/agent/mallory",
                p.now,
                ReceiptKind::Accepted,
                None,
            ),
            bases: Vec::new(),
        }),
    );
    assert!(matches!(err, Err(SourceError::Receipt(_))), "{err:?}");
    p.drain_src();
    assert!(p.rolled_back);
    assert!(matches!(p.summary().outcome, Outcome::Aborted(_)));
}

#[test]
fn a_forged_sent_receipt_keeps_the_destination_from_starting() {
    let mut p = Pair::new(128, 0, 50e6, 1 << 30);
    let now = p.now;
    // An attacker swaps the source's Sent receipt for one over other state.
    p.tamper_control = Some(Box::new(move |m| {
        if let Message::Handover(h) = m {
            h.receipt = receipt_by(
                SRC,
                now,
                ReceiptKind::Sent,
                Some((
                    convoy_protocol::digest::Digest([1; 32]),
                    convoy_protocol::digest::Digest([2; 32]),
                )),
            );
        }
    }));
    p.run();
    assert!(
        matches!(p.dst_errors.as_slice(), [DestinationError::Receipt(_)]),
        "{:?}",
        p.dst_errors
    );
    assert!(p.started.is_none() && p.staging.is_none());
    // The destination said it did not start: the VM runs at the source.
    assert!(
        matches!(p.summary().outcome, Outcome::Aborted(_)),
        "{:?}",
        p.summary()
    );
    assert!(p.rolled_back && !p.vm.paused);
}

#[test]
fn a_tampered_device_state_aborts_before_handover() {
    let mut p = Pair::new(128, 5, 50e6, 1 << 30);
    // The device state in Finish is altered in flight: the destination's
    // Ready digests it, the source sees a state it did not send.
    p.tamper_control = Some(Box::new(|m| {
        if let Message::Finish(f) = m {
            f.device_state[0] ^= 1;
        }
    }));
    p.run();
    assert!(
        matches!(p.src_errors.as_slice(), [SourceError::DeviceStateMismatch]),
        "{:?}",
        p.src_errors
    );
    assert!(matches!(p.summary().outcome, Outcome::Aborted(_)));
    assert!(p.rolled_back && !p.vm.paused && p.started.is_none() && p.staging.is_none());
}

#[test]
fn a_round_end_that_understates_what_was_sent_aborts_before_handover() {
    let mut p = Pair::new(128, 5, 50e6, 1 << 30);
    // The destination has applied round 1's batches when a RoundEnd
    // claiming none arrives: a protocol violation, not a confirmation.
    p.tamper_control = Some(Box::new(|m| {
        if let Message::RoundEnd(r) = m {
            r.batches.iter_mut().for_each(|b| *b = 0);
        }
    }));
    p.run();
    assert!(
        matches!(
            p.dst_errors.as_slice(),
            [DestinationError::BatchCount { .. }]
        ),
        "{:?}",
        p.dst_errors
    );
    assert!(matches!(p.summary().outcome, Outcome::Aborted(_)));
    assert!(p.rolled_back && !p.vm.paused && p.started.is_none() && p.staging.is_none());
}

#[test]
fn a_round_end_that_overtakes_its_batches_is_confirmed_once_they_are_applied() {
    // The control stream is faster than the data: each RoundEnd arrives
    // while its round's batches are still on the way.
    let mut p = Pair::new(256, 5, 50e6, 1 << 30);
    p.data_lag = Duration::from_millis(200);
    p.run();
    let s = p.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
    assert!(s.verified && s.rounds >= 2);
    assert_eq!(
        p.staging.as_ref().unwrap(),
        p.paused_image.as_ref().unwrap()
    );
}

#[test]
fn the_time_a_started_vm_waited_for_its_disks_is_not_downtime_and_cannot_go_below_zero() {
    let run = |synced_ms: Option<u32>| {
        let mut p = Pair::new(128, 0, 50e6, 1 << 30);
        p.tamper_back = Some(Box::new(move |m| {
            if let (Message::Started(s), Some(ms)) = (m, synced_ms) {
                s.synced_ms = ms;
            }
        }));
        p.run();
        let s = p.summary().clone();
        assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
        s.downtime.unwrap()
    };
    let plain = run(None);
    // The harness's link takes 5 ms each way: the pause spans at least
    // Finish → Ready → Handover → Started.
    assert!(plain >= Duration::from_millis(15), "{plain:?}");
    assert_eq!(run(Some(5)), plain - Duration::from_millis(5));
    assert_eq!(run(Some(u32::MAX)), Duration::ZERO);
}

#[test]
fn a_destination_that_never_confirms_a_round_times_out_and_rolls_back() {
    let mut p = accepted_without_a_destination();
    p.drain_src();
    let deadline = p.src.poll_timeout().expect("a deadline while draining");
    p.src.handle_timeout(deadline);
    p.drain_src();
    assert!(
        matches!(&p.summary().outcome, Outcome::Aborted(w) if w.contains("did not confirm round 1")),
        "{:?}",
        p.summary()
    );
    assert!(p.rolled_back && !p.vm.paused);
}

fn assert_postcopy_completed(p: &Pair) -> SourceSummary {
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

#[test]
fn postcopy_runs_the_vm_first_then_fills_and_verifies_every_page() {
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, |c| {
        c.switchover = Switchover::Immediately;
    });
    p.run();
    let s = assert_postcopy_completed(&p);
    let pc = s.postcopy.unwrap();
    assert_eq!(pc.owed, 2048, "every page is owed, zero pages included");
    assert!(pc.fetches > 0 && pc.served > 0, "{pc:?}");
    assert_eq!(s.rounds, 1);
    // Downtime ends when the VM runs there, long before the last page.
    assert!(s.downtime.unwrap() * 5 < s.total, "{s:?}");
}

#[test]
fn hybrid_switches_after_the_first_pass_and_owes_only_the_dirty_pages() {
    // The VM that never converges in pre-copy (see above).
    // One pass is long enough for the cold writes to dirty more than
    // 20 ms of downtime can carry, not long enough to dirty everything.
    let mut p = Pair::with(2048, 60, 20e6, 1 << 30, |c| {
        c.switchover = Switchover::Hybrid { after: None };
        c.force_stop = false;
    });
    without_delta(&mut p);
    p.run();
    let s = assert_postcopy_completed(&p);
    let pc = s.postcopy.unwrap();
    assert_eq!(s.rounds, 2, "one pre-copy pass, then post-copy");
    assert!(pc.owed > 0 && pc.owed < 2048, "{pc:?}");
}

#[test]
fn hybrid_that_converges_never_switches() {
    let mut p = Pair::with(512, 0, 100e6, 1 << 30, |c| {
        c.switchover = Switchover::Hybrid { after: None };
    });
    p.run();
    let s = p.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed);
    assert!(s.converged && s.postcopy.is_none());
}

#[test]
fn a_link_lost_after_the_switch_is_in_doubt_and_nothing_is_dropped() {
    let postcopy = |c: &mut SourceConfig| c.switchover = Switchover::Immediately;
    // Lost before the destination read the switch: nothing ran there, and
    // the source keeps its paused copy, in doubt, never resumed by itself.
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, postcopy);
    p.cut_after_src_msgs = Some(2);
    p.run();
    let s = p.summary().clone();
    assert!(matches!(s.outcome, Outcome::InDoubt(_)), "{s:?}");
    assert!(!p.rolled_back && !p.vm.discarded && p.vm.paused);
    assert!(p.staging.is_none());
    assert!(matches!(p.dst_event, Some(DestinationEvent::Failed(_))));

    // Lost once the VM runs there: both keep what they hold.
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, postcopy);
    p.cut_on_running = true;
    p.run();
    let s = p.summary().clone();
    assert!(matches!(s.outcome, Outcome::InDoubt(_)), "{s:?}");
    assert!(!p.rolled_back && !p.vm.discarded && p.vm.paused);
    assert!(p.staging.is_some(), "the running VM is kept");
    assert!(
        matches!(&p.dst_event, Some(DestinationEvent::InDoubt(_))),
        "{:?}",
        p.dst_event
    );
}

/// Post-copy with a 10 s recovery window.
fn recovering(c: &mut SourceConfig) {
    c.switchover = Switchover::Immediately;
    c.recovery = Duration::from_secs(10);
}

#[test]
fn a_link_lost_in_postcopy_resumes_on_a_new_link_and_every_page_verifies() {
    // Cut in the middle of the push: some pages are installed, some are
    // on the wire and lost, the rest not sent yet; the VM touches missing
    // pages while the link is down.
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
    p.cut_after_postcopy_batches = Some(20);
    p.touch_in_outage = vec![1500, 1501, 2000];
    p.run();
    let s = assert_postcopy_completed(&p);
    let pc = s.postcopy.unwrap();
    assert_eq!(pc.recoveries, 1, "{pc:?}");
    assert_eq!(p.dst.recoveries(), 1);
    assert!(p.resume_refusals.is_empty(), "{:?}", p.resume_refusals);
    assert!(p.src_errors.is_empty() && p.dst_errors.is_empty());
    // Asked again once resumed: the fault stream served more than the
    // pages the VM touched before the cut.
    assert!(pc.fetches >= 2, "{pc:?}");
    // Receipts as without a cut: one Ready, the one for the root checked
    // on the new link.
    let kinds: Vec<ReceiptKind> = s
        .receipts
        .iter()
        .map(|r| {
            r.verify(&InsecureCrypto(String::new()))
                .unwrap()
                .receipt
                .kind
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ReceiptKind::Accepted,
            ReceiptKind::Ready,
            ReceiptKind::Sent,
            ReceiptKind::Started
        ]
    );

    // Cut before the source heard that the VM runs there, and a cut at
    // every later point: each resumes and verifies.
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
    p.cut_on_running = true;
    p.run();
    let s = assert_postcopy_completed(&p);
    assert_eq!(s.postcopy.unwrap().recoveries, 1);
    for n in [1, 60, 120] {
        let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
        p.cut_after_postcopy_batches = Some(n);
        p.run();
        let s = assert_postcopy_completed(&p);
        assert_eq!(s.postcopy.unwrap().recoveries, 1, "cut after {n} batches");
    }
}

#[test]
fn a_source_back_before_the_destination_noticed_the_break_resumes() {
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
    p.cut_after_postcopy_batches = Some(20);
    p.dst_notices_late = true;
    p.run();
    let s = assert_postcopy_completed(&p);
    assert_eq!(s.postcopy.unwrap().recoveries, 1);
    assert!(p.resume_refusals.is_empty(), "{:?}", p.resume_refusals);
}

#[test]
fn a_link_that_stays_down_past_the_recovery_window_is_in_doubt_on_both_sides() {
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
    p.cut_after_postcopy_batches = Some(20);
    p.outage = Duration::from_secs(60);
    p.run();
    let s = p.summary().clone();
    assert!(
        matches!(&s.outcome, Outcome::InDoubt(w) if w.contains("within 10 s")),
        "{s:?}"
    );
    assert!(!p.rolled_back && !p.vm.discarded && p.vm.paused);
    assert!(p.staging.is_some(), "the running VM is kept");
    assert!(
        matches!(&p.dst_event, Some(DestinationEvent::InDoubt(w)) if w.contains("did not come back")),
        "{:?}",
        p.dst_event
    );
}

#[test]
fn only_the_source_with_the_same_ticket_resumes_a_migration() {
    // A Resume for another ticket is refused; the migration waits on for
    // its own source, which then resumes it.
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
    p.cut_after_postcopy_batches = Some(20);
    let mut first = true;
    p.tamper_resume = Some(Box::new(move |m| {
        if let Message::Resume(r) = m {
            if first {
                first = false;
                // Deliver a forged one first, then the real one.
                let mut forged = r.clone();
                forged.ticket = Digest([0xEE; 32]);
                *m = Message::Resume(forged);
            }
        }
    }));
    p.run();
    assert_eq!(p.resume_refusals.len(), 1, "{:?}", p.resume_refusals);
    // The forged Resume was the source's only one: no answer, so the
    // source gives up in doubt and the destination waits its window out.
    let s = p.summary().clone();
    assert!(matches!(s.outcome, Outcome::InDoubt(_)), "{s:?}");
    assert!(matches!(p.dst_event, Some(DestinationEvent::InDoubt(_))));

    // The right ticket from another agent (its own mutual TLS identity):
    // refused the same way.
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
    p.cut_after_postcopy_batches = Some(20);
    p.resume_peer = "spiffe://pair.test/agent/intruder";
    p.run();
    assert_eq!(p.resume_refusals.len(), 1, "{:?}", p.resume_refusals);
    assert!(p.resume_refusals[0].contains("another agent"));
    assert!(matches!(p.dst_event, Some(DestinationEvent::InDoubt(_))));
    assert!(p.staging.is_some(), "the running VM is kept");
}

/// A post-copy migration cut by `cut`, whose Resumed `tamper` alters:
/// the source refuses it (saying `why`) and is left in doubt, never
/// resumed here.
fn a_bad_resumed_leaves_the_source_in_doubt(
    cut: impl FnOnce(&mut Pair),
    tamper: fn(&mut convoy_protocol::message::Resumed),
    why: &str,
) {
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, recovering);
    cut(&mut p);
    p.tamper_back = Some(Box::new(move |m| {
        if let Message::Resumed(r) = m {
            tamper(r);
        }
    }));
    p.run();
    let s = p.summary().clone();
    assert!(matches!(s.outcome, Outcome::InDoubt(_)), "{s:?}");
    assert!(
        p.src_errors
            .iter()
            .any(|e| matches!(e, SourceError::BadResume(w) if w.contains(why))),
        "{:?}",
        p.src_errors
    );
    assert!(!p.rolled_back && !p.vm.discarded, "never resumed here");
}

#[test]
fn a_resumed_that_does_not_fit_or_claims_pages_never_sent_leaves_the_source_in_doubt() {
    a_bad_resumed_leaves_the_source_in_doubt(
        |p| p.cut_after_postcopy_batches = Some(20),
        |r| {
            r.missing.pop();
        },
        "does not fit",
    );
    // Cut before the push began; then the destination says it lacks
    // nothing, while most owed pages were never sent: the roots would
    // agree on stale leaves, so the source refuses it.
    a_bad_resumed_leaves_the_source_in_doubt(
        |p| p.cut_on_running = true,
        |r| r.missing.iter_mut().for_each(|w| *w = 0),
        "never sent",
    );
}

#[test]
fn a_page_altered_after_the_switch_stops_the_vm_there_and_never_resumes_it_here() {
    let mut p = Pair::with(512, 0, 50e6, 1 << 30, |c| {
        c.switchover = Switchover::Immediately;
    });
    p.level = 0;
    // No faults: the pushed copy is the only one.
    p.touch.clear();
    let mut done = false;
    p.tamper = Some(Box::new(move |_round, h, payload| {
        if !done && h.compression == convoy_protocol::page::Compression::None && payload.len() > 100
        {
            payload[77] ^= 1;
            done = true;
        }
    }));
    p.run();
    let s = p.summary().clone();
    assert!(matches!(s.outcome, Outcome::InDoubt(_)), "{s:?}");
    assert!(!p.rolled_back && !p.vm.discarded);
    assert!(
        p.staging.is_none(),
        "the VM that ran on a bad page is stopped"
    );
    assert!(matches!(p.dst_event, Some(DestinationEvent::Failed(_))));
}

// ---- Memory reuse when a VM comes back ----

const PAGES_REUSE: usize = 2048;

/// The first trip, a→b, with a retaining the image under a fresh key: a
/// finished Pair (a's image sealed, b's key and arrival leaves taken).
fn first_trip() -> (Pair, ReuseOffer, Vec<Digest>) {
    let mut p = Pair::new(PAGES_REUSE, 0, 100e6, 1 << 30);
    let offer = ReuseOffer {
        image: RetainedId([5; 16]),
        key: ReuseKey::from_bytes([0x42; 32]),
    };
    p.src.retain_image(offer.clone());
    p.retain = Some(offer);
    p.run();
    assert_eq!(p.summary().outcome, Outcome::Completed);
    let key = p.dst.take_reuse_key().expect("the key travels in Handover");
    let leaves = p.dst.verified_leaves().expect("verified leaves");
    assert_eq!(leaves.len(), PAGES_REUSE);
    (p, key, leaves)
}

/// The trip back, b→a: b's VM runs on from the image it received, with
/// `changed` pages rewritten; a holds `image`; b offers `offer`.
fn trip_back(
    first: &Pair,
    image: RetainedImage,
    offer: Option<ReuseOffer>,
    leaves: Vec<Digest>,
    changed: usize,
) -> Pair {
    let mut p = Pair::with(PAGES_REUSE, 0, 100e6, 1 << 30, |c| {
        c.manifest.reuse = offer.map(Box::new);
    });
    p.vm.pages = first.staging.clone().unwrap();
    // Spread the changes: every tenth-odd page gets a new first word.
    for i in 0..changed {
        let page = (i * 13 + 1) % PAGES_REUSE;
        p.vm.pages[page][..8].copy_from_slice(&(0xdead_0000 + i as u64).to_le_bytes());
    }
    p.arrival_leaves = Some(leaves);
    p.held_image = Some(image);
    p
}

#[test]
fn a_vm_that_comes_back_sends_only_its_changed_pages() {
    let (mut first, offer, leaves) = first_trip();
    let image = first.retained_here.take().expect("a sealed the image");
    // The retained image holds no plaintext page: look for every non-zero
    // page's first 64 bytes in it.
    let sealed = image.sealed_bytes();
    for page in first.paused_image.as_ref().unwrap().iter().step_by(97) {
        if page.iter().any(|b| *b != 0) {
            assert!(!sealed.windows(64).any(|w| w == &page[..64]));
        }
    }
    let there = first.summary().clone();
    // Under 10% of the pages change at b.
    let changed = PAGES_REUSE / 20;
    let mut back = trip_back(&first, image, Some(offer), leaves, changed);
    back.run();
    let s = back.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
    assert!(s.verified);
    assert_eq!(back.staging.as_ref().unwrap(), &back.vm.pages);
    assert_eq!(s.memory_root, Some(root_of(&back.vm.pages)));
    assert!(s.encodings.retained > 0, "{:?}", s.encodings);
    // Every non-zero unchanged page was retained; changed ones were sent.
    let nonzero = back
        .vm
        .pages
        .iter()
        .filter(|p| p.iter().any(|b| *b != 0))
        .count() as u64;
    assert!(s.encodings.retained + changed as u64 >= nonzero - changed as u64);
    println!(
        "reuse: first trip {} bytes, trip back {} bytes ({} of {} pages changed, {} retained)",
        there.payload_bytes, s.payload_bytes, changed, PAGES_REUSE, s.encodings.retained
    );
    assert!(
        s.payload_bytes * 5 < there.payload_bytes,
        "{} bytes back vs {} there",
        s.payload_bytes,
        there.payload_bytes
    );
}

#[test]
fn an_offer_for_an_image_the_destination_does_not_hold_is_a_normal_migration() {
    let (mut first, offer, leaves) = first_trip();
    let image = first.retained_here.take().unwrap();
    let other = ReuseOffer {
        image: RetainedId([6; 16]),
        key: offer.key.clone(),
    };
    let mut back = trip_back(&first, image, Some(other), leaves, 10);
    back.run();
    let s = back.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
    assert!(!back
        .src
        .accepted_capabilities()
        .unwrap()
        .has(Capabilities::REUSE));
    assert_eq!(s.encodings.retained, 0);
    assert_eq!(back.staging.as_ref().unwrap(), &back.vm.pages);
}

#[test]
fn a_retained_page_altered_at_rest_aborts_and_the_vm_stays() {
    let (mut first, offer, leaves) = first_trip();
    let mut image = first.retained_here.take().unwrap();
    // The holding host flips one ciphertext byte of page 2 (unchanged at
    // the source, so sent as retained).
    image.sealed_bytes_mut()[2 * (PAGE + 16) + 100] ^= 1;
    let mut back = trip_back(&first, image, Some(offer), leaves, 10);
    back.run();
    let s = back.summary().clone();
    assert!(matches!(s.outcome, Outcome::Aborted(_)), "{s:?}");
    assert!(back.rolled_back && !back.vm.discarded);
    assert!(back
        .dst_errors
        .iter()
        .any(|e| matches!(e, DestinationError::Retained(ReuseError::Unauthentic(2)))));
    assert!(back.started.is_none() && back.staging.is_none());
}

#[test]
fn a_wrong_key_opens_nothing_and_the_vm_stays() {
    let (mut first, _, leaves) = first_trip();
    let image = first.retained_here.take().unwrap();
    let forged = ReuseOffer {
        image: image.id(),
        key: ReuseKey::from_bytes([0x43; 32]),
    };
    let mut back = trip_back(&first, image, Some(forged), leaves, 10);
    back.run();
    let s = back.summary().clone();
    assert!(matches!(s.outcome, Outcome::Aborted(_)), "{s:?}");
    assert!(back.rolled_back && !back.vm.discarded && back.started.is_none());
}

#[test]
fn a_stale_leaf_at_the_source_is_caught_by_the_root_check() {
    // The source believes page 2 unchanged though it changed: the
    // destination opens the old version, and the root says no.
    let (mut first, offer, mut leaves) = first_trip();
    let image = first.retained_here.take().unwrap();
    let mut back = trip_back(&first, image, Some(offer), leaves.clone(), 0);
    back.vm.pages[2][0] ^= 0xff;
    leaves[2] = leaf_digest(&back.vm.pages[2]);
    back.arrival_leaves = Some(leaves);
    back.run();
    let s = back.summary().clone();
    assert!(matches!(s.outcome, Outcome::Aborted(_)), "{s:?}");
    assert!(back
        .dst_errors
        .iter()
        .any(|e| matches!(e, DestinationError::RootMismatch { .. })));
    assert!(back.rolled_back && !back.vm.discarded && back.started.is_none());
}

#[test]
fn without_an_offer_reuse_is_neither_offered_nor_accepted() {
    let mut p = Pair::new(256, 0, 100e6, 1 << 30);
    p.run();
    assert!(!p
        .src
        .accepted_capabilities()
        .unwrap()
        .has(Capabilities::REUSE));
    assert!(p.dst.take_reuse_key().is_none());
}
