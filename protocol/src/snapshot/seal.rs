//! Making a snapshot's content: chunks sealed on any thread ([`Sealer`]),
//! recorded in leaf order with the root the manifest will name
//! ([`Capture`]).

use super::chunk::{seal_chunk, ChunkKeys, ChunkLayout, SealError, SealedChunk};
use super::key::DataKey;
use super::manifest::ChunkRef;
use crate::digest::{leaf_digest, zero_leaf, Digest, MerkleTree};
use crate::page::saturating_usize;

/// Seals chunks of one layout under one data key (any thread).
#[derive(Debug)]
pub struct Sealer {
    keys: ChunkKeys,
    layout: ChunkLayout,
    level: i32,
}

/// One chunk, sealed, with its leaves' digests.
#[derive(Debug)]
pub struct Sealed {
    /// Its place.
    pub index: u64,
    /// The object, or `None` for an all-zero chunk.
    pub chunk: Option<SealedChunk>,
    /// Its leaves' digests.
    pub leaves: Vec<Digest>,
}

impl Sealer {
    /// A sealer compressing at zstd `level` (0: none).
    pub fn new(key: &DataKey, layout: ChunkLayout, level: i32) -> Sealer {
        Sealer {
            keys: ChunkKeys::new(key),
            layout,
            level,
        }
    }

    /// Seals chunk `index` of raw bytes `raw` (its leaves, whole).
    pub fn seal(&self, index: u64, raw: &[u8]) -> Result<Sealed, SealError> {
        let r = self.layout.range(index);
        let want = saturating_usize(r.end - r.start).saturating_mul(self.layout.page);
        if r.is_empty() || raw.len() != want {
            return Err(SealError::Shape {
                len: raw.len(),
                page: self.layout.page,
                max: self.layout.chunk_leaves,
            });
        }
        let chunk = seal_chunk(
            &self.keys,
            raw,
            self.layout.page,
            self.layout.chunk_leaves,
            self.level,
        )?;
        let leaves = raw
            .chunks_exact(self.layout.page)
            .map(leaf_digest)
            .collect();
        Ok(Sealed {
            index,
            chunk,
            leaves,
        })
    }
}

/// The manifest's chunk list and root, as sealed chunks are recorded.
#[derive(Debug)]
pub struct Capture {
    layout: ChunkLayout,
    tree: MerkleTree,
    chunks: Vec<Option<ChunkRef>>,
}

impl Capture {
    /// Nothing recorded yet.
    pub fn new(layout: ChunkLayout) -> Capture {
        Capture {
            layout,
            tree: MerkleTree::filled(saturating_usize(layout.leaves), zero_leaf(layout.page)),
            chunks: vec![None; saturating_usize(layout.chunks())],
        }
    }

    /// Records a sealed chunk (again: the later one wins, as when a live
    /// push sends a dirtied chunk anew).
    pub fn record(&mut self, s: &Sealed) {
        let chunk = match &s.chunk {
            Some(c) => ChunkRef::Stored {
                name: c.name,
                len: u32::try_from(c.bytes.len()).unwrap_or(u32::MAX),
            },
            None => ChunkRef::Zero,
        };
        self.record_ref(s.index, chunk, &s.leaves);
    }

    /// Records chunk `index` as `chunk` with its leaves' digests (what
    /// [`Capture::record`] keeps of a sealed chunk, for a caller that let
    /// go of its bytes).
    pub fn record_ref(&mut self, index: u64, chunk: ChunkRef, leaves: &[Digest]) {
        let start = saturating_usize(self.layout.range(index).start);
        for (i, d) in leaves.iter().enumerate() {
            self.tree.set_leaf(start.saturating_add(i), *d);
        }
        self.tree.fold_if_due();
        if let Some(slot) = self.chunks.get_mut(saturating_usize(index)) {
            *slot = Some(chunk);
        }
    }

    /// The chunk list and root, or the first chunk never recorded.
    pub fn finish(mut self) -> Result<(Vec<ChunkRef>, Digest), u64> {
        let mut chunks = Vec::with_capacity(self.chunks.len());
        for (i, c) in self.chunks.into_iter().enumerate() {
            chunks.push(c.ok_or(i as u64)?);
        }
        Ok((chunks, self.tree.root()))
    }
}
