//! Delta encoding of memory pages against their previous version, in the
//! shape of QEMU's XBZRLE, and the source's bounded cache of previous
//! versions.
//!
//! A page re-sent in a later round often differs from the version sent
//! before in a few bytes (a counter, a list link, a timestamp). The source
//! XORs the two versions and sends only where they differ; the destination
//! XORs that into the page it holds, which *is* the previous version,
//! because every version of a page travels in order on one stream
//! ([`crate::page::stream_for`]). So only the source keeps old versions, in
//! a [`PageCache`].
//!
//! # Format
//! A delta is a sequence of pairs covering the page from its first byte:
//!
//! ```text
//! delta = pair*
//! pair  = zero-run:varint  literal-run:varint  literal:byte{literal-run}
//! ```
//!
//! Each pair skips `zero-run` unchanged bytes, then XORs the `literal-run`
//! bytes that follow into the page. Lengths are unsigned LEB128, minimally
//! encoded. The unchanged bytes after the last literal are implied, so an
//! unchanged page is the empty delta. Only the first pair may have an empty
//! zero run (the page changed from its first byte), and no literal run is
//! empty: two literals with nothing between them are one literal, and a
//! pair without a literal would only skip bytes that are implied anyway.
//!
//! Unchanged stretches shorter than [`MIN_ZERO_RUN`] bytes between changed
//! bytes stay inside the literal (as zero XOR bytes): splitting there would
//! cost two length bytes to save at most two literal bytes. QEMU gets the
//! same effect by comparing a machine word at a time.
//!
//! Applying is all-or-nothing: [`apply`] checks the whole delta against the
//! page length before it writes a byte, so a hostile delta leaves the page
//! as it was. Nothing is allocated from a length read off the wire.

use std::hash::{BuildHasher, RandomState};

use thiserror::Error;

use crate::geometry::{PageIndex, PageSize};

/// Shortest unchanged stretch the encoder splits a literal at; shorter ones
/// are carried inside the literal as zero XOR bytes.
pub const MIN_ZERO_RUN: usize = 3;

/// Why a delta does not apply to a page. Every variant is the peer's fault,
/// except [`DeltaError::PageLength`] (the caller's).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DeltaError {
    /// A retained page is opened from the retained image, not written
    /// from a batch ([`crate::page::PageData::Retained`]).
    #[error("a retained page must be opened from the retained image")]
    Retained,
    /// The delta ends inside a length.
    #[error("delta ends inside a length at byte {at}")]
    TruncatedVarint {
        /// Offset of the length in the delta.
        at: usize,
    },
    /// A length does not fit in 64 bits, or is not minimally encoded.
    #[error("length at byte {at} overflows or is not minimally encoded")]
    BadVarint {
        /// Offset of the length in the delta.
        at: usize,
    },
    /// A run reaches past the end of the page.
    #[error("run of {len} bytes at page offset {offset} passes the page end ({page} bytes)")]
    PastPageEnd {
        /// Page offset where the run starts.
        offset: u64,
        /// Run length.
        len: u64,
        /// Page length.
        page: usize,
    },
    /// A literal run of length zero.
    #[error("empty literal run at byte {at}")]
    EmptyLiteral {
        /// Offset of its length in the delta.
        at: usize,
    },
    /// A zero run of length zero after the first pair.
    #[error("empty zero run at byte {at} (only the first pair may have one)")]
    EmptyZeroRun {
        /// Offset of its length in the delta.
        at: usize,
    },
    /// The delta ends inside a literal run.
    #[error("delta ends inside a literal of {len} bytes at byte {at}")]
    TruncatedLiteral {
        /// Offset of the literal in the delta.
        at: usize,
        /// Its declared length.
        len: u64,
    },
    /// Bytes after the pair that reaches the end of the page.
    #[error("{extra} bytes after the end of the page")]
    TrailingBytes {
        /// Bytes left over.
        extra: usize,
    },
    /// A full page of the wrong size for the caller's buffer
    /// ([`crate::page::PageData::write_to`]).
    #[error("page buffer of {got} bytes for a page of {expected}")]
    PageLength {
        /// Bytes in the page data.
        expected: usize,
        /// Bytes in the caller's buffer.
        got: usize,
    },
}

/// Appends to `out` the delta that turns `old` into `new`, and returns true;
/// or returns false, leaving `out` as it was, as soon as the delta would be
/// longer than `limit` bytes (or when `old` and `new` differ in length).
/// Two equal pages give the empty delta.
///
/// Work is bounded by the limit: a page that changed throughout is given up
/// after about `limit` changed bytes.
pub fn encode(old: &[u8], new: &[u8], out: &mut Vec<u8>, limit: usize) -> bool {
    if old.len() != new.len() {
        return false;
    }
    let start = out.len();
    let n = new.len();
    let mut i = 0;
    loop {
        let zero = equal_prefix(&old[i..], &new[i..]);
        let lit = i + zero;
        if lit == n {
            return true;
        }
        // Extend the literal over changed bytes and over unchanged
        // stretches shorter than MIN_ZERO_RUN that more changes follow.
        let mut end = lit;
        loop {
            while end < n && old[end] != new[end] {
                end += 1;
            }
            if end - lit > limit {
                out.truncate(start);
                return false;
            }
            if end == n {
                break;
            }
            let same = equal_prefix(&old[end..], &new[end..]);
            if same >= MIN_ZERO_RUN || end + same == n {
                break;
            }
            end += same;
        }
        let len = end - lit;
        let need = varint_len(zero as u64) + varint_len(len as u64) + len;
        if out.len() - start + need > limit {
            out.truncate(start);
            return false;
        }
        put_varint(out, zero as u64);
        put_varint(out, len as u64);
        out.extend(old[lit..end].iter().zip(&new[lit..end]).map(|(a, b)| a ^ b));
        i = end;
    }
}

/// XORs `delta` into `page`. The whole delta is checked first: on error the
/// page is unchanged.
pub fn apply(page: &mut [u8], delta: &[u8]) -> Result<(), DeltaError> {
    check(delta, page.len())?;
    walk(delta, page.len(), |offset, literal| {
        if let Some(dst) = page.get_mut(offset..offset + literal.len()) {
            for (d, x) in dst.iter_mut().zip(literal) {
                *d ^= x;
            }
        }
    })
}

/// Checks that `delta` is well formed for a page of `page_len` bytes,
/// without applying it.
pub fn check(delta: &[u8], page_len: usize) -> Result<(), DeltaError> {
    walk(delta, page_len, |_, _| {})
}

/// Parses `delta` against a page of `page_len` bytes, calling `f` with each
/// literal and its page offset, in order. Stops at the first error; every
/// literal passed to `f` lies inside the page.
fn walk(delta: &[u8], page_len: usize, mut f: impl FnMut(usize, &[u8])) -> Result<(), DeltaError> {
    let mut pos = 0;
    let mut offset = 0usize;
    let mut first = true;
    while pos < delta.len() {
        if offset == page_len {
            return Err(DeltaError::TrailingBytes {
                extra: delta.len() - pos,
            });
        }
        let zero_at = pos;
        let zero = read_varint(delta, &mut pos)?;
        if zero == 0 && !first {
            return Err(DeltaError::EmptyZeroRun { at: zero_at });
        }
        let lit_at = pos;
        let len = read_varint(delta, &mut pos)?;
        if len == 0 {
            return Err(DeltaError::EmptyLiteral { at: lit_at });
        }
        let room = (page_len - offset) as u64;
        if zero >= room || len > room - zero {
            let start = offset as u64;
            return Err(if zero >= room {
                DeltaError::PastPageEnd {
                    offset: start,
                    len: zero,
                    page: page_len,
                }
            } else {
                DeltaError::PastPageEnd {
                    offset: start + zero,
                    len,
                    page: page_len,
                }
            });
        }
        // CAST: both were just checked to fit in the page, whose length is a
        // usize.
        #[allow(clippy::cast_possible_truncation)]
        let (zero, len) = (zero as usize, len as usize);
        let Some(literal) = delta.get(pos..pos + len) else {
            return Err(DeltaError::TruncatedLiteral {
                at: pos,
                len: len as u64,
            });
        };
        offset += zero;
        f(offset, literal);
        offset += len;
        pos += len;
        first = false;
    }
    Ok(())
}

/// Bytes at the start of `a` equal to those of `b`, compared a word at a
/// time.
fn equal_prefix(a: &[u8], b: &[u8]) -> usize {
    let mut n = 0;
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        if x != y {
            break;
        }
        n += 8;
    }
    n + a[n..]
        .iter()
        .zip(&b[n..])
        .take_while(|(x, y)| x == y)
        .count()
}

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v.to_le_bytes()[0] & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v.to_le_bytes()[0]);
}

/// Reads a minimally encoded LEB128 `u64` at `*pos`, advancing it.
fn read_varint(delta: &[u8], pos: &mut usize) -> Result<u64, DeltaError> {
    let at = *pos;
    let mut v = 0u64;
    for i in 0..10 {
        let Some(&b) = delta.get(at + i) else {
            return Err(DeltaError::TruncatedVarint { at });
        };
        let bits = u64::from(b & 0x7f);
        // The tenth byte holds bit 63 only.
        if i == 9 && b > 1 {
            return Err(DeltaError::BadVarint { at });
        }
        v |= bits << (7 * i);
        if b & 0x80 == 0 {
            // A last byte of zero after others is a longer spelling.
            if b == 0 && i > 0 {
                return Err(DeltaError::BadVarint { at });
            }
            *pos = at + i + 1;
            return Ok(v);
        }
    }
    Err(DeltaError::BadVarint { at })
}

/// Hits, misses and evictions of a [`PageCache`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups that found a previous version.
    pub hits: u64,
    /// Lookups that found none.
    pub misses: u64,
    /// Versions dropped to make room for another page.
    pub evictions: u64,
}

/// The source's bounded cache of the last version it sent of each page,
/// for delta encoding.
///
/// Memory is fixed when it is made: one slab of `capacity` pages, and an
/// open-addressing index (linear probing, at most half full, deletion by
/// backward shift, so no tombstones) of 4-byte slot numbers; nothing grows
/// afterwards. When the slab is full a version is evicted by CLOCK: each
/// slot has a reference bit, set when its page is looked up (a page sent
/// again) and clear for a page just inserted, and the clock hand evicts the
/// first slot whose bit is clear, clearing bits as it passes. In pre-copy
/// most pages are sent once, in the bulk round, and a few hot ones again and
/// again; CLOCK keeps the hot ones through a sweep of the once-sent, where
/// FIFO would evict them in insertion order.
///
/// The cache must hold exactly what the destination holds: a version goes
/// in when it is put in a batch, and a page sent as zero is removed (see
/// [`crate::page::BatchBuilder::push_delta_with`]). One cache per data
/// stream: a page always travels on the same stream.
pub struct PageCache {
    page: usize,
    slab: Vec<u8>,
    /// The page in each slot.
    owner: Vec<Option<PageIndex>>,
    referenced: Vec<bool>,
    /// Slot numbers by hash of their page, [`EMPTY`] where none.
    table: Vec<u32>,
    hasher: RandomState,
    free: Vec<u32>,
    len: usize,
    hand: usize,
    /// Whether the next [`PageCache::insert`] stores (see
    /// [`PageCache::admit_within`]); each insert sets it back.
    admit: bool,
    /// Whether every slot has been in use at once.
    filled: bool,
    stats: CacheStats,
}

/// An unused entry of [`PageCache`]'s index.
const EMPTY: u32 = u32::MAX;

impl std::fmt::Debug for PageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageCache")
            .field("page", &self.page)
            .field("capacity", &self.capacity())
            .field("len", &self.len)
            .field("stats", &self.stats)
            .finish()
    }
}

impl PageCache {
    /// A cache of `capacity_bytes / page_size` pages (at most 2^31), all
    /// allocated now (zeroed, so the OS commits them as they are first
    /// written). A capacity under one page gives a cache that holds
    /// nothing.
    // CAST: slot numbers are below `slots`, at most 2^31 < u32::MAX.
    #[allow(clippy::cast_possible_truncation)]
    pub fn new(capacity_bytes: usize, page_size: PageSize) -> Self {
        let page = page_size.bytes();
        let slots = (capacity_bytes / page).min(1 << 31);
        PageCache {
            page,
            slab: vec![0; slots * page],
            owner: vec![None; slots],
            referenced: vec![false; slots],
            table: vec![EMPTY; (2 * slots).next_power_of_two()],
            hasher: RandomState::new(),
            free: (0..slots as u32).rev().collect(),
            len: 0,
            hand: 0,
            admit: true,
            filled: false,
            stats: CacheStats::default(),
        }
    }

    /// The size of the pages it holds.
    pub fn page_size(&self) -> usize {
        self.page
    }

    /// Pages it can hold.
    pub fn capacity(&self) -> usize {
        self.owner.len()
    }

    /// Pages it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes it allocated (slab and bookkeeping); fixed at creation.
    pub fn allocated_bytes(&self) -> usize {
        self.slab.capacity()
            + self.owner.capacity() * std::mem::size_of::<Option<PageIndex>>()
            + self.referenced.capacity()
            + (self.table.capacity() + self.free.capacity()) * std::mem::size_of::<u32>()
    }

    /// The cached version of `idx`, counted as a hit or a miss.
    pub fn get(&mut self, idx: PageIndex) -> Option<&[u8]> {
        match self.find(idx) {
            Ok(pos) => {
                self.stats.hits += 1;
                let slot = self.table[pos] as usize;
                self.referenced[slot] = true;
                Some(&self.slab[slot * self.page..(slot + 1) * self.page])
            }
            Err(_) => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// Stores `bytes` as the version of `idx`, replacing an older one or
    /// evicting another page's when full. A slice that is not one page long
    /// is not stored, and the older version is dropped; so is a page while
    /// the cache does not admit it ([`PageCache::admit_within`]).
    // CAST: a slot is below the slot count, at most 2^31 (see `new`).
    #[allow(clippy::cast_possible_truncation)]
    pub fn insert(&mut self, idx: PageIndex, bytes: &[u8]) {
        let admit = std::mem::replace(&mut self.admit, true);
        if bytes.len() != self.page || !admit {
            self.remove(idx);
            return;
        }
        let slot = match self.find(idx) {
            Ok(pos) => self.table[pos] as usize,
            Err(_) => {
                let Some(slot) = self.free.pop().map(|s| s as usize).or_else(|| self.evict())
                else {
                    return;
                };
                // Found again: an eviction may have moved entries.
                if let Err(pos) = self.find(idx) {
                    self.table[pos] = slot as u32;
                }
                self.owner[slot] = Some(idx);
                self.referenced[slot] = false;
                self.len += 1;
                self.filled |= self.len == self.owner.len();
                slot
            }
        };
        self.slab[slot * self.page..(slot + 1) * self.page].copy_from_slice(bytes);
    }

    /// Whether the next [`PageCache::insert`] stores its page, given that
    /// `left` pages, that one among them, are still to go in the same
    /// sweep (a round's pages on one stream, each sent once): yes until
    /// the cache has first been full, and after that only within the last
    /// twice its capacity.
    ///
    /// A page stored in a full cache with its reference bit clear (one
    /// not looked up since) is evicted when the clock hand comes round to
    /// its slot: after at most `capacity` more evictions, and a sweep
    /// looks no page up twice. So in a sweep much longer than the cache
    /// most of what it stores is evicted before the sweep ends, which
    /// costs a copy and the index work for nothing and sweeps out the
    /// hot pages (ones sent again, whose bit is set). A round 1 of 1 GiB
    /// through a cache of 32 MiB stored 32 times what it kept.
    ///
    /// This is an estimate: pages sent as zero or held by the destination
    /// store nothing, and the encoder cannot tell them before it reads
    /// them. Where at most half of the last pages are such, a round 1
    /// ends with the versions storing every page would leave; where more
    /// are, with fewer (and with the first pages stored, which fill it,
    /// when all of the last ones are zero). Either way a page not stored
    /// drops its older version, as [`PageCache::insert`] says, so the
    /// cache never holds a version the destination lacks; only the deltas
    /// it makes possible change.
    pub fn admit_within(&mut self, left: usize) {
        self.admit = !self.filled || left <= self.capacity().saturating_mul(2);
    }

    /// Forgets the version of `idx`, if any.
    // CAST: a slot is below the slot count, at most 2^31 (see `new`).
    #[allow(clippy::cast_possible_truncation)]
    pub fn remove(&mut self, idx: PageIndex) {
        if let Ok(pos) = self.find(idx) {
            let slot = self.unlink(pos);
            self.free.push(slot as u32);
        }
    }

    /// Hits, misses and evictions so far.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    // CAST: hash bits, masked to the table size; dropping high bits of a
    // hash loses nothing.
    #[allow(clippy::cast_possible_truncation)]
    fn home(&self, idx: PageIndex) -> usize {
        self.hasher.hash_one(idx.0) as usize & (self.table.len() - 1)
    }

    /// The index position of `idx`, or the empty position where it would
    /// go. Terminates: the index is never more than half full.
    fn find(&self, idx: PageIndex) -> Result<usize, usize> {
        let mask = self.table.len() - 1;
        let mut pos = self.home(idx);
        loop {
            let slot = self.table[pos];
            if slot == EMPTY {
                return Err(pos);
            }
            if self.owner[slot as usize] == Some(idx) {
                return Ok(pos);
            }
            pos = (pos + 1) & mask;
        }
    }

    /// Removes the index entry at `pos` and empties its slot, which it
    /// returns. Later entries of the probe run shift back into the hole.
    fn unlink(&mut self, pos: usize) -> usize {
        let mask = self.table.len() - 1;
        let slot = self.table[pos] as usize;
        self.owner[slot] = None;
        self.referenced[slot] = false;
        self.len -= 1;
        self.table[pos] = EMPTY;
        let (mut hole, mut next) = (pos, pos);
        loop {
            next = (next + 1) & mask;
            let s = self.table[next];
            let Some(page) = self.owner.get(s as usize).copied().flatten() else {
                break;
            };
            // It may fill the hole if the hole lies between its home and
            // where it sits.
            let home = self.home(page);
            if next.wrapping_sub(home) & mask >= next.wrapping_sub(hole) & mask {
                self.table[hole] = s;
                self.table[next] = EMPTY;
                hole = next;
            }
        }
        slot
    }

    /// Frees a slot by CLOCK; `None` only for a cache of no slots. Called
    /// when every slot is in use.
    fn evict(&mut self) -> Option<usize> {
        let slots = self.owner.len();
        // Two sweeps at most: the first clears every reference bit.
        for _ in 0..2 * slots {
            let slot = self.hand;
            self.hand = (self.hand + 1) % slots;
            if self.referenced[slot] {
                self.referenced[slot] = false;
                continue;
            }
            if let Some(old) = self.owner[slot] {
                if let Ok(pos) = self.find(old) {
                    self.unlink(pos);
                }
                self.stats.evictions += 1;
            }
            return Some(slot);
        }
        None
    }
}

#[cfg(test)]
mod tests;
