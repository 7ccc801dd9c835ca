//! Checking a snapshot on its way out of the bucket: each chunk against
//! its name and place ([`Opener`], shareable between threads), then every
//! leaf against the manifest's root ([`Restore`]) before the VM may start.

use std::ops::Range;

use thiserror::Error;

use super::chunk::{open_chunk, ChunkError, ChunkKeys, ChunkLayout, ChunkName};
use super::key::DataKey;
use super::manifest::{ChunkRef, SnapshotManifest};
use crate::digest::{leaf_digest, zero_leaf, Digest, MerkleTree};
use crate::page::saturating_usize;

/// Why a snapshot's content was refused; each says where.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// A chunk failed its checks.
    #[error("chunk {index} (leaves {}..{}, chunks/{name}): {error}", leaves.start, leaves.end)]
    Chunk {
        /// Its place.
        index: u64,
        /// Its leaves.
        leaves: Range<u64>,
        /// Its name.
        name: ChunkName,
        /// What was wrong.
        #[source]
        error: ChunkError,
    },
    /// No such chunk is stored (past the end, or a zero chunk).
    #[error("chunk {0} is not a stored chunk of this snapshot")]
    NotStored(u64),
    /// Stored chunks never arrived.
    #[error("{missing} stored chunks never arrived, the first chunk {first} (chunks/{name})")]
    Missing {
        /// How many.
        missing: u64,
        /// The first.
        first: u64,
        /// Its name.
        name: ChunkName,
    },
    /// Every chunk checked, and still not the manifest's root: the manifest
    /// lists chunks that are not the VM it names.
    #[error("the chunks make root {got}, the manifest names {expected}")]
    Root {
        /// The manifest's.
        expected: Digest,
        /// What the chunks make.
        got: Digest,
    },
}

/// Opens chunks of one snapshot (any thread, any order).
#[derive(Debug)]
pub struct Opener {
    keys: ChunkKeys,
    layout: ChunkLayout,
    chunks: Vec<ChunkRef>,
}

/// A chunk that passed its checks.
#[derive(Debug)]
pub struct OpenedChunk {
    /// Its place.
    pub index: u64,
    /// Its leaves' raw bytes.
    pub raw: Vec<u8>,
    /// Their digests.
    pub leaves: Vec<Digest>,
}

impl Opener {
    /// The opener of `m`'s chunks (its layout from [`SnapshotManifest::validate`]).
    pub fn new(m: &SnapshotManifest, layout: ChunkLayout, key: &DataKey) -> Opener {
        Opener {
            keys: ChunkKeys::new(key),
            layout,
            chunks: m.chunks.clone(),
        }
    }

    /// The layout.
    pub fn layout(&self) -> ChunkLayout {
        self.layout
    }

    /// The stored chunks: place, name and sealed length.
    pub fn stored(&self) -> impl Iterator<Item = (u64, ChunkName, u32)> + '_ {
        self.chunks.iter().enumerate().filter_map(|(i, c)| match c {
            ChunkRef::Stored { name, len } => Some((i as u64, *name, *len)),
            ChunkRef::Zero => None,
        })
    }

    /// Checks the sealed bytes of chunk `index`: its recorded length, its
    /// authentication under its name, its nonce, its shape and its content
    /// against its name.
    pub fn open(&self, index: u64, sealed: &[u8]) -> Result<OpenedChunk, RestoreError> {
        let Some(ChunkRef::Stored { name, len }) = self.chunks.get(saturating_usize(index)) else {
            return Err(RestoreError::NotStored(index));
        };
        let leaves = self.layout.range(index);
        let fail = |error| RestoreError::Chunk {
            index,
            leaves: leaves.clone(),
            name: *name,
            error,
        };
        if sealed.len() != *len as usize {
            return Err(fail(ChunkError::NotRecordedLength {
                len: sealed.len(),
                expected: *len as usize,
            }));
        }
        let count = saturating_usize(leaves.end - leaves.start);
        let raw = open_chunk(
            &self.keys,
            name,
            sealed,
            self.layout.page,
            count,
            self.layout.max_sealed(),
        )
        .map_err(fail)?;
        let leaves = raw
            .chunks_exact(self.layout.page)
            .map(leaf_digest)
            .collect();
        Ok(OpenedChunk { index, raw, leaves })
    }
}

/// The leaves of a snapshot as its chunks arrive, and the root check.
#[derive(Debug)]
pub struct Restore {
    layout: ChunkLayout,
    tree: MerkleTree,
    pending: Vec<Option<ChunkName>>,
    left: u64,
    root: Digest,
}

impl Restore {
    /// Nothing yet: every leaf zero, every stored chunk owed.
    pub fn new(m: &SnapshotManifest, layout: ChunkLayout) -> Restore {
        let pending: Vec<_> = m
            .chunks
            .iter()
            .map(|c| match c {
                ChunkRef::Stored { name, .. } => Some(*name),
                ChunkRef::Zero => None,
            })
            .collect();
        let left = pending.iter().filter(|p| p.is_some()).count() as u64;
        Restore {
            layout,
            tree: MerkleTree::filled(saturating_usize(layout.leaves), zero_leaf(layout.page)),
            pending,
            left,
            root: m.root,
        }
    }

    /// Records a chunk the opener passed (twice is harmless).
    pub fn record(&mut self, c: &OpenedChunk) {
        let start = self.layout.range(c.index).start;
        for (i, d) in c.leaves.iter().enumerate() {
            self.tree
                .set_leaf(saturating_usize(start).saturating_add(i), *d);
        }
        self.tree.fold_if_due();
        if let Some(slot) = self.pending.get_mut(saturating_usize(c.index)) {
            if slot.take().is_some() {
                self.left -= 1;
            }
        }
    }

    /// Stored chunks not yet recorded.
    pub fn left(&self) -> u64 {
        self.left
    }

    /// Every stored chunk recorded, and the root the manifest names.
    pub fn finish(mut self) -> Result<Digest, RestoreError> {
        if let Some((first, name)) = self
            .pending
            .iter()
            .enumerate()
            .find_map(|(i, p)| p.map(|n| (i as u64, n)))
        {
            return Err(RestoreError::Missing {
                missing: self.left,
                first,
                name,
            });
        }
        let got = self.tree.root();
        if got != self.root {
            return Err(RestoreError::Root {
                expected: self.root,
                got,
            });
        }
        Ok(got)
    }
}
