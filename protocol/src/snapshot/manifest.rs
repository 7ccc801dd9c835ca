//! The manifest: what a snapshot is, signed by the agent that pushed it.

use ring::aead;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::chunk::{ChunkLayout, ChunkName, MAX_CHUNK_LEAVES, MIN_CHUNK_LEAVES, TAG_LEN};
use super::key::{DataKey, WrappedKey, WRAPPED_LEN};
use super::{LineageId, SnapshotId};
use crate::digest::{device_state_digest, Digest};
use crate::disk::DiskGeometry;
use crate::names::{Role, SpiffeId, VmName};
use crate::page::MemoryGeometry;
use crate::signed::{ChainVerifier, EnvelopeError, Signable, Signed};

/// The manifest format this code writes and reads.
pub const FORMAT: u16 = 2;
/// The context of a manifest's signature.
pub const MANIFEST_CONTEXT: &[u8] = b"convoy 2026-12 snapshot manifest v1\0";
/// The largest manifest body (a million chunks, and room besides).
pub const MAX_MANIFEST_BODY: usize = 48 << 20;
/// Most recipients of one snapshot.
pub const MAX_RECIPIENTS: usize = 16;
const DEVICE_CONTEXT: &str = "convoy 2026-12 snapshot device state aes-256-gcm v1";
const DEVICE_NONCE_CONTEXT: &str = "convoy 2026-12 snapshot device state nonce v1";

/// One chunk of the leaf space, as the manifest records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkRef {
    /// Every leaf zero: nothing stored.
    Zero,
    /// Stored as `chunks/<name>`, `len` bytes sealed.
    Stored {
        /// Its name.
        name: ChunkName,
        /// Its sealed length.
        len: u32,
    },
}

/// The device state, sealed under the data key and bound to the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedState {
    /// The AES-GCM nonce.
    pub nonce: [u8; 12],
    /// The sealed bytes and tag.
    pub sealed: Vec<u8>,
}

/// What a snapshot is. The agent that pushed it signs it; a puller trusts
/// nothing in the bucket that this does not name and bind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotManifest {
    /// [`FORMAT`].
    pub format: u16,
    /// This snapshot (random).
    pub snapshot: SnapshotId,
    /// The VM's lineage: its snapshots share a data key, so chunks dedup.
    pub lineage: LineageId,
    /// 1, 2, … within the lineage: a puller that saw generation `g`
    /// refuses any older one (rollback).
    pub generation: u64,
    /// The digest of the previous generation's signed manifest.
    pub previous: Option<Digest>,
    /// The agent that pushed it (the signer).
    pub source: SpiffeId,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// The VM.
    pub vm: VmName,
    /// Its attributes, for the puller's policy.
    pub attributes: crate::vm::VmAttributes,
    /// What kind of VM it is (a QEMU VM's "memory" is QEMU's stream:
    /// [`super::qemu`]).
    pub backend: super::qemu::SnapshotBackend,
    /// Guest memory.
    pub memory: MemoryGeometry,
    /// Disks: their blocks are leaves after the memory's pages.
    pub disks: Vec<DiskGeometry>,
    /// Leaves a chunk (a power of two).
    pub chunk_leaves: u32,
    /// Every chunk, in leaf order.
    pub chunks: Vec<ChunkRef>,
    /// The Merkle root over every leaf: the one a live migration checks.
    pub root: Digest,
    /// The device state's digest.
    pub device_digest: Digest,
    /// The device state, sealed.
    pub device_state: SealedState,
    /// The data key, for each recipient.
    pub recipients: Vec<WrappedKey>,
    /// The operator's ticket, for a store-and-forward migration.
    pub ticket: Option<crate::ticket::SignedTicket>,
}

impl Signable for SnapshotManifest {
    const CONTEXT: &'static [u8] = MANIFEST_CONTEXT;
    const MAX_BODY: usize = MAX_MANIFEST_BODY;
}

/// A manifest with its signature and the pusher's chain.
pub type SignedManifest = Signed<SnapshotManifest>;

/// The digest a later generation names as `previous`, and a ticket or a
/// puller's record names a manifest by.
pub fn manifest_digest(m: &SignedManifest) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(MANIFEST_CONTEXT);
    h.update(&m.body);
    h.update(&m.signature);
    Digest(*h.finalize().as_bytes())
}

/// Why a manifest is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The envelope, its chain or its signature.
    #[error("manifest envelope: {0}")]
    Envelope(#[from] EnvelopeError),
    /// Signed by someone else than the agent it names as its source.
    #[error("manifest signed by {signer}, but names {named} as its source")]
    Signer {
        /// Who signed.
        signer: SpiffeId,
        /// Who it names.
        named: SpiffeId,
    },
    /// Its source is not an agent.
    #[error("manifest's source {0} is not an agent")]
    NotAnAgent(SpiffeId),
    /// A format this code does not read.
    #[error("manifest format {0}, this agent reads {FORMAT}")]
    Format(u16),
    /// It contradicts itself.
    #[error("inconsistent manifest: {0}")]
    Inconsistent(String),
}

impl SnapshotManifest {
    /// What the snapshot says a sim VM is — memory, disks (names and
    /// sizes), attributes — as a ticket binds it (a QEMU VM's is
    /// [`super::QemuImage::subject`]: its memory and disk names are in the
    /// sealed state).
    pub fn subject(&self) -> crate::vm::VmSubject {
        crate::vm::VmSubject {
            memory_bytes: self.memory.bytes(),
            disks: self
                .disks
                .iter()
                .map(|d| crate::vm::DiskSubject {
                    name: d.name.to_string(),
                    bytes: d.bytes,
                })
                .collect(),
            attributes: self.attributes.digest(),
        }
    }

    /// The leaves and their chunking, once the geometry is checked.
    pub fn layout(&self) -> Result<ChunkLayout, ManifestError> {
        let leaves = crate::disk::check(self.memory, &self.disks)
            .map_err(|e| ManifestError::Inconsistent(e.to_string()))?;
        Ok(ChunkLayout {
            leaves,
            chunk_leaves: self.chunk_leaves,
            page: self.memory.page_size().bytes(),
        })
    }

    /// Every check a manifest must pass on its own.
    pub fn validate(&self) -> Result<ChunkLayout, ManifestError> {
        let bad = |s: String| Err(ManifestError::Inconsistent(s));
        if self.format != FORMAT {
            return Err(ManifestError::Format(self.format));
        }
        if self.source.role() != Role::Agent {
            return Err(ManifestError::NotAnAgent(self.source.clone()));
        }
        if !self.chunk_leaves.is_power_of_two()
            || !(MIN_CHUNK_LEAVES..=MAX_CHUNK_LEAVES).contains(&self.chunk_leaves)
        {
            return bad(format!("{} leaves a chunk", self.chunk_leaves));
        }
        let layout = self.layout()?;
        if self.chunks.len() as u64 != layout.chunks() {
            return bad(format!(
                "{} chunks listed for {} leaves in chunks of {}",
                self.chunks.len(),
                layout.leaves,
                self.chunk_leaves
            ));
        }
        let max = layout.max_sealed();
        for (i, c) in self.chunks.iter().enumerate() {
            if let ChunkRef::Stored { len, .. } = c {
                if *len as usize > max {
                    return bad(format!(
                        "chunk {i} recorded as {len} bytes, more than {max}"
                    ));
                }
            }
        }
        if (self.generation == 1) != self.previous.is_none() || self.generation == 0 {
            return bad(format!(
                "generation {} with{} a previous manifest",
                self.generation,
                if self.previous.is_some() { "" } else { "out" }
            ));
        }
        if self.recipients.is_empty() || self.recipients.len() > MAX_RECIPIENTS {
            return bad(format!(
                "{} recipients (1..={MAX_RECIPIENTS})",
                self.recipients.len()
            ));
        }
        for (i, r) in self.recipients.iter().enumerate() {
            if r.wrapped.len() != WRAPPED_LEN {
                return bad(format!("the key wrapped for {} is malformed", r.recipient));
            }
            if self.recipients[..i]
                .iter()
                .any(|o| o.recipient == r.recipient)
            {
                return bad(format!("{} named twice as a recipient", r.recipient));
            }
            if r.recipient.role() != Role::Agent {
                return bad(format!("recipient {} is not an agent", r.recipient));
            }
        }
        if self.device_state.sealed.len() > crate::message::MAX_DEVICE_STATE + TAG_LEN {
            return bad("device state larger than a migration carries".into());
        }
        self.attributes
            .validate()
            .map_err(|e| ManifestError::Inconsistent(e.to_string()))?;
        Ok(layout)
    }

    /// The key wrapped for `agent`, if it is a recipient.
    pub fn wrapped_for(&self, agent: &SpiffeId) -> Option<&WrappedKey> {
        self.recipients.iter().find(|r| &r.recipient == agent)
    }

    /// Stored chunks, and their sealed bytes in all.
    pub fn stored(&self) -> (u64, u64) {
        self.chunks.iter().fold((0, 0), |(n, b), c| match c {
            ChunkRef::Stored { len, .. } => (n + 1, b + u64::from(*len)),
            ChunkRef::Zero => (n, b),
        })
    }
}

/// Opens a signed manifest: bounds, the pusher's chain at the time the
/// manifest claims (it verifies long after it was made), the signature,
/// the signer against the source it names, and [`SnapshotManifest::validate`].
pub fn open_manifest(
    signed: &SignedManifest,
    verifier: &dyn ChainVerifier,
) -> Result<(SnapshotManifest, ChunkLayout), ManifestError> {
    // Another format need not decode as this one: said as what it is.
    if let Ok((format, _)) = postcard::take_from_bytes::<u16>(&signed.body) {
        if format != FORMAT {
            return Err(ManifestError::Format(format));
        }
    }
    let (m, signer) = signed.open_at_claimed(verifier, |m: &SnapshotManifest| m.created_at)?;
    if signer != m.source {
        return Err(ManifestError::Signer {
            signer,
            named: m.source,
        });
    }
    let layout = m.validate()?;
    Ok((m, layout))
}

/// Why a manifest is not one a puller may take.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FreshnessError {
    /// Older than one already seen of the lineage.
    #[error("generation {got} of this VM's snapshots is older than generation {seen}, already seen here (a rollback)")]
    Rollback {
        /// The manifest's generation.
        got: u64,
        /// The newest seen.
        seen: u64,
    },
    /// The same generation as one seen, but another manifest.
    #[error("generation {0} was seen here as another manifest (a fork of the lineage)")]
    Fork(u64),
}

/// Whether a manifest of `generation` (digest `digest`) may be taken by a
/// puller whose newest record of the lineage is `seen`.
pub fn check_fresh(
    generation: u64,
    digest: &Digest,
    seen: Option<(u64, Digest)>,
) -> Result<(), FreshnessError> {
    match seen {
        Some((g, _)) if generation < g => Err(FreshnessError::Rollback {
            got: generation,
            seen: g,
        }),
        Some((g, d)) if generation == g && d != *digest => Err(FreshnessError::Fork(g)),
        _ => Ok(()),
    }
}

fn device_key(key: &DataKey) -> aead::LessSafeKey {
    crate::aead_key::derived(DEVICE_CONTEXT, key.as_bytes())
}

/// Seals `state` for the snapshot `snapshot` (its nonce is derived from
/// both: a snapshot id is never reused).
pub fn seal_state(key: &DataKey, snapshot: &SnapshotId, state: &[u8]) -> SealedState {
    let mut h = blake3::Hasher::new_keyed(&key.derive(DEVICE_NONCE_CONTEXT));
    h.update(&snapshot.0);
    h.update(state);
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&h.finalize().as_bytes()[..12]);
    let mut sealed = state.to_vec();
    // AES-GCM refuses only inputs past 64 GiB.
    let _ = device_key(key).seal_in_place_append_tag(
        aead::Nonce::assume_unique_for_key(nonce),
        aead::Aad::from(&snapshot.0),
        &mut sealed,
    );
    SealedState { nonce, sealed }
}

/// Why the device state was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum StateError {
    /// It does not authenticate (altered, another snapshot's, another key).
    #[error("device state does not authenticate under this snapshot's key")]
    Authentication,
    /// It is not the state the manifest's digest names.
    #[error("device state does not match its digest")]
    Digest,
}

/// Opens the manifest's device state and checks it against its digest.
pub fn open_state(key: &DataKey, m: &SnapshotManifest) -> Result<Vec<u8>, StateError> {
    let mut buf = m.device_state.sealed.clone();
    let plain = device_key(key)
        .open_in_place(
            aead::Nonce::assume_unique_for_key(m.device_state.nonce),
            aead::Aad::from(&m.snapshot.0),
            &mut buf,
        )
        .map_err(|_| StateError::Authentication)?;
    if device_state_digest(plain) != m.device_digest {
        return Err(StateError::Digest);
    }
    let n = plain.len();
    buf.truncate(n);
    Ok(buf)
}
