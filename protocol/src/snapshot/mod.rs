//! Snapshots: a VM as objects in an untrusted bucket (sans-IO formats).
//!
//! A snapshot is the VM's *leaf space* — memory pages, then disk blocks,
//! exactly as a live migration carries them ([`crate::disk`]) — cut into
//! fixed chunks of leaves ([`chunk`]), each sealed with AES-256-GCM under
//! the lineage's data key and stored under a name that is a keyed hash of
//! its content; the device state, sealed too; and a **manifest**
//! ([`manifest`]) signed by the agent that pushed it, naming every chunk,
//! the geometry, the VM, the same Merkle root a live migration verifies,
//! and the data key wrapped for each named recipient agent ([`key`]).
//!
//! What the bucket (or anyone who copies it) learns: the number and sizes
//! of chunks, which chunks of a lineage are equal, and the manifest's
//! clear fields (the VM's name, geometry and attributes, its recipients).
//! Not a byte of memory or disk, and no digest it could test a guess
//! against.
//!
//! What a puller checks before the VM may start, and the error each gives:
//! the manifest's chain and signature, signer = the source it names, its
//! consistency ([`manifest::ManifestError`]); its generation against the
//! newest it saw of the lineage ([`manifest::FreshnessError`]: rollback,
//! fork); per chunk, the recorded length, AES-GCM under its name, a nonce
//! derived from its content, its shape, its content against its name
//! ([`chunk::ChunkError`], wrapped with the chunk's place and leaves in
//! [`restore::RestoreError`]); every stored chunk present; the root over
//! every leaf; the device state's authentication and digest.
//!
//! # Objects under a snapshot URL's prefix
//! ```text
//! manifests/g<generation, 20 digits>-<snapshot id, hex>   signed manifest
//! chunks/<chunk name, hex>                               sealed chunk
//! claims/<snapshot id, hex>                               handover claim (store-and-forward)
//! ```
//! Chunks are shared by the lineage's generations: a second push uploads
//! only the chunks whose names are not there yet.

pub mod chunk;
pub mod claim;
pub mod key;
pub mod manifest;
pub mod qemu;
pub mod restore;
pub mod seal;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use chunk::{ChunkKeys, ChunkLayout, ChunkName, SealedChunk};
pub use key::{DataKey, SealingKeyStatement, SignedSealingKey, WrappedKey};
pub use manifest::{
    check_fresh, manifest_digest, open_manifest, ChunkRef, SignedManifest, SnapshotManifest,
};
pub use qemu::{QemuImage, SnapshotBackend};
pub use restore::{Opener, Restore, RestoreError};
pub use seal::{Capture, Sealer};

macro_rules! id16 {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub struct $name(pub [u8; 16]);

        impl $name {
            /// Lower-case hex.
            pub fn to_hex(&self) -> String {
                self.0.iter().map(|b| format!("{b:02x}")).collect()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.to_hex())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            /// 32 lower-case hex digits, as `Display` writes them.
            fn from_str(s: &str) -> Result<Self, String> {
                parse_id16(s).map($name).ok_or_else(|| {
                    format!("{s:?} is not 32 lower-case hex digits")
                })
            }
        }
    };
}

/// 16 bytes from 32 lower-case hex digits (one id, one spelling).
fn parse_id16(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32
        || !s
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(bytes)
}

id16!(
    /// One snapshot (random).
    SnapshotId
);
id16!(
    /// A VM's line of snapshots, sharing a data key (random).
    LineageId
);

/// The object name of a manifest, under the snapshot URL's prefix.
pub fn manifest_object(generation: u64, snapshot: &SnapshotId) -> String {
    format!("manifests/g{generation:020}-{snapshot}")
}

/// The generation and snapshot a manifest object's name claims (the
/// manifest inside must say the same).
pub fn parse_manifest_object(name: &str) -> Option<(u64, SnapshotId)> {
    let rest = name.strip_prefix("manifests/g")?;
    let (g, id) = rest.split_once('-')?;
    if g.len() != 20 || !g.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let generation = g.parse().ok()?;
    Some((generation, SnapshotId(parse_id16(id)?)))
}

/// The object name of a chunk, under the snapshot URL's prefix.
pub fn chunk_object(name: &ChunkName) -> String {
    format!("chunks/{name}")
}

#[cfg(test)]
mod tests;
