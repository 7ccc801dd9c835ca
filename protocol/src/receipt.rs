//! Signed receipts: non-repudiation of what each side sent and received.
//!
//! At each step that matters, the agent that takes it signs a [`Receipt`]
//! with its own certificate key and hands it to the other side, which
//! checks it and keeps it:
//!
//! | kind | signed by | says |
//! |------|-----------|------|
//! | `Accepted` | destination | "I accept this ticket's migration" |
//! | `Ready` | destination | "I hold exactly this memory root and device state" |
//! | `Sent` | source | "I handed over exactly this state and will not run it" |
//! | `Started` | destination | "the VM runs here from this state" |
//!
//! Every receipt names the migration and the digest of the operator's
//! signed ticket, so receipts, ticket and audit records bind together. A
//! receipt carries the signer's chain and verifies offline with only the CA
//! bundle, at the time it claims to have been signed. It travels in the
//! generic envelope [`crate::signed::Signed`] ([`SignedReceipt`]).

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::digest::Digest;
use crate::names::{MigrationId, Role, SpiffeId};
use crate::signed::{
    ChainError, ChainVerifier, EnvelopeError, MalformedEnvelope, SignError, Signable, Signed,
    Signer,
};
use crate::ticket::SignedTicket;

/// Signatures over receipts cover this prefix, then the body.
pub const RECEIPT_CONTEXT: &[u8] = b"convoy migration receipt v1\0";

/// Largest encoded receipt body.
pub const MAX_RECEIPT_BODY: usize = 1024;

/// What a receipt attests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ReceiptKind {
    /// The destination accepted the migration.
    Accepted,
    /// The destination holds the state, verified.
    Ready,
    /// The source handed the state over.
    Sent,
    /// The VM runs at the destination.
    Started,
}

/// A signed statement about one step of one migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// What it attests.
    pub kind: ReceiptKind,
    /// The migration.
    pub migration: MigrationId,
    /// Digest of the operator's signed ticket.
    pub ticket: Digest,
    /// Memory root, for Ready, Sent and Started.
    pub memory_root: Option<Digest>,
    /// Device-state digest, for Ready, Sent and Started.
    pub device: Option<Digest>,
    /// When it was signed, seconds since the Unix epoch.
    pub at_unix: u64,
}

impl Signable for Receipt {
    const CONTEXT: &'static [u8] = RECEIPT_CONTEXT;
    const MAX_BODY: usize = MAX_RECEIPT_BODY;
}

/// A receipt, its signature (over [`RECEIPT_CONTEXT`] ‖ body) and the
/// signer's chain (DER, leaf first).
pub type SignedReceipt = Signed<Receipt>;

/// Why a receipt is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ReceiptError {
    /// Bounds, or a body that does not decode.
    #[error("malformed receipt: {0}")]
    Malformed(#[source] MalformedEnvelope),
    /// The signer's chain does not verify (at the receipt's time).
    #[error("receipt signer's certificate refused: {0}")]
    Chain(ChainError),
    /// The signature does not verify.
    #[error("receipt signature is invalid")]
    Signature,
    /// The signer is not an agent.
    #[error("receipt signed by {0}, which is not an agent")]
    NotAnAgent(SpiffeId),
    /// Signing failed.
    #[error("cannot sign: {0}")]
    Sign(#[from] SignError),
    /// Valid, but not the receipt expected here.
    #[error("wrong receipt: {0}")]
    Mismatch(#[source] ReceiptMismatch),
}

/// How a valid receipt differs from the one expected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ReceiptMismatch {
    /// Signed by another agent than the one expected.
    #[error("signed by {signer}, expected {expected}")]
    Signer {
        /// Who signed it.
        signer: SpiffeId,
        /// Who should have.
        expected: SpiffeId,
    },
    /// Of another kind, or about another migration, ticket or state.
    #[error("{0:?} receipt does not attest this migration's state")]
    State(ReceiptKind),
}

impl From<EnvelopeError> for ReceiptError {
    fn from(e: EnvelopeError) -> Self {
        match e {
            EnvelopeError::Malformed(e) => ReceiptError::Malformed(e),
            EnvelopeError::Chain(e) => ReceiptError::Chain(e),
            EnvelopeError::Signature(_) => ReceiptError::Signature,
        }
    }
}

/// A receipt whose chain and signature were checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedReceipt {
    /// The receipt.
    pub receipt: Receipt,
    /// The agent that signed it.
    pub signer: SpiffeId,
}

/// The digest receipts use to name a signed ticket.
pub fn ticket_digest(t: &SignedTicket) -> Digest {
    let mut h = blake3::Hasher::new_derive_key("convoy 2026-11 signed ticket digest v1");
    h.update(&(t.body.len() as u64).to_le_bytes());
    h.update(&t.body);
    h.update(&t.signature);
    Digest(*h.finalize().as_bytes())
}

impl Signed<Receipt> {
    /// Checks bounds, the chain at the receipt's own time, the signature,
    /// and that an agent signed it.
    pub fn verify(&self, verifier: &dyn ChainVerifier) -> Result<VerifiedReceipt, ReceiptError> {
        let (receipt, signer) = self.open_at_claimed(verifier, |r| r.at_unix)?;
        if signer.role() != Role::Agent {
            return Err(ReceiptError::NotAnAgent(signer));
        }
        Ok(VerifiedReceipt { receipt, signer })
    }
}

/// The signing and checking of receipts for one agent in one migration: a
/// signer (this agent's key), a verifier (the CA bundle), and a clock
/// anchor, since a sans-IO state machine only sees `Instant`s.
#[derive(Clone)]
pub struct Notary {
    signer: std::sync::Arc<dyn Signer + Send + Sync>,
    verifier: std::sync::Arc<dyn ChainVerifier + Send + Sync>,
    anchor: (std::time::Instant, u64),
}

impl std::fmt::Debug for Notary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notary")
            .field("anchor_unix", &self.anchor.1)
            .finish()
    }
}

/// The digests a receipt attests besides the ticket: memory root and device
/// state digest.
pub type StateDigests = Option<(Digest, Digest)>;

impl Notary {
    /// A notary whose clock reads `now_unix` at `now`.
    pub fn new(
        signer: std::sync::Arc<dyn Signer + Send + Sync>,
        verifier: std::sync::Arc<dyn ChainVerifier + Send + Sync>,
        now: std::time::Instant,
        now_unix: u64,
    ) -> Self {
        Notary {
            signer,
            verifier,
            anchor: (now, now_unix),
        }
    }

    fn unix(&self, now: std::time::Instant) -> u64 {
        self.anchor.1 + now.saturating_duration_since(self.anchor.0).as_secs()
    }

    /// Signs a receipt of `kind`.
    pub fn sign(
        &self,
        now: std::time::Instant,
        kind: ReceiptKind,
        migration: MigrationId,
        ticket: Digest,
        state: StateDigests,
    ) -> Result<SignedReceipt, ReceiptError> {
        Ok(SignedReceipt::sign(
            &Receipt {
                kind,
                migration,
                ticket,
                memory_root: state.map(|s| s.0),
                device: state.map(|s| s.1),
                at_unix: self.unix(now),
            },
            self.signer.as_ref(),
        )?)
    }

    /// Checks that `r` is a valid receipt of `kind` by `from` about exactly
    /// this migration, ticket and state.
    pub fn check(
        &self,
        r: &SignedReceipt,
        from: &SpiffeId,
        kind: ReceiptKind,
        migration: MigrationId,
        ticket: Digest,
        state: StateDigests,
    ) -> Result<(), ReceiptError> {
        let v = r.verify(self.verifier.as_ref())?;
        let want = Receipt {
            kind,
            migration,
            ticket,
            memory_root: state.map(|s| s.0),
            device: state.map(|s| s.1),
            at_unix: v.receipt.at_unix,
        };
        if &v.signer != from {
            return Err(ReceiptError::Mismatch(ReceiptMismatch::Signer {
                signer: v.signer,
                expected: from.clone(),
            }));
        }
        if v.receipt != want {
            return Err(ReceiptError::Mismatch(ReceiptMismatch::State(
                v.receipt.kind,
            )));
        }
        Ok(())
    }
}
