//! The sender's side of the batch codec: [`BatchBuilder`] reads pages
//! straight into a batch (zero pages, whole pages, deltas, retained pages)
//! and [`Compressor`] compresses its payload with zstd, backing off when
//! memory does not compress.

use thiserror::Error;

use super::batch::{BatchHeader, Compression, EncodingStats, Run, RunKind, ZstdError};
use crate::delta::{self, PageCache};
use crate::digest::{leaf_digest, zero_leaf, Digest};
use crate::geometry::{is_zero, PageIndex, PageSize};

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
    Zstd(#[from] ZstdError),
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
                (Compression::None, at_size(self.data))
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

/// `data` in an allocation no larger than it needs, within an eighth. A
/// raw batch is built in room for a full one (256 KiB for the last few
/// pages of a round), and a sender holds its payload until the bytes are
/// acknowledged, with the send window counting only the bytes sent.
/// Measured with 15 VMs migrating at once, before this and the
/// compressor's own copy: 241 MB of the agents' 421 MB heap at its peak
/// were payloads held at the size they were built in. So a payload well
/// under its capacity is copied out at its size (a memcpy of what is
/// sent); a full one is handed over as it is.
fn at_size(data: Vec<u8>) -> Vec<u8> {
    if data.capacity() - data.len() > data.len() / 8 {
        data.as_slice().to_vec()
    } else {
        data
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
    /// zstd's output, kept from batch to batch: what is returned is a copy
    /// at its size, not a vector of the input's bound (which a sender
    /// then held at that size until the bytes were acknowledged).
    scratch: Vec<u8>,
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
            Some(zstd::bulk::Compressor::new(level.clamp(1, 19)).map_err(ZstdError::from)?)
        };
        Ok(Compressor {
            inner,
            scratch: Vec::new(),
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
        self.scratch.clear();
        self.scratch
            .reserve(zstd::zstd_safe::compress_bound(data.len()));
        let n = z
            .compress_to_buffer(data, &mut self.scratch)
            .map_err(ZstdError::from)?;
        if n + data.len() / 32 < data.len() {
            self.backoff = 0;
            Ok(Some(self.scratch[..n].to_vec()))
        } else {
            self.backoff = (self.backoff * 2).clamp(1, MAX_BACKOFF);
            self.skip = self.backoff;
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_batch_well_under_its_room_is_finished_at_its_size() {
        let page = PageSize::SIZE_4K;
        let mut b = BatchBuilder::new(page);
        b.push_with(PageIndex(3), |buf| buf.fill(7)).unwrap();
        let built_in = b.data.capacity();
        let enc = b.finish(0, 1, &mut Compressor::new(0).unwrap()).unwrap();
        assert!(built_in >= 16 * page.bytes(), "{built_in}");
        assert_eq!(enc.header.compression, Compression::None);
        assert_eq!(enc.payload, vec![7u8; page.bytes()]);
        assert_eq!(
            enc.payload.capacity(),
            enc.payload.len(),
            "copied out at its size"
        );

        let full = vec![9u8; 256 << 10];
        let at = full.as_ptr();
        let kept = at_size(full);
        assert_eq!(
            kept.as_ptr(),
            at,
            "a full vector is handed over, not copied"
        );
        let mut nearly = Vec::with_capacity(100);
        nearly.extend_from_slice(&[1u8; 95]);
        let at = nearly.as_ptr();
        let kept = at_size(nearly);
        assert_eq!(kept.as_ptr(), at, "within an eighth: kept");
    }

    #[test]
    fn compressed_bytes_hold_no_more_memory_than_they_carry() {
        let mut c = Compressor::new(1).unwrap();
        let text: Vec<u8> = b"convoy moves running VMs. "
            .iter()
            .copied()
            .cycle()
            .take(256 << 10)
            .collect();
        for _ in 0..3 {
            let z = c.compress(&text).unwrap().expect("text compresses");
            assert!(z.len() < 4096, "{}", z.len());
            assert_eq!(z.capacity(), z.len(), "held at its size, not the input's");
            let back = zstd::bulk::decompress(&z, text.len()).unwrap();
            assert_eq!(back, text);
        }
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
}
