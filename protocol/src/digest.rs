//! Digests of pages and the Merkle root over a memory image.
//!
//! Each page has a 32-byte BLAKE3 leaf digest. The root over the image is a
//! Merkle tree with the shape of RFC 9162 §2.1.1 (the left subtree of a node
//! over `n` leaves holds the largest power of two below `n`), and with the
//! same *domain separation*: a leaf can never be taken for an interior node.
//! RFC 9162 separates them with a 0x00/0x01 prefix byte; a prefix byte would
//! push a 4 KiB page over a BLAKE3 chunk boundary and cost a fifth chunk per
//! page, so Convoy separates them with two different BLAKE3 keys derived from
//! distinct context strings instead (same property, no extra compression).
//!
//! [`MerkleTree`] keeps every level, so that changing a few leaves and asking
//! for the root again only rehashes the paths above the changed leaves: the
//! destination updates leaves as batches arrive and the root at the end of a
//! migration costs one path per page changed in the last round.

use std::fmt;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// A 32-byte BLAKE3 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

const LEAF_CONTEXT: &str = "convoy 2026-11 memory page leaf v1";
const NODE_CONTEXT: &str = "convoy 2026-11 merkle interior node v1";
const STATE_CONTEXT: &str = "convoy 2026-11 device state v1";

fn key(context: &'static str, cell: &'static OnceLock<[u8; 32]>) -> &'static [u8; 32] {
    cell.get_or_init(|| blake3::derive_key(context, b""))
}

fn leaf_key() -> &'static [u8; 32] {
    static K: OnceLock<[u8; 32]> = OnceLock::new();
    key(LEAF_CONTEXT, &K)
}

fn node_key() -> &'static [u8; 32] {
    static K: OnceLock<[u8; 32]> = OnceLock::new();
    key(NODE_CONTEXT, &K)
}

/// The leaf digest of one page's contents.
pub fn leaf_digest(page: &[u8]) -> Digest {
    Digest(*blake3::keyed_hash(leaf_key(), page).as_bytes())
}

/// The digest of an interior node over two children.
pub fn node_digest(left: &Digest, right: &Digest) -> Digest {
    let mut h = blake3::Hasher::new_keyed(node_key());
    h.update(&left.0);
    h.update(&right.0);
    Digest(*h.finalize().as_bytes())
}

/// The digest of a device-state blob.
pub fn device_state_digest(state: &[u8]) -> Digest {
    Digest(
        blake3::Hasher::new_derive_key(STATE_CONTEXT)
            .update(state)
            .finalize()
            .into(),
    )
}

/// The leaf digest of an all-zero page of `page_size` bytes, computed once.
pub fn zero_leaf(page_size: usize) -> Digest {
    static Z4K: OnceLock<Digest> = OnceLock::new();
    if page_size == 4096 {
        *Z4K.get_or_init(|| leaf_digest(&[0u8; 4096]))
    } else {
        leaf_digest(&vec![0u8; page_size])
    }
}

/// Changed leaves after which [`MerkleTree::fold_if_due`] rehashes.
pub const FOLD_EVERY: usize = 1 << 14;

/// An incrementally updatable Merkle tree over a fixed number of leaves.
#[derive(Clone)]
pub struct MerkleTree {
    /// `levels[0]` are the leaves, the last level holds the root alone.
    levels: Vec<Vec<Digest>>,
    /// Leaves changed since the last [`MerkleTree::root`]: one bit a leaf.
    dirty: Vec<u64>,
    any_dirty: bool,
    /// How many leaves are marked in `dirty`.
    pending: usize,
}

impl fmt::Debug for MerkleTree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MerkleTree")
            .field("leaves", &self.len())
            .field("dirty", &self.any_dirty)
            .finish()
    }
}

impl MerkleTree {
    /// A tree of `n` leaves (at least one), every one set to `fill`.
    pub fn filled(n: usize, fill: Digest) -> Self {
        let n = n.max(1);
        let mut levels = vec![vec![fill; n]];
        let mut width = n;
        while width > 1 {
            width = width.div_ceil(2);
            levels.push(vec![Digest([0; 32]); width]);
        }
        let mut t = MerkleTree {
            levels,
            dirty: vec![u64::MAX; n.div_ceil(64)],
            any_dirty: true,
            pending: n,
        };
        t.rebuild_all();
        t
    }

    /// Number of leaves.
    pub fn len(&self) -> usize {
        self.levels[0].len()
    }

    /// Always false: a tree has at least one leaf.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Leaves changed since the last rehash: what the next
    /// [`MerkleTree::root`] has to fold in.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// The leaf at `i`.
    pub fn leaf(&self, i: usize) -> Option<Digest> {
        self.levels[0].get(i).copied()
    }

    /// Sets leaf `i`. Out-of-range indexes are the caller's bug and are
    /// reported as `false` rather than panicking.
    pub fn set_leaf(&mut self, i: usize, d: Digest) -> bool {
        let Some(slot) = self.levels[0].get_mut(i) else {
            return false;
        };
        if *slot != d {
            *slot = d;
            let bit = 1 << (i % 64);
            if self.dirty[i / 64] & bit == 0 {
                self.dirty[i / 64] |= bit;
                self.pending += 1;
            }
            self.any_dirty = true;
        }
        true
    }

    /// Rehashes the paths above changed leaves once [`FOLD_EVERY`] of them
    /// are pending, so that the cost of a root is spread over the
    /// transfer instead of falling, whole, on the call at its end — which
    /// in a migration is inside the downtime (a 5 GiB leaf space rebuilt
    /// at once cost about 200 ms on each side).
    pub fn fold_if_due(&mut self) {
        if self.pending >= FOLD_EVERY {
            self.root();
        }
    }

    fn rebuild_all(&mut self) {
        for lvl in 1..self.levels.len() {
            let (lower, upper) = self.levels.split_at_mut(lvl);
            let below = &lower[lvl - 1];
            for (j, slot) in upper[0].iter_mut().enumerate() {
                *slot = combine(below, j);
            }
        }
        self.dirty.iter_mut().for_each(|w| *w = 0);
        self.any_dirty = false;
        self.pending = 0;
    }

    /// The root, rehashing only the paths above leaves changed since the
    /// previous call.
    pub fn root(&mut self) -> Digest {
        if self.any_dirty {
            let changed: usize = self.dirty.iter().map(|w| w.count_ones() as usize).sum();
            if changed * 4 > self.len() {
                self.rebuild_all();
            } else {
                let mut idx: Vec<usize> = Vec::with_capacity(changed);
                for (w, word) in self.dirty.iter_mut().enumerate() {
                    let mut bits = std::mem::take(word);
                    while bits != 0 {
                        idx.push(w * 64 + bits.trailing_zeros() as usize);
                        bits &= bits - 1;
                    }
                }
                for lvl in 1..self.levels.len() {
                    for i in idx.iter_mut() {
                        *i /= 2;
                    }
                    idx.dedup();
                    let (lower, upper) = self.levels.split_at_mut(lvl);
                    for &j in &idx {
                        upper[0][j] = combine(&lower[lvl - 1], j);
                    }
                }
                self.any_dirty = false;
                self.pending = 0;
            }
        }
        self.levels[self.levels.len() - 1][0]
    }
}

/// Node `j` of the level above `below`: the hash of its two children, or the
/// lone left child promoted unchanged (which yields RFC 9162's shape).
fn combine(below: &[Digest], j: usize) -> Digest {
    match (below.get(2 * j), below.get(2 * j + 1)) {
        (Some(l), Some(r)) => node_digest(l, r),
        (Some(l), None) => *l,
        // Unreachable by construction: every level is ceil(below/2) wide.
        (None, _) => Digest([0; 32]),
    }
}

/// The RFC 9162 Merkle tree hash computed recursively from the definition;
/// the reference [`MerkleTree`] is tested against.
pub fn reference_root(leaves: &[Digest]) -> Digest {
    match leaves.len() {
        0 => Digest(*blake3::hash(b"").as_bytes()),
        1 => leaves[0],
        n => {
            let mut k = 1;
            while k * 2 < n {
                k *= 2;
            }
            node_digest(&reference_root(&leaves[..k]), &reference_root(&leaves[k..]))
        }
    }
}

#[cfg(test)]
mod tests {
    // Test code: test vectors: small indexes made into bytes.
    #![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    use super::*;

    fn leaves(n: usize, salt: u8) -> Vec<Digest> {
        (0..n)
            .map(|i| leaf_digest(&[(i % 251) as u8, salt, (i / 251) as u8]))
            .collect()
    }

    #[test]
    fn folding_on_the_way_gives_the_same_root_and_leaves_little_for_the_end() {
        let n = 3 * FOLD_EVERY + 5;
        let l = leaves(n, 3);
        let mut t = MerkleTree::filled(n, zero_leaf(4096));
        // Scattered, as dirty pages are: a stride coprime with n.
        for k in 0..n {
            let i = (k * 7919) % n;
            assert!(t.set_leaf(i, l[i]));
            t.fold_if_due();
            assert!(t.pending < FOLD_EVERY);
        }
        assert_eq!(t.root(), reference_root(&l));
        // Setting a leaf twice before a fold counts it once.
        let mut t = MerkleTree::filled(4, zero_leaf(4096));
        t.set_leaf(1, l[1]);
        t.set_leaf(1, l[2]);
        assert_eq!(t.pending, 1);
        t.root();
        assert_eq!(t.pending, 0);
    }

    #[test]
    fn matches_rfc9162_shape_for_all_small_sizes() {
        for n in 1..70 {
            let l = leaves(n, 1);
            let mut t = MerkleTree::filled(n, zero_leaf(4096));
            for (i, d) in l.iter().enumerate() {
                assert!(t.set_leaf(i, *d));
            }
            assert_eq!(t.root(), reference_root(&l), "n = {n}");
        }
    }

    #[test]
    fn incremental_update_equals_full_rebuild() {
        let n = 1000;
        let mut l = leaves(n, 2);
        let mut t = MerkleTree::filled(n, zero_leaf(4096));
        for (i, d) in l.iter().enumerate() {
            t.set_leaf(i, *d);
        }
        let _ = t.root();
        for i in [0usize, 1, 511, 512, 999] {
            l[i] = leaf_digest(&[9, 9, i as u8]);
            t.set_leaf(i, l[i]);
        }
        assert_eq!(t.root(), reference_root(&l));
    }

    #[test]
    fn leaf_and_node_domains_differ() {
        let a = leaf_digest(b"a");
        let b = leaf_digest(b"b");
        let mut concat = Vec::new();
        concat.extend_from_slice(&a.0);
        concat.extend_from_slice(&b.0);
        assert_ne!(node_digest(&a, &b), leaf_digest(&concat));
    }

    #[test]
    fn out_of_range_leaf_is_refused() {
        let mut t = MerkleTree::filled(3, zero_leaf(4096));
        assert!(!t.set_leaf(3, zero_leaf(4096)));
    }
}
