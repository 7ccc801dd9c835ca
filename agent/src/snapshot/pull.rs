//! A snapshot out of the bucket into a VM: nothing starts before every
//! chunk, the root and the device state are checked.

use std::sync::Arc;
use std::time::{Duration, Instant};

use convoy_protocol::digest::Digest;
use convoy_protocol::names::SpiffeId;
use convoy_protocol::page::{is_zero, PageIndex};
use convoy_protocol::signed::ChainVerifier;
use convoy_protocol::snapshot::manifest::open_state;
use convoy_protocol::snapshot::{
    check_fresh, chunk_object, Opener, Restore, SnapshotId, SnapshotManifest,
};
use futures_util::StreamExt;

use super::partial::Partial;
use super::sealing::SealingKeys;
use super::{
    blocking, manifest_objects, newest_for, read_manifest, Found, SnapshotError, SnapshotStore,
};
use crate::backend::sim::SimVm;
use crate::backend::{Staging, VmBackend};

/// Chunks fetched and opened at once.
const PARALLEL: usize = 8;

/// What to pull.
pub struct PullRequest<'a> {
    /// This agent.
    pub me: SpiffeId,
    /// Its sealing keys.
    pub keys: &'a SealingKeys,
    /// The trust bundle the manifest's signer must chain to.
    pub verifier: &'a (dyn ChainVerifier + Sync),
    /// This snapshot, or the newest wrapped for this agent.
    pub snapshot: Option<SnapshotId>,
    /// The newest generation (and its manifest's digest) this agent has
    /// seen of the lineage: an older one is a rollback.
    pub seen: Option<(u64, Digest)>,
    /// The most memory and disk bytes this agent takes.
    pub capacity: u64,
    /// Where a VM's disks are made (`DIR/VM/`).
    pub disk_dir: Option<&'a std::path::Path>,
    /// Keep the VM paused once started.
    pub paused: bool,
    /// Where chunks are kept until the pull is done (an earlier pull's
    /// are used).
    pub partial: Option<Arc<Partial>>,
}

impl std::fmt::Debug for PullRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullRequest")
            .field("me", &self.me)
            .field("snapshot", &self.snapshot)
            .finish_non_exhaustive()
    }
}

/// A pulled VM.
#[derive(Debug)]
pub struct Pulled {
    /// Its manifest.
    pub manifest: SnapshotManifest,
    /// The manifest's digest (the agent records it against rollback).
    pub digest: Digest,
    /// The VM, started (or paused).
    pub vm: Arc<dyn VmBackend>,
    /// The device counter it resumed from.
    pub counter: u64,
    /// Chunks fetched, and those kept by an earlier pull.
    pub fetched: Fetched,
    /// Fetching and checking the chunks.
    pub chunks_took: Duration,
    /// The whole pull.
    pub took: Duration,
}

/// Finds the snapshot `req` names (or the newest for this agent), checks
/// it and starts it.
pub async fn pull(store: &SnapshotStore, req: PullRequest<'_>) -> Result<Pulled, SnapshotError> {
    let found = choose(store, req.verifier, &req.me, req.snapshot, None).await?;
    restore(store, found, req).await
}

/// The manifest of snapshot `snapshot`, or of the newest snapshot (of
/// `vm`, if given) wrapped for `me`, read and checked on its own.
pub async fn choose(
    store: &SnapshotStore,
    verifier: &(dyn ChainVerifier + Sync),
    me: &SpiffeId,
    snapshot: Option<SnapshotId>,
    vm: Option<&convoy_protocol::names::VmName>,
) -> Result<Found, SnapshotError> {
    let found =
        match snapshot {
            Some(id) => find(store, verifier, &id).await?,
            None => newest_for(store, verifier, me, vm).await?.ok_or_else(|| {
                SnapshotError::NotFound {
                    url: store.url().to_owned(),
                    what: match vm {
                        Some(v) => format!("no snapshot of {v} for {me}"),
                        None => format!("no snapshot for {me}"),
                    },
                }
            })?,
        };
    if vm.is_some_and(|v| *v != found.manifest.vm) {
        return Err(SnapshotError::NotFound {
            url: store.url().to_owned(),
            what: format!(
                "snapshot {} is of VM {}, not {}",
                found.manifest.snapshot,
                found.manifest.vm,
                vm.map(ToString::to_string).unwrap_or_default()
            ),
        });
    }
    Ok(found)
}

/// Restores `found` (from [`choose`]): freshness, capacity, the data key,
/// every chunk into a staging image, the root, the device state; then
/// starts it.
pub async fn restore(
    store: &SnapshotStore,
    found: Found,
    req: PullRequest<'_>,
) -> Result<Pulled, SnapshotError> {
    let started = Instant::now();
    let Found {
        object,
        manifest: m,
        layout,
        digest,
        ..
    } = found;
    check_fresh(m.generation, &digest, req.seen).map_err(|source| SnapshotError::Stale {
        object: object.clone(),
        source,
    })?;
    let bytes = layout.leaves.saturating_mul(layout.page as u64);
    if bytes > req.capacity {
        return Err(SnapshotError::TooLarge {
            bytes,
            capacity: req.capacity,
        });
    }
    if m.backend != convoy_protocol::snapshot::SnapshotBackend::Sim {
        return Err(SnapshotError::Qemu(format!(
            "{object} holds a {} VM, not a sim VM",
            m.backend
        )));
    }
    let key = req.keys.unwrap(&req.me, &m.snapshot, &m.recipients)?;
    let state = open_state(&key, &m)?;
    let staging = {
        let (memory, disks, name) = (m.memory, m.disks.clone(), m.vm.to_string());
        let dir = req.disk_dir.map(std::path::Path::to_path_buf);
        blocking(move || {
            SimVm::incoming_with_disks(memory, &disks, dir.as_deref().map(|d| (d, name.as_str())))
        })
        .await??
    };
    let t = Instant::now();
    let sink: Arc<dyn Sink> = Arc::new(SimSink(staging.clone()));
    let fetched = match fetch_chunks(store, &m, layout, &key, Some(sink), req.partial).await {
        Ok((f, _)) => f,
        Err(e) => {
            staging.discard();
            return Err(e);
        }
    };
    let chunks_took = t.elapsed();
    let paused = req.paused;
    let started_vm = blocking(move || {
        staging
            .clone()
            .start(&state, paused)
            .inspect_err(|_| staging.discard())
    })
    .await??;
    Ok(Pulled {
        manifest: m,
        digest,
        vm: started_vm.0,
        counter: started_vm.1,
        fetched,
        chunks_took,
        took: started.elapsed(),
    })
}

/// Fetches and opens every stored chunk of `found` and recomputes the
/// root and the device state, without staging anything: what a pull
/// would check. Returns the chunks and bytes fetched and the root.
pub async fn verify(
    store: &SnapshotStore,
    found: &Found,
    me: &SpiffeId,
    keys: &SealingKeys,
) -> Result<((u64, u64), Digest), SnapshotError> {
    let m = &found.manifest;
    let key = keys.unwrap(me, &m.snapshot, &m.recipients)?;
    let state = open_state(&key, m)?;
    if m.backend == convoy_protocol::snapshot::SnapshotBackend::Qemu {
        convoy_protocol::snapshot::QemuImage::decode(&state, m).map_err(|source| {
            SnapshotError::QemuImage {
                object: found.object.clone(),
                source: Box::new(source),
            }
        })?;
    }
    let (f, root) = fetch_chunks(store, m, found.layout, &key, None, None).await?;
    Ok(((f.chunks, f.bytes), root))
}

/// The manifest of snapshot `id`.
async fn find(
    store: &SnapshotStore,
    verifier: &(dyn ChainVerifier + Sync),
    id: &SnapshotId,
) -> Result<Found, SnapshotError> {
    for object in manifest_objects(store).await? {
        if super::holds_snapshot(&object, id) {
            return read_manifest(store, &object, verifier).await;
        }
    }
    Err(SnapshotError::NotFound {
        url: store.url().to_owned(),
        what: format!("no snapshot {id}"),
    })
}

/// Where a restore writes the leaves it opened.
pub(super) trait Sink: Send + Sync {
    /// Writes leaf `leaf` (never all zero: those are left as they are).
    fn write_leaf(&self, leaf: u64, data: &[u8]) -> Result<(), SnapshotError>;
}

/// A sim VM's staging image.
struct SimSink(Arc<SimVm>);

impl Sink for SimSink {
    fn write_leaf(&self, leaf: u64, data: &[u8]) -> Result<(), SnapshotError> {
        Ok(self.0.write_page(PageIndex(leaf), Some(data))?)
    }
}

/// What a pull fetched, and what it took from kept chunks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fetched {
    /// Chunks fetched from the bucket.
    pub chunks: u64,
    /// Their sealed bytes.
    pub bytes: u64,
    /// Chunks taken from an earlier pull's kept ones instead.
    pub kept: u64,
}

/// Fetches and checks (and writes to `staging`, given) every stored
/// chunk, then checks the root, which it returns. With `partial`, a chunk
/// kept there by an earlier pull of this snapshot is opened from there
/// (and fetched if it does not open), and every chunk fetched is kept.
pub(super) async fn fetch_chunks(
    store: &SnapshotStore,
    m: &SnapshotManifest,
    layout: convoy_protocol::snapshot::ChunkLayout,
    key: &convoy_protocol::snapshot::DataKey,
    staging: Option<Arc<dyn Sink>>,
    partial: Option<Arc<Partial>>,
) -> Result<(Fetched, Digest), SnapshotError> {
    let opener = Arc::new(Opener::new(m, layout, key));
    let mut restore = Restore::new(m, layout);
    let max = layout.max_sealed() as u64;
    let stored: Vec<_> = opener.stored().collect();
    let mut results = futures_util::stream::iter(stored)
        .map(|(i, name, _)| {
            let (store, opener, staging, partial) = (
                store.clone(),
                opener.clone(),
                staging.clone(),
                partial.clone(),
            );
            async move {
                if let Some(p) = partial.clone() {
                    let (opener, staging) = (opener.clone(), staging.clone());
                    let kept = blocking(move || {
                        let sealed = p.get(&name)?;
                        match open_into(&opener, staging.as_deref(), i, &sealed) {
                            Ok(c) => Some(c),
                            // It does not open: never used, fetched anew.
                            Err(SnapshotError::Restore(_)) => {
                                p.remove(&name);
                                None
                            }
                            // Staging failed, not the chunk: fetched anew,
                            // and a local error there ends the pull.
                            Err(_) => None,
                        }
                    })
                    .await?;
                    if let Some(c) = kept {
                        return Ok::<_, SnapshotError>((c, None));
                    }
                }
                let bytes = store.get(&chunk_object(&name), max).await?;
                let n = bytes.len() as u64;
                let c = blocking(move || -> Result<_, SnapshotError> {
                    let c = open_into(&opener, staging.as_deref(), i, &bytes)?;
                    if let Some(p) = partial {
                        p.put(&name, &bytes);
                    }
                    Ok(c)
                })
                .await??;
                Ok((c, Some(n)))
            }
        })
        .buffer_unordered(PARALLEL);
    let mut done = Fetched::default();
    while let Some(r) = results.next().await {
        let (c, n) = r?;
        restore.record(&c);
        match n {
            Some(n) => {
                done.chunks += 1;
                done.bytes += n;
            }
            None => done.kept += 1,
        }
    }
    let root = restore.finish()?;
    Ok((done, root))
}

/// Opens chunk `i` (sealed as `sealed`) and writes its leaves to
/// `staging`, given.
fn open_into(
    opener: &Opener,
    staging: Option<&dyn Sink>,
    i: u64,
    sealed: &[u8],
) -> Result<convoy_protocol::snapshot::restore::OpenedChunk, SnapshotError> {
    let c = opener.open(i, sealed)?;
    if let Some(staging) = staging {
        let start = opener.layout().range(i).start;
        for (leaf, data) in (start..).zip(c.raw.chunks_exact(opener.layout().page)) {
            if !is_zero(data) {
                staging.write_leaf(leaf, data)?;
            }
        }
    }
    Ok(c)
}
