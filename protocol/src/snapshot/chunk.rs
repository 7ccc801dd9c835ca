//! Chunks: the leaf space cut into fixed runs of leaves, each sealed alone
//! under the lineage's data key and named by a keyed hash of its content.
//!
//! # Format of a sealed chunk (the object's bytes)
//! ```text
//! sealed = nonce:12 ‖ AES-256-GCM(plain, aad = CHUNK_AAD ‖ name) ‖ tag:16
//! plain  = version:u8 (1) ‖ count:u16 LE ‖ zero-bitmap:⌈count/8⌉
//!          ‖ codec:u8 (0 raw, 1 zstd) ‖ body
//! body   = the chunk's non-zero leaves in order, raw or as one zstd frame
//! ```
//! - **name** = BLAKE3 keyed with a key derived from the data key, over the
//!   chunk's raw bytes (every leaf, zeros included). The bucket cannot
//!   test a guess about a chunk without the key; equal chunks of one
//!   lineage share a name, which is what dedup needs.
//! - **nonce** = the first 12 bytes of BLAKE3 keyed with another derived
//!   key, over `plain`: a nonce is reused only for the very same plaintext
//!   (so equal chunks seal equally, and a chunk sealed at another zstd
//!   level gets another nonce — never the same nonce over other bytes).
//!   The reader recomputes it: a nonce not derived so is refused.
//! - An all-zero chunk is not stored at all; a zero leaf costs one bit.

use std::fmt;

use ring::aead;
use thiserror::Error;
use zeroize::Zeroize;

use super::key::DataKey;
use crate::geometry::is_zero;

/// Bytes of the nonce in front of a sealed chunk.
pub const NONCE_LEN: usize = 12;
/// Bytes AES-GCM adds at the end.
pub const TAG_LEN: usize = 16;
/// Fewest leaves in a chunk.
pub const MIN_CHUNK_LEAVES: u32 = 64;
/// Most leaves in a chunk (16 MiB at 4 KiB pages).
pub const MAX_CHUNK_LEAVES: u32 = 4096;
/// Leaves in a chunk unless the VM is too large for it (1 MiB at 4 KiB).
pub const DEFAULT_CHUNK_LEAVES: u32 = 256;
/// Most chunks one snapshot may have (bounds the manifest).
pub const MAX_CHUNKS: u64 = 1 << 20;

const PLAIN_VERSION: u8 = 1;
const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;
const CHUNK_AAD: &[u8] = b"convoy 2026-12 snapshot chunk v1\0";
const NAME_CONTEXT: &str = "convoy 2026-12 snapshot chunk name v1";
const NONCE_CONTEXT: &str = "convoy 2026-12 snapshot chunk nonce v1";
const SEAL_CONTEXT: &str = "convoy 2026-12 snapshot chunk aes-256-gcm v1";

/// A chunk's name in the bucket: a keyed hash of its content.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ChunkName(pub [u8; 32]);

impl ChunkName {
    /// Lower-case hex, the object's name under `chunks/`.
    pub fn to_hex(&self) -> String {
        crate::digest::Digest(self.0).to_hex()
    }
}

impl fmt::Debug for ChunkName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkName({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for ChunkName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// How the leaf space is cut: `leaves` leaves of `page` bytes, in chunks
/// of `chunk_leaves` (the last one may be shorter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLayout {
    /// Leaves in all.
    pub leaves: u64,
    /// Leaves a chunk.
    pub chunk_leaves: u32,
    /// Bytes a leaf.
    pub page: usize,
}

impl ChunkLayout {
    /// The layout a pusher picks for `leaves` leaves: the default chunk,
    /// doubled until the snapshot has at most [`MAX_CHUNKS`] chunks (`None`
    /// when even the largest chunk leaves too many).
    pub fn for_leaves(leaves: u64, page: usize) -> Option<ChunkLayout> {
        let mut chunk_leaves = DEFAULT_CHUNK_LEAVES;
        while leaves.div_ceil(u64::from(chunk_leaves)) > MAX_CHUNKS {
            chunk_leaves = chunk_leaves
                .checked_mul(2)
                .filter(|c| *c <= MAX_CHUNK_LEAVES)?;
        }
        Some(ChunkLayout {
            leaves,
            chunk_leaves,
            page,
        })
    }

    /// Chunks in all.
    pub fn chunks(&self) -> u64 {
        self.leaves.div_ceil(u64::from(self.chunk_leaves.max(1)))
    }

    /// The leaves of chunk `i` (empty past the end).
    pub fn range(&self, i: u64) -> std::ops::Range<u64> {
        let per = u64::from(self.chunk_leaves);
        let start = i.saturating_mul(per).min(self.leaves);
        start..start.saturating_add(per).min(self.leaves)
    }

    /// The largest sealed chunk this layout allows: a plain chunk holding
    /// every leaf raw, its header, the nonce and the tag.
    pub fn max_sealed(&self) -> usize {
        let count = crate::page::saturating_usize(u64::from(self.chunk_leaves));
        NONCE_LEN + plain_header_len(count) + count.saturating_mul(self.page) + TAG_LEN
    }
}

fn plain_header_len(count: usize) -> usize {
    1 + 2 + count.div_ceil(8) + 1
}

/// The keys one data key yields for chunks.
pub struct ChunkKeys {
    name: [u8; 32],
    nonce: [u8; 32],
    seal: aead::LessSafeKey,
}

impl fmt::Debug for ChunkKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChunkKeys(..)")
    }
}

impl Drop for ChunkKeys {
    fn drop(&mut self) {
        self.name.zeroize();
        self.nonce.zeroize();
    }
}

impl ChunkKeys {
    /// The chunk keys of `key`.
    pub fn new(key: &DataKey) -> ChunkKeys {
        ChunkKeys {
            name: key.derive(NAME_CONTEXT),
            nonce: key.derive(NONCE_CONTEXT),
            seal: crate::aead_key::derived(SEAL_CONTEXT, key.as_bytes()),
        }
    }

    /// The name of a chunk of these raw bytes.
    pub fn name(&self, raw: &[u8]) -> ChunkName {
        ChunkName(*blake3::keyed_hash(&self.name, raw).as_bytes())
    }

    fn nonce(&self, plain: &[u8]) -> [u8; NONCE_LEN] {
        let h = blake3::keyed_hash(&self.nonce, plain);
        let mut n = [0u8; NONCE_LEN];
        n.copy_from_slice(&h.as_bytes()[..NONCE_LEN]);
        n
    }
}

/// A chunk ready for the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedChunk {
    /// Its name.
    pub name: ChunkName,
    /// The object's bytes.
    pub bytes: Vec<u8>,
    /// Leaves that were zero (they cost a bit each).
    pub zero_leaves: u32,
}

/// Why a chunk could not be sealed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SealError {
    /// The raw bytes are not whole leaves, or more than a chunk holds.
    #[error("a chunk of {len} bytes is not 1..={max} whole leaves of {page} bytes")]
    Shape {
        /// Bytes given.
        len: usize,
        /// Bytes a leaf.
        page: usize,
        /// Leaves a chunk holds.
        max: u32,
    },
    /// zstd failed.
    #[error("zstd: {0}")]
    Zstd(String),
    /// AES-GCM refused (cannot happen for sizes a chunk has).
    #[error("sealing failed")]
    Seal,
}

/// Why a chunk from the bucket was refused. Every variant is the bucket's
/// (or whoever wrote it) fault, and says what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ChunkError {
    /// Shorter than a nonce and a tag, or longer than the layout allows.
    #[error("{len} bytes, outside {min}..={max}")]
    Length {
        /// Bytes found.
        len: usize,
        /// Fewest a sealed chunk has.
        min: usize,
        /// Most this snapshot's chunks may have.
        max: usize,
    },
    /// The manifest recorded another length.
    #[error("{len} bytes where the manifest recorded {expected}")]
    NotRecordedLength {
        /// Bytes found.
        len: usize,
        /// Bytes recorded.
        expected: usize,
    },
    /// AES-GCM refused: altered bytes, another name's chunk, or another key.
    #[error(
        "does not authenticate under this snapshot's key and its name (altered, or another chunk)"
    )]
    Authentication,
    /// The nonce is not the one its content determines.
    #[error("its nonce is not derived from its content")]
    Nonce,
    /// The plaintext is not a chunk of this layout.
    #[error("malformed content: {0}")]
    Format(&'static str),
    /// The compressed body does not decompress to its leaves.
    #[error("compressed body: {0}")]
    Zstd(String),
    /// The content is not what its name says.
    #[error("its content does not match its name (a chunk swapped under another's name)")]
    Name,
}

/// Seals the raw bytes of one chunk (1..=`max_leaves` whole leaves of
/// `page` bytes), compressing at `level` (0: none) when that is smaller.
/// `None` for an all-zero chunk: it is not stored.
pub fn seal_chunk(
    keys: &ChunkKeys,
    raw: &[u8],
    page: usize,
    max_leaves: u32,
    level: i32,
) -> Result<Option<SealedChunk>, SealError> {
    let shape = SealError::Shape {
        len: raw.len(),
        page,
        max: max_leaves,
    };
    if page == 0 || raw.is_empty() || raw.len() % page != 0 {
        return Err(shape);
    }
    let count = raw.len() / page;
    let Ok(count16) = u16::try_from(count) else {
        return Err(shape);
    };
    if count > crate::page::saturating_usize(u64::from(max_leaves)) {
        return Err(shape);
    }
    let mut bitmap = vec![0u8; count.div_ceil(8)];
    let mut body = Vec::with_capacity(raw.len());
    let mut zeros = 0u32;
    for (i, leaf) in raw.chunks_exact(page).enumerate() {
        if is_zero(leaf) {
            bitmap[i / 8] |= 1 << (i % 8);
            zeros += 1;
        } else {
            body.extend_from_slice(leaf);
        }
    }
    if body.is_empty() {
        return Ok(None);
    }
    let (codec, body) = if level > 0 {
        let z = zstd::bulk::compress(&body, level).map_err(|e| SealError::Zstd(e.to_string()))?;
        if z.len() < body.len() {
            (CODEC_ZSTD, z)
        } else {
            (CODEC_RAW, body)
        }
    } else {
        (CODEC_RAW, body)
    };
    let mut plain = Vec::with_capacity(plain_header_len(count) + body.len() + TAG_LEN);
    plain.push(PLAIN_VERSION);
    plain.extend_from_slice(&count16.to_le_bytes());
    plain.extend_from_slice(&bitmap);
    plain.push(codec);
    plain.extend_from_slice(&body);
    let name = keys.name(raw);
    let nonce = keys.nonce(&plain);
    let mut aad = CHUNK_AAD.to_vec();
    aad.extend_from_slice(&name.0);
    keys.seal
        .seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(&aad),
            &mut plain,
        )
        .map_err(|_| SealError::Seal)?;
    let mut bytes = Vec::with_capacity(NONCE_LEN + plain.len());
    bytes.extend_from_slice(&nonce);
    bytes.extend_from_slice(&plain);
    Ok(Some(SealedChunk {
        name,
        bytes,
        zero_leaves: zeros,
    }))
}

/// Opens a sealed chunk named `name` that must hold `count` leaves of
/// `page` bytes: authenticates it, checks its nonce, decodes it and
/// checks its content against its name. The chunk's raw bytes.
pub fn open_chunk(
    keys: &ChunkKeys,
    name: &ChunkName,
    sealed: &[u8],
    page: usize,
    count: usize,
    max_sealed: usize,
) -> Result<Vec<u8>, ChunkError> {
    let min = NONCE_LEN + plain_header_len(1) + TAG_LEN;
    if sealed.len() < min || sealed.len() > max_sealed {
        return Err(ChunkError::Length {
            len: sealed.len(),
            min,
            max: max_sealed,
        });
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let mut n = [0u8; NONCE_LEN];
    n.copy_from_slice(nonce);
    let mut aad = CHUNK_AAD.to_vec();
    aad.extend_from_slice(&name.0);
    let mut buf = ct.to_vec();
    let plain = keys
        .seal
        .open_in_place(
            aead::Nonce::assume_unique_for_key(n),
            aead::Aad::from(&aad),
            &mut buf,
        )
        .map_err(|_| ChunkError::Authentication)?;
    if keys.nonce(plain) != n {
        return Err(ChunkError::Nonce);
    }
    let raw = decode_plain(plain, page, count)?;
    if keys.name(&raw) != *name {
        return Err(ChunkError::Name);
    }
    Ok(raw)
}

pub(crate) fn decode_plain(plain: &[u8], page: usize, count: usize) -> Result<Vec<u8>, ChunkError> {
    let head = plain_header_len(count);
    if plain.len() < head {
        return Err(ChunkError::Format("shorter than its header"));
    }
    if plain[0] != PLAIN_VERSION {
        return Err(ChunkError::Format("unknown version"));
    }
    if usize::from(u16::from_le_bytes([plain[1], plain[2]])) != count {
        return Err(ChunkError::Format(
            "another number of leaves than its place holds",
        ));
    }
    let bitmap = &plain[3..3 + count.div_ceil(8)];
    // Bits past the last leaf must be clear: one chunk, one encoding.
    if count % 8 != 0 && bitmap.last().is_some_and(|b| b >> (count % 8) != 0) {
        return Err(ChunkError::Format("zero bits past its last leaf"));
    }
    let zero = |i: usize| bitmap[i / 8] & (1 << (i % 8)) != 0;
    let nonzero = (0..count).filter(|&i| !zero(i)).count();
    if nonzero == 0 {
        return Err(ChunkError::Format(
            "all zero (such a chunk is never stored)",
        ));
    }
    let want = nonzero * page;
    let codec = plain[head - 1];
    let body = &plain[head..];
    let body = match codec {
        CODEC_RAW => body.to_vec(),
        CODEC_ZSTD => {
            // Bounded: zstd refuses to write past `want`.
            zstd::bulk::decompress(body, want).map_err(|e| ChunkError::Zstd(e.to_string()))?
        }
        _ => return Err(ChunkError::Format("unknown codec")),
    };
    if body.len() != want {
        return Err(ChunkError::Format("its body is not its non-zero leaves"));
    }
    let mut raw = vec![0u8; count * page];
    let mut leaves = body.chunks_exact(page);
    for i in 0..count {
        if !zero(i) {
            let Some(leaf) = leaves.next() else {
                return Err(ChunkError::Format("its body is not its non-zero leaves"));
            };
            if is_zero(leaf) {
                return Err(ChunkError::Format("a zero leaf not marked zero"));
            }
            raw[i * page..(i + 1) * page].copy_from_slice(leaf);
        }
    }
    Ok(raw)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // Tests: test patterns.
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    fn keys(b: u8) -> ChunkKeys {
        ChunkKeys::new(&DataKey::from_bytes([b; 32]))
    }

    fn raw(leaves: usize, seed: u8) -> Vec<u8> {
        let mut v = vec![0u8; leaves * PAGE];
        for (i, leaf) in v.chunks_exact_mut(PAGE).enumerate() {
            if i % 3 != 0 {
                for (j, b) in leaf.iter_mut().enumerate() {
                    *b = (j as u8) ^ (i as u8) ^ seed;
                }
                leaf[0] = 1;
            }
        }
        v
    }

    #[test]
    fn a_chunk_round_trips_raw_and_compressed() {
        let k = keys(1);
        for level in [0, 3] {
            let r = raw(10, 7);
            let s = seal_chunk(&k, &r, PAGE, 256, level).unwrap().unwrap();
            assert_eq!(s.zero_leaves, 4);
            let back = open_chunk(&k, &s.name, &s.bytes, PAGE, 10, usize::MAX).unwrap();
            assert_eq!(back, r);
        }
    }

    #[test]
    fn equal_chunks_seal_equally_and_an_all_zero_one_is_not_stored() {
        let k = keys(1);
        let a = seal_chunk(&k, &raw(8, 2), PAGE, 256, 3).unwrap();
        let b = seal_chunk(&k, &raw(8, 2), PAGE, 256, 3).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            seal_chunk(&k, &vec![0; 4 * PAGE], PAGE, 256, 3).unwrap(),
            None
        );
        // Another key: another name, so the bucket cannot link them.
        let c = seal_chunk(&keys(2), &raw(8, 2), PAGE, 256, 3)
            .unwrap()
            .unwrap();
        assert_ne!(c.name, a.unwrap().name);
    }

    #[test]
    fn the_same_content_at_another_level_gets_another_nonce() {
        let k = keys(1);
        let mut r = raw(8, 2);
        r.iter_mut().step_by(7).for_each(|b| *b = 0);
        let a = seal_chunk(&k, &r, PAGE, 256, 0).unwrap().unwrap();
        let b = seal_chunk(&k, &r, PAGE, 256, 3).unwrap().unwrap();
        assert_eq!(a.name, b.name);
        assert_ne!(a.bytes[..NONCE_LEN], b.bytes[..NONCE_LEN]);
    }

    #[test]
    fn a_tampered_swapped_or_foreign_chunk_is_refused() {
        let k = keys(1);
        let a = seal_chunk(&k, &raw(8, 2), PAGE, 256, 3).unwrap().unwrap();
        let b = seal_chunk(&k, &raw(8, 3), PAGE, 256, 3).unwrap().unwrap();
        let mut t = a.bytes.clone();
        let last = t.len() - 1;
        t[last / 2] ^= 1;
        assert_eq!(
            open_chunk(&k, &a.name, &t, PAGE, 8, usize::MAX),
            Err(ChunkError::Authentication)
        );
        // b's bytes under a's name.
        assert_eq!(
            open_chunk(&k, &a.name, &b.bytes, PAGE, 8, usize::MAX),
            Err(ChunkError::Authentication)
        );
        assert_eq!(
            open_chunk(&keys(9), &a.name, &a.bytes, PAGE, 8, usize::MAX),
            Err(ChunkError::Authentication)
        );
        // At another place (another leaf count).
        assert!(matches!(
            open_chunk(&k, &a.name, &a.bytes, PAGE, 9, usize::MAX),
            Err(ChunkError::Format(_))
        ));
        assert!(matches!(
            open_chunk(&k, &a.name, &a.bytes[..20], PAGE, 8, usize::MAX),
            Err(ChunkError::Length { .. })
        ));
        assert!(matches!(
            open_chunk(&k, &a.name, &a.bytes, PAGE, 8, 100),
            Err(ChunkError::Length { .. })
        ));
    }

    #[test]
    fn a_key_holder_cannot_make_a_chunk_that_lies_about_its_name() {
        // Someone holding the key seals content under a name it does not
        // have: the reader recomputes the name.
        let k = keys(1);
        let a = seal_chunk(&k, &raw(8, 2), PAGE, 256, 0).unwrap().unwrap();
        let b = seal_chunk(&k, &raw(8, 3), PAGE, 256, 0).unwrap().unwrap();
        let forged = reseal_under(&k, &b, a.name);
        assert_eq!(
            open_chunk(&k, &a.name, &forged, PAGE, 8, usize::MAX),
            Err(ChunkError::Name)
        );
    }

    /// `c`'s plaintext sealed again under `name`, nonce derived properly.
    fn reseal_under(k: &ChunkKeys, c: &SealedChunk, name: ChunkName) -> Vec<u8> {
        let mut aad = CHUNK_AAD.to_vec();
        aad.extend_from_slice(&c.name.0);
        let mut n = [0u8; NONCE_LEN];
        n.copy_from_slice(&c.bytes[..NONCE_LEN]);
        let mut buf = c.bytes[NONCE_LEN..].to_vec();
        let plain = k
            .seal
            .open_in_place(
                aead::Nonce::assume_unique_for_key(n),
                aead::Aad::from(&aad),
                &mut buf,
            )
            .unwrap()
            .to_vec();
        let mut aad = CHUNK_AAD.to_vec();
        aad.extend_from_slice(&name.0);
        let mut p = plain.clone();
        k.seal
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(n),
                aead::Aad::from(&aad),
                &mut p,
            )
            .unwrap();
        let mut out = n.to_vec();
        out.extend_from_slice(&p);
        out
    }

    #[test]
    fn layouts_bound_the_chunk_count() {
        let l = ChunkLayout::for_leaves(1000, PAGE).unwrap();
        assert_eq!((l.chunk_leaves, l.chunks()), (256, 4));
        assert_eq!(l.range(3), 768..1000);
        assert_eq!(l.range(4), 1000..1000);
        // 2 TiB of 4 KiB leaves: 2^29 leaves, chunks grow to 512 leaves.
        let big = ChunkLayout::for_leaves(1 << 29, PAGE).unwrap();
        assert_eq!(big.chunk_leaves, 512);
        assert!(big.chunks() <= MAX_CHUNKS);
        assert_eq!(ChunkLayout::for_leaves(1 << 40, PAGE), None);
    }

    #[test]
    fn shapes_a_chunk_cannot_have_are_refused() {
        let k = keys(1);
        assert!(seal_chunk(&k, &[1; 100], PAGE, 256, 0).is_err());
        assert!(seal_chunk(&k, &[], PAGE, 256, 0).is_err());
        assert!(seal_chunk(&k, &raw(3, 1), PAGE, 2, 0).is_err());
    }
}
