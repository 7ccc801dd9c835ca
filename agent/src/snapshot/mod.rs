//! Snapshots in object storage: a VM pushed to a bucket as sealed chunks
//! and a signed manifest, and pulled back — verified — into a VM that may
//! start (formats and checks: [`convoy_protocol::snapshot`]).
//!
//! - [`sealing`]: this agent's sealing key, its signed statement, and the
//!   HPKE wrapping of a data key for named recipients.
//! - [`store`]: snapshot URLs (`file://`, `s3://`) over `object_store`.
//! - [`profile`]: which S3 service and keys an `s3://` bucket is reached
//!   with (AWS shared-file profiles, chosen per bucket).
//! - [`push`]: a paused VM into the bucket (a new lineage, or the next
//!   generation of one this agent can open: unchanged chunks are not
//!   uploaded again).
//! - [`copy`]: snapshots from one URL to another, unopened (server-side
//!   within one S3 bucket), the manifest last; run again, it resumes.
//! - [`handover`]: the create-only claim that ends a store-and-forward
//!   migration (exactly one side wins).
//! - [`enroll`]: agents' sealing keys published under the URL, for
//!   pushers to name them as recipients.
//! - [`seen`]: the newest generation of each lineage this agent saw
//!   (rollback and fork refused).
//! - [`qemu`]: a QEMU VM saved as QEMU's stream and its raw disks, and
//!   restored into a QEMU launched only once every chunk checked.
//! - [`pull`]: the newest (or a named) snapshot out of the bucket into a
//!   staging image, every chunk and the root checked before it starts.
//! - [`partial`]: a pull's chunks kept until it is done, so a pull cut
//!   short fetches again only what it lacked.

pub mod copy;
pub mod enroll;
pub mod handover;
pub mod partial;
pub mod pending;
pub mod profile;
pub mod pull;
pub mod push;
pub mod qemu;
pub mod sealing;
pub mod seen;
pub mod started;
pub mod store;

use convoy_protocol::digest::Digest;
use convoy_protocol::names::SpiffeId;
use convoy_protocol::signed::ChainVerifier;
use convoy_protocol::snapshot::manifest::{FreshnessError, ManifestError, StateError};
use convoy_protocol::snapshot::{
    manifest_digest, open_manifest, parse_manifest_object, ChunkLayout, RestoreError,
    SignedManifest, SnapshotId, SnapshotManifest,
};

pub use sealing::{SealingError, SealingKeys};
pub use store::{SnapshotStore, StoreError};

/// The largest manifest object read (the format's bound, and its envelope).
pub(crate) const MAX_MANIFEST_OBJECT: u64 =
    convoy_protocol::snapshot::manifest::MAX_MANIFEST_BODY as u64 + (64 << 10);

/// Why a push or a pull failed. Each names what and where.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The bucket.
    #[error(transparent)]
    Store(Box<StoreError>),
    /// A manifest or statement object does not decode.
    #[error("{object}: does not decode: {source}")]
    Decode {
        /// The object.
        object: String,
        /// The decoder's words.
        #[source]
        source: postcard::Error,
    },
    /// A manifest was refused.
    #[error("{object}: {source}")]
    Manifest {
        /// The object.
        object: String,
        /// Why.
        #[source]
        source: Box<ManifestError>,
    },
    /// A manifest object's name claims another generation or snapshot than
    /// the manifest inside (a manifest copied under another name).
    #[error("{object} holds generation {generation} of snapshot {snapshot}")]
    Misnamed {
        /// The object.
        object: String,
        /// The manifest's generation.
        generation: u64,
        /// The manifest's snapshot.
        snapshot: SnapshotId,
    },
    /// No snapshot where one was asked for.
    #[error("{url}: {what}")]
    NotFound {
        /// The URL.
        url: String,
        /// What is not there.
        what: String,
    },
    /// Older than, or a fork of, what this agent saw of the lineage.
    #[error("{object}: {source}")]
    Stale {
        /// The object.
        object: String,
        /// Why.
        #[source]
        source: FreshnessError,
    },
    /// The data key.
    #[error(transparent)]
    Sealing(Box<SealingError>),
    /// The content failed its checks.
    #[error(transparent)]
    Restore(Box<RestoreError>),
    /// The device state failed its checks.
    #[error(transparent)]
    State(#[from] StateError),
    /// The VM backend.
    #[error(transparent)]
    Backend(Box<crate::backend::BackendError>),
    /// A chunk could not be sealed.
    #[error("chunk {index}: {source}")]
    Seal {
        /// Its place.
        index: u64,
        /// Why.
        #[source]
        source: convoy_protocol::snapshot::chunk::SealError,
    },
    /// The VM is larger than this agent takes.
    #[error("the snapshot holds {bytes} bytes of memory and disks, more than this agent's capacity of {capacity}")]
    TooLarge {
        /// Its size.
        bytes: u64,
        /// The capacity.
        capacity: u64,
    },
    /// Too many leaves for any chunk size.
    #[error("{0} leaves: too large for a snapshot")]
    Layout(u64),
    /// The VM's geometry.
    #[error("the VM's geometry: {0}")]
    Geometry(String),
    /// Another push made this generation first.
    #[error("{object} exists already: another push of generation {generation} won; push again")]
    Raced {
        /// The manifest object.
        object: String,
        /// Its generation.
        generation: u64,
    },
    /// A handover claim that does not check out.
    #[error("{object}: {why}")]
    Claim {
        /// The claim object.
        object: String,
        /// Why.
        why: String,
    },
    /// A chunk is not the length its signed manifest gives.
    #[error("{object}: {got} bytes, manifest {manifest} gives {expected}")]
    ChunkLength {
        /// The chunk object.
        object: String,
        /// Its length.
        got: u64,
        /// The manifest's.
        expected: u32,
        /// The manifest object.
        manifest: String,
    },
    /// A worker task ended without its result.
    #[error("a worker task failed: {0}")]
    Task(String),
    /// A QEMU VM could not be saved or restored (what QEMU or its files
    /// said).
    #[error("QEMU: {0}")]
    Qemu(String),
    /// The agent's snapshot record (`snapshots.redb`) failed.
    #[error("the snapshot record: {0}")]
    Journal(String),
    /// A QEMU snapshot's state disagrees with its manifest.
    #[error("{object}: {source}")]
    QemuImage {
        /// The manifest object.
        object: String,
        /// Why.
        #[source]
        source: Box<convoy_protocol::snapshot::qemu::QemuImageError>,
    },
}

impl From<StoreError> for SnapshotError {
    fn from(e: StoreError) -> Self {
        SnapshotError::Store(Box::new(e))
    }
}

impl From<SealingError> for SnapshotError {
    fn from(e: SealingError) -> Self {
        SnapshotError::Sealing(Box::new(e))
    }
}

impl From<RestoreError> for SnapshotError {
    fn from(e: RestoreError) -> Self {
        SnapshotError::Restore(Box::new(e))
    }
}

impl From<crate::backend::BackendError> for SnapshotError {
    fn from(e: crate::backend::BackendError) -> Self {
        SnapshotError::Backend(Box::new(e))
    }
}

/// A manifest read from the bucket and checked on its own.
#[derive(Debug, Clone)]
pub struct Found {
    /// Its object name.
    pub object: String,
    /// The signed manifest.
    pub signed: SignedManifest,
    /// What it says.
    pub manifest: SnapshotManifest,
    /// Its layout.
    pub layout: ChunkLayout,
    /// Its digest ([`manifest_digest`]).
    pub digest: Digest,
}

/// The manifest objects under `store`, newest generation first, by name
/// only (the listing is the bucket's word, checked when read).
pub async fn manifest_objects(store: &SnapshotStore) -> Result<Vec<String>, SnapshotError> {
    let mut names: Vec<(u64, String)> = store
        .list("manifests")
        .await?
        .into_iter()
        .filter_map(|n| parse_manifest_object(&n).map(|(g, _)| (g, n)))
        .collect();
    names.sort_by(|a, b| b.cmp(a));
    Ok(names.into_iter().map(|(_, n)| n).collect())
}

/// Whether manifest object `object` (as [`manifest_objects`] lists them)
/// holds snapshot `id`.
pub fn holds_snapshot(object: &str, id: &SnapshotId) -> bool {
    parse_manifest_object(object).is_some_and(|(_, s)| s == *id)
}

/// Reads manifest `object` and checks it: decodes, signature chain,
/// signer, consistency, and the name it is stored under.
pub async fn read_manifest(
    store: &SnapshotStore,
    object: &str,
    verifier: &(dyn ChainVerifier + Sync),
) -> Result<Found, SnapshotError> {
    let bytes = store.get(object, MAX_MANIFEST_OBJECT).await?;
    let signed: SignedManifest =
        postcard::from_bytes(&bytes).map_err(|source| SnapshotError::Decode {
            object: object.to_owned(),
            source,
        })?;
    let (manifest, layout) =
        open_manifest(&signed, verifier).map_err(|source| SnapshotError::Manifest {
            object: object.to_owned(),
            source: Box::new(source),
        })?;
    if parse_manifest_object(object) != Some((manifest.generation, manifest.snapshot)) {
        return Err(SnapshotError::Misnamed {
            object: object.to_owned(),
            generation: manifest.generation,
            snapshot: manifest.snapshot,
        });
    }
    let digest = manifest_digest(&signed);
    Ok(Found {
        object: object.to_owned(),
        signed,
        manifest,
        layout,
        digest,
    })
}

/// The newest manifest under `store` (of VM `vm`, if given) that verifies
/// and is wrapped for `me`; a manifest that does not verify is an error,
/// not skipped (a bucket must not be able to hide a newer snapshot behind
/// a broken one silently).
pub async fn newest_for(
    store: &SnapshotStore,
    verifier: &(dyn ChainVerifier + Sync),
    me: &SpiffeId,
    vm: Option<&convoy_protocol::names::VmName>,
) -> Result<Option<Found>, SnapshotError> {
    for object in manifest_objects(store).await? {
        let f = read_manifest(store, &object, verifier).await?;
        if vm.is_some_and(|v| *v != f.manifest.vm) {
            continue;
        }
        if f.manifest.wrapped_for(me).is_some() {
            return Ok(Some(f));
        }
    }
    Ok(None)
}

/// `m` (manifest object `object`, digest `digest`) as `snapshot list`
/// shows it.
pub fn summary(
    object: &str,
    m: &SnapshotManifest,
    layout: ChunkLayout,
    digest: Digest,
) -> convoy_protocol::ctl::snapshot::SnapshotSummary {
    let stored = m
        .chunks
        .iter()
        .filter(|c| matches!(c, convoy_protocol::snapshot::ChunkRef::Stored { .. }))
        .count() as u64;
    convoy_protocol::ctl::snapshot::SnapshotSummary {
        object: object.to_owned(),
        snapshot: m.snapshot,
        lineage: m.lineage,
        generation: m.generation,
        vm: m.vm.clone(),
        backend: m.backend,
        source: m.source.to_string(),
        created_at: m.created_at,
        recipients: m
            .recipients
            .iter()
            .map(|r| r.recipient.to_string())
            .collect(),
        vm_bytes: layout.leaves.saturating_mul(layout.page as u64),
        chunks: (layout.chunks(), stored),
        digest,
    }
}

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, SnapshotError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SnapshotError::Task(e.to_string()))
}

#[cfg(test)]
mod s3_tests;
#[cfg(test)]
mod tests;
