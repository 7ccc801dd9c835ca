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
//! Cryptography sits behind [`TicketVerifier`] and [`TicketSigner`]: the
//! agent implements them with rustls-webpki and ring; tests and fuzzing can
//! swap in their own.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::model::MigrationPlan;
use crate::names::{MigrationId, Role, SpiffeId, VmName};

/// Signatures over tickets cover this prefix and then the ticket body, so a
/// ticket signature can never be replayed as another kind of signature.
pub const TICKET_CONTEXT: &[u8] = b"convoy migration ticket v1\0";

/// Largest encoded ticket body.
pub const MAX_TICKET_BODY: usize = 4096;
/// Most certificates in a signer's chain.
pub const MAX_CHAIN_LEN: usize = 4;
/// Largest certificate in a chain.
pub const MAX_CERT_LEN: usize = 8192;
/// Longest validity a ticket may claim (one day).
pub const MAX_TICKET_LIFETIME_SECS: u64 = 86_400;

/// What the operator authorizes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// Migration id (random, chosen by the operator).
    pub id: MigrationId,
    /// The VM.
    pub vm: VmName,
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
}

/// A ticket, its signature and the signer's certificate chain (DER, leaf
/// first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTicket {
    /// The postcard encoding of the [`Ticket`] that was signed.
    pub body: Vec<u8>,
    /// Ed25519 signature over [`TICKET_CONTEXT`] ‖ `body`.
    pub signature: Vec<u8>,
    /// Signer's certificate chain.
    pub chain: Vec<Vec<u8>>,
}

/// Cryptographic checks a ticket needs, provided by the agent.
pub trait TicketVerifier {
    /// Verifies `chain` (leaf first) up to a trusted CA at `now_unix`,
    /// checking expiry and revocation, and returns the leaf's SPIFFE ID.
    fn verify_chain(&self, chain: &[Vec<u8>], now_unix: u64) -> Result<SpiffeId, String>;
    /// Verifies `signature` over `message` with the public key of the
    /// certificate `leaf`.
    fn verify_signature(&self, leaf: &[u8], message: &[u8], signature: &[u8])
        -> Result<(), String>;
}

/// Signs tickets with an operator's key.
pub trait TicketSigner {
    /// The certificate chain (DER, leaf first).
    fn chain(&self) -> Vec<Vec<u8>>;
    /// An Ed25519 signature over `message`.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String>;
}

/// Why a ticket is refused. Each variant names the check that failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TicketError {
    /// Sizes out of bounds, or a body that does not decode.
    #[error("malformed ticket: {0}")]
    Malformed(String),
    /// The signer's chain does not verify to the CA bundle.
    #[error("ticket signer's certificate refused: {0}")]
    Chain(String),
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
    /// Signing failed.
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// A ticket whose signature, chain and validity window were checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedTicket {
    /// The ticket.
    pub ticket: Ticket,
    /// The operator who signed it.
    pub signer: SpiffeId,
}

/// What a Convoy signature covers: a context string naming the kind of
/// statement, then the statement, so no signature verifies as another kind.
pub(crate) fn signed_message(context: &[u8], body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(context.len() + body.len());
    m.extend_from_slice(context);
    m.extend_from_slice(body);
    m
}

fn message(body: &[u8]) -> Vec<u8> {
    signed_message(TICKET_CONTEXT, body)
}

impl SignedTicket {
    /// Signs `ticket`.
    pub fn sign(ticket: &Ticket, signer: &dyn TicketSigner) -> Result<SignedTicket, TicketError> {
        let body =
            postcard::to_stdvec(ticket).map_err(|e| TicketError::Malformed(e.to_string()))?;
        let signature = signer.sign(&message(&body)).map_err(TicketError::Sign)?;
        Ok(SignedTicket {
            body,
            signature,
            chain: signer.chain(),
        })
    }

    /// Checks sizes, the chain, the signature, the signer's role and the
    /// validity window at `now_unix` with `skew` seconds of tolerance.
    pub fn verify(
        &self,
        verifier: &dyn TicketVerifier,
        now_unix: u64,
        skew: u64,
    ) -> Result<VerifiedTicket, TicketError> {
        if self.body.len() > MAX_TICKET_BODY
            || self.signature.len() != 64
            || self.chain.is_empty()
            || self.chain.len() > MAX_CHAIN_LEN
            || self.chain.iter().any(|c| c.len() > MAX_CERT_LEN)
        {
            return Err(TicketError::Malformed("sizes out of bounds".into()));
        }
        let signer = verifier
            .verify_chain(&self.chain, now_unix)
            .map_err(TicketError::Chain)?;
        verifier
            .verify_signature(&self.chain[0], &message(&self.body), &self.signature)
            .map_err(|_| TicketError::Signature)?;
        if signer.role() != Role::Operator {
            return Err(TicketError::NotAnOperator(signer));
        }
        let (ticket, rest): (Ticket, &[u8]) = postcard::take_from_bytes(&self.body)
            .map_err(|e| TicketError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(TicketError::Malformed("trailing bytes".into()));
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
        Ok(VerifiedTicket { ticket, signer })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy scheme: the "chain" names the signer, the "signature" is a
    /// keyed BLAKE3 of the message under the signer's name.
    struct Toy(&'static str);

    fn toy_sig(who: &[u8], message: &[u8]) -> Vec<u8> {
        let mut key = [0u8; 32];
        key[..who.len().min(32)].copy_from_slice(&who[..who.len().min(32)]);
        let h = blake3::keyed_hash(&key, message);
        let mut s = h.as_bytes().to_vec();
        s.extend_from_slice(h.as_bytes());
        s
    }

    impl TicketSigner for Toy {
        fn chain(&self) -> Vec<Vec<u8>> {
            vec![self.0.as_bytes().to_vec()]
        }
        fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
            Ok(toy_sig(self.0.as_bytes(), message))
        }
    }

    struct ToyVerifier;

    impl TicketVerifier for ToyVerifier {
        fn verify_chain(&self, chain: &[Vec<u8>], _now: u64) -> Result<SpiffeId, String> {
            let s = std::str::from_utf8(&chain[0]).map_err(|e| e.to_string())?;
            if s.contains("untrusted") {
                return Err("unknown CA".into());
            }
            s.parse()
                .map_err(|e: crate::names::NameError| e.to_string())
        }
        fn verify_signature(&self, leaf: &[u8], message: &[u8], sig: &[u8]) -> Result<(), String> {
            (toy_sig(leaf, message) == sig)
                .then_some(())
                .ok_or("bad".into())
        }
    }

    fn ticket(now: u64) -> Ticket {
        Ticket {
            id: MigrationId([1; 16]),
            vm: "vm".parse().unwrap(),
            source: "spiffe://t/agent/a".parse().unwrap(),
            destination: "spiffe://t/agent/b".parse().unwrap(),
            plan: MigrationPlan::default(),
            issued_at: now,
            expires_at: now + 300,
            nonce: [9; 16],
        }
    }

    const OP: &str = "spiffe://t/operator/alice";

    #[test]
    fn signed_ticket_verifies_and_names_its_signer() {
        let t = SignedTicket::sign(&ticket(1000), &Toy(OP)).unwrap();
        let v = t.verify(&ToyVerifier, 1010, 60).unwrap();
        assert_eq!(v.ticket, ticket(1000));
        assert_eq!(v.signer.to_string(), OP);
    }

    #[test]
    fn each_check_fails_with_its_own_error() {
        let good = SignedTicket::sign(&ticket(1000), &Toy(OP)).unwrap();
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
        let agent = SignedTicket::sign(&ticket(1000), &Toy("spiffe://t/agent/a")).unwrap();
        assert!(matches!(
            agent.verify(&ToyVerifier, 1000, 60),
            Err(TicketError::NotAnOperator(_))
        ));
        let untrusted =
            SignedTicket::sign(&ticket(1000), &Toy("spiffe://untrusted/operator/x")).unwrap();
        assert!(matches!(
            untrusted.verify(&ToyVerifier, 1000, 60),
            Err(TicketError::Chain(_))
        ));
        let long = SignedTicket::sign(
            &Ticket {
                expires_at: 1000 + MAX_TICKET_LIFETIME_SECS + 1,
                ..ticket(1000)
            },
            &Toy(OP),
        )
        .unwrap();
        assert!(matches!(
            long.verify(&ToyVerifier, 1000, 60),
            Err(TicketError::Lifetime { .. })
        ));
        let mut huge = good.clone();
        huge.chain = vec![vec![0; 10]; MAX_CHAIN_LEN + 1];
        assert!(matches!(
            huge.verify(&ToyVerifier, 1000, 60),
            Err(TicketError::Malformed(_))
        ));
    }
}
