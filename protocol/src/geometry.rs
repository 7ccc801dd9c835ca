//! Page geometry: page sizes, the shape of a guest's memory, page indexes
//! and sets of pages, the striping of pages over data streams, and the size
//! limits every batch is held to. A leaf: it knows nothing of the codec.

use std::num::NonZeroU32;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Largest number of raw bytes in one batch (1 MiB).
pub const MAX_BATCH_BYTES: usize = 1 << 20;

/// Pages per stripe: consecutive pages in one stripe share a data stream.
pub const STRIPE_PAGES: u64 = 64;

/// Largest number of pages a guest may have (2^32 pages, 16 TiB at 4 KiB).
pub const MAX_PAGE_COUNT: u64 = 1 << 32;

/// `v` as a `usize`, saturating where it does not fit (32-bit targets):
/// as a length it then fails to allocate and as an index it is out of
/// range, never a smaller value that aliases a real page. Lossless on
/// 64-bit targets.
pub fn saturating_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

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

    /// The longest delta [`crate::page::BatchBuilder::push_delta_with`] sends
    /// instead of the page (a quarter of a page); see there why.
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
#[allow(clippy::cast_possible_truncation)]
pub fn stream_for(page: PageIndex, streams: u16) -> u16 {
    // CAST: a remainder of division by a `u16`, so below 2^16.
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
            words: vec![0; saturating_usize(len.div_ceil(64))],
            len,
        }
    }

    /// Every page of `len`.
    pub fn full(len: u64) -> Self {
        let mut b = PageBitmap {
            words: vec![u64::MAX; saturating_usize(len.div_ceil(64))],
            len,
        };
        b.trim();
        b
    }

    /// A bitmap from raw words (as a dirty log delivers them); bits past
    /// `len` are cleared.
    pub fn from_words(mut words: Vec<u64>, len: u64) -> Self {
        words.resize(saturating_usize(len.div_ceil(64)), 0);
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

    /// Keeps only the pages also in `other`.
    pub fn intersect_with(&mut self, other: &PageBitmap) {
        for (i, a) in self.words.iter_mut().enumerate() {
            *a &= other.words.get(i).copied().unwrap_or(0);
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

#[cfg(test)]
mod tests {
    use super::*;

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
