//! Signed statements: the one envelope every signed kind travels in, and
//! the traits behind which the cryptography sits.
//!
//! A signature in Convoy covers a context string naming the kind of
//! statement, then the statement's bytes ([`signed_message`]), so no
//! signature verifies as another kind. Each kind names its context (and
//! the largest body it may have) by implementing [`Signable`]:
//!
//! | kind | context |
//! |------|---------|
//! | [`crate::ticket::Ticket`] | [`crate::ticket::TICKET_CONTEXT`] |
//! | [`crate::receipt::Receipt`] | [`crate::receipt::RECEIPT_CONTEXT`] |
//! | [`crate::audit::AuditRecord`] | [`crate::audit::RECORD_CONTEXT`] |
//! | a tree head (size ‖ root ‖ time) | [`crate::audit::HEAD_CONTEXT`] |
//!
//! Tickets and receipts travel alone, so they carry their signer's chain:
//! [`Signed<T>`] is the postcard body of a `T`, its signature and the
//! chain, and checks all of it ([`Signed::open`]; each kind adds its own
//! checks, such as the signer's role, around it). Audit records and tree
//! heads do not fit that envelope — a log names its signer once, in its
//! header, and a tree head signs a fixed layout rather than a postcard
//! body — so they share only the context and the signing and checking of
//! one signature ([`sign_in_context`], [`verify_in_context`],
//! [`sign_body`]).
//!
//! Cryptography sits behind [`Signer`] and [`ChainVerifier`]: the agent
//! implements them with rustls-webpki and ring; tests and fuzzing swap in
//! their own (`crate::fuzz::InsecureCrypto`).

use std::fmt;
use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::names::{SpiffeId, TrustDomain};

/// Most certificates in a signer's chain.
pub const MAX_CHAIN_LEN: usize = 4;
/// Largest certificate in a chain.
pub const MAX_CERT_LEN: usize = 8192;
/// The length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// A kind of signed statement: its domain-separation context and the
/// largest encoded body an envelope of it may hold.
pub trait Signable: Serialize + DeserializeOwned {
    /// Signatures over this kind cover this prefix, then the body.
    const CONTEXT: &'static [u8];
    /// Largest postcard body a [`Signed`] of this kind may hold.
    const MAX_BODY: usize;
}

/// Why a signer's certificate chain is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ChainError {
    /// No certificate at all.
    #[error("empty certificate chain")]
    Empty,
    /// Too many certificates, or one too large.
    #[error("chain out of bounds")]
    OutOfBounds,
    /// The leaf does not parse, or names no single SPIFFE ID.
    #[error("{0}")]
    Certificate(String),
    /// The identity's trust domain is neither ours nor federated.
    #[error("{id} is in trust domain {}, which is neither ours ({ours}) nor federated", id.domain())]
    ForeignDomain {
        /// The identity the leaf names.
        id: SpiffeId,
        /// Our trust domain.
        ours: TrustDomain,
    },
    /// The domain is federated, but not for this identity.
    #[error("{id} is not among the identities federated from {}", id.domain())]
    NotFederated {
        /// The identity the leaf names.
        id: SpiffeId,
    },
    /// The chain does not lead to the CA of the identity's domain.
    #[error("{id}: certificate not issued by the CA of {}", id.domain())]
    UnknownIssuer {
        /// The identity the leaf names.
        id: SpiffeId,
    },
    /// A certificate of the chain is revoked.
    #[error("certificate revoked")]
    Revoked,
    /// A certificate of the chain has expired.
    #[error("certificate expired")]
    Expired,
    /// A certificate of the chain is not valid yet.
    #[error("certificate not valid yet")]
    NotValidYet,
    /// Any other reason the path does not verify (the verifier's words).
    #[error("{0}")]
    Invalid(String),
}

/// Why a signature does not verify.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// The signer's certificate does not parse (the parser's words).
    #[error("signer's certificate: {0}")]
    Certificate(String),
    /// The signature is not the signer's over this message.
    #[error("bad signature")]
    Invalid,
}

/// Why a statement could not be signed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SignError {
    /// The key is not held as PKCS#8.
    #[error("signing keys must be Ed25519 in PKCS#8")]
    NotPkcs8,
    /// The key is not an Ed25519 key (the key parser's words).
    #[error("not an Ed25519 key: {0}")]
    NotEd25519(String),
    /// The statement does not encode.
    #[error("cannot encode: {0}")]
    Encode(#[source] postcard::Error),
}

/// Signs statements with one identity's key.
pub trait Signer {
    /// The certificate chain (DER, leaf first).
    fn chain(&self) -> Vec<Vec<u8>>;
    /// An Ed25519 signature over `message`.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError>;
}

/// Checks signers' chains and signatures against a CA bundle.
pub trait ChainVerifier {
    /// Verifies `chain` (leaf first) up to a trusted CA at `now_unix`,
    /// checking expiry and revocation, and returns the leaf's SPIFFE ID.
    fn verify_chain(&self, chain: &[Vec<u8>], now_unix: u64) -> Result<SpiffeId, ChainError>;
    /// Verifies `signature` over `message` with the public key of the
    /// certificate `leaf`.
    fn verify_signature(
        &self,
        leaf: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), SignatureError>;
    /// The public key of the certificate `leaf` (its SubjectPublicKeyInfo):
    /// what tells two signers apart when approvals are counted, whatever
    /// names their certificates carry.
    fn public_key(&self, leaf: &[u8]) -> Result<Vec<u8>, SignatureError>;
}

/// What a Convoy signature covers: a context string naming the kind of
/// statement, then the statement, so no signature verifies as another kind.
pub fn signed_message(context: &[u8], body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(context.len() + body.len());
    m.extend_from_slice(context);
    m.extend_from_slice(body);
    m
}

/// Signs `body` under `context`.
pub fn sign_in_context(
    signer: &dyn Signer,
    context: &[u8],
    body: &[u8],
) -> Result<Vec<u8>, SignError> {
    signer.sign(&signed_message(context, body))
}

/// Checks `signature` over `body` under `context` by the key of `leaf`.
pub fn verify_in_context(
    verifier: &dyn ChainVerifier,
    leaf: &[u8],
    context: &[u8],
    body: &[u8],
    signature: &[u8],
) -> Result<(), SignatureError> {
    verifier.verify_signature(leaf, &signed_message(context, body), signature)
}

/// The postcard body of `value` and its signature under `T`'s context.
pub fn sign_body<T: Signable>(
    value: &T,
    signer: &dyn Signer,
) -> Result<(Vec<u8>, Vec<u8>), SignError> {
    let body = postcard::to_stdvec(value).map_err(SignError::Encode)?;
    let signature = sign_in_context(signer, T::CONTEXT, &body)?;
    Ok((body, signature))
}

/// Whether a chain has 1..=[`MAX_CHAIN_LEN`] certificates of at most
/// [`MAX_CERT_LEN`] bytes each.
pub fn chain_in_bounds(chain: &[Vec<u8>]) -> bool {
    !chain.is_empty()
        && chain.len() <= MAX_CHAIN_LEN
        && chain.iter().all(|c| c.len() <= MAX_CERT_LEN)
}

/// Why an envelope does not verify; each kind maps these onto its own
/// error ([`crate::ticket::TicketError`], [`crate::receipt::ReceiptError`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Out of bounds, or a body that does not decode.
    #[error(transparent)]
    Malformed(#[from] MalformedEnvelope),
    /// The signer's chain is refused.
    #[error(transparent)]
    Chain(ChainError),
    /// The signature does not verify.
    #[error(transparent)]
    Signature(SignatureError),
}

/// What is wrong with the parts of an envelope, before any cryptography.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum MalformedEnvelope {
    /// The body is larger than its kind allows.
    #[error("body of {len} bytes, more than {max}")]
    BodyTooLarge {
        /// The body's length.
        len: usize,
        /// The kind's [`Signable::MAX_BODY`].
        max: usize,
    },
    /// The signature is not [`SIGNATURE_LEN`] bytes.
    #[error("signature of {0} bytes, not {SIGNATURE_LEN}")]
    SignatureLength(usize),
    /// The chain is empty, longer than [`MAX_CHAIN_LEN`] or holds a
    /// certificate larger than [`MAX_CERT_LEN`].
    #[error("certificate chain out of bounds")]
    ChainOutOfBounds,
    /// The body does not decode as the kind.
    #[error("{0}")]
    Body(#[source] postcard::Error),
    /// The body decodes with bytes left over.
    #[error("trailing bytes")]
    Trailing,
}

/// A statement of kind `T`: its postcard body, the signature over `T`'s
/// context and the body, and the signer's certificate chain (DER, leaf
/// first). On the wire exactly those three fields, in that order.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Signed<T> {
    /// The postcard encoding of the `T` that was signed.
    pub body: Vec<u8>,
    /// Ed25519 signature over `T::CONTEXT` ‖ `body`.
    pub signature: Vec<u8>,
    /// Signer's certificate chain.
    pub chain: Vec<Vec<u8>>,
    #[serde(skip)]
    kind: PhantomData<fn() -> T>,
}

impl<T> Signed<T> {
    /// An envelope of these parts, unchecked (for tests and tools that
    /// build or alter envelopes; [`Signed::sign`] makes a valid one).
    pub fn from_parts(body: Vec<u8>, signature: Vec<u8>, chain: Vec<Vec<u8>>) -> Self {
        Signed {
            body,
            signature,
            chain,
            kind: PhantomData,
        }
    }
}

impl<T> Clone for Signed<T> {
    fn clone(&self) -> Self {
        Signed::from_parts(
            self.body.clone(),
            self.signature.clone(),
            self.chain.clone(),
        )
    }
}

impl<T> PartialEq for Signed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.body == other.body && self.signature == other.signature && self.chain == other.chain
    }
}

impl<T> Eq for Signed<T> {}

impl<T> fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signed")
            .field("body", &self.body)
            .field("signature", &self.signature)
            .field("chain", &self.chain)
            .finish()
    }
}

impl<T: Signable> Signed<T> {
    /// Signs `value` with `signer`'s key and attaches its chain.
    pub fn sign(value: &T, signer: &dyn Signer) -> Result<Self, SignError> {
        let (body, signature) = sign_body(value, signer)?;
        Ok(Signed::from_parts(body, signature, signer.chain()))
    }

    /// Checks bounds, the chain at `now_unix`, the signature, and only
    /// then decodes the body: the statement and who signed it.
    pub fn open(
        &self,
        verifier: &dyn ChainVerifier,
        now_unix: u64,
    ) -> Result<(T, SpiffeId), EnvelopeError> {
        self.check_bounds()?;
        let signer = self.check_signer(verifier, now_unix)?;
        Ok((self.decode()?, signer))
    }

    /// Checks bounds, decodes the body, then checks the chain at the time
    /// the statement itself claims (`at`) and the signature: for statements
    /// that verify offline long after they were made.
    pub fn open_at_claimed(
        &self,
        verifier: &dyn ChainVerifier,
        at: impl FnOnce(&T) -> u64,
    ) -> Result<(T, SpiffeId), EnvelopeError> {
        self.check_bounds()?;
        let value = self.decode()?;
        let signer = self.check_signer(verifier, at(&value))?;
        Ok((value, signer))
    }

    fn check_bounds(&self) -> Result<(), EnvelopeError> {
        if self.body.len() > T::MAX_BODY {
            return Err(MalformedEnvelope::BodyTooLarge {
                len: self.body.len(),
                max: T::MAX_BODY,
            }
            .into());
        }
        if self.signature.len() != SIGNATURE_LEN {
            return Err(MalformedEnvelope::SignatureLength(self.signature.len()).into());
        }
        if !chain_in_bounds(&self.chain) {
            return Err(MalformedEnvelope::ChainOutOfBounds.into());
        }
        Ok(())
    }

    /// The chain at `at`, then the signature by its leaf (bounds checked).
    fn check_signer(
        &self,
        verifier: &dyn ChainVerifier,
        at: u64,
    ) -> Result<SpiffeId, EnvelopeError> {
        let signer = verifier
            .verify_chain(&self.chain, at)
            .map_err(EnvelopeError::Chain)?;
        verify_in_context(
            verifier,
            &self.chain[0],
            T::CONTEXT,
            &self.body,
            &self.signature,
        )
        .map_err(EnvelopeError::Signature)?;
        Ok(signer)
    }

    fn decode(&self) -> Result<T, EnvelopeError> {
        let (value, rest): (T, &[u8]) =
            postcard::take_from_bytes(&self.body).map_err(MalformedEnvelope::Body)?;
        if !rest.is_empty() {
            return Err(MalformedEnvelope::Trailing.into());
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout `SignedTicket` and `SignedReceipt` had before they became
    /// `Signed<T>`.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Legacy {
        body: Vec<u8>,
        signature: Vec<u8>,
        chain: Vec<Vec<u8>>,
    }

    #[derive(Serialize, Deserialize)]
    struct Kind;

    impl Signable for Kind {
        const CONTEXT: &'static [u8] = b"test\0";
        const MAX_BODY: usize = 16;
    }

    #[test]
    fn the_envelope_encodes_as_the_three_fields_did() {
        let legacy = Legacy {
            body: vec![1, 2, 3],
            signature: vec![4; 64],
            chain: vec![vec![5; 300], vec![], vec![6]],
        };
        let new = Signed::<Kind>::from_parts(
            legacy.body.clone(),
            legacy.signature.clone(),
            legacy.chain.clone(),
        );
        let bytes = postcard::to_stdvec(&legacy).unwrap();
        assert_eq!(postcard::to_stdvec(&new).unwrap(), bytes);
        assert_eq!(postcard::from_bytes::<Signed<Kind>>(&bytes).unwrap(), new);
        assert_eq!(
            postcard::from_bytes::<Legacy>(&postcard::to_stdvec(&new).unwrap()).unwrap(),
            legacy
        );
    }

    #[test]
    fn chains_are_bounded() {
        assert!(!chain_in_bounds(&[]));
        assert!(chain_in_bounds(&[vec![0; MAX_CERT_LEN]]));
        assert!(!chain_in_bounds(&[vec![0; MAX_CERT_LEN + 1]]));
        assert!(!chain_in_bounds(&vec![vec![0]; MAX_CHAIN_LEN + 1]));
    }
}
