//! The handover of a store-and-forward migration: one create-only object,
//! `claims/<snapshot>`, decides where the VM runs. The destination, once
//! it has checked everything, writes a `Started` claim; the source, when
//! it gives up waiting (or is told to abort), writes an `Aborted` claim.
//! The object store creates an object only if it does not exist, so
//! exactly one of them wins: the destination starts the VM only if its
//! claim was written, the source resumes only if its claim was written,
//! and whoever lost reads the winner's claim — signed, so a bucket cannot
//! forge one — and acts on it. A bucket that holds something unreadable
//! there blocks both: the VM stays paused at the source (in doubt), never
//! runs twice and is never lost.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::digest::Digest;
use crate::names::{MigrationId, SpiffeId};
use crate::signed::{ChainVerifier, EnvelopeError, Signable, Signed};

use super::SnapshotId;

/// The context of a claim's signature.
pub const CLAIM_CONTEXT: &[u8] = b"convoy 2026-12 handover claim v1\0";

/// Who won the handover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// The destination started the VM.
    Started,
    /// The source took the VM back.
    Aborted,
}

/// A handover claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The migration (the ticket's id).
    pub migration: MigrationId,
    /// The snapshot handed over.
    pub snapshot: SnapshotId,
    /// Its manifest's digest.
    pub manifest: Digest,
    /// Who claims: the destination (`Started`) or the source (`Aborted`).
    pub by: SpiffeId,
    /// What.
    pub verdict: Verdict,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

impl Signable for Claim {
    const CONTEXT: &'static [u8] = CLAIM_CONTEXT;
    const MAX_BODY: usize = 1024;
}

/// A claim with its signature and chain.
pub type SignedClaim = Signed<Claim>;

/// The claim object of `snapshot`.
pub fn claim_object(snapshot: &SnapshotId) -> String {
    format!("claims/{snapshot}")
}

/// Why a claim was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ClaimError {
    /// Its envelope, chain or signature.
    #[error("claim: {0}")]
    Envelope(#[from] EnvelopeError),
    /// Signed by another than the agent it names.
    #[error("a claim naming {by} is signed by {signer}")]
    Signer {
        /// Who it names.
        by: SpiffeId,
        /// Who signed.
        signer: SpiffeId,
    },
    /// About another handover.
    #[error("the claim is about {what} {got}, not {expected}")]
    Other {
        /// `migration`, `snapshot` or `manifest`.
        what: &'static str,
        /// What it says.
        got: String,
        /// What this handover is.
        expected: String,
    },
    /// By the wrong side for its verdict.
    #[error("a {verdict:?} claim by {by}: only the {side} may make one")]
    WrongSide {
        /// The verdict.
        verdict: Verdict,
        /// Who made it.
        by: SpiffeId,
        /// `destination` or `source`.
        side: &'static str,
    },
}

/// The handover a claim must be about.
#[derive(Debug, Clone, Copy)]
pub struct Handover<'a> {
    /// The migration.
    pub migration: MigrationId,
    /// The snapshot.
    pub snapshot: SnapshotId,
    /// Its manifest's digest.
    pub manifest: Digest,
    /// The source agent.
    pub source: &'a SpiffeId,
    /// The destination agent.
    pub destination: &'a SpiffeId,
}

/// Opens `signed` as a claim on `h`: chain, signature, signer, the
/// handover it is about, and the side that may make its verdict.
pub fn open_claim(
    signed: &SignedClaim,
    verifier: &dyn ChainVerifier,
    h: &Handover<'_>,
) -> Result<Claim, ClaimError> {
    let (c, signer) = signed.open_at_claimed(verifier, |c: &Claim| c.at)?;
    if signer != c.by {
        return Err(ClaimError::Signer { by: c.by, signer });
    }
    let other = |what, got: String, expected: String| {
        Err(ClaimError::Other {
            what,
            got,
            expected,
        })
    };
    if c.migration != h.migration {
        return other(
            "migration",
            c.migration.to_string(),
            h.migration.to_string(),
        );
    }
    if c.snapshot != h.snapshot {
        return other("snapshot", c.snapshot.to_string(), h.snapshot.to_string());
    }
    if c.manifest != h.manifest {
        return other("manifest", c.manifest.to_hex(), h.manifest.to_hex());
    }
    let (side, expected) = match c.verdict {
        Verdict::Started => ("destination", h.destination),
        Verdict::Aborted => ("source", h.source),
    };
    if &c.by != expected {
        return Err(ClaimError::WrongSide {
            verdict: c.verdict,
            by: c.by,
            side,
        });
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::fuzz::InsecureCrypto;

    const A: &str = "spiffe://lab/agent/a";
    const B: &str = "spiffe://lab/agent/b";

    fn claim(by: &str, verdict: Verdict) -> Claim {
        Claim {
            migration: MigrationId([1; 16]),
            snapshot: SnapshotId([2; 16]),
            manifest: Digest([3; 32]),
            by: by.parse().unwrap(),
            verdict,
            at: 1_700_000_000,
        }
    }

    #[test]
    fn only_the_right_side_signs_its_verdict_about_this_handover() {
        let (a, b): (SpiffeId, SpiffeId) = (A.parse().unwrap(), B.parse().unwrap());
        let h = Handover {
            migration: MigrationId([1; 16]),
            snapshot: SnapshotId([2; 16]),
            manifest: Digest([3; 32]),
            source: &a,
            destination: &b,
        };
        let v = InsecureCrypto(String::new());
        let sign =
            |c: &Claim, signer: &str| Signed::sign(c, &InsecureCrypto(signer.into())).unwrap();
        assert_eq!(
            open_claim(&sign(&claim(B, Verdict::Started), B), &v, &h)
                .unwrap()
                .verdict,
            Verdict::Started
        );
        assert_eq!(
            open_claim(&sign(&claim(A, Verdict::Aborted), A), &v, &h)
                .unwrap()
                .verdict,
            Verdict::Aborted
        );
        // The source cannot claim the destination started, nor the reverse.
        assert!(matches!(
            open_claim(&sign(&claim(A, Verdict::Started), A), &v, &h),
            Err(ClaimError::WrongSide { .. })
        ));
        assert!(matches!(
            open_claim(&sign(&claim(B, Verdict::Aborted), B), &v, &h),
            Err(ClaimError::WrongSide { .. })
        ));
        // Signed by another than it names.
        assert!(matches!(
            open_claim(&sign(&claim(B, Verdict::Started), A), &v, &h),
            Err(ClaimError::Signer { .. })
        ));
        // About another snapshot.
        let mut c = claim(B, Verdict::Started);
        c.snapshot = SnapshotId([9; 16]);
        assert!(matches!(
            open_claim(&sign(&c, B), &v, &h),
            Err(ClaimError::Other {
                what: "snapshot",
                ..
            })
        ));
    }
}
