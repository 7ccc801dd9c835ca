//! Audit logs: every ticket decision, receipt and outcome is in both agents'
//! signed logs; the logs verify offline with only the CA bundle, and any
//! edit, cut or reordering is found and located. An evidence bundle built
//! from both logs proves a migration offline, and a swapped receipt is
//! found.

use convoy_agent::lab::Lab;
use convoy_protocol::audit::{
    entry_offsets, torn_digest, verify_log, AuditEvent, AuditRecord, LogFault,
};
use convoy_protocol::ctl::Outcome;
use convoy_protocol::evidence::{build_bundle, check_bundle, EvidenceError, RecordProblem, Side};
use convoy_protocol::receipt::{Receipt, ReceiptKind};
use convoy_protocol::ticket::Ticket;
use convoy_tests::{lab, migrate, sim_spec};

/// What is left of a lab after shutdown: its CA bundle.
struct Trusted {
    trust: convoy_agent::trust::identity::TrustBundle,
}

/// An agent's log once it holds `outcomes` outcome records: the
/// destination writes its own after the source has the Started receipt, so
/// right after a migration returns it may not be there yet.
async fn settled_log(lab: &Lab, agent: &str, outcomes: usize) -> Vec<u8> {
    let path = lab.audit_log(agent);
    for _ in 0..1000 {
        let bytes = std::fs::read(&path).unwrap();
        let n = verify_log(&bytes, &lab.trust).map_or(0, |v| {
            v.records
                .iter()
                .filter(|r| matches!(r.event, AuditEvent::Outcome { .. }))
                .count()
        });
        if n >= outcomes {
            return bytes;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{} never recorded {outcomes} outcomes", path.display());
}

fn kinds(events: &[AuditEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            AuditEvent::AgentStarted { .. } => "started-agent".to_string(),
            AuditEvent::TicketAccepted { role, .. } => format!("ticket-{role}"),
            AuditEvent::Refused { .. } => "refused".into(),
            AuditEvent::Receipt(r) => {
                let b: Receipt = postcard::from_bytes(&r.body).unwrap();
                format!("receipt-{:?}", b.kind)
            }
            AuditEvent::Outcome { outcome, .. } => format!("outcome-{outcome}"),
            AuditEvent::Ticket(_) => "ticket-signed".into(),
            AuditEvent::Phase { phase, .. } => format!("phase: {phase}"),
            AuditEvent::PolicyLoaded { .. } => "policy-loaded".into(),
            AuditEvent::Decision {
                action, permitted, ..
            } => format!("{action}-{}", if *permitted { "permit" } else { "deny" }),
            other => format!("{other:?}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_logs_record_the_migration_and_verify_offline() {
    let (_dir, lab) = lab(&["a", "b"]).await;
    let a = lab.client("a").await.unwrap();
    a.vm_create(sim_spec("vm", 8 << 20, 1000)).await.unwrap();
    let req = migrate(&lab, "vm", "a", "b");
    let r = a.migrate(req.clone(), |_| {}).await.unwrap();
    assert_eq!(r.outcome, Outcome::Completed);
    // A refusal is recorded too: the same ticket again.
    assert!(a.migrate(req.clone(), |_| {}).await.is_err());
    let a_log = settled_log(&lab, "a", 1).await;
    let b_log = settled_log(&lab, "b", 1).await;
    let trust = lab.trust.clone();
    lab.shutdown().await;
    let lab = Trusted { trust };

    let va = verify_log(&a_log, &lab.trust).unwrap();
    assert_eq!(va.agent.name().as_str(), "a");
    let events: Vec<AuditEvent> = va.records.iter().map(|r| r.event.clone()).collect();
    assert_eq!(
        kinds(&events),
        vec![
            "started-agent",
            "policy-loaded",
            "CreateVm-permit",
            "ticket-source",
            "ticket-signed",
            "MigrateOut-permit",
            "phase: paused for the final copy",
            "phase: handed over",
            "phase: started at the destination: copy here wiped",
            "receipt-Accepted",
            "receipt-Ready",
            "receipt-Sent",
            "receipt-Started",
            "outcome-completed",
            "refused",
        ]
    );
    // The ticket it accepted is the operator's, kept whole.
    let t: Ticket = postcard::from_bytes(&req.ticket.body).unwrap();
    assert!(
        matches!(&events[3], AuditEvent::TicketAccepted { migration, .. } if *migration == t.id)
    );
    assert_eq!(events[4], AuditEvent::Ticket(req.ticket.clone()));

    let vb = verify_log(&b_log, &lab.trust).unwrap();
    let events: Vec<AuditEvent> = vb.records.iter().map(|r| r.event.clone()).collect();
    assert_eq!(
        kinds(&events),
        vec![
            "started-agent",
            "policy-loaded",
            "ticket-destination",
            "ticket-signed",
            "MigrateIn-permit",
            "receipt-Accepted",
            "receipt-Ready",
            "receipt-Sent",
            "receipt-Started",
            "phase: staging reserved (8388608 bytes), accepting",
            "phase: handover recorded",
            "phase: verified and started here",
            "outcome-started",
        ]
    );
    // The receipts in both logs are the same signed objects.
    let receipts = |evs: &[AuditEvent]| -> Vec<Vec<u8>> {
        evs.iter()
            .filter_map(|e| match e {
                AuditEvent::Receipt(r) => Some(r.signature.clone()),
                _ => None,
            })
            .collect()
    };
    let ra = receipts(
        &va.records
            .iter()
            .map(|r| r.event.clone())
            .collect::<Vec<_>>(),
    );
    assert_eq!(ra, receipts(&events));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_cuts_and_reorderings_of_a_log_are_detected() {
    let (_dir, lab) = lab(&["a", "b"]).await;
    let a = lab.client("a").await.unwrap();
    a.vm_create(sim_spec("vm", 4 << 20, 0)).await.unwrap();
    a.migrate(migrate(&lab, "vm", "a", "b"), |_| {})
        .await
        .unwrap();
    let log = std::fs::read(lab.pki.dir().join("state/a/audit.log")).unwrap();
    let trust = lab.trust.clone();
    lab.shutdown().await;
    let lab = Trusted { trust };
    assert!(verify_log(&log, &lab.trust).is_ok());
    let at = entry_offsets(&log);
    assert!(at.len() >= 9, "{} entries", at.len());

    // An edited byte in the third record (entry 5) is found there.
    let mut edited = log.clone();
    let (off, len) = at[5];
    edited[off + len / 2] ^= 0x01;
    let e = verify_log(&edited, &lab.trust).unwrap_err();
    assert_eq!(e.entry, 5, "{e}");
    assert!(e.to_string().contains(&format!("byte {off}")), "{e}");

    // A cut inside an entry (record 2's head): a torn append, located where
    // it begins (the agent would cut it at start and record the cut).
    let e = verify_log(&log[..at[6].0 + 3], &lab.trust).unwrap_err();
    assert_eq!(
        e.what,
        LogFault::TornTail {
            len: at[6].0 + 3 - at[5].0
        },
        "{e}"
    );
    assert_eq!((e.entry, e.offset), (5, at[5].0));

    // A deleted record (entry 3 and its head).
    let mut deleted = log[..at[3].0].to_vec();
    deleted.extend_from_slice(&log[at[5].0..]);
    assert!(verify_log(&deleted, &lab.trust).is_err());

    // Two records swapped with their heads.
    let mut swapped = log[..at[3].0].to_vec();
    swapped.extend_from_slice(&log[at[5].0..at[7].0]);
    swapped.extend_from_slice(&log[at[3].0..at[5].0]);
    swapped.extend_from_slice(&log[at[7].0..]);
    assert!(verify_log(&swapped, &lab.trust).is_err());

    // Whole trailing entries cut: the log stays valid but its last signed
    // head is smaller than the one the operator saw.
    let full = verify_log(&log, &lab.trust)
        .unwrap()
        .last_head
        .unwrap()
        .size;
    let short = verify_log(&log[..at[5].0], &lab.trust)
        .unwrap()
        .last_head
        .unwrap()
        .size;
    assert!(short < full);

    // Another CA's bundle does not accept the log at all.
    let other = tempfile::tempdir().unwrap();
    let pki = convoy_agent::trust::pki::Pki::init(
        other.path(),
        convoy_protocol::names::TrustDomain::new("convoy.internal").unwrap(),
    )
    .unwrap();
    assert!(verify_log(&log, &pki.trust().unwrap()).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evidence_bundle_proves_a_migration_offline_and_a_swapped_receipt_is_refused() {
    let (_dir, lab) = lab(&["a", "b"]).await;
    let a = lab.client("a").await.unwrap();
    a.vm_create(sim_spec("vm", 4 << 20, 500)).await.unwrap();
    let there = migrate(&lab, "vm", "a", "b");
    let r = a.migrate(there.clone(), |_| {}).await.unwrap();
    assert_eq!(r.outcome, Outcome::Completed);
    // And back, once b is done with it: a second migration in the same two
    // logs.
    settled_log(&lab, "b", 1).await;
    let b = lab.client("b").await.unwrap();
    let back = migrate(&lab, "vm", "b", "a");
    let r = b.migrate(back.clone(), |_| {}).await.unwrap();
    assert_eq!(r.outcome, Outcome::Completed);
    // Each log: one outcome as source, one as destination.
    let logs = [
        settled_log(&lab, "a", 2).await,
        settled_log(&lab, "b", 2).await,
    ];
    let (ca, domain) = (lab.pki.ca_cert(), lab.pki.domain().clone());
    lab.shutdown().await;

    // Whoever builds the bundle verifies the logs first.
    let trust = convoy_agent::trust::identity::TrustBundle::load(&ca, domain.clone()).unwrap();
    let logs: Vec<_> = logs
        .iter()
        .map(|l| verify_log(l, &trust).unwrap())
        .collect();
    let id = |req: &convoy_protocol::ctl::MigrateRequest| {
        postcard::from_bytes::<Ticket>(&req.ticket.body).unwrap().id
    };
    let first = build_bundle(id(&there), &logs).unwrap();
    let second = build_bundle(id(&back), &logs).unwrap();
    let bytes = first.encode().unwrap();

    // A third party with only the CA certificate.
    let offline = convoy_agent::trust::identity::TrustBundle::load(&ca, domain).unwrap();
    let s = check_bundle(&bytes, &offline).unwrap();
    assert_eq!(s.migration, id(&there));
    assert_eq!(s.ticket.ticket.vm.as_str(), "vm");
    assert_eq!(s.source.agent.name().as_str(), "a");
    assert_eq!(s.destination.agent.name().as_str(), "b");
    assert!(s.started && s.source.accepted && s.destination.accepted);
    assert_eq!(s.source.receipts.len(), 4);
    assert_eq!(s.destination.receipts.len(), 4);
    assert_eq!(s.source.outcomes, ["completed"]);
    assert!(s.memory_root.is_some());
    // The way back proves too, with the roles the other way round.
    let s2 = second.check(&offline).unwrap();
    assert_eq!(s2.source.agent.name().as_str(), "b");

    // Swap b's Ready receipt record for the one of the way back: signed by
    // a real agent, proven in b's real log, but another migration's.
    let ready = |ev: &convoy_protocol::evidence::SideEvidence| {
        ev.records
            .iter()
            .position(|r| {
                let rec: AuditRecord = postcard::from_bytes(&r.body).unwrap();
                matches!(&rec.event, AuditEvent::Receipt(x)
                    if postcard::from_bytes::<Receipt>(&x.body).unwrap().kind == ReceiptKind::Ready)
            })
            .unwrap()
    };
    let mut swapped = first.clone();
    let at = ready(&swapped.sides[1]);
    swapped.sides[1].records[at] = second.sides[0].records[ready(&second.sides[0])].clone();
    let e = check_bundle(&swapped.encode().unwrap(), &offline).unwrap_err();
    match &e {
        EvidenceError::Record {
            side: Side::Destination,
            record,
            problem,
            ..
        } if *record == at => assert_eq!(
            **problem,
            RecordProblem::ForeignReceipt {
                kind: ReceiptKind::Ready,
                migration: id(&back)
            }
        ),
        other => panic!("expected a foreign receipt: {other}"),
    }
    assert!(
        e.to_string().contains("Ready receipt is for migration"),
        "{e}"
    );
}

/// A kill in the middle of an append, as a stopped agent's log cut inside
/// its last append shows it: the agent starts again, cuts the torn bytes
/// off (kept next to the log), records the cut and serves; its log
/// verifies and keeps every record under a signed head. Damage before the
/// last head instead stops the start with the entry and byte named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_audit_tail_is_cut_at_restart_and_other_damage_stops_the_start() {
    let (_dir, mut lab) = lab(&["a"]).await;
    let a = lab.client("a").await.unwrap();
    a.vm_create(sim_spec("vm", 4 << 20, 0)).await.unwrap();
    a.close().await;
    lab.stop_agent("a").await.unwrap();
    let path = lab.audit_log("a");
    let whole = std::fs::read(&path).unwrap();
    let before = verify_log(&whole, &lab.trust).unwrap();
    let at = entry_offsets(&whole);
    // The last append: its record whole, its head cut in the middle.
    let (record, _) = at[at.len() - 2];
    let (head, head_len) = at[at.len() - 1];
    let cut = head + head_len / 2;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(cut as u64)
        .unwrap();
    let e = verify_log(&std::fs::read(&path).unwrap(), &lab.trust).unwrap_err();
    assert!(matches!(e.what, LogFault::TornTail { .. }), "{e}");

    lab.start_agent("a").await.unwrap();
    let a = lab.client("a").await.unwrap();
    let served = a.audit_log().await.unwrap();
    a.close().await;
    lab.stop_agent("a").await.unwrap();
    let after = verify_log(&std::fs::read(&path).unwrap(), &lab.trust).unwrap();
    assert!(verify_log(&served, &lab.trust).is_ok());
    let n = before.records.len();
    assert_eq!(after.records[..n - 1], before.records[..n - 1]);
    let digest = torn_digest(&whole[record..cut]);
    assert_eq!(
        after.records[n - 1].event,
        AuditEvent::TornTailCut {
            offset: record as u64,
            bytes: (cut - record) as u64,
            digest,
        }
    );
    assert!(matches!(
        after.records[n].event,
        AuditEvent::AgentStarted { .. }
    ));
    let kept = path.with_file_name(format!(
        "audit.log.torn-{record}-{}",
        &digest.to_hex()[..16]
    ));
    assert_eq!(std::fs::read(&kept).unwrap(), whole[record..cut]);

    // An edited byte in record 1 (entry 3), before the last head.
    let mut bytes = std::fs::read(&path).unwrap();
    let (off, len) = entry_offsets(&bytes)[3];
    bytes[off + len / 2] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let e = lab.start_agent("a").await.unwrap_err();
    assert!(
        e.to_string().contains(&format!("entry 3 (byte {off})")),
        "{e}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing cut");
    lab.shutdown().await;
}
