//! The agent's sealing key: the X25519 key a snapshot's data key is
//! wrapped to (HPKE, RFC 9180), published in a statement its identity
//! signs ([`convoy_protocol::snapshot::key`]).
//!
//! The private key is derived (HPKE's `DeriveKeyPair`) from a 32-byte
//! secret kept in the state directory (`sealing.key`, mode 0600), never in
//! memory longer than the agent runs, never on the wire. Losing the file
//! loses every snapshot wrapped to this agent alone: back it up with the
//! identity key.

use std::path::Path;

use convoy_protocol::digest::Digest;
use convoy_protocol::names::{Role, SpiffeId};
use convoy_protocol::signed::{ChainVerifier, EnvelopeError, SignError, Signed, Signer};
use convoy_protocol::snapshot::key::{
    key_id, wrap_aad, SealingKeyStatement, SignedSealingKey, WrappedKey, WRAPPED_LEN, WRAP_INFO,
    X25519_LEN,
};
use convoy_protocol::snapshot::{DataKey, SnapshotId};
use hpke::{Deserializable, Kem as _, Serializable};
use zeroize::Zeroizing;

type Kem = hpke::kem::X25519HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type Aead = hpke::aead::AesGcm256;

/// The file, in the state directory, of the sealing key's secret.
pub const SEALING_KEY_FILE: &str = "sealing.key";

/// Why a sealing key, a statement or a wrapped key was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealingError {
    /// The key file could not be read or made.
    #[error("sealing key: {0}")]
    File(#[from] crate::transport::ResetKeyError),
    /// No randomness.
    #[error(transparent)]
    Random(#[from] crate::transport::NoRandomness),
    /// The statement could not be signed.
    #[error("sealing key statement: {0}")]
    Sign(#[from] Box<SignError>),
    /// The statement's envelope, chain or signature.
    #[error("sealing key statement of {expected}: {error}")]
    Envelope {
        /// Whose statement it should be.
        expected: SpiffeId,
        /// What was wrong.
        #[source]
        error: Box<EnvelopeError>,
    },
    /// A statement signed by someone else than the agent it names.
    #[error("a sealing key statement naming {named} is signed by {signer}")]
    Signer {
        /// The agent it names.
        named: SpiffeId,
        /// Who signed.
        signer: SpiffeId,
    },
    /// The statement is another agent's than the one asked for.
    #[error("the sealing key statement is {got}'s, not {expected}'s")]
    NotFor {
        /// Whose it is.
        got: SpiffeId,
        /// Whose was wanted.
        expected: SpiffeId,
    },
    /// A statement's key is not an X25519 public key.
    #[error("{0}'s sealing key is not an X25519 public key")]
    BadPublicKey(SpiffeId),
    /// HPKE refused to wrap.
    #[error("cannot wrap the data key for {0}")]
    Wrap(SpiffeId),
    /// This agent is not among the snapshot's recipients.
    #[error("this snapshot is not for {me}: its recipients are {recipients}")]
    NotARecipient {
        /// This agent.
        me: SpiffeId,
        /// Whom it was wrapped for.
        recipients: String,
    },
    /// Wrapped to another sealing key of this agent (an older one).
    #[error("the data key was wrapped to sealing key {wrapped_to}, this agent holds {holds}")]
    OtherKey {
        /// The key id the wrapped key names.
        wrapped_to: Digest,
        /// This agent's key id.
        holds: Digest,
    },
    /// HPKE refused to unwrap: altered, or wrapped for another snapshot.
    #[error("the data key wrapped for this agent does not open (altered, or another snapshot's)")]
    Unwrap,
}

/// This agent's sealing key pair.
pub struct SealingKeys {
    private: <Kem as hpke::Kem>::PrivateKey,
    public: [u8; X25519_LEN],
}

impl std::fmt::Debug for SealingKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealingKeys")
            .field("key_id", &key_id(&self.public).to_hex())
            .finish()
    }
}

impl SealingKeys {
    /// The key pair of the secret in `state_dir/sealing.key`, made there
    /// if there is none.
    pub fn load_or_create(state_dir: &Path) -> Result<SealingKeys, SealingError> {
        let secret = Zeroizing::new(crate::transport::key_file(
            &state_dir.join(SEALING_KEY_FILE),
        )?);
        Ok(SealingKeys::from_secret(&secret))
    }

    /// A key pair for this run only (an agent without a state directory:
    /// snapshots for it cannot be opened after it restarts).
    pub fn ephemeral() -> Result<SealingKeys, SealingError> {
        let mut secret = Zeroizing::new([0u8; 32]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret[..])
            .map_err(|_| crate::transport::NoRandomness)?;
        Ok(SealingKeys::from_secret(&secret))
    }

    fn from_secret(secret: &[u8; 32]) -> SealingKeys {
        let (private, public) = Kem::derive_keypair(secret);
        let mut p = [0u8; X25519_LEN];
        p.copy_from_slice(&public.to_bytes());
        SealingKeys { private, public: p }
    }

    /// The public key.
    pub fn public(&self) -> [u8; X25519_LEN] {
        self.public
    }

    /// The public key's id.
    pub fn key_id(&self) -> Digest {
        key_id(&self.public)
    }

    /// The statement of this key, signed by `identity` (this agent's).
    pub fn statement(
        &self,
        identity: &(dyn Signer + Sync),
        agent: SpiffeId,
        now_unix: u64,
    ) -> Result<SignedSealingKey, SealingError> {
        let st = SealingKeyStatement {
            agent,
            public: self.public,
            issued_at: now_unix,
        };
        Signed::sign(&st, identity).map_err(|e| SealingError::Sign(Box::new(e)))
    }

    /// Opens the data key `m` wrapped for `me`.
    pub fn unwrap(
        &self,
        me: &SpiffeId,
        snapshot: &SnapshotId,
        recipients: &[WrappedKey],
    ) -> Result<DataKey, SealingError> {
        let Some(w) = recipients.iter().find(|r| &r.recipient == me) else {
            let names: Vec<String> = recipients.iter().map(|r| r.recipient.to_string()).collect();
            return Err(SealingError::NotARecipient {
                me: me.clone(),
                recipients: names.join(", "),
            });
        };
        if w.key != self.key_id() {
            return Err(SealingError::OtherKey {
                wrapped_to: w.key,
                holds: self.key_id(),
            });
        }
        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(&w.enc)
            .map_err(|_| SealingError::Unwrap)?;
        let plain = hpke::single_shot_open::<Aead, Kdf, Kem>(
            &hpke::OpModeR::Base,
            &self.private,
            &enc,
            WRAP_INFO,
            &w.wrapped,
            &wrap_aad(snapshot),
        )
        .map_err(|_| SealingError::Unwrap)?;
        let plain = Zeroizing::new(plain);
        let bytes: [u8; 32] = plain
            .as_slice()
            .try_into()
            .map_err(|_| SealingError::Unwrap)?;
        Ok(DataKey::from_bytes(bytes))
    }
}

/// Opens `signed` as the sealing key of `expected`: its chain (at the time
/// it claims), its signature, signed by the agent it names, that agent
/// the one expected.
pub fn open_statement(
    signed: &SignedSealingKey,
    verifier: &(dyn ChainVerifier + Sync),
    expected: &SpiffeId,
) -> Result<SealingKeyStatement, SealingError> {
    let (st, signer) = signed
        .open_at_claimed(verifier, |s: &SealingKeyStatement| s.issued_at)
        .map_err(|error| SealingError::Envelope {
            expected: expected.clone(),
            error: Box::new(error),
        })?;
    if signer != st.agent || signer.role() != Role::Agent {
        return Err(SealingError::Signer {
            named: st.agent,
            signer,
        });
    }
    if &st.agent != expected {
        return Err(SealingError::NotFor {
            got: st.agent,
            expected: expected.clone(),
        });
    }
    Ok(st)
}

/// Wraps `key` for the agent of `to`, in the manifest of `snapshot`.
pub fn wrap(
    key: &DataKey,
    to: &SealingKeyStatement,
    snapshot: &SnapshotId,
) -> Result<WrappedKey, SealingError> {
    let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(&to.public)
        .map_err(|_| SealingError::BadPublicKey(to.agent.clone()))?;
    let (enc, wrapped) = hpke::single_shot_seal::<Aead, Kdf, Kem, _>(
        &hpke::OpModeS::Base,
        &pk,
        WRAP_INFO,
        key.as_bytes(),
        &wrap_aad(snapshot),
        &mut rand::rng(),
    )
    .map_err(|_| SealingError::Wrap(to.agent.clone()))?;
    let mut e = [0u8; X25519_LEN];
    let enc = enc.to_bytes();
    if enc.len() != X25519_LEN || wrapped.len() != WRAPPED_LEN {
        return Err(SealingError::Wrap(to.agent.clone()));
    }
    e.copy_from_slice(&enc);
    Ok(WrappedKey {
        recipient: to.agent.clone(),
        key: to.key_id(),
        enc: e,
        wrapped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use convoy_protocol::fuzz::InsecureCrypto;

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    #[test]
    fn a_data_key_wrapped_for_an_agent_opens_there_only() {
        let dir = tempfile::tempdir().unwrap();
        let b = SealingKeys::load_or_create(dir.path()).unwrap();
        // The same file, the same key.
        let again = SealingKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(b.key_id(), again.key_id());
        let c = SealingKeys::ephemeral().unwrap();
        let (bid, cid) = (id("spiffe://lab/agent/b"), id("spiffe://lab/agent/c"));
        let v = InsecureCrypto(String::new());
        let st = b
            .statement(&InsecureCrypto(bid.to_string()), bid.clone(), 1)
            .unwrap();
        let st = open_statement(&st, &v, &bid).unwrap();
        let snap = SnapshotId([1; 16]);
        let key = DataKey::from_bytes([7; 32]);
        let w = vec![wrap(&key, &st, &snap).unwrap()];
        assert_eq!(b.unwrap(&bid, &snap, &w).unwrap(), key);
        assert!(matches!(
            c.unwrap(&cid, &snap, &w),
            Err(SealingError::NotARecipient { .. })
        ));
        // c claims b's slot: the key id tells.
        assert!(matches!(
            c.unwrap(&bid, &snap, &w),
            Err(SealingError::OtherKey { .. })
        ));
        // Copied into another snapshot's manifest.
        assert!(matches!(
            b.unwrap(&bid, &SnapshotId([2; 16]), &w),
            Err(SealingError::Unwrap)
        ));
        let mut t = w.clone();
        t[0].wrapped[3] ^= 1;
        assert!(matches!(
            b.unwrap(&bid, &snap, &t),
            Err(SealingError::Unwrap)
        ));
    }

    #[test]
    fn a_statement_must_be_signed_by_the_agent_it_names() {
        let k = SealingKeys::ephemeral().unwrap();
        let (bid, cid) = (id("spiffe://lab/agent/b"), id("spiffe://lab/agent/c"));
        let v = InsecureCrypto(String::new());
        // c signs a statement naming b: c would read what is meant for b.
        let forged = k
            .statement(&InsecureCrypto(cid.to_string()), bid.clone(), 1)
            .unwrap();
        assert!(matches!(
            open_statement(&forged, &v, &bid),
            Err(SealingError::Signer { .. })
        ));
        let cs = k
            .statement(&InsecureCrypto(cid.to_string()), cid.clone(), 1)
            .unwrap();
        assert!(matches!(
            open_statement(&cs, &v, &bid),
            Err(SealingError::NotFor { .. })
        ));
        let op = id("spiffe://lab/operator/alice");
        let by_operator = k
            .statement(&InsecureCrypto(op.to_string()), op.clone(), 1)
            .unwrap();
        assert!(matches!(
            open_statement(&by_operator, &v, &op),
            Err(SealingError::Signer { .. })
        ));
    }

    #[test]
    fn a_key_file_of_the_wrong_size_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(SEALING_KEY_FILE);
        std::fs::write(&p, b"short").unwrap();
        let e = SealingKeys::load_or_create(dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("5 bytes where a key of 32 was expected"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"short");
    }
}
