//! Signed migration tickets: the operator's authorization of one migration.
//!
//! `convoyctl` builds a [`Ticket`] — which VM, from which agent to which,
//! the whole migration plan, validity window, a fresh nonce — and signs it with the operator's
//! certificate key. The ticket travels with the operator's certificate chain
//! so every agent (and anyone auditing later) can check it offline with
//! only the CA bundle. The source checks it against the operator connected
//! to it; the destination checks it again and checks that the agent
//! proposing the migration is the ticket's source, so no agent can launder
//! its own authority into a migration no operator asked for.
//!
//! The ticket travels in the generic envelope [`crate::signed::Signed`]
//! ([`SignedTicket`]); cryptography sits behind its [`crate::signed::Signer`] and
//! [`crate::signed::ChainVerifier`] traits.
//!
//! A ticket may also require the approval of several parties
//! ([`approval`]): they sign the ticket without its approvals, the
//! submitter signs it with them, and [`Signed::verify`] checks every one.

pub mod approval;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::model::MigrationPlan;
use crate::names::{MigrationId, Role, SpiffeId, VmName};
use crate::signed::{
    ChainError, ChainVerifier, EnvelopeError, MalformedEnvelope, SignError, Signable, Signed,
};

/// Signatures over tickets cover this prefix and then the ticket body, so a
/// ticket signature can never be replayed as another kind of signature.
pub const TICKET_CONTEXT: &[u8] = b"convoy migration ticket v1\0";

/// Largest encoded ticket body (room for [`approval::MAX_APPROVALS`]
/// approvals with their certificate chains, a few KiB each; small enough
/// that the signed ticket, its own chain included, fits an audit record in
/// an evidence bundle, [`crate::evidence::MAX_RECORD_BODY`]).
pub const MAX_TICKET_BODY: usize = 24 << 10;
/// Longest validity a ticket may claim (one day).
pub const MAX_TICKET_LIFETIME_SECS: u64 = 86_400;

/// What the operator authorizes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// Migration id (random, chosen by the operator).
    pub id: MigrationId,
    /// The VM.
    pub vm: VmName,
    /// What the VM is: memory size, disks and a digest of its attributes,
    /// as the source reported them when the operator signed. The source
    /// refuses the ticket for a VM that differs (another incarnation under
    /// the same name), the destination a proposal that differs.
    pub subject: crate::vm::VmSubject,
    /// The agent that sends the VM.
    pub source: SpiffeId,
    /// The agent that receives it.
    pub destination: SpiffeId,
    /// The whole plan the operator authorized: mode, streams, limits,
    /// storage, start-paused, force-stop, tuning. The source runs exactly
    /// this plan and the destination admits nothing else
    /// ([`crate::admission`]).
    pub plan: MigrationPlan,
    /// Seconds since the Unix epoch.
    pub issued_at: u64,
    /// Seconds since the Unix epoch; not valid from then on.
    pub expires_at: u64,
    /// Random; an agent accepts a nonce once.
    pub nonce: [u8; 16],
    /// Who must approve before either agent acts (none: the signer's
    /// word is enough).
    pub approvers: Vec<approval::Approver>,
    /// Their signed approvals of this ticket without its approvals
    /// ([`approval::request_digest`]).
    pub approvals: Vec<approval::SignedApproval>,
}

impl Signable for Ticket {
    const CONTEXT: &'static [u8] = TICKET_CONTEXT;
    const MAX_BODY: usize = MAX_TICKET_BODY;
}

/// A ticket, its signature (over [`TICKET_CONTEXT`] ‖ body) and the
/// signer's certificate chain (DER, leaf first).
pub type SignedTicket = Signed<Ticket>;

/// Why a ticket is refused. Each variant names the check that failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TicketError {
    /// Sizes out of bounds, or a body that does not decode.
    #[error("malformed ticket: {0}")]
    Malformed(#[source] MalformedEnvelope),
    /// The signer's chain does not verify to the CA bundle.
    #[error("ticket signer's certificate refused: {0}")]
    Chain(ChainError),
    /// The signature does not verify.
    #[error("ticket signature is invalid")]
    Signature,
    /// The signer is not an operator.
    #[error("ticket signed by {0}, which is not an operator")]
    NotAnOperator(SpiffeId),
    /// Issued in the future (beyond the allowed clock skew).
    #[error("ticket not valid until {issued_at} (now {now}, skew {skew} s)")]
    NotYetValid {
        /// Issued at.
        issued_at: u64,
        /// Now.
        now: u64,
        /// Allowed skew.
        skew: u64,
    },
    /// Expired (beyond the allowed clock skew).
    #[error("ticket expired at {expires_at} (now {now}, skew {skew} s)")]
    Expired {
        /// Expiry.
        expires_at: u64,
        /// Now.
        now: u64,
        /// Allowed skew.
        skew: u64,
    },
    /// The validity window is empty or longer than allowed.
    #[error("ticket lifetime from {issued_at} to {expires_at} is invalid")]
    Lifetime {
        /// Issued at.
        issued_at: u64,
        /// Expiry.
        expires_at: u64,
    },
    /// An approval is refused, or one the ticket requires is missing.
    #[error(transparent)]
    Approval(Box<approval::ApprovalError>),
    /// Signing failed.
    #[error("cannot sign: {0}")]
    Sign(#[from] SignError),
}

impl From<approval::ApprovalError> for TicketError {
    fn from(e: approval::ApprovalError) -> Self {
        TicketError::Approval(Box::new(e))
    }
}

impl From<EnvelopeError> for TicketError {
    fn from(e: EnvelopeError) -> Self {
        match e {
            EnvelopeError::Malformed(e) => TicketError::Malformed(e),
            EnvelopeError::Chain(e) => TicketError::Chain(e),
            EnvelopeError::Signature(_) => TicketError::Signature,
        }
    }
}

/// A ticket whose signature, chain and validity window were checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedTicket {
    /// The ticket.
    pub ticket: Ticket,
    /// The operator who signed it.
    pub signer: SpiffeId,
    /// The parties who approved it, each verified.
    pub approvals: approval::Approvals,
}

impl Signed<Ticket> {
    /// Checks sizes, the chain, the signature, the signer's role, the
    /// validity window at `now_unix` with `skew` seconds of tolerance, and
    /// every approval against the approvers the ticket requires
    /// ([`approval::check`]).
    pub fn verify(
        &self,
        verifier: &dyn ChainVerifier,
        now_unix: u64,
        skew: u64,
    ) -> Result<VerifiedTicket, TicketError> {
        let (ticket, signer) = self.open(verifier, now_unix)?;
        if signer.role() != Role::Operator {
            return Err(TicketError::NotAnOperator(signer));
        }
        if ticket.expires_at <= ticket.issued_at
            || ticket.expires_at - ticket.issued_at > MAX_TICKET_LIFETIME_SECS
        {
            return Err(TicketError::Lifetime {
                issued_at: ticket.issued_at,
                expires_at: ticket.expires_at,
            });
        }
        if ticket.issued_at > now_unix.saturating_add(skew) {
            return Err(TicketError::NotYetValid {
                issued_at: ticket.issued_at,
                now: now_unix,
                skew,
            });
        }
        if ticket.expires_at.saturating_add(skew) <= now_unix {
            return Err(TicketError::Expired {
                expires_at: ticket.expires_at,
                now: now_unix,
                skew,
            });
        }
        let approvals = approval::check(&ticket, verifier)?;
        Ok(VerifiedTicket {
            ticket,
            signer,
            approvals,
        })
    }
}

#[cfg(test)]
mod approval_tests;
#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::InsecureCrypto;
    use crate::signed::SignatureError;

    /// The insecure crypto of the fuzz targets, as a signer named `who`.
    fn toy(who: &str) -> InsecureCrypto {
        InsecureCrypto(who.into())
    }

    /// The insecure crypto, except that it trusts no CA of the trust
    /// domain `untrusted`.
    struct ToyVerifier;

    impl ChainVerifier for ToyVerifier {
        fn verify_chain(&self, chain: &[Vec<u8>], now: u64) -> Result<SpiffeId, ChainError> {
            let id = toy("").verify_chain(chain, now)?;
            if id.domain().to_string() == "untrusted" {
                return Err(ChainError::UnknownIssuer { id });
            }
            Ok(id)
        }
        fn verify_signature(
            &self,
            leaf: &[u8],
            message: &[u8],
            sig: &[u8],
        ) -> Result<(), SignatureError> {
            toy("").verify_signature(leaf, message, sig)
        }
        fn public_key(&self, leaf: &[u8]) -> Result<Vec<u8>, SignatureError> {
            toy("").public_key(leaf)
        }
    }

    fn ticket(now: u64) -> Ticket {
        Ticket {
            id: MigrationId([1; 16]),
            vm: "vm".parse().unwrap(),
            subject: crate::vm::VmSubject::plain(1 << 20),
            source: "spiffe://t/agent/a".parse().unwrap(),
            destination: "spiffe://t/agent/b".parse().unwrap(),
            plan: MigrationPlan::default(),
            issued_at: now,
            expires_at: now + 300,
            nonce: [9; 16],
            approvers: Vec::new(),
            approvals: Vec::new(),
        }
    }

    const OP: &str = "spiffe://t/operator/alice";

    #[test]
    fn signed_ticket_verifies_and_names_its_signer() {
        let t = SignedTicket::sign(&ticket(1000), &toy(OP)).unwrap();
        let v = t.verify(&ToyVerifier, 1010, 60).unwrap();
        assert_eq!(v.ticket, ticket(1000));
        assert_eq!(v.signer.to_string(), OP);
    }

    #[test]
    fn each_check_fails_with_its_own_error() {
        let good = SignedTicket::sign(&ticket(1000), &toy(OP)).unwrap();
        let mut forged = good.clone();
        forged.body = postcard::to_stdvec(&Ticket {
            vm: "other".parse().unwrap(),
            ..ticket(1000)
        })
        .unwrap();
        assert_eq!(
            forged.verify(&ToyVerifier, 1000, 60),
            Err(TicketError::Signature)
        );
        assert!(matches!(
            good.verify(&ToyVerifier, 1400, 60),
            Err(TicketError::Expired { .. })
        ));
        assert!(good.verify(&ToyVerifier, 1350, 60).is_ok(), "within skew");
        assert!(matches!(
            good.verify(&ToyVerifier, 900, 60),
            Err(TicketError::NotYetValid { .. })
        ));
        let agent = SignedTicket::sign(&ticket(1000), &toy("spiffe://t/agent/a")).unwrap();
        assert!(matches!(
            agent.verify(&ToyVerifier, 1000, 60),
            Err(TicketError::NotAnOperator(_))
        ));
        let untrusted =
            SignedTicket::sign(&ticket(1000), &toy("spiffe://untrusted/operator/x")).unwrap();
        assert!(matches!(
            untrusted.verify(&ToyVerifier, 1000, 60),
            Err(TicketError::Chain(_))
        ));
        let long = SignedTicket::sign(
            &Ticket {
                expires_at: 1000 + MAX_TICKET_LIFETIME_SECS + 1,
                ..ticket(1000)
            },
            &toy(OP),
        )
        .unwrap();
        assert!(matches!(
            long.verify(&ToyVerifier, 1000, 60),
            Err(TicketError::Lifetime { .. })
        ));
        let mut huge = good.clone();
        huge.chain = vec![vec![0; 10]; crate::signed::MAX_CHAIN_LEN + 1];
        assert!(matches!(
            huge.verify(&ToyVerifier, 1000, 60),
            Err(TicketError::Malformed(MalformedEnvelope::ChainOutOfBounds))
        ));
    }
}
