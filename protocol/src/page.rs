//! Guest-memory geometry, page sets, and the page-batch codec.
//!
//! Pages travel in *batches*: a [`BatchHeader`] listing the pages as runs of
//! consecutive indexes, each run of one [`RunKind`], followed by a payload,
//! raw or compressed with zstd as one block. A batch is compressed whole
//! because zstd over 64 KiB is both faster per byte and tighter than page by
//! page; a batch that does not shrink goes raw, and a [`Compressor`] that
//! keeps failing backs off so incompressible memory does not pay for
//! compression attempts.
//!
//! The payload holds, in page order:
//!
//! | page kind | bytes in the payload |
//! |---|---|
//! | [`RunKind::Zero`] | none |
//! | [`RunKind::Data`] | the page, `page_size` bytes |
//! | [`RunKind::Delta`] | a `u16` little-endian length `n` (`0..=page_size/2`), then `n` bytes of [`crate::delta`] against the version sent before |
//! | [`RunKind::Retained`] | none: the destination opens the page from the image it retained ([`crate::reuse`]); only when it accepted [`crate::message::Capabilities::REUSE`] |
//!
//! The decoder bounds the payload before it decompresses it (`page_size` a
//! data page, `2 + page_size/2` a delta page), checks every delta's
//! structure, and hands out [`PageData`]; applying a delta to the staged page
//! is the caller's ([`PageData::write_to`]). A delta only makes sense if the
//! destination holds the version it was made against, which the stream
//! ordering below guarantees.
//!
//! Pages are striped over the data streams by [`stream_for`]: every version
//! of a page travels on the same stream, so the per-stream ordering QUIC
//! gives is enough to apply versions in the order they were read.

use std::num::NonZeroU32;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::delta::{self, DeltaError, PageCache};
use crate::digest::{leaf_digest, zero_leaf, Digest};

/// Largest number of raw bytes in one batch (1 MiB).
pub const MAX_BATCH_BYTES: usize = 1 << 20;

/// Pages per stripe: consecutive pages in one stripe share a data stream.
pub const STRIPE_PAGES: u64 = 64;

/// Largest number of pages a guest may have (2^32 pages, 16 TiB at 4 KiB).
pub const MAX_PAGE_COUNT: u64 = 1 << 32;

/// A page size: a power of two from 4 KiB to 64 KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct PageSize(NonZeroU32);

impl PageSize {
    /// 4 KiB, the only size the built-in backends use.
    pub const SIZE_4K: PageSize = PageSize(match NonZeroU32::new(4096) {
        Some(v) => v,
        None => panic!("4096 is not zero"),
    });

    /// The size in bytes.
    pub fn bytes(self) -> usize {
        self.0.get() as usize
    }

    /// The most pages of this size in one batch.
    pub fn max_batch_pages(self) -> usize {
        MAX_BATCH_BYTES / self.bytes()
    }

    /// The longest delta a batch may carry for a page of this size (half a
    /// page); the decoder refuses longer ones.
    pub fn max_delta_bytes(self) -> usize {
        self.bytes() / 2
    }

    /// The longest delta [`BatchBuilder::push_delta_with`] sends instead of
    /// the page (a quarter of a page); see there why.
    pub fn delta_limit(self) -> usize {
        self.bytes() / 4
    }
}

impl TryFrom<u32> for PageSize {
    type Error = GeometryError;
    fn try_from(v: u32) -> Result<Self, GeometryError> {
        match NonZeroU32::new(v) {
            Some(n) if v.is_power_of_two() && (4096..=65536).contains(&v) => Ok(PageSize(n)),
            _ => Err(GeometryError::PageSize(v)),
        }
    }
}

impl From<PageSize> for u32 {
    fn from(p: PageSize) -> u32 {
        p.0.get()
    }
}

/// The index of a page in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PageIndex(pub u64);

/// Why a geometry is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum GeometryError {
    /// Not a power of two in 4 KiB..=64 KiB.
    #[error("page size {0} is not a power of two between 4096 and 65536")]
    PageSize(u32),
    /// Zero pages, or more than [`MAX_PAGE_COUNT`].
    #[error("page count {0} is outside 1..={MAX_PAGE_COUNT}")]
    PageCount(u64),
    /// The memory size is not a whole number of pages.
    #[error("memory size {bytes} is not a multiple of the page size {page}")]
    NotMultiple {
        /// Requested bytes.
        bytes: u64,
        /// Page size.
        page: u32,
    },
}

/// The shape of a guest's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawGeometry", into = "RawGeometry")]
pub struct MemoryGeometry {
    page_size: PageSize,
    page_count: u64,
}

#[derive(Serialize, Deserialize)]
struct RawGeometry {
    page_size: PageSize,
    page_count: u64,
}

impl TryFrom<RawGeometry> for MemoryGeometry {
    type Error = GeometryError;
    fn try_from(r: RawGeometry) -> Result<Self, GeometryError> {
        MemoryGeometry::new(r.page_size, r.page_count)
    }
}

impl From<MemoryGeometry> for RawGeometry {
    fn from(g: MemoryGeometry) -> RawGeometry {
        RawGeometry {
            page_size: g.page_size,
            page_count: g.page_count,
        }
    }
}

impl MemoryGeometry {
    /// A geometry of `page_count` pages.
    pub fn new(page_size: PageSize, page_count: u64) -> Result<Self, GeometryError> {
        if page_count == 0 || page_count > MAX_PAGE_COUNT {
            return Err(GeometryError::PageCount(page_count));
        }
        Ok(MemoryGeometry {
            page_size,
            page_count,
        })
    }

    /// A geometry of `bytes` bytes in 4 KiB pages.
    pub fn from_bytes(bytes: u64) -> Result<Self, GeometryError> {
        let page = PageSize::SIZE_4K;
        if bytes % page.bytes() as u64 != 0 {
            return Err(GeometryError::NotMultiple {
                bytes,
                page: page.into(),
            });
        }
        MemoryGeometry::new(page, bytes / page.bytes() as u64)
    }

    /// Page size.
    pub fn page_size(&self) -> PageSize {
        self.page_size
    }

    /// Number of pages.
    pub fn page_count(&self) -> u64 {
        self.page_count
    }

    /// Total bytes.
    pub fn bytes(&self) -> u64 {
        self.page_count * self.page_size.bytes() as u64
    }
}

/// Which data stream carries `page` when there are `streams` of them.
pub fn stream_for(page: PageIndex, streams: u16) -> u16 {
    ((page.0 / STRIPE_PAGES) % u64::from(streams.max(1))) as u16
}

/// A set of pages, one bit a page.
#[derive(Clone, PartialEq, Eq)]
pub struct PageBitmap {
    words: Vec<u64>,
    len: u64,
}

impl std::fmt::Debug for PageBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageBitmap({} of {})", self.count(), self.len)
    }
}

impl PageBitmap {
    /// No pages of `len`.
    pub fn empty(len: u64) -> Self {
        PageBitmap {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    /// Every page of `len`.
    pub fn full(len: u64) -> Self {
        let mut b = PageBitmap {
            words: vec![u64::MAX; len.div_ceil(64) as usize],
            len,
        };
        b.trim();
        b
    }

    /// A bitmap from raw words (as a dirty log delivers them); bits past
    /// `len` are cleared.
    pub fn from_words(mut words: Vec<u64>, len: u64) -> Self {
        words.resize(len.div_ceil(64) as usize, 0);
        let mut b = PageBitmap { words, len };
        b.trim();
        b
    }

    fn trim(&mut self) {
        let rem = self.len % 64;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }

    /// Pages the set can hold.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when no page is in the set.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// Adds a page; out-of-range pages are ignored and reported as false.
    pub fn insert(&mut self, p: PageIndex) -> bool {
        if p.0 >= self.len {
            return false;
        }
        self.words[(p.0 / 64) as usize] |= 1 << (p.0 % 64);
        true
    }

    /// Removes a page.
    pub fn remove(&mut self, p: PageIndex) {
        if p.0 < self.len {
            self.words[(p.0 / 64) as usize] &= !(1 << (p.0 % 64));
        }
    }

    /// Whether a page is in the set.
    pub fn contains(&self, p: PageIndex) -> bool {
        p.0 < self.len && self.words[(p.0 / 64) as usize] & (1 << (p.0 % 64)) != 0
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Adds every page of `other`.
    pub fn union_with(&mut self, other: &PageBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    /// Removes every page of `other`.
    pub fn subtract(&mut self, other: &PageBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !*b;
        }
    }

    /// The pages in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = PageIndex> + '_ {
        self.words.iter().enumerate().flat_map(|(w, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                Some(PageIndex(w as u64 * 64 + b))
            })
        })
    }

    /// The raw words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }
}

/// True when every byte of `page` is zero. Word-wise: about ten times faster
/// than a byte loop.
pub fn is_zero(page: &[u8]) -> bool {
    let body = page.chunks_exact(64);
    let tail = body.remainder();
    body.into_iter().all(|c| {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            acc |= u64::from_ne_bytes(b);
        }
        acc == 0
    }) && tail.iter().all(|b| *b == 0)
}

/// How the payload of a batch is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Compression {
    /// The pages' bytes back to back.
    None,
    /// The pages' bytes back to back, compressed as one zstd frame.
    Zstd,
}

/// How the pages of a run are carried.
///
/// The order of the variants is the wire encoding: `Data` is 0 and `Zero`
/// is 1, as `false` and `true` were when a run had a `zero` flag, so a
/// batch without deltas is encoded as before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RunKind {
    /// Whole pages, `page_size` bytes each in the payload.
    Data,
    /// All-zero pages; nothing in the payload.
    Zero,
    /// Deltas against the version of each page sent before (see
    /// [`crate::delta`]), each a `u16` LE length and that many bytes.
    Delta,
    /// Pages the destination holds in the image it retained when the VM
    /// left it ([`crate::reuse`]); nothing in the payload.
    Retained,
}

/// A run of consecutive pages in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// Pages between the end of the previous run (or page 0) and this run.
    pub gap: u64,
    /// Pages in the run, at least one.
    pub len: u32,
    /// How the run's pages are carried.
    pub kind: RunKind,
}

/// The header of a page batch; the payload follows it in the same frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchHeader {
    /// Position of the batch on its stream, from 0, without gaps.
    pub seq: u64,
    /// Copy round the pages were read in (1 = bulk).
    pub round: u32,
    /// The pages, ascending.
    pub runs: Vec<Run>,
    /// How the payload is carried.
    pub compression: Compression,
}

/// What a batch carried, by page encoding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodingStats {
    /// Zero pages (no bytes).
    pub zero: u64,
    /// Pages sent raw.
    pub raw: u64,
    /// Whole pages sent inside a zstd block.
    pub zstd: u64,
    /// Pages sent as a delta against their previous version (raw or inside
    /// a zstd block).
    pub delta: u64,
    /// Pages not sent because the destination holds them in the image it
    /// retained ([`RunKind::Retained`]).
    pub retained: u64,
}

impl EncodingStats {
    /// Adds `other`.
    pub fn add(&mut self, other: &EncodingStats) {
        self.zero += other.zero;
        self.raw += other.raw;
        self.zstd += other.zstd;
        self.delta += other.delta;
        self.retained += other.retained;
    }

    /// All pages, the retained ones included.
    pub fn pages(&self) -> u64 {
        self.zero + self.raw + self.zstd + self.delta + self.retained
    }
}

/// Errors of the batch builder: the caller's misuse, not the peer's.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum BuildError {
    /// Pages must be pushed in ascending order without repeats.
    #[error("page {0} pushed out of order")]
    NotAscending(u64),
    /// The batch already holds [`PageSize::max_batch_pages`] pages.
    #[error("batch is full")]
    Full,
    /// zstd failed (out of memory).
    #[error("zstd: {0}")]
    Zstd(String),
    /// The page cache holds pages of another size than the batch.
    #[error("page cache of {cache}-byte pages for a batch of {batch}-byte pages")]
    CachePageSize {
        /// The cache's page size.
        cache: usize,
        /// The batch's page size.
        batch: usize,
    },
}

/// Builds one batch from pages read straight into its buffer.
#[derive(Debug)]
pub struct BatchBuilder {
    page: usize,
    max_pages: usize,
    delta_limit: usize,
    runs: Vec<Run>,
    last_end: u64,
    pages: usize,
    data: Vec<u8>,
    /// A delta being encoded, before it replaces the page in `data`.
    delta: Vec<u8>,
    leaves: Vec<(PageIndex, Digest)>,
    stats: EncodingStats,
}

impl BatchBuilder {
    /// An empty builder for pages of `page_size`.
    pub fn new(page_size: PageSize) -> Self {
        BatchBuilder::with_capacity(page_size, page_size.max_batch_pages())
    }

    /// An empty builder with room for `pages` pages before it reallocates.
    pub fn with_capacity(page_size: PageSize, pages: usize) -> Self {
        BatchBuilder {
            page: page_size.bytes(),
            max_pages: page_size.max_batch_pages(),
            delta_limit: page_size.delta_limit(),
            runs: Vec::new(),
            last_end: 0,
            pages: 0,
            data: Vec::with_capacity(pages.min(page_size.max_batch_pages()) * page_size.bytes()),
            delta: Vec::new(),
            leaves: Vec::new(),
            stats: EncodingStats::default(),
        }
    }

    /// Bytes of the payload before compression: what zstd is given.
    pub fn data_bytes(&self) -> usize {
        self.data.len()
    }

    /// Pages pushed so far.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Whether no more pages fit.
    pub fn is_full(&self) -> bool {
        self.pages >= self.max_pages
    }

    /// Appends page `idx`, letting `fill` write its bytes into the batch
    /// buffer (one copy from guest memory). Zero pages are detected here.
    pub fn push_with(
        &mut self,
        idx: PageIndex,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<(), BuildError> {
        self.push(idx, fill, false, None).map(|_| ())
    }

    /// Like [`BatchBuilder::push_with`], but a zero page is left out of the
    /// batch entirely (for a first round into zeroed staging memory).
    /// Returns whether the page was added.
    pub fn push_nonzero_with(
        &mut self,
        idx: PageIndex,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<bool, BuildError> {
        self.push(idx, fill, true, None)
    }

    /// Like [`BatchBuilder::push_with`], but a page whose previous version
    /// is in `cache` goes as a delta against it when the delta is at most
    /// [`PageSize::delta_limit`] (a quarter page) long; the page goes whole
    /// otherwise. Either way `cache` then holds the new version, or, for a
    /// zero page, nothing: the destination's page is then zero, which a
    /// zero page already sends for free, and a cache slot is better spent
    /// on a page with content. The leaf digest is always the full new
    /// page's.
    ///
    /// Why a quarter page: a delta that long means a quarter or more of the
    /// page changed, and such a page is usually being rewritten wholesale;
    /// the whole page then costs about as much after the batch's zstd pass
    /// (for compressible memory) while the encoder gives up early, having
    /// spent at most a quarter page of work, instead of scanning the whole
    /// page for a delta that saves little. Incompressible pages still save
    /// at least three quarters. The decoder accepts up to
    /// [`PageSize::max_delta_bytes`], so the limit can change without a
    /// protocol change.
    ///
    /// Use one cache for every batch of a stream and for nothing else, and
    /// only when the destination accepted
    /// [`crate::message::Capabilities::DELTA`]; the cache must see every
    /// page the stream sends (use [`BatchBuilder::push_nonzero_delta_with`]
    /// in the first round), or it holds versions the destination does not.
    pub fn push_delta_with(
        &mut self,
        idx: PageIndex,
        cache: &mut PageCache,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<(), BuildError> {
        self.push(idx, fill, false, Some(cache)).map(|_| ())
    }

    /// [`BatchBuilder::push_delta_with`] that leaves a zero page out of the
    /// batch, as [`BatchBuilder::push_nonzero_with`] does. Returns whether
    /// the page was added.
    pub fn push_nonzero_delta_with(
        &mut self,
        idx: PageIndex,
        cache: &mut PageCache,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<bool, BuildError> {
        self.push(idx, fill, true, Some(cache))
    }

    /// The first round of a migration back to a host that retained the
    /// VM's image ([`crate::reuse`]; only when the destination accepted
    /// [`crate::message::Capabilities::REUSE`]): a non-zero page whose leaf
    /// equals `held` (the leaf of the page in the retained image) goes as a
    /// [`RunKind::Retained`] page, without bytes; a zero page is left out
    /// (staging starts zeroed); any other page goes as
    /// [`BatchBuilder::push_nonzero_with`] (or with `cache`,
    /// [`BatchBuilder::push_nonzero_delta_with`]) sends it. Returns whether
    /// the page was added.
    pub fn push_nonzero_reusing_with(
        &mut self,
        idx: PageIndex,
        held: Option<Digest>,
        cache: Option<&mut PageCache>,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<bool, BuildError> {
        self.push_inner(idx, fill, true, cache, held)
    }

    /// The first round of a disk the destination started as a copy of a
    /// base image ([`crate::disk`]): a block whose leaf equals `base` (the
    /// leaf of the base's block) goes as a [`RunKind::Retained`] block,
    /// without bytes; a zero block is left out only where the base's block
    /// is zero too (elsewhere the destination holds the base's bytes, so
    /// it must be told); any other block goes as
    /// [`BatchBuilder::push_nonzero_reusing_with`] sends it. Returns whether
    /// the block was added.
    pub fn push_over_base_with(
        &mut self,
        idx: PageIndex,
        base: Digest,
        cache: Option<&mut PageCache>,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<bool, BuildError> {
        let skip_zero = base == zero_leaf(self.page);
        self.push_inner(idx, fill, skip_zero, cache, Some(base))
    }

    fn push(
        &mut self,
        idx: PageIndex,
        fill: impl FnOnce(&mut [u8]),
        skip_zero: bool,
        cache: Option<&mut PageCache>,
    ) -> Result<bool, BuildError> {
        self.push_inner(idx, fill, skip_zero, cache, None)
    }

    fn push_inner(
        &mut self,
        idx: PageIndex,
        fill: impl FnOnce(&mut [u8]),
        skip_zero: bool,
        cache: Option<&mut PageCache>,
        held: Option<Digest>,
    ) -> Result<bool, BuildError> {
        if self.is_full() {
            return Err(BuildError::Full);
        }
        if self.pages > 0 && idx.0 < self.last_end {
            return Err(BuildError::NotAscending(idx.0));
        }
        if let Some(c) = &cache {
            if c.page_size() != self.page {
                return Err(BuildError::CachePageSize {
                    cache: c.page_size(),
                    batch: self.page,
                });
            }
        }
        let start = self.data.len();
        self.data.resize(start + self.page, 0);
        fill(&mut self.data[start..]);
        let kind = if is_zero(&self.data[start..]) {
            self.data.truncate(start);
            if let Some(c) = cache {
                c.remove(idx);
            }
            if skip_zero {
                return Ok(false);
            }
            self.leaves.push((idx, zero_leaf(self.page)));
            self.stats.zero += 1;
            RunKind::Zero
        } else {
            let new = &self.data[start..];
            let leaf = leaf_digest(new);
            self.leaves.push((idx, leaf));
            let mut kind = RunKind::Data;
            if held == Some(leaf) {
                // The destination holds this version: no bytes, and no
                // cached version to make a later delta against.
                self.data.truncate(start);
                if let Some(c) = cache {
                    c.remove(idx);
                }
                self.stats.retained += 1;
                kind = RunKind::Retained;
            } else if let Some(c) = cache {
                self.delta.clear();
                let encoded = c
                    .get(idx)
                    .is_some_and(|old| delta::encode(old, new, &mut self.delta, self.delta_limit));
                c.insert(idx, new);
                // Within the limit, so within a u16.
                if let (true, Ok(len)) = (encoded, u16::try_from(self.delta.len())) {
                    self.data.truncate(start);
                    self.data.extend_from_slice(&len.to_le_bytes());
                    self.data.extend_from_slice(&self.delta);
                    self.stats.delta += 1;
                    kind = RunKind::Delta;
                }
            }
            kind
        };
        let base = if self.pages == 0 { 0 } else { self.last_end };
        match self.runs.last_mut() {
            Some(run) if self.pages > 0 && idx.0 == self.last_end && run.kind == kind => {
                run.len += 1;
            }
            _ => self.runs.push(Run {
                gap: idx.0 - base,
                len: 1,
                kind,
            }),
        }
        self.last_end = idx.0 + 1;
        self.pages += 1;
        Ok(true)
    }

    /// Finishes the batch as number `seq` of its stream, compressing with
    /// `compressor`.
    pub fn finish(
        self,
        seq: u64,
        round: u32,
        compressor: &mut Compressor,
    ) -> Result<EncodedBatch, BuildError> {
        let data_pages =
            (self.pages as u64) - self.stats.zero - self.stats.delta - self.stats.retained;
        let mut stats = self.stats;
        let (compression, payload) = match compressor.compress(&self.data)? {
            Some(z) => {
                stats.zstd = data_pages;
                (Compression::Zstd, z)
            }
            None => {
                stats.raw = data_pages;
                (Compression::None, self.data)
            }
        };
        Ok(EncodedBatch {
            header: BatchHeader {
                seq,
                round,
                runs: self.runs,
                compression,
            },
            payload,
            leaves: self.leaves,
            stats,
        })
    }
}

/// A finished batch: header and payload ready to frame, plus what the sender
/// must remember (the leaf digest of every page as read).
#[derive(Debug)]
pub struct EncodedBatch {
    /// Header.
    pub header: BatchHeader,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Leaf digest of every page in the batch.
    pub leaves: Vec<(PageIndex, Digest)>,
    /// Pages by encoding.
    pub stats: EncodingStats,
}

/// A zstd compressor that stops trying for a while after blocks that do not
/// shrink, so that incompressible memory does not pay for compression.
pub struct Compressor {
    inner: Option<zstd::bulk::Compressor<'static>>,
    level: i32,
    skip: u32,
    backoff: u32,
    attempted: bool,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor")
            .field("enabled", &self.inner.is_some())
            .field("backoff", &self.backoff)
            .finish()
    }
}

/// Longest back-off, in batches, after blocks that did not shrink.
const MAX_BACKOFF: u32 = 64;

impl Compressor {
    /// `level` 0 disables compression; otherwise a zstd level (1..=19).
    pub fn new(level: i32) -> Result<Self, BuildError> {
        let inner = if level == 0 {
            None
        } else {
            Some(
                zstd::bulk::Compressor::new(level.clamp(1, 19))
                    .map_err(|e| BuildError::Zstd(e.to_string()))?,
            )
        };
        Ok(Compressor {
            inner,
            level: if level == 0 { 0 } else { level.clamp(1, 19) },
            skip: 0,
            backoff: 0,
            attempted: false,
        })
    }

    /// The zstd level (0: none).
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Whether the last [`Compressor::compress`] ran zstd (rather than
    /// skipping it), so its time measures compression.
    pub fn attempted(&self) -> bool {
        self.attempted
    }

    /// Compressed bytes when compressing pays (saves at least 1/32), else
    /// `None`: send raw.
    pub fn compress(&mut self, data: &[u8]) -> Result<Option<Vec<u8>>, BuildError> {
        self.attempted = false;
        let Some(z) = self.inner.as_mut() else {
            return Ok(None);
        };
        if data.is_empty() {
            return Ok(None);
        }
        if self.skip > 0 {
            self.skip -= 1;
            return Ok(None);
        }
        self.attempted = true;
        let out = z
            .compress(data)
            .map_err(|e| BuildError::Zstd(e.to_string()))?;
        if out.len() + data.len() / 32 < data.len() {
            self.backoff = 0;
            Ok(Some(out))
        } else {
            self.backoff = (self.backoff * 2).clamp(1, MAX_BACKOFF);
            self.skip = self.backoff;
            Ok(None)
        }
    }
}

/// Why a received batch was refused. Every variant is the peer's fault.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum BatchError {
    /// Batches on a stream must be numbered 0, 1, 2, … without gaps.
    #[error(
        "stream {stream}: batch {got} arrived, expected {expected} (reordered, duplicated or lost)"
    )]
    OutOfOrder {
        /// Stream index.
        stream: u16,
        /// The sequence number expected.
        expected: u64,
        /// The one received.
        got: u64,
    },
    /// A run of length zero, or runs that overflow.
    #[error("malformed run list")]
    BadRuns,
    /// A page past the end of guest memory.
    #[error("page {page} is past the end of memory ({count} pages)")]
    PageOutOfRange {
        /// Page.
        page: u64,
        /// Pages in memory.
        count: u64,
    },
    /// More pages than a batch may hold.
    #[error("batch of {0} pages exceeds the limit")]
    TooManyPages(u64),
    /// A page that belongs to another stream.
    #[error("page {page} arrived on stream {stream}, it belongs on stream {expected}")]
    WrongStream {
        /// Page.
        page: u64,
        /// Stream it arrived on.
        stream: u16,
        /// Stream it belongs on.
        expected: u16,
    },
    /// The payload does not hold exactly the pages: too short or too long
    /// for a batch of whole pages, or longer than its pages and deltas.
    #[error("payload of {got} bytes, expected {expected}")]
    PayloadSize {
        /// Expected raw bytes.
        expected: usize,
        /// Raw bytes found.
        got: usize,
    },
    /// The payload is larger than its pages could take (`page_size` a data
    /// page, `2 + page_size / 2` a delta page).
    #[error("payload of {got} bytes, at most {max} possible")]
    PayloadTooLarge {
        /// Most raw bytes the runs allow.
        max: usize,
        /// Raw bytes found.
        got: usize,
    },
    /// The payload ends inside a page or its delta.
    #[error("payload ends inside page {page}")]
    PayloadTruncated {
        /// The page.
        page: u64,
    },
    /// A delta longer than [`PageSize::max_delta_bytes`].
    #[error("delta of {len} bytes for page {page}, at most {max} allowed")]
    DeltaTooLong {
        /// The page.
        page: u64,
        /// Declared length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// A delta that does not fit its page.
    #[error("page {page}: {error}")]
    BadDelta {
        /// The page.
        page: u64,
        /// What is wrong with it.
        #[source]
        error: DeltaError,
    },
    /// zstd refused the payload (corrupt, or larger than declared).
    #[error("zstd payload does not decode: {0}")]
    Zstd(String),
    /// A [`RunKind::Retained`] page, but no retained image was agreed on.
    #[error("page {page} sent as retained, but no retained image was agreed on")]
    UnexpectedRetained {
        /// The first page of the run.
        page: u64,
    },
    /// The batch's round is older than one already seen on the stream.
    #[error("round {got} after round {last} on stream {stream}")]
    RoundWentBack {
        /// Stream.
        stream: u16,
        /// Last round seen.
        last: u32,
        /// Round received.
        got: u32,
    },
}

/// Decodes the batches of one data stream, enforcing order and striping.
pub struct StreamReceiver {
    stream: u16,
    streams: u16,
    /// Pages must be on their stripe's stream (not on the fault stream).
    striped: bool,
    geometry: MemoryGeometry,
    next_seq: u64,
    last_round: u32,
    /// [`RunKind::Retained`] pages are accepted (the destination accepted
    /// [`crate::message::Capabilities::REUSE`]).
    retained: bool,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
}

/// The pages of one batch, decoded.
#[derive(Debug)]
pub struct DecodedBatch {
    /// Sequence number on its stream.
    pub seq: u64,
    /// Copy round.
    pub round: u32,
    pages: Vec<Decoded>,
    data: bytes::Bytes,
}

/// One page of a decoded batch: its kind and where its bytes are in the
/// payload (empty for a zero page).
#[derive(Debug, Clone, Copy)]
struct Decoded {
    idx: PageIndex,
    kind: RunKind,
    start: usize,
    len: usize,
}

/// What a batch carries for one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PageData<'a> {
    /// The page is all zero.
    Zero,
    /// The whole page.
    Full(&'a [u8]),
    /// A delta to XOR into the version of the page sent before (checked
    /// against the page size at decode; apply with [`crate::delta::apply`]).
    Delta(&'a [u8]),
    /// Open the page from the image retained for the VM
    /// ([`crate::reuse::RetainedImage::open_into`]); [`PageData::write_to`]
    /// cannot.
    Retained,
}

impl PageData<'_> {
    /// Turns `page`, the staged version of the page, into the new one:
    /// zeroes it, overwrites it, or applies the delta. On error `page` is
    /// unchanged.
    pub fn write_to(self, page: &mut [u8]) -> Result<(), DeltaError> {
        match self {
            PageData::Zero => page.fill(0),
            PageData::Full(b) if b.len() == page.len() => page.copy_from_slice(b),
            PageData::Full(b) => {
                return Err(DeltaError::PageLength {
                    expected: b.len(),
                    got: page.len(),
                })
            }
            PageData::Delta(d) => delta::apply(page, d)?,
            PageData::Retained => return Err(DeltaError::Retained),
        }
        Ok(())
    }
}

impl DecodedBatch {
    /// Each page with what the batch carries for it.
    pub fn pages(&self) -> impl Iterator<Item = (PageIndex, PageData<'_>)> + '_ {
        self.pages.iter().map(move |p| {
            let bytes = &self.data[p.start..p.start + p.len];
            let data = match p.kind {
                RunKind::Zero => PageData::Zero,
                RunKind::Data => PageData::Full(bytes),
                RunKind::Delta => PageData::Delta(bytes),
                RunKind::Retained => PageData::Retained,
            };
            (p.idx, data)
        })
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
}

impl std::fmt::Debug for StreamReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReceiver")
            .field("stream", &self.stream)
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

impl StreamReceiver {
    /// A receiver for data stream `stream` of `streams`.
    pub fn new(stream: u16, streams: u16, geometry: MemoryGeometry) -> Self {
        StreamReceiver {
            stream,
            streams,
            striped: true,
            geometry,
            next_seq: 0,
            last_round: 0,
            retained: false,
            decompressor: None,
        }
    }

    /// Accepts [`RunKind::Retained`] pages from now on (only after
    /// accepting [`crate::message::Capabilities::REUSE`] for an image this
    /// host holds); without this they are refused.
    pub fn accept_retained(&mut self) {
        self.retained = true;
    }

    /// A receiver for the post-copy fault stream `stream`, whose pages may
    /// be any pages (they are sent in the order the VM asked for them).
    pub fn unstriped(stream: u16, geometry: MemoryGeometry) -> Self {
        StreamReceiver {
            striped: false,
            ..StreamReceiver::new(stream, 1, geometry)
        }
    }

    /// Batches accepted so far.
    pub fn received(&self) -> u64 {
        self.next_seq
    }

    /// Checks and decodes one batch. A raw payload is not copied.
    pub fn receive(
        &mut self,
        header: &BatchHeader,
        payload: &bytes::Bytes,
    ) -> Result<DecodedBatch, BatchError> {
        if header.seq != self.next_seq {
            return Err(BatchError::OutOfOrder {
                stream: self.stream,
                expected: self.next_seq,
                got: header.seq,
            });
        }
        if header.round < self.last_round {
            return Err(BatchError::RoundWentBack {
                stream: self.stream,
                last: self.last_round,
                got: header.round,
            });
        }
        let page = self.geometry.page_size().bytes();
        let max = self.geometry.page_size().max_batch_pages() as u64;
        let count = self.geometry.page_count();
        let mut pages = Vec::new();
        let mut next: u64 = 0;
        let mut total: u64 = 0;
        for run in &header.runs {
            if run.len == 0 {
                return Err(BatchError::BadRuns);
            }
            total += u64::from(run.len);
            if total > max {
                return Err(BatchError::TooManyPages(total));
            }
            let start = next.checked_add(run.gap).ok_or(BatchError::BadRuns)?;
            let end = start
                .checked_add(u64::from(run.len))
                .ok_or(BatchError::BadRuns)?;
            if end > count {
                return Err(BatchError::PageOutOfRange {
                    page: end - 1,
                    count,
                });
            }
            if run.kind == RunKind::Retained && !self.retained {
                return Err(BatchError::UnexpectedRetained { page: start });
            }
            for p in start..end {
                let idx = PageIndex(p);
                let expected = stream_for(idx, self.streams);
                if self.striped && expected != self.stream {
                    return Err(BatchError::WrongStream {
                        page: p,
                        stream: self.stream,
                        expected,
                    });
                }
                pages.push(Decoded {
                    idx,
                    kind: run.kind,
                    start: 0,
                    len: 0,
                });
            }
            next = end;
        }
        let count_of = |kind| pages.iter().filter(|p| p.kind == kind).count();
        let delta_pages = count_of(RunKind::Delta);
        let whole = count_of(RunKind::Data) * page;
        let max_delta = self.geometry.page_size().max_delta_bytes();
        // At most MAX_BATCH_BYTES: a delta page takes less than a page.
        let max = whole + delta_pages * (2 + max_delta);
        let check_size = |got: usize| match delta_pages {
            0 if got != whole => Err(BatchError::PayloadSize {
                expected: whole,
                got,
            }),
            _ if got > max => Err(BatchError::PayloadTooLarge { max, got }),
            _ => Ok(()),
        };
        let data = match header.compression {
            Compression::None => {
                check_size(payload.len())?;
                payload.clone()
            }
            Compression::Zstd => {
                let d = match self.decompressor.as_mut() {
                    Some(d) => d,
                    None => self.decompressor.insert(
                        zstd::bulk::Decompressor::new()
                            .map_err(|e| BatchError::Zstd(e.to_string()))?,
                    ),
                };
                // Bounded: zstd fails rather than write past `max`.
                let out = d
                    .decompress(payload, max)
                    .map_err(|e| BatchError::Zstd(e.to_string()))?;
                check_size(out.len())?;
                bytes::Bytes::from(out)
            }
        };
        // Place every page's bytes, checking each delta's length and
        // structure, so that what the caller gets applies cleanly.
        let mut off = 0;
        for p in &mut pages {
            let truncated = BatchError::PayloadTruncated { page: p.idx.0 };
            match p.kind {
                RunKind::Zero | RunKind::Retained => p.start = off,
                RunKind::Data => {
                    if data.len() - off < page {
                        return Err(truncated);
                    }
                    (p.start, p.len) = (off, page);
                }
                RunKind::Delta => {
                    let Some(&[lo, hi]) = data.get(off..off + 2) else {
                        return Err(truncated);
                    };
                    let len = usize::from(u16::from_le_bytes([lo, hi]));
                    if len > max_delta {
                        return Err(BatchError::DeltaTooLong {
                            page: p.idx.0,
                            len,
                            max: max_delta,
                        });
                    }
                    let Some(d) = data.get(off + 2..off + 2 + len) else {
                        return Err(truncated);
                    };
                    delta::check(d, page).map_err(|error| BatchError::BadDelta {
                        page: p.idx.0,
                        error,
                    })?;
                    (p.start, p.len) = (off + 2, len);
                }
            }
            off = p.start + p.len;
        }
        if off != data.len() {
            return Err(BatchError::PayloadSize {
                expected: off,
                got: data.len(),
            });
        }
        self.next_seq += 1;
        self.last_round = header.round;
        Ok(DecodedBatch {
            seq: header.seq,
            round: header.round,
            pages,
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(pages: u64) -> MemoryGeometry {
        MemoryGeometry::new(PageSize::SIZE_4K, pages).unwrap()
    }

    fn page_bytes(i: u64) -> Vec<u8> {
        match i % 3 {
            0 => vec![0; 4096],
            1 => (0..4096).map(|b| (b % 7) as u8).collect(),
            _ => (0..4096u64)
                .map(|b| (b.wrapping_mul(2654435761).wrapping_add(i * 97) >> 7) as u8)
                .collect(),
        }
    }

    fn build(pages: &[u64], seq: u64, level: i32) -> EncodedBatch {
        let mut b = BatchBuilder::new(PageSize::SIZE_4K);
        for &p in pages {
            b.push_with(PageIndex(p), |buf| buf.copy_from_slice(&page_bytes(p)))
                .unwrap();
        }
        b.finish(seq, 1, &mut Compressor::new(level).unwrap())
            .unwrap()
    }

    #[test]
    fn round_trip_raw_and_zstd() {
        for level in [0, 1, 3] {
            let s = STRIPE_PAGES;
            let pages: Vec<u64> = (0..s).chain(2 * s..2 * s + 6).collect();
            let enc = build(&pages, 0, level);
            let mut rx = StreamReceiver::new(0, 2, geometry(1000));
            let dec = rx
                .receive(&enc.header, &bytes::Bytes::from(enc.payload.clone()))
                .unwrap();
            let got: Vec<_> = dec.pages().collect();
            assert_eq!(got.len(), pages.len());
            for ((idx, bytes), &p) in got.iter().zip(&pages) {
                assert_eq!(idx.0, p);
                let expect = page_bytes(p);
                match bytes {
                    PageData::Zero => assert!(is_zero(&expect)),
                    PageData::Full(b) => assert_eq!(*b, &expect[..]),
                    PageData::Delta(_) => panic!("no cache, no delta"),
                    PageData::Retained => panic!("no held leaves, no retained page"),
                }
            }
            assert_eq!(enc.stats.pages(), pages.len() as u64);
            assert_eq!(enc.leaves.len(), pages.len());
        }
    }

    #[test]
    fn blocks_over_a_base_send_only_what_differs_and_zeros_where_the_base_is_not() {
        let zero = zero_leaf(4096);
        // Block 0 equals the base's; block 1 differs; block 2 is zero over
        // a non-zero base block (must be sent); block 3 is zero over a
        // zero base block (nothing to send).
        let base = [
            leaf_digest(&page_bytes(1)),
            leaf_digest(&page_bytes(8)),
            leaf_digest(&page_bytes(5)),
            zero,
        ];
        let mut b = BatchBuilder::new(PageSize::SIZE_4K);
        let mut added = Vec::new();
        for p in 0..4u64 {
            let fill = |buf: &mut [u8]| {
                if p < 2 {
                    buf.copy_from_slice(&page_bytes(p + 1))
                }
            };
            added.push(
                b.push_over_base_with(PageIndex(p), base[p as usize], None, fill)
                    .unwrap(),
            );
        }
        assert_eq!(added, [true, true, true, false]);
        let enc = b.finish(0, 1, &mut Compressor::new(0).unwrap()).unwrap();
        assert_eq!(
            (enc.stats.retained, enc.stats.raw, enc.stats.zero),
            (1, 1, 1)
        );
        assert_eq!(enc.payload.len(), 4096);
        let mut rx = StreamReceiver::new(0, 1, geometry(64));
        rx.accept_retained();
        let dec = rx
            .receive(&enc.header, &bytes::Bytes::from(enc.payload))
            .unwrap();
        let got: Vec<_> = dec.pages().map(|(i, d)| (i.0, d)).collect();
        assert_eq!(got[0], (0, PageData::Retained));
        assert!(matches!(got[1], (1, PageData::Full(_))));
        assert_eq!(got[2], (2, PageData::Zero));
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn retained_pages_carry_no_bytes_and_only_where_agreed() {
        let mut b = BatchBuilder::new(PageSize::SIZE_4K);
        // Page 0 held as is, page 1 held in another version, page 2 zero.
        let held = [
            Some(leaf_digest(&page_bytes(1))),
            Some(leaf_digest(&page_bytes(9))),
            None,
        ];
        for p in 0..3u64 {
            let fill = |buf: &mut [u8]| {
                if p < 2 {
                    buf.copy_from_slice(&page_bytes(p + 1))
                }
            };
            let added = b
                .push_nonzero_reusing_with(PageIndex(p), held[p as usize], None, fill)
                .unwrap();
            assert_eq!(added, p < 2);
        }
        let enc = b.finish(0, 1, &mut Compressor::new(0).unwrap()).unwrap();
        assert_eq!((enc.stats.retained, enc.stats.raw), (1, 1));
        assert_eq!(enc.payload.len(), 4096);
        assert_eq!(enc.leaves[0], (PageIndex(0), leaf_digest(&page_bytes(1))));
        let payload = bytes::Bytes::from(enc.payload);
        let mut rx = StreamReceiver::new(0, 1, geometry(64));
        assert_eq!(
            rx.receive(&enc.header, &payload).unwrap_err(),
            BatchError::UnexpectedRetained { page: 0 }
        );
        let mut rx = StreamReceiver::new(0, 1, geometry(64));
        rx.accept_retained();
        let dec = rx.receive(&enc.header, &payload).unwrap();
        let got: Vec<_> = dec.pages().collect();
        assert_eq!(got[0], (PageIndex(0), PageData::Retained));
        assert!(matches!(got[1], (PageIndex(1), PageData::Full(_))));
        assert_eq!(
            PageData::Retained.write_to(&mut [0u8; 4096]),
            Err(DeltaError::Retained)
        );
    }

    /// Pages 0..8 sent twice through one cache. The second time pages 0,
    /// 3 and 7 are unchanged, page 1 changed in 8 bytes, page 6 in 64
    /// scattered bytes, page 2 throughout, page 4 became zero and page 5
    /// (zero before, so not cached) non-zero.
    fn two_versions(level: i32) -> (Vec<Vec<u8>>, Vec<Vec<u8>>, EncodedBatch, EncodedBatch) {
        let mut old: Vec<Vec<u8>> = (0..8).map(|i| page_bytes(3 * i + 2)).collect();
        old[5] = vec![0; 4096];
        let mut new = old.clone();
        new[1][100..108].copy_from_slice(b"changed!");
        new[2] = page_bytes(1000);
        new[4] = vec![0; 4096];
        new[5] = page_bytes(5);
        for i in 0..64 {
            new[6][i * 61 + 7] ^= 0x5a;
        }
        let mut cache = PageCache::new(8 * 4096, PageSize::SIZE_4K);
        let mut comp = Compressor::new(level).unwrap();
        let mut send = |pages: &[Vec<u8>], seq| {
            let mut b = BatchBuilder::new(PageSize::SIZE_4K);
            for (i, p) in pages.iter().enumerate() {
                b.push_delta_with(PageIndex(i as u64), &mut cache, |buf| {
                    buf.copy_from_slice(p)
                })
                .unwrap();
            }
            b.finish(seq, 1, &mut comp).unwrap()
        };
        let first = send(&old, 0);
        let second = send(&new, 1);
        assert_eq!(
            cache.stats(),
            crate::delta::CacheStats {
                hits: 6,
                misses: 7 + 1,
                evictions: 0
            }
        );
        (old, new, first, second)
    }

    #[test]
    fn deltas_round_trip_and_rebuild_the_new_pages() {
        for level in [0, 3] {
            let (old, new, first, second) = two_versions(level);
            assert_eq!(first.stats.delta, 0);
            let kinds: Vec<_> = second.header.runs.iter().map(|r| (r.len, r.kind)).collect();
            use RunKind::*;
            assert_eq!(
                kinds,
                [
                    (2, Delta),
                    (1, Data),
                    (1, Delta),
                    (1, Zero),
                    (1, Data),
                    (2, Delta)
                ]
            );
            assert_eq!(second.stats.delta, 5);
            assert_eq!(second.stats.zero, 1);
            assert_eq!(second.stats.pages(), 8);
            let mut rx = StreamReceiver::new(0, 1, geometry(64));
            let mut staging = vec![vec![0u8; 4096]; 8];
            for (enc, want) in [(&first, &old), (&second, &new)] {
                let dec = rx
                    .receive(&enc.header, &bytes::Bytes::from(enc.payload.clone()))
                    .unwrap();
                for ((idx, data), (leaf_idx, leaf)) in dec.pages().zip(&enc.leaves) {
                    assert_eq!(idx, *leaf_idx);
                    let page = &mut staging[idx.0 as usize];
                    data.write_to(page).unwrap();
                    assert_eq!(leaf_digest(page), *leaf);
                }
                assert_eq!(&staging, want);
            }
        }
    }

    #[test]
    fn a_page_with_a_few_changed_bytes_costs_a_few_bytes() {
        let (_, _, _, second) = two_versions(0);
        // Pages 2 and 5 whole. Each delta has a u16 length: pages 0, 3 and
        // 7 nothing more; page 1 [100, 8, 8 XOR bytes]; page 6 three bytes
        // a changed byte (zero run, literal run, the byte).
        assert_eq!(
            second.payload.len(),
            2 * 4096 + 3 * 2 + (2 + 10) + (2 + 64 * 3)
        );
    }

    fn refused(header: &BatchHeader, payload: Vec<u8>) -> BatchError {
        let mut rx = StreamReceiver::new(0, 1, geometry(64));
        rx.receive(header, &bytes::Bytes::from(payload))
            .unwrap_err()
    }

    #[test]
    fn hostile_delta_payloads_are_refused() {
        let header = BatchHeader {
            seq: 0,
            round: 2,
            runs: vec![Run {
                gap: 3,
                len: 2,
                kind: RunKind::Delta,
            }],
            compression: Compression::None,
        };
        let good = vec![3, 0, 5, 1, 1, 0, 0];
        let mut rx = StreamReceiver::new(0, 1, geometry(64));
        let dec = rx
            .receive(&header, &bytes::Bytes::from(good.clone()))
            .unwrap();
        let got: Vec<_> = dec.pages().collect();
        assert_eq!(
            got,
            vec![
                (PageIndex(3), PageData::Delta(&[5, 1, 1])),
                (PageIndex(4), PageData::Delta(&[]))
            ]
        );
        assert_eq!(
            refused(&header, good[..6].to_vec()),
            BatchError::PayloadTruncated { page: 4 }
        );
        assert_eq!(
            refused(&header, good[..4].to_vec()),
            BatchError::PayloadTruncated { page: 3 }
        );
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(
            refused(&header, trailing),
            BatchError::PayloadSize {
                expected: 7,
                got: 8
            }
        );
        assert!(matches!(
            refused(&header, vec![1, 8, 0, 0]),
            BatchError::DeltaTooLong {
                page: 3,
                len: 2049,
                max: 2048
            }
        ));
        assert!(matches!(
            refused(&header, vec![3, 0, 5, 0, 1, 0, 0]),
            BatchError::BadDelta {
                page: 3,
                error: DeltaError::EmptyLiteral { .. }
            }
        ));
        // 4096 as a zero run reaches past the page.
        assert!(matches!(
            refused(&header, vec![4, 0, 0x80, 0x20, 1, 0, 0, 0]),
            BatchError::BadDelta {
                page: 3,
                error: DeltaError::PastPageEnd { .. }
            }
        ));
        assert!(matches!(
            refused(&header, vec![0; 2 * 2051]),
            BatchError::PayloadTooLarge { max: 4100, .. }
        ));
        // A zstd payload is bounded by the same maximum.
        let mut z = Compressor::new(3).unwrap();
        let big = z.compress(&vec![0; 8192]).unwrap().unwrap();
        let zheader = BatchHeader {
            compression: Compression::Zstd,
            ..header
        };
        assert!(matches!(refused(&zheader, big), BatchError::Zstd(_)));
    }

    #[test]
    fn a_cache_of_another_page_size_is_refused() {
        let size = PageSize::try_from(8192).unwrap();
        let mut cache = PageCache::new(1 << 20, size);
        let mut b = BatchBuilder::new(PageSize::SIZE_4K);
        assert_eq!(
            b.push_delta_with(PageIndex(0), &mut cache, |_| {}),
            Err(BuildError::CachePageSize {
                cache: 8192,
                batch: 4096
            })
        );
        assert_eq!(b.pages(), 0);
    }

    #[test]
    fn a_skipped_zero_page_leaves_the_cache() {
        let mut cache = PageCache::new(1 << 20, PageSize::SIZE_4K);
        cache.insert(PageIndex(0), &[1; 4096]);
        let mut b = BatchBuilder::new(PageSize::SIZE_4K);
        assert_eq!(
            b.push_nonzero_delta_with(PageIndex(0), &mut cache, |_| {}),
            Ok(false)
        );
        assert!(cache.is_empty());
        assert_eq!(b.pages(), 0);
    }

    #[test]
    fn out_of_order_and_wrong_stream_are_refused() {
        let enc = build(&[0, 1, 2], 1, 0);
        let mut rx = StreamReceiver::new(0, 2, geometry(100));
        assert!(matches!(
            rx.receive(&enc.header, &bytes::Bytes::from(enc.payload.clone())),
            Err(BatchError::OutOfOrder {
                expected: 0,
                got: 1,
                ..
            })
        ));
        let enc = build(&[STRIPE_PAGES], 0, 0);
        assert!(matches!(
            rx.receive(&enc.header, &bytes::Bytes::from(enc.payload.clone())),
            Err(BatchError::WrongStream { page, .. }) if page == STRIPE_PAGES
        ));
    }

    #[test]
    fn payload_tampering_is_detected_by_size_or_zstd() {
        let enc = build(&[1, 2], 0, 0);
        let mut rx = StreamReceiver::new(0, 1, geometry(100));
        assert!(matches!(
            rx.receive(&enc.header, &bytes::Bytes::from(enc.payload[1..].to_vec())),
            Err(BatchError::PayloadSize { .. })
        ));
        let enc = build(&[1, 4], 0, 3);
        assert_eq!(enc.header.compression, Compression::Zstd);
        let mut bad = enc.payload.clone();
        bad.truncate(bad.len() - 3);
        assert!(rx.receive(&enc.header, &bytes::Bytes::from(bad)).is_err());
    }

    #[test]
    fn pages_past_memory_are_refused() {
        let enc = build(&[5], 0, 0);
        let mut rx = StreamReceiver::new(0, 1, geometry(5));
        assert!(matches!(
            rx.receive(&enc.header, &bytes::Bytes::from(enc.payload.clone())),
            Err(BatchError::PageOutOfRange { .. })
        ));
    }

    #[test]
    fn incompressible_data_backs_off() {
        let mut c = Compressor::new(1).unwrap();
        // splitmix64 output: incompressible.
        let noise: Vec<u8> = (0..8192u64)
            .flat_map(|i| {
                let mut z = i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                (z ^ (z >> 31)).to_le_bytes()
            })
            .collect();
        let mut attempts = 0;
        for _ in 0..100 {
            let before = c.skip;
            assert!(c.compress(&noise).unwrap().is_none());
            if before == 0 {
                attempts += 1;
            }
        }
        assert!(attempts < 12, "{attempts} attempts");
    }

    #[test]
    fn zero_check_matches_naive() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero(&p));
        for i in [0, 7, 63, 64, 4095] {
            p[i] = 1;
            assert!(!is_zero(&p));
            p[i] = 0;
        }
        assert!(is_zero(&p[..100]));
    }

    #[test]
    fn bitmap_basics() {
        let mut b = PageBitmap::empty(130);
        assert!(b.insert(PageIndex(129)));
        assert!(!b.insert(PageIndex(130)));
        b.insert(PageIndex(3));
        assert_eq!(b.iter().map(|p| p.0).collect::<Vec<_>>(), vec![3, 129]);
        assert_eq!(PageBitmap::full(130).count(), 130);
        assert_eq!(PageBitmap::from_words(vec![u64::MAX; 3], 130).count(), 130);
    }
}
