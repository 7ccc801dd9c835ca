//! Bundles built from honest logs verify offline; every tampering is
//! refused with the side and record named.

use super::*;
use crate::audit::{append, encode_entry, verify_log, AuditRecord, LogEntry, VerifiedLog};
use crate::digest::Digest;
use crate::fuzz::InsecureCrypto;
use crate::logtree::{LogTree, ProofError};
use crate::receipt::{ticket_digest, ReceiptKind, SignedReceipt};
use crate::signed::Signer;
use crate::ticket::{SignedTicket, TicketError};

const A: &str = "spiffe://t/agent/a";
const B: &str = "spiffe://t/agent/b";
const OP: &str = "spiffe://t/operator/alice";

fn mid(n: u8) -> MigrationId {
    MigrationId([n; 16])
}

fn ticket_as(n: u8, signer: &str) -> SignedTicket {
    let t = Ticket {
        id: mid(n),
        vm: "vm".parse().unwrap(),
        subject: crate::vm::VmSubject::plain(1 << 20),
        source: A.parse().unwrap(),
        destination: B.parse().unwrap(),
        plan: crate::model::MigrationPlan {
            streams: 1,
            ..Default::default()
        },
        issued_at: 1000,
        expires_at: 1300,
        nonce: [n; 16],
        approvers: Vec::new(),
        approvals: Vec::new(),
    };
    SignedTicket::sign(&t, &InsecureCrypto(signer.into())).unwrap()
}

fn ticket(n: u8) -> SignedTicket {
    ticket_as(n, OP)
}

/// A receipt of `kind` for migration `n`, attesting memory root `root`.
fn receipt(kind: ReceiptKind, signer: &str, n: u8, root: u8) -> SignedReceipt {
    let state = (kind != ReceiptKind::Accepted).then_some((Digest([root; 32]), Digest([9; 32])));
    let r = Receipt {
        kind,
        migration: mid(n),
        ticket: ticket_digest(&ticket(n)),
        memory_root: state.map(|s| s.0),
        device: state.map(|s| s.1),
        at_unix: 1010,
    };
    SignedReceipt::sign(&r, &InsecureCrypto(signer.into())).unwrap()
}

/// What each side logs of migration `n`, with the receipts given.
fn events(side: Side, n: u8, receipts: &[SignedReceipt]) -> Vec<AuditEvent> {
    let (peer, outcome) = match side {
        Side::Source => (B, "completed"),
        Side::Destination => (A, "started"),
    };
    let mut v = vec![
        AuditEvent::TicketAccepted {
            migration: mid(n),
            vm: "vm".parse().unwrap(),
            operator: OP.parse().unwrap(),
            peer: peer.parse().unwrap(),
            role: side.to_string(),
        },
        AuditEvent::Ticket(ticket(n)),
    ];
    v.extend(receipts.iter().cloned().map(AuditEvent::Receipt));
    v.push(AuditEvent::Outcome {
        migration: mid(n),
        vm: "vm".parse().unwrap(),
        outcome: outcome.into(),
    });
    v
}

/// The four honest receipts of migration `n`.
fn honest(n: u8) -> Vec<SignedReceipt> {
    vec![
        receipt(ReceiptKind::Accepted, B, n, 0),
        receipt(ReceiptKind::Ready, B, n, 7),
        receipt(ReceiptKind::Sent, A, n, 7),
        receipt(ReceiptKind::Started, B, n, 7),
    ]
}

/// A verified log of `agent` holding `events` after an agent start.
fn log(agent: &str, events: Vec<AuditEvent>) -> VerifiedLog {
    let c = InsecureCrypto(agent.into());
    let mut bytes = encode_entry(&LogEntry::Header {
        chain: c.chain(),
        at_unix: 900,
    })
    .unwrap();
    let mut tree = LogTree::new();
    let start = AuditEvent::AgentStarted {
        version: "test".into(),
    };
    for (seq, e) in (0..).zip(std::iter::once(start).chain(events)) {
        for entry in append(&mut tree, seq, 1000 + seq, e, &c).unwrap() {
            bytes.extend(encode_entry(&entry).unwrap());
        }
    }
    verify_log(&bytes, &c).unwrap()
}

/// Both logs of migrations `ns`, each with its honest receipts.
fn logs(ns: &[u8]) -> Vec<VerifiedLog> {
    let of = |side| {
        ns.iter()
            .flat_map(|&n| events(side, n, &honest(n)))
            .collect()
    };
    vec![log(A, of(Side::Source)), log(B, of(Side::Destination))]
}

fn check(b: &EvidenceBundle) -> Result<BundleSummary, EvidenceError> {
    check_bundle(&b.encode().unwrap(), &InsecureCrypto("unused".into()))
}

/// The problem with record `record` of `side`, or a panic.
fn problem(r: Result<BundleSummary, EvidenceError>, side: Side, record: usize) -> RecordProblem {
    match r {
        Err(EvidenceError::Record {
            side: s,
            record: i,
            problem,
            ..
        }) if s == side && i == record => *problem,
        other => panic!("expected a problem in {side} record {record}: {other:?}"),
    }
}

/// Position of the record of `kind` in a side's evidence.
fn position(ev: &SideEvidence, kind: ReceiptKind) -> usize {
    ev.records
        .iter()
        .position(|r| {
            let rec: AuditRecord = postcard::from_bytes(&r.body).unwrap();
            matches!(rec.event, AuditEvent::Receipt(ref s)
                if postcard::from_bytes::<Receipt>(&s.body).unwrap().kind == kind)
        })
        .unwrap()
}

#[test]
fn a_bundle_from_both_logs_verifies_offline() {
    let logs = logs(&[1, 2]);
    let b = build_bundle(mid(2), &logs).unwrap();
    let bytes = b.encode().unwrap();
    assert_eq!(EvidenceBundle::decode(&bytes).unwrap(), b);
    let s = check(&b).unwrap();
    assert_eq!(s.migration, mid(2));
    assert_eq!(s.ticket.signer.to_string(), OP);
    assert_eq!(s.ticket_digest, ticket_digest(&ticket(2)));
    assert_eq!(s.source.agent.to_string(), A);
    assert_eq!(s.destination.agent.to_string(), B);
    // Acceptance, ticket, four receipts, outcome; migration 1 left out.
    assert_eq!((s.source.records, s.destination.records), (7, 7));
    assert!(s.source.accepted && s.destination.accepted);
    assert_eq!(s.source.outcomes, ["completed"]);
    assert_eq!(s.destination.receipts.len(), 4);
    assert!(s.started);
    assert_eq!(s.memory_root, Some(Digest([7; 32])));
    assert_eq!(s.source.head.size, 15, "agent start and two migrations");
    // Other agents' logs are ignored.
    let mut more = logs.clone();
    more.push(log("spiffe://t/agent/c", vec![]));
    assert_eq!(build_bundle(mid(2), &more).unwrap(), b);
}

#[test]
fn a_receipt_swapped_in_from_another_migration_is_refused() {
    let logs = logs(&[1, 2]);
    let other = build_bundle(mid(2), &logs).unwrap();
    let mut b = build_bundle(mid(1), &logs).unwrap();
    // Validly signed, validly proven in the same log: but migration 2's.
    let at = position(&b.sides[1], ReceiptKind::Ready);
    b.sides[1].records[at] = other.sides[1].records[at].clone();
    assert_eq!(
        problem(check(&b), Side::Destination, at),
        RecordProblem::ForeignReceipt {
            kind: ReceiptKind::Ready,
            migration: mid(2)
        }
    );
}

#[test]
fn a_replaced_ready_receipt_is_refused() {
    // The destination's log holds another Ready than the one the
    // source received and signed Sent for.
    let mut forged = honest(1);
    forged[1] = receipt(ReceiptKind::Ready, B, 1, 8);
    let logs = vec![
        log(A, events(Side::Source, 1, &honest(1))),
        log(B, events(Side::Destination, 1, &forged)),
    ];
    let b = build_bundle(mid(1), &logs).unwrap();
    assert!(matches!(
        check(&b),
        Err(EvidenceError::ConflictingReceipts {
            kind: ReceiptKind::Ready,
            first: Side::Source,
            second: Side::Destination,
            ..
        })
    ));
    // Both logs hold the other Ready: it does not attest what Sent does.
    let logs = vec![
        log(A, events(Side::Source, 1, &forged)),
        log(B, events(Side::Destination, 1, &forged)),
    ];
    let e = check(&build_bundle(mid(1), &logs).unwrap()).unwrap_err();
    assert_eq!(
        e,
        EvidenceError::StateMismatch {
            what: "memory root",
            ready: Some(Digest([8; 32])),
            other_kind: ReceiptKind::Sent,
            other: Some(Digest([7; 32])),
        }
    );
    assert!(e.to_string().contains("Ready receipt attests 0808"), "{e}");
}

#[test]
fn a_receipt_signed_by_the_wrong_side_is_refused() {
    let mut r = honest(1);
    r[2] = receipt(ReceiptKind::Sent, B, 1, 7);
    let logs = vec![
        log(A, events(Side::Source, 1, &r)),
        log(B, events(Side::Destination, 1, &r)),
    ];
    let b = build_bundle(mid(1), &logs).unwrap();
    let at = position(&b.sides[0], ReceiptKind::Sent);
    assert!(matches!(
        problem(check(&b), Side::Source, at),
        RecordProblem::ReceiptSigner {
            kind: ReceiptKind::Sent,
            must: Side::Source,
            ..
        }
    ));
}

#[test]
fn an_edited_record_a_wrong_proof_and_a_forged_head_are_refused() {
    let good = build_bundle(mid(1), &logs(&[1])).unwrap();
    let mut edited = good.clone();
    let body = &mut edited.sides[0].records[2].body;
    let n = body.len();
    body[n - 3] ^= 1;
    assert_eq!(
        problem(check(&edited), Side::Source, 2),
        RecordProblem::Signature
    );

    let mut wrong = good.clone();
    wrong.sides[1].records[1].proof[0].0[0] ^= 1;
    assert_eq!(
        problem(check(&wrong), Side::Destination, 1),
        RecordProblem::Inclusion(ProofError::Mismatch)
    );
    let mut cut = good.clone();
    cut.sides[1].records[1].proof.pop();
    assert_eq!(
        problem(check(&cut), Side::Destination, 1),
        RecordProblem::Inclusion(ProofError::Length)
    );
    let mut moved = good.clone();
    moved.sides[1].records[1].index += 1;
    assert!(matches!(
        problem(check(&moved), Side::Destination, 1),
        RecordProblem::Inclusion(_)
    ));

    let mut forged = good.clone();
    forged.sides[0].head.root.0[0] ^= 1;
    assert_eq!(
        check(&forged),
        Err(EvidenceError::TreeHead {
            side: Side::Source,
            size: good.sides[0].head.size
        })
    );
    let mut shrunk = good.clone();
    shrunk.sides[1].head.size -= 1;
    assert!(matches!(
        check(&shrunk),
        Err(EvidenceError::TreeHead {
            side: Side::Destination,
            ..
        })
    ));
}

#[test]
fn a_missing_or_wrong_side_is_refused() {
    let good = build_bundle(mid(1), &logs(&[1])).unwrap();
    let mut one = good.clone();
    one.sides.truncate(1);
    assert_eq!(
        check(&one),
        Err(EvidenceError::MissingSide {
            side: Side::Destination
        })
    );
    let mut twice = good.clone();
    twice.sides[1] = twice.sides[0].clone();
    let e = check(&twice).unwrap_err();
    assert!(
        matches!(&e, EvidenceError::WrongAgent { side: Side::Destination, found, .. } if found.to_string() == A),
        "{e}"
    );
    let mut empty = good.clone();
    empty.sides[0].records.clear();
    assert_eq!(
        check(&empty),
        Err(EvidenceError::NoRecords { side: Side::Source })
    );
    // Records dropped from both sides: a started VM needs its Sent.
    let mut dropped = good.clone();
    for s in &mut dropped.sides {
        let at = position(s, ReceiptKind::Sent);
        s.records.remove(at);
    }
    assert_eq!(
        check(&dropped),
        Err(EvidenceError::MissingReceipt {
            kind: ReceiptKind::Sent,
            why: "started at the destination"
        })
    );
    assert!(matches!(
        build_bundle(mid(1), &logs(&[1])[..1]),
        Err(BuildError::MissingLog {
            side: Side::Destination,
            ..
        })
    ));
}

#[test]
fn the_ticket_must_be_the_operators_for_this_migration_and_in_a_log() {
    let logs = logs(&[1, 2]);
    let good = build_bundle(mid(1), &logs).unwrap();
    let mut other = good.clone();
    other.ticket = ticket(2);
    assert_eq!(
        check(&other),
        Err(EvidenceError::TicketMigration {
            bundle: mid(1),
            ticket: mid(2)
        })
    );
    let mut agent = good.clone();
    agent.ticket = ticket_as(1, A);
    assert!(matches!(
        check(&agent),
        Err(EvidenceError::Ticket(TicketError::NotAnOperator(_)))
    ));
    let mut unlogged = good.clone();
    for s in &mut unlogged.sides {
        s.records.remove(1);
    }
    assert_eq!(check(&unlogged), Err(EvidenceError::TicketNotLogged));
    // The ticket is needed whole: logs without it cannot prove.
    let old: Vec<VerifiedLog> = [(A, Side::Source), (B, Side::Destination)]
        .into_iter()
        .map(|(agent, side)| {
            let mut e = events(side, 1, &honest(1));
            e.remove(1);
            log(agent, e)
        })
        .collect();
    assert_eq!(
        build_bundle(mid(1), &old),
        Err(BuildError::NoTicket(mid(1)))
    );
}

#[test]
fn bounds_magic_version_and_trailing_bytes_are_checked_before_decoding() {
    let good = build_bundle(mid(1), &logs(&[1])).unwrap();
    let bytes = good.encode().unwrap();
    let v = InsecureCrypto("unused".into());
    let big = vec![0u8; MAX_BUNDLE_LEN + 1];
    assert!(matches!(
        check_bundle(&big, &v),
        Err(EvidenceError::TooLarge { .. })
    ));
    assert_eq!(check_bundle(b"CVY", &v), Err(EvidenceError::Magic));
    let mut version = bytes.clone();
    version[9] = 2;
    assert_eq!(check_bundle(&version, &v), Err(EvidenceError::Version(2)));
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert!(matches!(
        check_bundle(&trailing, &v),
        Err(EvidenceError::Malformed(_))
    ));
    assert!(matches!(
        check_bundle(&bytes[..bytes.len() - 1], &v),
        Err(EvidenceError::Malformed(_))
    ));
    // A side announcing more records than allowed is refused on the
    // count, before anything is read or allocated for them.
    let mut many = good.clone();
    let r = many.sides[0].records[0].clone();
    many.sides[0].records = vec![r; MAX_SIDE_RECORDS + 1];
    let mut bytes = BUNDLE_MAGIC.to_vec();
    bytes.extend_from_slice(&BUNDLE_VERSION.to_be_bytes());
    bytes.extend(postcard::to_stdvec(&many).unwrap());
    assert_eq!(
        check_bundle(&bytes, &v),
        Err(EvidenceError::Limit {
            what: "records in one side",
            max: MAX_SIDE_RECORDS
        })
    );
    // A record from outside the migration is refused too.
    let logs = logs(&[1]);
    let mut extra = good.clone();
    let start = &logs[0].signed[0];
    extra.sides[0].records.insert(
        0,
        EvidenceRecord {
            index: 0,
            body: start.body.clone(),
            signature: start.signature.clone(),
            proof: logs[0]
                .tree
                .inclusion_proof(0, good.sides[0].head.size)
                .unwrap(),
        },
    );
    assert!(matches!(
        problem(check(&extra), Side::Source, 0),
        RecordProblem::Unrelated { .. }
    ));
}

/// A source's resolution of migration `n` resting on `statement`.
fn resolution(n: u8, statement: crate::indoubt::SignedStatement) -> AuditEvent {
    AuditEvent::Resolution {
        migration: mid(n),
        vm: "vm".parse().unwrap(),
        role: "source".into(),
        decision: "resumed here".into(),
        reason: "the destination fenced the handoff (signed)".into(),
        operator: None,
        statement: Some(statement),
    }
}

fn statement(n: u8, signer: &str, ticket_of: u8) -> crate::indoubt::SignedStatement {
    let s = crate::indoubt::Statement {
        migration: mid(n),
        ticket: ticket_digest(&ticket(ticket_of)),
        epoch: 1,
        verdict: crate::indoubt::Verdict::Fenced,
        at_unix: 1020,
    };
    crate::signed::Signed::sign(&s, &InsecureCrypto(signer.into())).unwrap()
}

#[test]
fn a_resolution_checks_the_destinations_statement_it_rests_on() {
    let with = |st| {
        let mut source = events(Side::Source, 1, &honest(1));
        source.push(resolution(1, st));
        vec![
            log(A, source),
            log(B, events(Side::Destination, 1, &honest(1))),
        ]
    };
    // The destination's fence, about this migration: accepted and told.
    let b = build_bundle(mid(1), &with(statement(1, B, 1))).unwrap();
    let s = check(&b).unwrap();
    assert!(
        s.source
            .outcomes
            .iter()
            .any(|o| o.contains("signed Fenced")),
        "{:?}",
        s.source.outcomes
    );
    // Signed by the source itself, or about another ticket: refused, at
    // the record.
    for forged in [statement(1, A, 1), statement(1, B, 2)] {
        let b = build_bundle(mid(1), &with(forged)).unwrap();
        let last = b.sides[0].records.len() - 1;
        assert!(matches!(
            problem(check(&b), Side::Source, last),
            RecordProblem::Statement(_)
        ));
    }
}
