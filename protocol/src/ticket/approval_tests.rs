//! Approvals by several parties: what counts, and each way one is refused.
#![allow(clippy::unwrap_used)]

use super::approval::{
    check, request_digest, Approval, ApprovalError, ApprovalRole, Approver, SignedApproval,
};
use super::{SignedTicket, Ticket, TicketError};
use crate::model::MigrationPlan;
use crate::names::{MigrationId, SpiffeId};
use crate::signed::{ChainError, ChainVerifier, EnvelopeError, SignError, SignatureError, Signer};

/// A signer whose "certificate" is `ID|KEY`: two names may share a key,
/// one name may hold two keys. A "signature" is a keyed hash under KEY.
struct Party {
    id: String,
    key: String,
}

fn party(id: &str, key: &str) -> Party {
    Party {
        id: id.into(),
        key: key.into(),
    }
}

fn mac(key: &[u8], message: &[u8]) -> Vec<u8> {
    let k = blake3::hash(key);
    let h = blake3::keyed_hash(k.as_bytes(), message);
    [h.as_bytes().as_slice(), h.as_bytes().as_slice()].concat()
}

impl Signer for Party {
    fn chain(&self) -> Vec<Vec<u8>> {
        vec![format!("{}|{}", self.id, self.key).into_bytes()]
    }
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        Ok(mac(self.key.as_bytes(), message))
    }
}

/// Trusts every domain but `untrusted`; the key `revoked` is revoked, a
/// key `until-T` has a certificate that expires at T.
struct Keys;

fn split(leaf: &[u8]) -> (&str, &str) {
    let s = std::str::from_utf8(leaf).unwrap();
    s.split_once('|').unwrap()
}

impl ChainVerifier for Keys {
    fn verify_chain(&self, chain: &[Vec<u8>], now: u64) -> Result<SpiffeId, ChainError> {
        let (id, key) = split(chain.first().ok_or(ChainError::Empty)?);
        let id: SpiffeId = id.parse().unwrap();
        if key == "revoked" {
            return Err(ChainError::Revoked);
        }
        if let Some(until) = key.strip_prefix("until-") {
            if now >= until.parse::<u64>().unwrap() {
                return Err(ChainError::Expired);
            }
        }
        if id.domain().to_string() == "untrusted" {
            return Err(ChainError::UnknownIssuer { id });
        }
        Ok(id)
    }
    fn verify_signature(&self, leaf: &[u8], m: &[u8], sig: &[u8]) -> Result<(), SignatureError> {
        let (_, key) = split(leaf);
        (mac(key.as_bytes(), m) == sig)
            .then_some(())
            .ok_or(SignatureError::Invalid)
    }
    fn public_key(&self, leaf: &[u8]) -> Result<Vec<u8>, SignatureError> {
        Ok(split(leaf).1.as_bytes().to_vec())
    }
}

const NOW: u64 = 1_000_000;

/// A move from provider `donor.example` to `recipient.example`.
fn request(approvers: &[&str]) -> Ticket {
    Ticket {
        id: MigrationId([7; 16]),
        vm: "web".parse().unwrap(),
        subject: crate::vm::VmSubject::plain(1 << 20),
        source: "spiffe://donor.example/agent/a".parse().unwrap(),
        destination: "spiffe://recipient.example/agent/b".parse().unwrap(),
        plan: MigrationPlan::default(),
        issued_at: NOW,
        expires_at: NOW + 3600,
        nonce: [5; 16],
        approvers: approvers.iter().map(|a| a.parse().unwrap()).collect(),
        approvals: Vec::new(),
    }
}

fn approve(t: &Ticket, who: &Party, role: Option<&str>) -> SignedApproval {
    SignedApproval::sign(
        &Approval {
            request: request_digest(t).unwrap(),
            role: role.map(|r| r.parse().unwrap()),
            approved_at: NOW + 10,
        },
        who,
    )
    .unwrap()
}

const TENANT: &str = "spiffe://donor.example/operator/tina";
const DONOR: &str = "spiffe://donor.example/operator/dora";
const RECIPIENT: &str = "spiffe://recipient.example/operator/rex";

/// The three-party ticket, approved by tenant, donor and recipient.
fn three() -> Ticket {
    let mut t = request(&["tenant", "donor", "recipient"]);
    t.approvals = vec![
        approve(&t, &party(TENANT, "kt"), Some("tenant")),
        approve(&t, &party(DONOR, "kd"), Some("donor")),
        approve(&t, &party(RECIPIENT, "kr"), Some("recipient")),
    ];
    t
}

#[test]
fn three_parties_approve_and_the_ticket_verifies_with_their_roles() {
    let t = three();
    let submitter = party("spiffe://donor.example/operator/tina", "kt");
    let signed = SignedTicket::sign(&t, &submitter).unwrap();
    let v = signed.verify(&Keys, NOW + 20, 60).unwrap();
    assert_eq!(v.approvals.count(), 3);
    assert_eq!(
        v.approvals.roles().into_iter().collect::<Vec<_>>(),
        [
            ApprovalRole::Tenant,
            ApprovalRole::Donor,
            ApprovalRole::Recipient
        ]
    );
    let who: Vec<String> = v
        .approvals
        .principals()
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(who, [DONOR, TENANT, RECIPIENT]);
    // A ticket with no approvers and no approvals needs none.
    let plain = request(&[]);
    assert!(check(&plain, &Keys).unwrap().is_empty());
}

#[test]
fn a_missing_party_is_named() {
    let mut t = three();
    t.approvals.remove(0);
    assert_eq!(
        check(&t, &Keys),
        Err(ApprovalError::Missing {
            missing: vec![Approver::Role(ApprovalRole::Tenant)]
        })
    );
    // Through the signed ticket, the same error.
    let signed = SignedTicket::sign(&t, &party(DONOR, "kd")).unwrap();
    let Err(TicketError::Approval(e)) = signed.verify(&Keys, NOW, 60) else {
        panic!("verified without the tenant");
    };
    assert!(matches!(*e, ApprovalError::Missing { .. }), "{e}");
}

#[test]
fn distinct_keys_are_counted_not_entries_names_or_certificates() {
    // The same approval twice.
    let mut t = three();
    let again = t.approvals[1].clone();
    t.approvals.push(again);
    assert!(matches!(
        check(&t, &Keys),
        Err(ApprovalError::Duplicate {
            index: 3,
            first: 1,
            why: "same key",
            ..
        })
    ));
    // One key under two names: the tenant's key signs as the donor too.
    let mut t = request(&["tenant", "donor", "recipient"]);
    t.approvals = vec![
        approve(&t, &party(TENANT, "k1"), Some("tenant")),
        approve(&t, &party(DONOR, "k1"), Some("donor")),
        approve(&t, &party(RECIPIENT, "kr"), Some("recipient")),
    ];
    assert!(matches!(
        check(&t, &Keys),
        Err(ApprovalError::Duplicate {
            index: 1,
            first: 0,
            why: "same key",
            ..
        })
    ));
    // One name with two keys (two certificates) counts once.
    let mut t = request(&["donor", "donor"]);
    t.approvals = vec![
        approve(&t, &party(DONOR, "k1"), Some("donor")),
        approve(&t, &party(DONOR, "k2"), Some("donor")),
    ];
    assert!(matches!(
        check(&t, &Keys),
        Err(ApprovalError::Duplicate {
            index: 1,
            why: "same operator",
            ..
        })
    ));
    // Two donors, two keys: two approvals.
    let other = "spiffe://donor.example/operator/otto";
    let mut t = request(&["donor", "donor"]);
    t.approvals = vec![
        approve(&t, &party(DONOR, "k1"), Some("donor")),
        approve(&t, &party(other, "k2"), Some("donor")),
    ];
    assert_eq!(check(&t, &Keys).unwrap().count(), 2);
}

#[test]
fn each_requirement_needs_its_own_approval() {
    // Dora is named and is the donor: one approval cannot meet both.
    let mut t = request(&["donor", DONOR]);
    t.approvals = vec![approve(&t, &party(DONOR, "kd"), Some("donor"))];
    assert_eq!(
        check(&t, &Keys),
        Err(ApprovalError::Missing {
            missing: vec![Approver::Operator(DONOR.parse().unwrap())]
        })
    );
    // Another donor's approval: the matching gives Dora's to her name
    // whichever order they come in.
    let otto = "spiffe://donor.example/operator/otto";
    for order in [[0, 1], [1, 0]] {
        let mut t = request(&["donor", DONOR]);
        let all = [
            approve(&t, &party(DONOR, "kd"), Some("donor")),
            approve(&t, &party(otto, "ko"), Some("donor")),
        ];
        t.approvals = order.iter().map(|&i| all[i].clone()).collect();
        assert_eq!(check(&t, &Keys).unwrap().count(), 2);
    }
}

#[test]
fn an_approval_of_another_ticket_or_of_this_one_altered_is_refused() {
    let mut t = three();
    let other = request(&["tenant", "donor", "recipient"]);
    let other = Ticket {
        nonce: [6; 16],
        ..other
    };
    t.approvals[2] = approve(&other, &party(RECIPIENT, "kr"), Some("recipient"));
    assert!(matches!(
        check(&t, &Keys),
        Err(ApprovalError::OtherTicket { index: 2, .. })
    ));
    // Any field changed after approval (a requirement dropped, the plan,
    // the destination) invalidates every approval.
    let mut t = three();
    t.approvers.pop();
    assert!(matches!(
        check(&t, &Keys),
        Err(ApprovalError::OtherTicket { index: 0, .. })
    ));
    let mut t = three();
    t.plan.force_stop = !t.plan.force_stop;
    assert!(matches!(
        check(&t, &Keys),
        Err(ApprovalError::OtherTicket { index: 0, .. })
    ));
}

#[test]
fn revoked_untrusted_forged_and_agent_approvals_are_refused() {
    let mut t = three();
    t.approvals[1] = approve(&t, &party(DONOR, "revoked"), Some("donor"));
    assert!(matches!(
        check(&t, &Keys),
        Err(ApprovalError::Envelope {
            index: 1,
            error: EnvelopeError::Chain(ChainError::Revoked)
        })
    ));
    let mut t = request(&["spiffe://untrusted/operator/eve"]);
    t.approvals = vec![approve(
        &t,
        &party("spiffe://untrusted/operator/eve", "ke"),
        None,
    )];
    assert!(matches!(
        check(&t, &Keys),
        Err(ApprovalError::Envelope {
            error: EnvelopeError::Chain(ChainError::UnknownIssuer { .. }),
            ..
        })
    ));
    let mut t = three();
    t.approvals[0].signature[0] ^= 1;
    assert!(matches!(
        check(&t, &Keys),
        Err(ApprovalError::Envelope {
            index: 0,
            error: EnvelopeError::Signature(_)
        })
    ));
    let mut t = request(&["donor"]);
    t.approvals = vec![approve(
        &t,
        &party("spiffe://donor.example/agent/a", "ka"),
        Some("donor"),
    )];
    assert!(matches!(
        check(&t, &Keys),
        Err(ApprovalError::NotAnOperator { .. })
    ));
}

#[test]
fn unnamed_approvers_and_roles_not_held_are_refused() {
    // Mallory is named nowhere and claims no role.
    let mallory = "spiffe://donor.example/operator/mallory";
    let mut t = three();
    t.approvals.push(approve(&t, &party(mallory, "km"), None));
    let e = check(&t, &Keys).unwrap_err();
    assert!(matches!(e, ApprovalError::Unnamed { index: 3, .. }), "{e}");
    assert!(e.to_string().contains("mallory"), "{e}");
    // The recipient's operator cannot approve as the donor.
    let mut t = request(&["donor"]);
    t.approvals = vec![approve(&t, &party(RECIPIENT, "kr"), Some("donor"))];
    let e = check(&t, &Keys).unwrap_err();
    assert!(
        matches!(
            e,
            ApprovalError::RoleNotHeld {
                role: ApprovalRole::Donor,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("donor.example"), "{e}");
}

#[test]
fn an_approval_is_checked_when_it_was_given_within_the_ticket_s_window() {
    // The recipient's short-lived certificate expired after it approved:
    // the ticket still verifies at submission, and offline later.
    let mut t = request(&["donor", "recipient"]);
    let short = party(RECIPIENT, &format!("until-{}", NOW + 100));
    t.approvals = vec![
        approve(&t, &party(DONOR, "kd"), Some("donor")),
        approve(&t, &short, Some("recipient")),
    ];
    let signed = SignedTicket::sign(&t, &party(DONOR, "kd")).unwrap();
    assert_eq!(
        signed
            .verify(&Keys, NOW + 1000, 60)
            .unwrap()
            .approvals
            .count(),
        2
    );
    // A certificate that expired before the ticket was requested cannot
    // approve by backdating: its time is brought into the window.
    let old = party(RECIPIENT, &format!("until-{}", NOW - 1));
    let backdated = SignedApproval::sign(
        &Approval {
            request: request_digest(&t).unwrap(),
            role: Some("recipient".parse().unwrap()),
            approved_at: NOW - 3600,
        },
        &old,
    )
    .unwrap();
    t.approvals[1] = backdated;
    assert!(matches!(
        check(&t, &Keys),
        Err(ApprovalError::Envelope {
            index: 1,
            error: EnvelopeError::Chain(ChainError::Expired)
        })
    ));
}

#[test]
fn bounds_and_names_parse() {
    let mut t = request(&["donor"; 9]);
    assert!(matches!(
        check(&t, &Keys),
        Err(ApprovalError::TooMany {
            what: "approvers",
            ..
        })
    ));
    t.approvers.truncate(1);
    let a = approve(&t, &party(DONOR, "kd"), Some("donor"));
    t.approvals = vec![a; 9];
    assert!(matches!(
        check(&t, &Keys),
        Err(ApprovalError::TooMany {
            what: "approvals",
            ..
        })
    ));
    assert!("auditor".parse::<Approver>().is_err());
    assert!(
        "spiffe://x/agent/a".parse::<Approver>().is_err(),
        "agents do not approve"
    );
    assert_eq!(
        "spiffe://x/operator/o".parse::<Approver>().unwrap(),
        Approver::Operator("spiffe://x/operator/o".parse().unwrap())
    );
}
