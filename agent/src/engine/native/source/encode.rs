//! Encoding on a data stream's thread: pages read from the guest, zero
//! check, BLAKE3 leaves, deltas and zstd (fixed or adaptive level), framed
//! and handed to the writer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use convoy_protocol::adapt::LevelChooser;
use convoy_protocol::delta::PageCache;
use convoy_protocol::message::encode_batch_head;
use convoy_protocol::page::{stream_for, BatchBuilder, BuildError, Compressor};
use convoy_protocol::source::SentBatch;

use super::jobs::{HeldLeaf, Job, Outbox, StreamError, StreamOut, BATCH_PAGES};
use crate::backend::VmBackend;
use crate::config::TamperHook;
use crate::engine::priority::PushPriority;

/// Frames an encoded batch of `stream` (through the tamper hook, if the
/// agent was built dangerously with one) and hands it to the writer.
pub(super) fn emit(
    out: &Outbox,
    stream: u16,
    round: u32,
    mut enc: convoy_protocol::page::EncodedBatch,
    tamper: Option<&TamperHook>,
) -> Result<(), StreamError> {
    if let Some(t) = tamper {
        t(round, &mut enc.header, &mut enc.payload);
    }
    let (head, payload, info) = frame(stream, enc)?;
    out.send(StreamOut::Batch {
        head,
        payload,
        info,
    })
}

/// An encoded batch of `stream` as a frame (its head and payload) and
/// what to report once it is sent.
pub(super) fn frame(
    stream: u16,
    enc: convoy_protocol::page::EncodedBatch,
) -> Result<(Bytes, Bytes, SentBatch), StreamError> {
    let head = encode_batch_head(&enc.header, enc.payload.len())?;
    let info = SentBatch {
        stream,
        leaves: enc.leaves,
        stats: enc.stats,
        frame_bytes: (head.len() + enc.payload.len()) as u64,
    };
    Ok((Bytes::from(head), Bytes::from(enc.payload), info))
}

/// A stream's rate of taking frames, for adaptive compression: bytes per
/// second of writing, into the stream's `link` (f64 bits).
pub(super) struct LinkRate {
    link: Arc<AtomicU64>,
    sent: f64,
    waited: f64,
}

impl LinkRate {
    pub(super) fn new(link: Arc<AtomicU64>) -> Self {
        LinkRate {
            link,
            sent: 0.0,
            waited: 0.0,
        }
    }

    /// A frame of `bytes` took `busy` to write.
    pub(super) fn record(&mut self, bytes: u64, busy: std::time::Duration) {
        // Bytes over time, both decayed: a frame that went at once (into
        // free buffer space) weighs its little time, not an enormous rate.
        self.sent = self.sent * 0.9 + bytes as f64;
        self.waited = self.waited * 0.9 + busy.as_secs_f64();
        // Nothing until enough time was measured.
        if self.waited >= 0.01 {
            self.link
                .store((self.sent / self.waited).to_bits(), Ordering::Relaxed);
        }
    }
}

/// How one data stream encodes.
pub(super) struct Encoder {
    pub(super) stream: u16,
    pub(super) streams: u16,
    pub(super) level: i32,
    pub(super) tamper: Option<TamperHook>,
    /// Bytes of this stream's delta cache; 0 sends no deltas.
    pub(super) cache_bytes: u64,
    /// Choose the zstd level from measured figures (up to `level`).
    pub(super) adaptive: bool,
    /// The stream's measured link rate, bytes per second (f64 bits).
    pub(super) link: Arc<AtomicU64>,
}

/// Compression of one stream's batches, at a fixed or an adaptive level
/// ([`convoy_protocol::adapt`]).
pub(super) struct Shrink {
    pub(super) comp: Compressor,
    pub(super) chooser: Option<LevelChooser>,
    pub(super) link: Arc<AtomicU64>,
}

impl Shrink {
    pub(super) fn new(
        level: i32,
        adaptive: bool,
        link: Arc<AtomicU64>,
    ) -> Result<Shrink, BuildError> {
        let chooser = (adaptive && level > 0).then(|| LevelChooser::new(level));
        let first = chooser.as_ref().map_or(level, LevelChooser::level);
        Ok(Shrink {
            comp: Compressor::new(first)?,
            chooser,
            link,
        })
    }

    /// Encodes `b`, at the level the chooser picks, and times it.
    pub(super) fn finish(
        &mut self,
        b: BatchBuilder,
        seq: u64,
        round: u32,
    ) -> Result<convoy_protocol::page::EncodedBatch, BuildError> {
        let Some(chooser) = self.chooser.as_mut() else {
            return b.finish(seq, round, &mut self.comp);
        };
        chooser.observe_link(f64::from_bits(self.link.load(Ordering::Relaxed)));
        let level = chooser.next_batch();
        if level != self.comp.level() {
            self.comp = Compressor::new(level)?;
        }
        let input = b.data_bytes();
        let t = Instant::now();
        let enc = b.finish(seq, round, &mut self.comp)?;
        if self.comp.attempted() {
            let output = enc.payload.len().min(input);
            chooser.observe_compression(level, input, output, t.elapsed());
        }
        Ok(enc)
    }
}

/// The encoder thread of one data stream.
pub(super) fn encode_stream(
    enc: Encoder,
    vm: Arc<dyn VmBackend>,
    jobs: std::sync::mpsc::Receiver<Job>,
    out: Outbox,
) -> Result<(), StreamError> {
    let Encoder {
        stream,
        streams,
        level,
        tamper,
        cache_bytes,
        adaptive,
        link,
    } = enc;
    let page_size = vm.geometry().page_size();
    let mut comp = Shrink::new(level, adaptive, link)?;
    // The last version sent of this stream's pages, for deltas. It lives
    // for the whole migration: round 1 fills it.
    let mut cache = (cache_bytes > 0).then(|| {
        PageCache::new(
            usize::try_from(cache_bytes).unwrap_or(usize::MAX),
            page_size,
        )
    });
    let mut seq = 0u64;
    let flush = |b: BatchBuilder, seq: &mut u64, round: u32, comp: &mut Shrink| {
        let enc = comp.finish(b, *seq, round)?;
        *seq += 1;
        emit(&out, stream, round, enc, tamper.as_ref())
    };
    // After a post-copy switch this push is background to the faults.
    let mut priority = PushPriority::default();
    while let Ok(job) = jobs.recv() {
        if job.background {
            priority.background();
        }
        if !job.delta {
            // Its pages change what the destination holds without the
            // cache seeing them, so no later delta may use the cache
            // (none comes: deltas end at the post-copy switch, for good).
            cache = None;
        }
        let mut b = BatchBuilder::with_capacity(page_size, BATCH_PAGES);
        let mut skipped = 0u64;
        let mine = || {
            job.pages
                .iter()
                .filter(|&p| stream_for(p, streams) == stream)
        };
        // This stream's pages of the job still to go, the next one
        // counted: the delta cache stores only what it will keep
        // (`PageCache::admit_within`).
        let mut left = if cache.is_some() { mine().count() } else { 0 };
        for p in mine() {
            let ahead = left;
            left = left.saturating_sub(1);
            if job.served.as_ref().is_some_and(|s| !s.claim(p)) {
                continue;
            }
            // A leaf that cannot be read (a disk file) fails the stream,
            // and so the migration: never sent as zeros.
            let mut failed = None;
            let read = |buf: &mut [u8]| failed = vm.read_leaf(p, buf).err();
            // None in a job without deltas (ended above).
            let cache = cache.as_mut().map(|c| {
                c.admit_within(ahead);
                &mut *c
            });
            let held = job.held.as_ref().and_then(|h| h.leaf(p));
            // The destination's block is not zero: a zero one must go.
            let skip_zero = job.skip_zero && !matches!(held, Some(HeldLeaf::Unknown));
            let added = match (held, cache, skip_zero) {
                (Some(HeldLeaf::Base(leaf)), cache, true) => {
                    b.push_over_base_with(p, leaf, cache, read)
                }
                (Some(HeldLeaf::Page(leaf)), cache, true) => {
                    b.push_nonzero_reusing_with(p, leaf, cache, read)
                }
                (_, Some(c), true) => b.push_nonzero_delta_with(p, c, read),
                (_, Some(c), false) => b.push_delta_with(p, c, read).map(|()| true),
                (_, None, true) => b.push_nonzero_with(p, read),
                (_, None, false) => b.push_with(p, read).map(|()| true),
            }?;
            if let Some(e) = failed {
                return Err(e.into());
            }
            if !added {
                skipped += 1;
            }
            if b.pages() >= BATCH_PAGES {
                if job.background {
                    priority.background();
                }
                let full =
                    std::mem::replace(&mut b, BatchBuilder::with_capacity(page_size, BATCH_PAGES));
                flush(full, &mut seq, job.round, &mut comp)?;
            }
        }
        if b.pages() > 0 {
            flush(b, &mut seq, job.round, &mut comp)?;
        }
        out.send(StreamOut::RoundDone {
            round: job.round,
            skipped,
        })?;
    }
    Ok(())
}
