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
use convoy_protocol::snapshot::ChunkRef;
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
    /// The snapshot's id, chosen before the push (a store-and-forward
    /// source records it first); a new random one when `None`.
    pub snapshot: Option<SnapshotId>,
    /// Live: `vm` is running; rounds of chunks go up while it runs (the
    /// ones it rewrites again), then the push pauses it and seals only
    /// the chunks written since. Not live: `vm` is paused already.
    pub live: bool,
    /// What `vm` is: a sim VM, or a saved QEMU VM
    /// ([`super::qemu::CapturedQemu`]).
    pub backend: convoy_protocol::snapshot::SnapshotBackend,
    /// Where a first push records its lineage and key before uploading
    /// ([`super::started`]), so that, cut short and run again, it resumes;
    /// `None`: a first push cut short starts over.
    pub journal: Option<Arc<super::seen::SeenLineages>>,
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
    /// Live: copy rounds while the VM ran (0 when not live).
    pub rounds: u32,
    /// Live: how long the VM was paused by the push (its downtime), and
    /// the chunks sealed again in that time.
    pub paused: Option<(Duration, u64)>,
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
        None => first_lineage(store, &req)?,
    };
    let memory = req.vm.geometry();
    let disks = req.vm.disks();
    let leaves = convoy_protocol::disk::check(memory, &disks)
        .map_err(|e| SnapshotError::Geometry(e.to_string()))?;
    let page = memory.page_size().bytes();
    let layout = ChunkLayout::for_leaves(leaves, page).ok_or(SnapshotError::Layout(leaves))?;
    let snapshot = match req.snapshot {
        Some(s) => s,
        None => new_snapshot_id()?,
    };

    let t = Instant::now();
    let sealer = Arc::new(Sealer::new(&key, layout, req.level));
    // What the bucket says it holds: a chunk it lies about is missing at
    // pull time, and the pull says which.
    let mut existing: HashSet<String> = store.list("chunks").await?.into_iter().collect();
    let mut sealed: Vec<Option<Kept>> = vec![None; usize_of(layout.chunks())];
    let mut up = (0u64, 0u64);
    let mut rounds = 0u32;
    let mut paused = None;
    if req.live {
        req.vm.start_dirty_log();
    }
    let all: Vec<u64> = (0..layout.chunks()).collect();
    let first = seal_chunks(
        store,
        &req.vm,
        &sealer,
        layout,
        all,
        &mut existing,
        &mut sealed,
    )
    .await;
    let first = first.inspect_err(|_| stop_log(&req))?;
    add(&mut up, first);
    if req.live {
        rounds = 1;
        // Rounds while the guest runs, until what it rewrites is small
        // (or stops shrinking, or the rounds run out).
        let mut last = u64::MAX;
        loop {
            let dirty = dirty_chunks(&*req.vm, layout);
            let n = dirty.len() as u64;
            if n <= LIVE_DONE_CHUNKS || n >= last || rounds >= LIVE_MAX_ROUNDS {
                // Sealed again while paused, below.
                let paused_at = Instant::now();
                req.vm.pause().inspect_err(|_| stop_log(&req))?;
                let mut last_dirty = dirty;
                last_dirty.extend(dirty_chunks(&*req.vm, layout));
                last_dirty.sort_unstable();
                last_dirty.dedup();
                stop_log(&req);
                let k = last_dirty.len() as u64;
                let r = seal_chunks(
                    store,
                    &req.vm,
                    &sealer,
                    layout,
                    last_dirty,
                    &mut existing,
                    &mut sealed,
                )
                .await?;
                add(&mut up, r);
                paused = Some((paused_at, k));
                break;
            }
            last = n;
            rounds += 1;
            let r = seal_chunks(
                store,
                &req.vm,
                &sealer,
                layout,
                dirty,
                &mut existing,
                &mut sealed,
            )
            .await
            .inspect_err(|_| stop_log(&req))?;
            add(&mut up, r);
        }
    }
    let (uploaded, uploaded_bytes) = up;
    let mut capture = Capture::new(layout);
    for (i, k) in (0..).zip(&sealed) {
        if let Some((chunk, leaves)) = k {
            capture.record_ref(i, *chunk, leaves);
        }
    }
    let (chunks, root) = capture
        .finish()
        .map_err(|i| SnapshotError::Task(format!("chunk {i} was never sealed")))?;
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
        backend: req.backend,
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
    if let (1, Some(j)) = (generation, &req.journal) {
        // Left behind, the record only makes the next first push of this
        // VM here take the same lineage again.
        if let Err(e) = j.finish_push(store.url(), &req.name) {
            tracing::warn!(vm = %req.name, "the record of a first push stays: {e}");
        }
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
        rounds,
        paused: paused.map(|(at, k)| (at.elapsed(), k)),
        manifest,
        layout,
    })
}

/// The lineage and key of a VM's first push to `store`: those of a first
/// push cut short (recorded in `req.journal`), else new ones, recorded
/// there before anything is uploaded. Generation 1, no previous manifest.
fn first_lineage(
    store: &SnapshotStore,
    req: &PushRequest,
) -> Result<(LineageId, DataKey, u64, Option<Digest>), SnapshotError> {
    let journal_err = |e: redb::Error| SnapshotError::Journal(e.to_string());
    let Some(j) = &req.journal else {
        return Ok((
            LineageId(random16()?),
            DataKey::from_bytes(random32()?),
            1,
            None,
        ));
    };
    if let Some(s) = j
        .started_push(store.url(), &req.name)
        .map_err(journal_err)?
    {
        let key = req
            .keys
            .unwrap(&req.me, &s.wrapped_for, std::slice::from_ref(&s.key))?;
        return Ok((s.lineage, key, 1, None));
    }
    let (lineage, key) = (LineageId(random16()?), DataKey::from_bytes(random32()?));
    let wrapped_for = new_snapshot_id()?;
    let me = SealingKeyStatement {
        agent: req.me.clone(),
        public: req.keys.public(),
        issued_at: req.now_unix,
    };
    let started = super::started::StartedPush {
        lineage,
        wrapped_for,
        key: wrap(&key, &me, &wrapped_for)?,
    };
    j.start_push(store.url(), &req.name, &started)
        .map_err(journal_err)?;
    Ok((lineage, key, 1, None))
}

/// Rounds of a live push at most, the first included.
const LIVE_MAX_ROUNDS: u32 = 8;
/// A live push pauses the VM once this few chunks (or fewer) were
/// written in the last round.
const LIVE_DONE_CHUNKS: u64 = 4;

/// What is kept of a sealed chunk once it is uploaded: its entry in the
/// chunk list and its leaves' digests (not its bytes).
type Kept = (ChunkRef, Vec<Digest>);

fn usize_of(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

fn add(total: &mut (u64, u64), r: (u64, u64)) {
    total.0 += r.0;
    total.1 += r.1;
}

fn stop_log(req: &PushRequest) {
    if req.live {
        req.vm.stop_dirty_log();
    }
}

/// The chunks holding a leaf written since the last call, in order.
fn dirty_chunks(vm: &dyn VmBackend, layout: ChunkLayout) -> Vec<u64> {
    let per = u64::from(layout.chunk_leaves);
    let mut out: Vec<u64> = vm.collect_dirty_log().iter().map(|p| p.0 / per).collect();
    out.dedup();
    out
}

/// Reads, seals and uploads chunks `indices` ([`PARALLEL`] at a time) into
/// `sealed`; what was uploaded (chunks, bytes).
async fn seal_chunks(
    store: &SnapshotStore,
    vm: &Arc<dyn VmBackend>,
    sealer: &Arc<Sealer>,
    layout: ChunkLayout,
    indices: Vec<u64>,
    existing: &mut HashSet<String>,
    sealed: &mut [Option<Kept>],
) -> Result<(u64, u64), SnapshotError> {
    let there = Arc::new(std::mem::take(existing));
    let mut results = futures_util::stream::iter(indices)
        .map(|i| {
            let (vm, sealer, there, store) =
                (vm.clone(), sealer.clone(), there.clone(), store.clone());
            async move {
                let s = blocking(move || read_and_seal(&*vm, &sealer, layout, i)).await??;
                let mut sent = None;
                if let Some(c) = &s.chunk {
                    let object = chunk_object(&c.name);
                    if !there.contains(&object) {
                        let made = store.put_new(&object, Bytes::from(c.bytes.clone())).await?;
                        sent = Some((object, if made { c.bytes.len() as u64 } else { 0 }));
                    }
                }
                Ok::<_, SnapshotError>((s, sent))
            }
        })
        .buffer_unordered(PARALLEL);
    let (mut uploaded, mut bytes) = (0u64, 0u64);
    let mut added = Vec::new();
    let mut failed = None;
    while let Some(r) = results.next().await {
        match r {
            Ok((s, sent)) => {
                if let Some((object, n)) = sent {
                    if n > 0 {
                        uploaded += 1;
                        bytes += n;
                    }
                    added.push(object);
                }
                let i = usize_of(s.index);
                if let Some(slot) = sealed.get_mut(i) {
                    let chunk = match &s.chunk {
                        Some(c) => ChunkRef::Stored {
                            name: c.name,
                            len: u32::try_from(c.bytes.len()).unwrap_or(u32::MAX),
                        },
                        None => ChunkRef::Zero,
                    };
                    *slot = Some((chunk, s.leaves));
                }
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    drop(results);
    *existing = Arc::try_unwrap(there).unwrap_or_else(|a| (*a).clone());
    existing.extend(added);
    match failed {
        Some(e) => Err(e),
        None => Ok((uploaded, bytes)),
    }
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

/// A new random snapshot id.
pub fn new_snapshot_id() -> Result<SnapshotId, SnapshotError> {
    Ok(SnapshotId(random16()?))
}

fn random16() -> Result<[u8; 16], SnapshotError> {
    let b = random32()?;
    let mut r = [0u8; 16];
    r.copy_from_slice(&b[..16]);
    Ok(r)
}
