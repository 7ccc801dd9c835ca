//! Keys of a snapshot: the lineage's data key, and the statements and
//! wrapped copies through which only named agents can learn it.
//!
//! Every agent holds an X25519 *sealing key*. It publishes the public half
//! in a [`SealingKeyStatement`] signed with its identity key, so a pusher
//! that names a recipient `b` takes the sealing key only from a statement
//! that `b`'s certificate signed (checked against the trust bundle, which
//! may federate another domain). The data key is wrapped for each
//! recipient with HPKE (RFC 9180, base mode, DHKEM(X25519, HKDF-SHA256),
//! HKDF-SHA256, AES-256-GCM) into a [`WrappedKey`] inside the signed
//! manifest; the HPKE operations themselves live in the agent, which has
//! the randomness and the private key.

use std::fmt;

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::digest::Digest;
use crate::names::SpiffeId;
use crate::signed::{Signable, Signed};

/// The context of a sealing-key statement's signature.
pub const SEALING_KEY_CONTEXT: &[u8] = b"convoy 2026-12 sealing key v1\0";
/// HPKE's `info` when a data key is wrapped.
pub const WRAP_INFO: &[u8] = b"convoy 2026-12 snapshot data key v1";
/// Bytes of an X25519 public key (and of HPKE's encapsulated key).
pub const X25519_LEN: usize = 32;
/// Bytes of a wrapped data key: the key and an AES-GCM tag.
pub const WRAPPED_LEN: usize = 32 + 16;

/// The 32-byte key of a lineage's chunks and device state. Zeroized on
/// drop; its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct DataKey([u8; 32]);

impl DataKey {
    /// A key from 32 bytes (drawn from a secure random source, or unwrapped).
    pub fn from_bytes(bytes: [u8; 32]) -> DataKey {
        DataKey(bytes)
    }

    /// The key's bytes, to wrap them.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A key for one purpose, derived from this one.
    pub(crate) fn derive(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, &self.0)
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<secret>)")
    }
}

/// An agent's public sealing key, signed by the agent's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealingKeyStatement {
    /// The agent that holds the private half.
    pub agent: SpiffeId,
    /// X25519 public key.
    pub public: [u8; X25519_LEN],
    /// Seconds since the Unix epoch.
    pub issued_at: u64,
}

impl SealingKeyStatement {
    /// The key's id: BLAKE3 of the public key, named in wrapped keys.
    pub fn key_id(&self) -> Digest {
        key_id(&self.public)
    }
}

/// The id of the sealing key `public`.
pub fn key_id(public: &[u8; X25519_LEN]) -> Digest {
    Digest(*blake3::hash(public).as_bytes())
}

impl Signable for SealingKeyStatement {
    const CONTEXT: &'static [u8] = SEALING_KEY_CONTEXT;
    const MAX_BODY: usize = 512;
}

/// A sealing-key statement with its signature and chain.
pub type SignedSealingKey = Signed<SealingKeyStatement>;

/// The data key, wrapped for one recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    /// The agent that can unwrap it.
    pub recipient: SpiffeId,
    /// The id of the sealing key it was wrapped to ([`key_id`]).
    pub key: Digest,
    /// HPKE's encapsulated key.
    pub enc: [u8; X25519_LEN],
    /// The data key sealed by HPKE (key and tag).
    pub wrapped: Vec<u8>,
}

/// HPKE's associated data when a data key is wrapped in the manifest of
/// `snapshot`: the wrapped key belongs to that manifest alone.
pub fn wrap_aad(snapshot: &super::SnapshotId) -> Vec<u8> {
    let mut aad = b"convoy snapshot ".to_vec();
    aad.extend_from_slice(&snapshot.0);
    aad
}
