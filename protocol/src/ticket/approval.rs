//! Approval of one ticket by several parties.
//!
//! A ticket may name the parties that must approve it
//! ([`Ticket::approvers`]): a role (`tenant`, `donor`, `recipient`) or a
//! named operator, possibly of a federated trust domain. `convoyctl ticket
//! request` writes the ticket unsigned; each party signs an [`Approval`] of
//! its [`request_digest`] (the ticket without its approvals); the
//! submitting operator signs the ticket with the approvals inside, and both
//! agents (and anyone checking evidence later) verify every approval
//! offline ([`check`]).
//!
//! What is counted is **distinct keys**: two approvals by one key (under
//! two certificates, or two names) are refused as a duplicate, as are two
//! by one name, so N approvals are N parties. Each requirement is met by
//! its own approval (a matching, not a count of signatures). An approval is
//! refused when it is for another ticket, by a revoked, expired or
//! untrusted certificate, by something other than an operator, by an
//! identity the ticket names in no requirement, or in a role its signer
//! does not hold (a donor is an operator of the source's trust domain, a
//! recipient of the destination's; who is a tenant the agent's inventory
//! says). The policy then sees the set of approving principals and roles.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::Ticket;
use crate::digest::Digest;
use crate::names::{Role, SpiffeId};
use crate::signed::{ChainVerifier, EnvelopeError, Signable, SignatureError, Signed};

/// Signatures over approvals cover this prefix and then the approval.
pub const APPROVAL_CONTEXT: &[u8] = b"convoy ticket approval v1\0";
/// Largest encoded approval body.
pub const MAX_APPROVAL_BODY: usize = 128;
/// Most requirements a ticket may name.
pub const MAX_APPROVERS: usize = 8;
/// Most approvals a ticket may carry.
pub const MAX_APPROVALS: usize = 8;

/// The role a party approves in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ApprovalRole {
    /// The VM's owner (an operator of the VM's tenant, by the agent's
    /// inventory).
    Tenant,
    /// The provider the VM leaves: an operator of the source agent's
    /// trust domain.
    Donor,
    /// The provider the VM joins: an operator of the destination agent's
    /// trust domain.
    Recipient,
}

impl ApprovalRole {
    /// The name policies and the command line use.
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalRole::Tenant => "tenant",
            ApprovalRole::Donor => "donor",
            ApprovalRole::Recipient => "recipient",
        }
    }
}

impl fmt::Display for ApprovalRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is none of `tenant`, `donor`, `recipient`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown approval role {0:?} (tenant, donor or recipient)")]
pub struct UnknownApprovalRole(pub String);

impl FromStr for ApprovalRole {
    type Err = UnknownApprovalRole;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tenant" => Ok(ApprovalRole::Tenant),
            "donor" => Ok(ApprovalRole::Donor),
            "recipient" => Ok(ApprovalRole::Recipient),
            _ => Err(UnknownApprovalRole(s.into())),
        }
    }
}

/// Who must approve a ticket: any operator in a role, or one operator.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Approver {
    /// An operator approving in this role.
    Role(ApprovalRole),
    /// This operator (in any role, or none).
    Operator(SpiffeId),
}

impl Approver {
    /// Whether an approval by `who` in `role` meets this requirement.
    pub fn admits(&self, who: &SpiffeId, role: Option<ApprovalRole>) -> bool {
        match self {
            Approver::Role(r) => role == Some(*r),
            Approver::Operator(id) => id == who,
        }
    }
}

impl fmt::Display for Approver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Approver::Role(r) => write!(f, "a {r}"),
            Approver::Operator(id) => write!(f, "{id}"),
        }
    }
}

/// Why a requirement does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("approver {0:?} is neither tenant, donor, recipient nor an operator's spiffe:// ID")]
pub struct BadApprover(pub String);

impl FromStr for Approver {
    type Err = BadApprover;
    /// `tenant`, `donor`, `recipient`, or an operator's SPIFFE ID.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(r) = s.parse() {
            return Ok(Approver::Role(r));
        }
        match s.parse::<SpiffeId>() {
            Ok(id) if id.role() == Role::Operator => Ok(Approver::Operator(id)),
            _ => Err(BadApprover(s.into())),
        }
    }
}

/// One party's approval of one ticket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// The [`request_digest`] of the ticket approved.
    pub request: Digest,
    /// The role the signer approves in, if any.
    pub role: Option<ApprovalRole>,
    /// When, as the signer's clock said (seconds since the Unix epoch).
    pub approved_at: u64,
}

impl Signable for Approval {
    const CONTEXT: &'static [u8] = APPROVAL_CONTEXT;
    const MAX_BODY: usize = MAX_APPROVAL_BODY;
}

/// An approval, its signature and the approver's certificate chain.
pub type SignedApproval = Signed<Approval>;

/// What approvals sign: the ticket with no approvals, so approvals can be
/// gathered in any order and each covers every field, the requirements
/// included.
pub fn request_digest(ticket: &Ticket) -> Result<Digest, postcard::Error> {
    let mut bare = ticket.clone();
    bare.approvals.clear();
    let body = postcard::to_stdvec(&bare)?;
    let mut h = blake3::Hasher::new_derive_key("convoy 2026-12 ticket request digest v1");
    h.update(&(body.len() as u64).to_le_bytes());
    h.update(&body);
    Ok(Digest(*h.finalize().as_bytes()))
}

/// `signer`'s approval of `ticket` in `role`, at `at_unix` (seconds since
/// the Unix epoch).
pub fn approval_for(
    ticket: &Ticket,
    role: Option<ApprovalRole>,
    at_unix: u64,
    signer: &dyn crate::signed::Signer,
) -> Result<SignedApproval, crate::signed::SignError> {
    let request = request_digest(ticket).map_err(crate::signed::SignError::Encode)?;
    SignedApproval::sign(
        &Approval {
            request,
            role,
            approved_at: at_unix,
        },
        signer,
    )
}

/// One approval that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedApproval {
    /// Who approved.
    pub principal: SpiffeId,
    /// In which role, if any.
    pub role: Option<ApprovalRole>,
    /// A digest of the approver's public key: what makes two approvals
    /// two parties.
    pub key: Digest,
    /// When, as the approver claimed.
    pub approved_at: u64,
}

/// The approvals of a ticket, each verified, each by its own key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Approvals(pub Vec<VerifiedApproval>);

impl Approvals {
    /// The approving operators.
    pub fn principals(&self) -> BTreeSet<SpiffeId> {
        self.0.iter().map(|a| a.principal.clone()).collect()
    }

    /// The roles approved in.
    pub fn roles(&self) -> BTreeSet<ApprovalRole> {
        self.0.iter().filter_map(|a| a.role).collect()
    }

    /// How many distinct keys approved.
    pub fn count(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Why a ticket's approvals are refused; each names the approval (by its
/// place in the ticket, from 0) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ApprovalError {
    /// More requirements or approvals than allowed.
    #[error("ticket has {len} {what}, more than {max}")]
    TooMany {
        /// "approvers" or "approvals".
        what: &'static str,
        /// How many.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// The ticket itself does not encode (so has no digest).
    #[error("cannot encode the ticket: {0}")]
    Encode(String),
    /// The envelope is malformed, the chain refused (revoked, expired,
    /// untrusted) or the signature wrong.
    #[error("approval {index}: {error}")]
    Envelope {
        /// Which approval.
        index: usize,
        /// What failed.
        error: EnvelopeError,
    },
    /// The approver's public key cannot be read.
    #[error("approval {index}: {error}")]
    Key {
        /// Which approval.
        index: usize,
        /// What failed.
        error: SignatureError,
    },
    /// Signed by an agent, not an operator.
    #[error("approval {index} by {principal}, which is not an operator")]
    NotAnOperator {
        /// Which approval.
        index: usize,
        /// Its signer.
        principal: SpiffeId,
    },
    /// It approves another ticket (or this one with other fields).
    #[error("approval {index} by {principal} is for another ticket ({}, this one is {})", .digests[0], .digests[1])]
    OtherTicket {
        /// Which approval.
        index: usize,
        /// Its signer.
        principal: SpiffeId,
        /// The digest it approves, and this ticket's request digest.
        digests: Box<[Digest; 2]>,
    },
    /// A second approval by a key or a name that already approved.
    #[error("approval {index} by {principal} duplicates approval {first} ({why})")]
    Duplicate {
        /// Which approval.
        index: usize,
        /// Its signer.
        principal: SpiffeId,
        /// The approval it duplicates.
        first: usize,
        /// "same key" or "same operator".
        why: &'static str,
    },
    /// The signer claims a role it does not hold.
    #[error(
        "approval {index} by {principal} as {role}, but a {role} is an operator of {expected}"
    )]
    RoleNotHeld {
        /// Which approval.
        index: usize,
        /// Its signer.
        principal: SpiffeId,
        /// The role claimed.
        role: ApprovalRole,
        /// The trust domain the role's operators come from.
        expected: String,
    },
    /// The signer meets none of the ticket's requirements.
    #[error("approval {index} by {principal}{} meets none of the ticket's approvers ({})",
        .role.map(|r| format!(" as {r}")).unwrap_or_default(), list(.approvers))]
    Unnamed {
        /// Which approval.
        index: usize,
        /// Its signer.
        principal: SpiffeId,
        /// The role claimed.
        role: Option<ApprovalRole>,
        /// What the ticket requires.
        approvers: Vec<Approver>,
    },
    /// Requirements no distinct approval meets.
    #[error("ticket still needs the approval of {}", list(.missing))]
    Missing {
        /// The requirements left.
        missing: Vec<Approver>,
    },
}

fn list(a: &[Approver]) -> String {
    if a.is_empty() {
        return "none".into();
    }
    a.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether an approval by `principal` in `role` could count for `ticket`:
/// the role is one the principal holds (a donor is of the source's trust
/// domain, a recipient of the destination's) and the ticket names it in a
/// requirement. Signatures, keys and duplicates are [`check`]'s.
pub fn admissible(
    ticket: &Ticket,
    principal: &SpiffeId,
    role: Option<ApprovalRole>,
) -> Result<(), ApprovalError> {
    admissible_at(ticket, ticket.approvals.len(), principal, role)
}

fn admissible_at(
    ticket: &Ticket,
    index: usize,
    principal: &SpiffeId,
    role: Option<ApprovalRole>,
) -> Result<(), ApprovalError> {
    let domain_of_role = match role {
        Some(ApprovalRole::Donor) => Some(ticket.source.domain()),
        Some(ApprovalRole::Recipient) => Some(ticket.destination.domain()),
        Some(ApprovalRole::Tenant) | None => None,
    };
    if let (Some(role), Some(domain)) = (role, domain_of_role) {
        if principal.domain() != domain {
            return Err(ApprovalError::RoleNotHeld {
                index,
                principal: principal.clone(),
                role,
                expected: domain.to_string(),
            });
        }
    }
    if !ticket.approvers.iter().any(|r| r.admits(principal, role)) {
        return Err(ApprovalError::Unnamed {
            index,
            principal: principal.clone(),
            role,
            approvers: ticket.approvers.clone(),
        });
    }
    Ok(())
}

/// Verifies every approval of `ticket`, then that its requirements are
/// met by distinct approvals: the approvals, or the first thing wrong.
///
/// Each approver's chain is checked (revocation included) at the time the
/// approval claims, brought into the ticket's validity window: an approval
/// stays good when its certificate expires after it was given (short-lived
/// certificates renew), and checks the same offline, later, in evidence;
/// a key whose certificate was never valid within the window cannot
/// approve by backdating, and a revoked one never can.
pub fn check(ticket: &Ticket, verifier: &dyn ChainVerifier) -> Result<Approvals, ApprovalError> {
    for (what, len, max) in [
        ("approvers", ticket.approvers.len(), MAX_APPROVERS),
        ("approvals", ticket.approvals.len(), MAX_APPROVALS),
    ] {
        if len > max {
            return Err(ApprovalError::TooMany { what, len, max });
        }
    }
    if ticket.approvers.is_empty() && ticket.approvals.is_empty() {
        return Ok(Approvals::default());
    }
    let expected = request_digest(ticket).map_err(|e| ApprovalError::Encode(e.to_string()))?;
    let mut out: Vec<VerifiedApproval> = Vec::with_capacity(ticket.approvals.len());
    for (index, signed) in ticket.approvals.iter().enumerate() {
        let window = |a: &Approval| {
            a.approved_at
                .clamp(ticket.issued_at, ticket.expires_at.max(ticket.issued_at))
        };
        let (approval, principal) = signed
            .open_at_claimed(verifier, window)
            .map_err(|error| ApprovalError::Envelope { index, error })?;
        if principal.role() != Role::Operator {
            return Err(ApprovalError::NotAnOperator { index, principal });
        }
        if approval.request != expected {
            return Err(ApprovalError::OtherTicket {
                index,
                principal,
                digests: Box::new([approval.request, expected]),
            });
        }
        // `open` checked that the chain has a leaf.
        let leaf = signed.chain.first().map_or(&[][..], Vec::as_slice);
        let key = verifier
            .public_key(leaf)
            .map_err(|error| ApprovalError::Key { index, error })?;
        let key = Digest(*blake3::hash(&key).as_bytes());
        for (first, a) in out.iter().enumerate() {
            let why = if a.key == key {
                "same key"
            } else if a.principal == principal {
                "same operator"
            } else {
                continue;
            };
            return Err(ApprovalError::Duplicate {
                index,
                principal,
                first,
                why,
            });
        }
        admissible_at(ticket, index, &principal, approval.role)?;
        out.push(VerifiedApproval {
            principal,
            role: approval.role,
            key,
            approved_at: approval.approved_at,
        });
    }
    let missing = unmet(&ticket.approvers, &out);
    if !missing.is_empty() {
        return Err(ApprovalError::Missing { missing });
    }
    Ok(Approvals(out))
}

/// The requirements left over by a largest matching of requirements to
/// approvals, each approval meeting at most one (Kuhn's augmenting paths;
/// both sides are at most eight).
fn unmet(approvers: &[Approver], approvals: &[VerifiedApproval]) -> Vec<Approver> {
    fn augment(
        r: usize,
        approvers: &[Approver],
        approvals: &[VerifiedApproval],
        owner: &mut [Option<usize>],
        visited: &mut [bool],
    ) -> bool {
        for (a, approval) in approvals.iter().enumerate() {
            if visited[a] || !approvers[r].admits(&approval.principal, approval.role) {
                continue;
            }
            visited[a] = true;
            let free = match owner[a] {
                None => true,
                Some(other) => augment(other, approvers, approvals, owner, visited),
            };
            if free {
                owner[a] = Some(r);
                return true;
            }
        }
        false
    }
    let mut owner = vec![None; approvals.len()];
    let mut missing = Vec::new();
    for (r, approver) in approvers.iter().enumerate() {
        let mut visited = vec![false; approvals.len()];
        if !augment(r, approvers, approvals, &mut owner, &mut visited) {
            missing.push(approver.clone());
        }
    }
    missing
}
