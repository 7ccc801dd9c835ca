//! A paused VM into the bucket.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use convoy_protocol::digest::{device_state_digest, Digest};
use convoy_protocol::names::{SpiffeId, VmName};
use convoy_protocol::page::PageIndex;
use convoy_protocol::signed::{ChainVerifier, Signed, Signer};
use convoy_protocol::snapshot::key::SealingKeyStatement;
use convoy_protocol::snapshot::manifest::{seal_state, FORMAT};
use convoy_protocol::snapshot::seal::Sealed;
use convoy_protocol::snapshot::{
    chunk_object, manifest_object, Capture, ChunkLayout, DataKey, LineageId, Sealer, SnapshotId,
    SnapshotManifest,
};
use futures_util::StreamExt;

use super::sealing::{wrap, SealingKeys};
use super::{blocking, newest_for, SnapshotError, SnapshotStore};
use crate::backend::VmBackend;

/// Chunks sealed or moved at once (pulls and copies move as many).
pub const PARALLEL: usize = 8;

/// The zstd level an agent pushes at (`convoyctl bench --snapshot`
/// measures at the same).
pub const DEFAULT_LEVEL: i32 = 3;

/// What to push.
pub struct PushRequest {
    /// The VM's name.
    pub name: VmName,
    /// Its attributes.
    pub attributes: convoy_protocol::vm::VmAttributes,
    /// The VM, paused (its memory, disks and device state must not change
    /// while they are read).
    pub vm: Arc<dyn VmBackend>,
    /// This agent.
    pub me: SpiffeId,
    /// This agent's identity, which signs the manifest.
    pub signer: Arc<dyn Signer + Send + Sync>,
    /// This agent's sealing keys (it is always a recipient, so it can push
    /// the next generation).
    pub keys: Arc<SealingKeys>,
    /// The other recipients' checked sealing keys.
    pub recipients: Vec<SealingKeyStatement>,
    /// zstd level, 0 for none.
    pub level: i32,
    /// Seconds since the Unix epoch.
    pub now_unix: u64,
    /// The operator's ticket, for a store-and-forward migration.
    pub ticket: Option<convoy_protocol::ticket::SignedTicket>,
}

impl std::fmt::Debug for PushRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushRequest")
            .field("name", &self.name)
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct PushReport {
    /// The snapshot.
    pub snapshot: SnapshotId,
    /// Its generation in the lineage.
    pub generation: u64,
    /// The manifest object.
    pub object: String,
    /// The manifest's digest.
    pub digest: Digest,
    /// Chunks in all, and how many hold something.
    pub chunks: u64,
    /// Chunks that hold something.
    pub stored: u64,
    /// Stored chunks uploaded by this push.
    pub uploaded: u64,
    /// Their bytes.
    pub uploaded_bytes: u64,
    /// Bytes of memory and disks the snapshot stands for.
    pub vm_bytes: u64,
    /// Reading, sealing and uploading the chunks.
    pub chunks_took: Duration,
    /// The whole push.
    pub took: Duration,
    /// The manifest made.
    pub manifest: Box<SnapshotManifest>,
    /// Its layout.
    pub layout: ChunkLayout,
}

/// Pushes `req.vm` to `store`: the next generation of the newest snapshot
/// of the VM there that this agent can open (same lineage and data key,
/// so unchanged chunks are not uploaded again), or a new lineage.
pub async fn push(
    store: &SnapshotStore,
    verifier: &(dyn ChainVerifier + Sync),
    req: PushRequest,
) -> Result<PushReport, SnapshotError> {
    let started = Instant::now();
    let previous = newest_for(store, verifier, &req.me, Some(&req.name)).await?;
    let (lineage, key, generation, prev_digest) = match &previous {
        Some(f) => {
            let key = req
                .keys
                .unwrap(&req.me, &f.manifest.snapshot, &f.manifest.recipients)?;
            (
                f.manifest.lineage,
                key,
                f.manifest.generation.saturating_add(1),
                Some(f.digest),
            )
        }
        None => (
            LineageId(random16()?),
            DataKey::from_bytes(random32()?),
            1,
            None,
        ),
    };
    let memory = req.vm.geometry();
    let disks = req.vm.disks();
    let leaves = convoy_protocol::disk::check(memory, &disks)
        .map_err(|e| SnapshotError::Geometry(e.to_string()))?;
    let page = memory.page_size().bytes();
    let layout = ChunkLayout::for_leaves(leaves, page).ok_or(SnapshotError::Layout(leaves))?;
    let snapshot = SnapshotId(random16()?);

    let t = Instant::now();
    let (chunks, root, uploaded, uploaded_bytes) =
        push_chunks(store, &req.vm, &key, layout, req.level).await?;
    let chunks_took = t.elapsed();

    let state = req.vm.device_state()?;
    let mut recipients = vec![wrap(
        &key,
        &SealingKeyStatement {
            agent: req.me.clone(),
            public: req.keys.public(),
            issued_at: req.now_unix,
        },
        &snapshot,
    )?];
    for r in &req.recipients {
        if r.agent != req.me {
            recipients.push(wrap(&key, r, &snapshot)?);
        }
    }
    let stored = chunks
        .iter()
        .filter(|c| matches!(c, convoy_protocol::snapshot::ChunkRef::Stored { .. }))
        .count() as u64;
    let manifest = SnapshotManifest {
        format: FORMAT,
        snapshot,
        lineage,
        generation,
        previous: prev_digest,
        source: req.me.clone(),
        created_at: req.now_unix,
        vm: req.name.clone(),
        attributes: req.attributes.clone(),
        memory,
        disks,
        chunk_leaves: layout.chunk_leaves,
        chunks,
        root,
        device_digest: device_state_digest(&state),
        device_state: seal_state(&key, &snapshot, &state),
        recipients,
        ticket: req.ticket.clone(),
    };
    manifest
        .validate()
        .map_err(|source| SnapshotError::Manifest {
            object: "(the manifest being made)".into(),
            source: Box::new(source),
        })?;
    let signed = Signed::sign(&manifest, &*req.signer)
        .map_err(|e| SnapshotError::from(super::SealingError::Sign(Box::new(e))))?;
    let bytes = postcard::to_stdvec(&signed).map_err(|source| SnapshotError::Decode {
        object: "(the manifest being made)".into(),
        source,
    })?;
    let object = manifest_object(generation, &snapshot);
    let manifest = Box::new(manifest);
    if !store.put_new(&object, Bytes::from(bytes)).await? {
        return Err(SnapshotError::Raced { object, generation });
    }
    Ok(PushReport {
        snapshot,
        generation,
        digest: convoy_protocol::snapshot::manifest_digest(&signed),
        object,
        chunks: layout.chunks(),
        stored,
        uploaded,
        uploaded_bytes,
        vm_bytes: leaves.saturating_mul(page as u64),
        chunks_took,
        took: started.elapsed(),
        manifest,
        layout,
    })
}

/// Reads, seals and uploads every chunk ([`PARALLEL`] at a time); the
/// chunk list, the root, and what was uploaded (chunks, bytes).
async fn push_chunks(
    store: &SnapshotStore,
    vm: &Arc<dyn VmBackend>,
    key: &DataKey,
    layout: ChunkLayout,
    level: i32,
) -> Result<(Vec<convoy_protocol::snapshot::ChunkRef>, Digest, u64, u64), SnapshotError> {
    // What the bucket says it holds: a chunk it lies about is missing at
    // pull time, and the pull says which.
    let existing: Arc<HashSet<String>> =
        Arc::new(store.list("chunks").await?.into_iter().collect());
    let sealer = Arc::new(Sealer::new(key, layout, level));
    let mut capture = Capture::new(layout);
    let (mut uploaded, mut uploaded_bytes) = (0u64, 0u64);
    let mut results = futures_util::stream::iter(0..layout.chunks())
        .map(|i| {
            let (vm, sealer, existing, store) =
                (vm.clone(), sealer.clone(), existing.clone(), store.clone());
            async move {
                let sealed = blocking(move || read_and_seal(&*vm, &sealer, layout, i)).await??;
                let mut sent = 0u64;
                if let Some(c) = &sealed.chunk {
                    let object = chunk_object(&c.name);
                    if !existing.contains(&object)
                        && store.put_new(&object, Bytes::from(c.bytes.clone())).await?
                    {
                        sent = c.bytes.len() as u64;
                    }
                }
                Ok::<_, SnapshotError>((sealed, sent))
            }
        })
        .buffer_unordered(PARALLEL);
    while let Some(r) = results.next().await {
        let (sealed, sent) = r?;
        if sent > 0 {
            uploaded += 1;
            uploaded_bytes += sent;
        }
        capture.record(&sealed);
    }
    let (chunks, root) = capture
        .finish()
        .map_err(|i| SnapshotError::Task(format!("chunk {i} was never sealed")))?;
    Ok((chunks, root, uploaded, uploaded_bytes))
}

fn read_and_seal(
    vm: &dyn VmBackend,
    sealer: &Sealer,
    layout: ChunkLayout,
    index: u64,
) -> Result<Sealed, SnapshotError> {
    let r = layout.range(index);
    let page = layout.page;
    let mut raw = vec![0u8; convoy_protocol::page::saturating_usize(r.end - r.start) * page];
    for (leaf, buf) in r.zip(raw.chunks_exact_mut(page)) {
        vm.read_leaf(PageIndex(leaf), buf)?;
    }
    sealer
        .seal(index, &raw)
        .map_err(|source| SnapshotError::Seal { index, source })
}

fn random32() -> Result<[u8; 32], SnapshotError> {
    let mut b = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).map_err(|_| {
        SnapshotError::from(super::SealingError::from(crate::transport::NoRandomness))
    })?;
    Ok(b)
}

fn random16() -> Result<[u8; 16], SnapshotError> {
    let b = random32()?;
    let mut r = [0u8; 16];
    r.copy_from_slice(&b[..16]);
    Ok(r)
}
