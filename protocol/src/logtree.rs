//! An append-only Merkle log with RFC 9162 (Certificate Transparency 2.0)
//! inclusion and consistency proofs — the tamper-evidence under Convoy's
//! audit logs.
//!
//! The tree shape, the proof generation (RFC 9162 §2.1.3.1 `PATH`,
//! §2.1.4.1 `PROOF`/`SUBPROOF`) and the verification algorithms (§2.1.3.2,
//! §2.1.4.2) follow the RFC step by step. Hashing is [`crate::digest`]'s:
//! interior nodes with [`node_digest`], leaves with [`log_leaf`], a keyed
//! BLAKE3 domain of its own so an audit leaf can never be taken for a page
//! leaf or an interior node.
//!
//! Anyone holding a signed tree head (size, root) can check that a record is
//! in the log ([`verify_inclusion`]) and that a later head extends an earlier
//! one without rewriting history ([`verify_consistency`]), offline.

use std::sync::OnceLock;

use thiserror::Error;

use crate::digest::{node_digest, Digest};

const LOG_LEAF_CONTEXT: &str = "convoy 2026-11 audit log leaf v1";

/// The leaf digest of one log record's bytes.
pub fn log_leaf(record: &[u8]) -> Digest {
    static K: OnceLock<[u8; 32]> = OnceLock::new();
    let key = K.get_or_init(|| blake3::derive_key(LOG_LEAF_CONTEXT, b""));
    Digest(*blake3::keyed_hash(key, record).as_bytes())
}

/// The root of an empty log.
pub fn empty_root() -> Digest {
    Digest(*blake3::hash(b"").as_bytes())
}

/// Why a proof was refused or could not be made.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ProofError {
    /// A leaf index or tree size outside the log.
    #[error("index {index} is outside a tree of {size} leaves")]
    OutOfRange {
        /// Requested index or size.
        index: u64,
        /// Tree size.
        size: u64,
    },
    /// The proof has the wrong number of hashes.
    #[error("proof has the wrong length")]
    Length,
    /// The proof does not lead to the expected root(s).
    #[error("proof does not match the root")]
    Mismatch,
}

/// An append-only list of leaf digests with RFC 9162 proofs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogTree {
    leaves: Vec<Digest>,
}

fn split(n: usize) -> usize {
    // Largest power of two strictly below n (n >= 2).
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

fn mth(d: &[Digest]) -> Digest {
    match d.len() {
        0 => empty_root(),
        1 => d[0],
        n => {
            let k = split(n);
            node_digest(&mth(&d[..k]), &mth(&d[k..]))
        }
    }
}

fn path(m: usize, d: &[Digest], out: &mut Vec<Digest>) {
    let n = d.len();
    if n <= 1 {
        return;
    }
    let k = split(n);
    if m < k {
        path(m, &d[..k], out);
        out.push(mth(&d[k..]));
    } else {
        path(m - k, &d[k..], out);
        out.push(mth(&d[..k]));
    }
}

fn subproof(m: usize, d: &[Digest], b: bool, out: &mut Vec<Digest>) {
    let n = d.len();
    if m == n {
        if !b {
            out.push(mth(d));
        }
        return;
    }
    let k = split(n);
    if m <= k {
        subproof(m, &d[..k], b, out);
        out.push(mth(&d[k..]));
    } else {
        subproof(m - k, &d[k..], false, out);
        out.push(mth(&d[..k]));
    }
}

impl LogTree {
    /// An empty log.
    pub fn new() -> Self {
        LogTree::default()
    }

    /// A log over existing leaves.
    pub fn from_leaves(leaves: Vec<Digest>) -> Self {
        LogTree { leaves }
    }

    /// Appends a leaf; returns its index.
    pub fn push(&mut self, leaf: Digest) -> u64 {
        self.leaves.push(leaf);
        self.leaves.len() as u64 - 1
    }

    /// Number of leaves.
    pub fn len(&self) -> u64 {
        self.leaves.len() as u64
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> bool {
        self.leaves.is_empty()
    }

    /// The leaves.
    pub fn leaves(&self) -> &[Digest] {
        &self.leaves
    }

    /// The root of the first `size` leaves.
    pub fn root_at(&self, size: u64) -> Result<Digest, ProofError> {
        let d = self.prefix(size)?;
        Ok(mth(d))
    }

    /// The root of the whole log.
    pub fn root(&self) -> Digest {
        mth(&self.leaves)
    }

    fn prefix(&self, size: u64) -> Result<&[Digest], ProofError> {
        usize::try_from(size)
            .ok()
            .and_then(|s| self.leaves.get(..s))
            .ok_or(ProofError::OutOfRange {
                index: size,
                size: self.len(),
            })
    }

    /// The inclusion proof of leaf `index` in the tree of the first `size`
    /// leaves (RFC 9162 §2.1.3.1).
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Digest>, ProofError> {
        let d = self.prefix(size)?;
        if index >= size {
            return Err(ProofError::OutOfRange { index, size });
        }
        let mut out = Vec::new();
        path(crate::page::saturating_usize(index), d, &mut out);
        Ok(out)
    }

    /// The consistency proof between the trees of the first `old` and the
    /// first `new` leaves (RFC 9162 §2.1.4.1).
    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Digest>, ProofError> {
        let d = self.prefix(new)?;
        if old > new {
            return Err(ProofError::OutOfRange {
                index: old,
                size: new,
            });
        }
        let mut out = Vec::new();
        if old > 0 && old < new {
            subproof(crate::page::saturating_usize(old), d, true, &mut out);
        }
        Ok(out)
    }
}

/// Verifies that `leaf` is leaf `index` of the tree of `size` leaves whose
/// root is `root` (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    leaf: &Digest,
    index: u64,
    size: u64,
    proof: &[Digest],
    root: &Digest,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::OutOfRange { index, size });
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return Err(ProofError::Length);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_digest(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_digest(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(ProofError::Length);
    }
    if r != *root {
        return Err(ProofError::Mismatch);
    }
    Ok(())
}

/// Verifies that the tree of `new_size` leaves with root `new_root` extends
/// the tree of `old_size` leaves with root `old_root` (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    old_size: u64,
    old_root: &Digest,
    new_size: u64,
    new_root: &Digest,
    proof: &[Digest],
) -> Result<(), ProofError> {
    if old_size > new_size {
        return Err(ProofError::OutOfRange {
            index: old_size,
            size: new_size,
        });
    }
    if old_size == new_size {
        return if proof.is_empty() && old_root == new_root {
            Ok(())
        } else {
            Err(ProofError::Mismatch)
        };
    }
    if old_size == 0 {
        // The empty tree is a prefix of every tree.
        return if proof.is_empty() {
            Ok(())
        } else {
            Err(ProofError::Length)
        };
    }
    let mut path: Vec<Digest> = Vec::with_capacity(proof.len() + 1);
    if old_size.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    let Some((first, rest)) = path.split_first() else {
        return Err(ProofError::Length);
    };
    let (mut fn_, mut sn) = (old_size - 1, new_size - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if sn == 0 {
            return Err(ProofError::Length);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_digest(c, &fr);
            sr = node_digest(c, &sr);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            sr = node_digest(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(ProofError::Length);
    }
    if fr != *old_root || sr != *new_root {
        return Err(ProofError::Mismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    // Test code: test indexes are small.
    #![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    use super::*;

    fn log(n: u64) -> LogTree {
        let mut t = LogTree::new();
        for i in 0..n {
            t.push(log_leaf(&i.to_le_bytes()));
        }
        t
    }

    #[test]
    fn every_inclusion_proof_verifies_and_tampering_fails() {
        let t = log(40);
        for size in 1..=40 {
            let root = t.root_at(size).unwrap();
            for i in 0..size {
                let p = t.inclusion_proof(i, size).unwrap();
                let leaf = t.leaves()[i as usize];
                verify_inclusion(&leaf, i, size, &p, &root).unwrap();
                // Another leaf, another index, or a cut proof must fail.
                let other = log_leaf(b"forged");
                assert!(verify_inclusion(&other, i, size, &p, &root).is_err());
                if size > 1 {
                    assert!(verify_inclusion(&leaf, (i + 1) % size, size, &p, &root).is_err());
                    assert!(verify_inclusion(&leaf, i, size, &p[..p.len() - 1], &root).is_err());
                }
            }
        }
    }

    #[test]
    fn every_consistency_proof_verifies_and_rewrites_fail() {
        let t = log(40);
        for new in 1..=40u64 {
            let new_root = t.root_at(new).unwrap();
            for old in 0..=new {
                let old_root = t.root_at(old).unwrap();
                let p = t.consistency_proof(old, new).unwrap();
                verify_consistency(old, &old_root, new, &new_root, &p).unwrap();
                if old > 0 && old < new {
                    // A rewritten history: same size, different leaf.
                    let mut leaves = t.leaves()[..new as usize].to_vec();
                    leaves[0] = log_leaf(b"rewritten");
                    let forged = LogTree::from_leaves(leaves);
                    let forged_root = forged.root_at(new).unwrap();
                    assert!(verify_consistency(old, &old_root, new, &forged_root, &p).is_err());
                    let fp = forged.consistency_proof(old, new).unwrap();
                    assert!(verify_consistency(old, &old_root, new, &forged_root, &fp).is_err());
                }
            }
        }
    }

    #[test]
    fn bounds_are_errors() {
        let t = log(3);
        assert!(t.inclusion_proof(3, 3).is_err());
        assert!(t.inclusion_proof(0, 4).is_err());
        assert!(t.consistency_proof(4, 3).is_err());
        assert!(verify_inclusion(&log_leaf(b"x"), 5, 3, &[], &t.root()).is_err());
        assert_eq!(LogTree::new().root(), empty_root());
    }
}
