//! Replays the committed cargo-fuzz corpora (`fuzz/corpus/<target>/`) as
//! ordinary tests, and can regenerate the seed corpus from valid messages:
//! `CONVOY_WRITE_SEEDS=1 cargo test -p convoy-protocol --test fuzz_corpus`.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // Tests: seed sizes and indexes are small.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use convoy_protocol::ctl::{CtlMessage, CtlRequest, MigrateRequest};
use convoy_protocol::delta::PageCache;
use convoy_protocol::digest::Digest;
use convoy_protocol::fuzz;
use convoy_protocol::message::*;
use convoy_protocol::names::MigrationId;
use convoy_protocol::page::{
    BatchBuilder, Compressor, EncodedBatch, MemoryGeometry, PageIndex, PageSize, RunKind,
};
use convoy_protocol::receipt::ReceiptKind;
use convoy_protocol::ticket::{SignedTicket, Ticket};

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn replay(target: &str, f: fn(&[u8])) {
    fuzz::replay_corpus(env!("CARGO_MANIFEST_DIR"), target, f);
}

#[test]
fn replay_frame_decode() {
    replay("frame_decode", fuzz::frame_decode);
}

#[test]
fn replay_message_decode() {
    replay("message_decode", fuzz::message_decode);
}

#[test]
fn replay_batch_decode() {
    replay("batch_decode", fuzz::batch_decode);
}

#[test]
fn replay_delta_apply() {
    replay("delta_apply", fuzz::delta_apply);
}

#[test]
fn replay_destination_sequence() {
    replay("destination_sequence", fuzz::destination_sequence);
}

#[test]
fn replay_ticket_verify() {
    replay("ticket_verify", fuzz::ticket_verify);
}

#[test]
fn replay_receipt_verify() {
    replay("receipt_verify", fuzz::receipt_verify);
}

#[test]
fn replay_audit_log_verify() {
    replay("audit_log_verify", fuzz::audit_log_verify);
}

#[test]
fn replay_evidence_check() {
    replay("evidence_check", fuzz::evidence_check);
}

#[test]
fn replay_snapshot_open() {
    replay("snapshot_open", fuzz::snapshot_open);
}

#[test]
fn snapshot_seeds_pass_their_target_and_are_written_when_asked() {
    let seeds = fuzz::snapshot_seeds();
    assert_eq!(seeds.len(), 7);
    for s in &seeds {
        fuzz::snapshot_open(s);
    }
    if std::env::var_os("CONVOY_WRITE_SEEDS").is_none() {
        return;
    }
    std::fs::create_dir_all(corpus("snapshot_open")).unwrap();
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(corpus("snapshot_open").join(format!("seed-{i:02}")), s).unwrap();
    }
}

/// A receipt the fuzz targets' insecure crypto accepts.
fn rc(kind: ReceiptKind) -> convoy_protocol::receipt::SignedReceipt {
    let now = std::time::Instant::now();
    fuzz::InsecureCrypto::notary("spiffe://fuzz/agent/destination", now)
        .sign(now, kind, MigrationId([3; 16]), Digest([0; 32]), None)
        .unwrap()
}

/// Two batches of pages 0..3 on one stream: the first whole (zstd), the
/// second (raw) with deltas against the first for pages 1 and 2.
fn batches() -> (EncodedBatch, EncodedBatch) {
    let mut cache = PageCache::new(1 << 20, PageSize::SIZE_4K);
    let mut b = BatchBuilder::new(PageSize::SIZE_4K);
    for p in 0..3u64 {
        b.push_delta_with(PageIndex(p), &mut cache, |buf| buf.fill(p as u8))
            .unwrap();
    }
    let first = b.finish(0, 1, &mut Compressor::new(1).unwrap()).unwrap();
    let mut b = BatchBuilder::new(PageSize::SIZE_4K);
    for p in 0..3u64 {
        b.push_delta_with(PageIndex(p), &mut cache, |buf| {
            buf.fill(p as u8);
            if p < 2 {
                buf[100..104].copy_from_slice(b"new!");
                buf[4000] = 9;
            }
        })
        .unwrap();
    }
    let second = b.finish(1, 2, &mut Compressor::new(0).unwrap()).unwrap();
    assert!(second.header.runs.iter().any(|r| r.kind == RunKind::Delta));
    (first, second)
}

/// A proposal of a 1-stream migration, with or without a reuse offer.
fn propose(
    geometry: MemoryGeometry,
    reuse: Option<Box<convoy_protocol::reuse::ReuseOffer>>,
    disks: Vec<convoy_protocol::disk::DiskGeometry>,
) -> Message {
    Message::Propose(Propose {
        versions: VersionRange::OURS,
        capabilities: Capabilities::OURS,
        migration: MigrationId([3; 16]),
        vm: "vm".parse().unwrap(),
        attributes: Default::default(),
        manifest: Manifest {
            memory: geometry,
            data_streams: 1,
            qemu: None,
            postcopy: false,
            start_paused: false,
            plan: convoy_protocol::model::MigrationPlan {
                streams: 1,
                ..Default::default()
            },
            reuse,
            disks,
        },
        ticket: convoy_protocol::ticket::SignedTicket::from_parts(vec![], vec![], vec![]),
    })
}

/// An operator's request: seed 10, among the migration messages' seeds
/// (the frame decoders are fed both kinds).
fn ctl_seed() -> CtlMessage {
    CtlMessage::Request(CtlRequest::Migrate(MigrateRequest {
        vm: "vm".parse().unwrap(),
        to: "b".parse().unwrap(),
        to_addr: Some("127.0.0.1:1".into()),
        ticket: convoy_protocol::ticket::SignedTicket::from_parts(vec![], vec![], vec![]),
    }))
}

/// The migration messages' seeds; seed 10, inserted among them, is
/// [`ctl_seed`] (the numbers in comments are seed numbers).
fn seeds() -> Vec<Message> {
    let geometry = MemoryGeometry::new(PageSize::SIZE_4K, 64).unwrap();
    let (enc, delta) = batches();
    vec![
        propose(geometry, None, Vec::new()),
        Message::Accept(Accept {
            version: convoy_protocol::message::PROTOCOL_VERSION,
            capabilities: Capabilities::OURS,
            receipt: rc(ReceiptKind::Accepted),
            bases: vec![true],
        }),
        Message::Reject(Reject {
            reason: Reason::NoCapacity,
        }),
        Message::Finish(Finish {
            batches: vec![1],
            rounds: 2,
            device_state: vec![1, 2, 3],
            memory_root: Digest([7; 32]),
        }),
        Message::Ready(Ready {
            memory_root: Digest([7; 32]),
            device_digest: Digest([8; 32]),
            receipt: rc(ReceiptKind::Ready),
            faults: Some(convoy_protocol::message::FaultFigures {
                faults: 3,
                median_us: 40,
                p99_us: 90,
            }),
        }),
        Message::Handover(Handover {
            receipt: rc(ReceiptKind::Sent),
            reuse: None,
        }),
        Message::Started(Started {
            start_ms: 3,
            synced_ms: 2,
            pause: DestinationPause {
                drain_us: 40,
                check_us: 300,
                record_us: 500,
                start_us: 600,
            },
            receipt: rc(ReceiptKind::Started),
        }),
        Message::Abort(Abort {
            reason: Reason::ProtocolViolation("x".into()),
        }),
        Message::DataStreamOpen(DataStreamOpen {
            migration: MigrationId([3; 16]),
            stream: 0,
        }),
        Message::PageBatch(enc.header, Bytes::from(enc.payload)),
        Message::PageBatch(delta.header, Bytes::from(delta.payload)),
        Message::PostcopySwitch(convoy_protocol::message::PostcopySwitch {
            batches: vec![2, 1],
            device_state: vec![1, 2, 3],
            owed: vec![0b1011, u64::MAX],
            storage: false,
        }),
        Message::PostcopyRunning(convoy_protocol::message::PostcopyRunning { start_ms: 2 }),
        Message::RoundEnd(convoy_protocol::message::RoundEnd {
            round: 1,
            batches: vec![3, 2],
        }),
        Message::RoundApplied(convoy_protocol::message::RoundApplied { round: 1 }),
        Message::Fetch(convoy_protocol::message::Fetch {
            pages: vec![PageIndex(3), PageIndex(70)],
        }),
        // 15..=17: memory reuse — an offer, a key handed over, retained pages.
        propose(geometry, Some(Box::new(reuse_offer())), Vec::new()),
        Message::Handover(Handover {
            receipt: rc(ReceiptKind::Sent),
            reuse: Some(Box::new(reuse_offer())),
        }),
        Message::PageBatch(
            retained_batch().header,
            Bytes::from(retained_batch().payload),
        ),
        // 18: a VM with a disk (its blocks follow the memory's pages).
        propose(
            geometry,
            None,
            vec![convoy_protocol::disk::DiskGeometry {
                name: "root".parse().unwrap(),
                bytes: 16 * 4096,
                base: None,
            }],
        ),
        // Post-copy recovery.
        Message::Resume(convoy_protocol::message::Resume {
            migration: convoy_protocol::names::MigrationId([1; 16]),
            ticket: convoy_protocol::digest::Digest([2; 32]),
        }),
        Message::Resumed(convoy_protocol::message::Resumed {
            missing: vec![0b1011, 0],
        }),
        // An extra connection of a migration (a lane).
        Message::Lane(convoy_protocol::message::Lane {
            migration: convoy_protocol::names::MigrationId([1; 16]),
            lane: 1,
        }),
        // How much of a stream migration's channel the destination read.
        Message::ChannelRead(convoy_protocol::stream::ChannelRead {
            kind: convoy_protocol::stream::ChannelKind::Migration(1),
            bytes: 3 << 20,
        }),
    ]
}

fn reuse_offer() -> convoy_protocol::reuse::ReuseOffer {
    convoy_protocol::reuse::ReuseOffer {
        image: convoy_protocol::reuse::RetainedId([6; 16]),
        key: convoy_protocol::reuse::ReuseKey::from_bytes([9; 32]),
    }
}

/// A first-round batch to a host that retained the image: pages 0 and 2
/// unchanged (retained), page 1 changed, page 3 zero (left out).
fn retained_batch() -> EncodedBatch {
    let mut b = BatchBuilder::new(PageSize::SIZE_4K);
    let held = |p: u64| {
        let mut page = vec![p as u8 + 1; 4096];
        if p == 1 {
            page[0] = 0;
        }
        convoy_protocol::digest::leaf_digest(&page)
    };
    for p in 0..4u64 {
        b.push_nonzero_reusing_with(PageIndex(p), Some(held(p)), None, |buf| {
            if p < 3 {
                buf.fill(p as u8 + 1);
            }
        })
        .unwrap();
    }
    let enc = b.finish(0, 1, &mut Compressor::new(0).unwrap()).unwrap();
    assert_eq!(enc.stats.retained, 2);
    enc
}

#[test]
fn write_seed_corpus_when_asked() {
    if std::env::var_os("CONVOY_WRITE_SEEDS").is_none() {
        return;
    }
    let mut frames: Vec<Vec<u8>> = seeds().iter().map(|m| m.encode().unwrap()).collect();
    frames.insert(10, ctl_seed().encode().unwrap());
    for t in [
        "frame_decode",
        "message_decode",
        "batch_decode",
        "destination_sequence",
    ] {
        std::fs::create_dir_all(corpus(t)).unwrap();
    }
    for (i, f) in frames.iter().enumerate() {
        std::fs::write(corpus("frame_decode").join(format!("seed-{i:02}")), f).unwrap();
        std::fs::write(
            corpus("message_decode").join(format!("seed-{i:02}")),
            &f[4..],
        )
        .unwrap();
    }
    // A whole conversation, as the destination sees it.
    let convo: Vec<u8> = [0usize, 9, 3]
        .iter()
        .flat_map(|&i| frames[i].clone())
        .collect();
    std::fs::write(corpus("destination_sequence").join("seed-convo"), &convo).unwrap();
    for (i, f) in frames.iter().enumerate() {
        std::fs::write(
            corpus("destination_sequence").join(format!("seed-{i:02}")),
            f,
        )
        .unwrap();
    }
    // Batches for a 64-page, 1-stream geometry.
    let mut batch = vec![0u8, 64, 0, 0];
    batch.extend_from_slice(&frames[9]);
    std::fs::write(corpus("batch_decode").join("seed-batch"), &batch).unwrap();
    // A whole batch, then one with deltas against it.
    batch.extend_from_slice(&frames[11]);
    std::fs::write(corpus("batch_decode").join("seed-delta-batch"), &batch).unwrap();
    write_delta_seeds();
    // Retained pages, to a receiver that accepts them (the stream byte's
    // high bit) and to one that does not.
    for (name, stream) in [("seed-retained", 0x80u8), ("hostile-retained", 0)] {
        let mut v = vec![0u8, 64, 0, stream];
        v.extend_from_slice(&frames[17]);
        std::fs::write(corpus("batch_decode").join(name), &v).unwrap();
    }
    for (i, f) in frames.iter().enumerate() {
        let mut v = vec![0u8, 64, 0, 0];
        v.extend_from_slice(f);
        std::fs::write(corpus("batch_decode").join(format!("seed-{i:02}")), &v).unwrap();
    }
    // Hostile shapes: oversized length, tag 0, unknown tag, truncation.
    let hostile: [&[u8]; 4] = [
        &[0xff, 0xff, 0xff, 0xff, 1],
        &[0, 0, 0, 1, 0],
        &[0, 0, 0, 2, 99, 0],
        &[0, 0, 0, 9, 1, 1],
    ];
    for (i, h) in hostile.iter().enumerate() {
        for t in ["frame_decode", "destination_sequence"] {
            std::fs::write(corpus(t).join(format!("hostile-{i}")), h).unwrap();
        }
        std::fs::write(
            corpus("message_decode").join(format!("hostile-{i}")),
            &h[4..],
        )
        .unwrap();
    }
}

/// Seeds of `delta_apply`: a 2-byte page length, then a delta.
fn write_delta_seeds() {
    use convoy_protocol::delta::encode;
    let old: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 256) as u8).collect();
    let mut few = old.clone();
    few[10..14].copy_from_slice(b"new!");
    few[4095] ^= 1;
    let mut many = old.clone();
    for i in 0..64 {
        many[i * 61 + 7] ^= 0x5a;
    }
    let seed = |len: u16, delta: &[u8]| {
        let mut v = len.to_be_bytes().to_vec();
        v.extend_from_slice(delta);
        v
    };
    let encoded = |new: &[u8]| {
        let mut d = Vec::new();
        assert!(encode(&old, new, &mut d, usize::MAX));
        seed(4096, &d)
    };
    let seeds: [(&str, Vec<u8>); 11] = [
        ("seed-empty", seed(4096, &[])),
        ("seed-few", encoded(&few)),
        ("seed-many", encoded(&many)),
        ("seed-small-page", seed(16, &[0, 2, 1, 1, 10, 1, 1])),
        ("seed-whole-small-page", seed(4, &[0, 4, 1, 2, 3, 4])),
        (
            "hostile-past-end",
            seed(16, &[0, 2, 1, 1, 10, 5, 1, 1, 1, 1, 1]),
        ),
        ("hostile-truncated-varint", seed(4096, &[0x80])),
        ("hostile-overflow", seed(4096, &[0xff; 11])),
        ("hostile-empty-literal", seed(4096, &[1, 0])),
        ("hostile-empty-zero-run", seed(4096, &[0, 1, 1, 0, 1, 1])),
        ("hostile-trailing", seed(4, &[0, 4, 1, 1, 1, 1, 0])),
    ];
    for (name, bytes) in seeds {
        write("delta_apply", name, &bytes);
    }
}

const SOURCE: &str = "spiffe://fuzz/agent/source";
const DESTINATION: &str = "spiffe://fuzz/agent/destination";
const OPERATOR: &str = "spiffe://fuzz/operator/op";
/// The clock of the seeds (`InsecureCrypto::notary`'s).
const NOW: u64 = 1_700_000_000;

fn signed_ticket(n: u8, signer: &str) -> SignedTicket {
    let t = Ticket {
        id: MigrationId([n; 16]),
        vm: "vm".parse().unwrap(),
        subject: convoy_protocol::vm::VmSubject::plain(1 << 20),
        source: SOURCE.parse().unwrap(),
        destination: DESTINATION.parse().unwrap(),
        plan: convoy_protocol::model::MigrationPlan {
            streams: 1,
            ..Default::default()
        },
        issued_at: NOW,
        expires_at: NOW + 300,
        nonce: [n; 16],
        approvers: Vec::new(),
        approvals: Vec::new(),
    };
    SignedTicket::sign(&t, &fuzz::InsecureCrypto(signer.into())).unwrap()
}

/// The four receipts of migration `n`, each signed by its side.
fn receipts(n: u8) -> Vec<convoy_protocol::receipt::SignedReceipt> {
    let now = std::time::Instant::now();
    let ticket = convoy_protocol::receipt::ticket_digest(&signed_ticket(n, OPERATOR));
    let state = Some((Digest([7; 32]), Digest([8; 32])));
    [
        (ReceiptKind::Accepted, DESTINATION, None),
        (ReceiptKind::Ready, DESTINATION, state),
        (ReceiptKind::Sent, SOURCE, state),
        (ReceiptKind::Started, DESTINATION, state),
    ]
    .into_iter()
    .map(|(kind, who, state)| {
        fuzz::InsecureCrypto::notary(who, now)
            .sign(now, kind, MigrationId([n; 16]), ticket, state)
            .unwrap()
    })
    .collect()
}

/// The log of `agent` (source or destination) after migrations 1 and 2.
fn audit_log(agent: &str) -> Vec<u8> {
    use convoy_protocol::audit::{append, encode_entry, AuditEvent, LogEntry};
    use convoy_protocol::signed::Signer;
    let c = fuzz::InsecureCrypto(agent.into());
    let mut bytes = encode_entry(&LogEntry::Header {
        chain: c.chain(),
        at_unix: NOW,
    })
    .unwrap();
    let (peer, role, outcome) = if agent == SOURCE {
        (DESTINATION, "source", "completed")
    } else {
        (SOURCE, "destination", "started")
    };
    let mut events = vec![AuditEvent::AgentStarted {
        version: "seed".into(),
    }];
    for n in [1, 2] {
        events.push(AuditEvent::TicketAccepted {
            migration: MigrationId([n; 16]),
            vm: "vm".parse().unwrap(),
            operator: OPERATOR.parse().unwrap(),
            peer: peer.parse().unwrap(),
            role: role.into(),
        });
        events.push(AuditEvent::Ticket(signed_ticket(n, OPERATOR)));
        events.extend(receipts(n).into_iter().map(AuditEvent::Receipt));
        events.push(AuditEvent::Outcome {
            migration: MigrationId([n; 16]),
            vm: "vm".parse().unwrap(),
            outcome: outcome.into(),
        });
    }
    let mut tree = convoy_protocol::logtree::LogTree::new();
    for (seq, e) in (0..).zip(events) {
        for entry in append(&mut tree, seq, NOW + seq, e, &c).unwrap() {
            bytes.extend(encode_entry(&entry).unwrap());
        }
    }
    bytes
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(corpus(target)).unwrap();
    std::fs::write(corpus(target).join(name), bytes).unwrap();
}

/// Valid tickets, receipts, logs and evidence bundles (the insecure crypto
/// accepts them), and a few near misses of each.
#[test]
fn write_trust_seed_corpus_when_asked() {
    use convoy_protocol::evidence::build_bundle;
    if std::env::var_os("CONVOY_WRITE_SEEDS").is_none() {
        return;
    }
    let at = |now: u64, t: &SignedTicket| {
        let mut v = now.to_be_bytes().to_vec();
        v.extend(postcard::to_stdvec(t).unwrap());
        v
    };
    let good = signed_ticket(1, OPERATOR);
    // Approved by the donor and a named operator (the source's domain is
    // `fuzz`), one of them twice.
    let approved = {
        use convoy_protocol::ticket::approval::{approval_for, ApprovalRole};
        let mut t: Ticket = postcard::from_bytes(&good.body).unwrap();
        t.approvers = vec![
            "donor".parse().unwrap(),
            "spiffe://fuzz/operator/named".parse().unwrap(),
        ];
        let donor = fuzz::InsecureCrypto("spiffe://fuzz/operator/dora".into());
        let named = fuzz::InsecureCrypto("spiffe://fuzz/operator/named".into());
        t.approvals = vec![
            approval_for(&t, Some(ApprovalRole::Donor), NOW, &donor).unwrap(),
            approval_for(&t, None, NOW, &named).unwrap(),
        ];
        let once = SignedTicket::sign(&t, &fuzz::InsecureCrypto(OPERATOR.into())).unwrap();
        let again = t.approvals[0].clone();
        t.approvals.push(again);
        let twice = SignedTicket::sign(&t, &fuzz::InsecureCrypto(OPERATOR.into())).unwrap();
        (once, twice)
    };
    let mut edited = good.clone();
    edited.body[0] ^= 1;
    for (name, bytes) in [
        ("seed-valid", at(NOW + 10, &good)),
        ("seed-expired", at(NOW + 1000, &good)),
        ("seed-early", at(NOW - 1000, &good)),
        ("seed-agent", at(NOW, &signed_ticket(1, SOURCE))),
        ("seed-edited", at(NOW, &edited)),
        ("seed-approved", at(NOW + 10, &approved.0)),
        ("seed-approved-twice", at(NOW + 10, &approved.1)),
    ] {
        write("ticket_verify", name, &bytes);
    }
    for (i, r) in receipts(1).iter().enumerate() {
        write(
            "receipt_verify",
            &format!("seed-{i}"),
            &postcard::to_stdvec(r).unwrap(),
        );
    }
    let mut r = receipts(1).remove(1);
    r.chain = vec![OPERATOR.as_bytes().to_vec()];
    write(
        "receipt_verify",
        "seed-operator",
        &postcard::to_stdvec(&r).unwrap(),
    );

    let (src, dst) = (audit_log(SOURCE), audit_log(DESTINATION));
    let entries = convoy_protocol::audit::entry_offsets(&src);
    let mut edited = src.clone();
    let (off, len) = entries[5];
    edited[off + len / 2] ^= 1;
    write("audit_log_verify", "seed-source", &src);
    write("audit_log_verify", "seed-destination", &dst);
    write("audit_log_verify", "seed-edited", &edited);
    write("audit_log_verify", "seed-cut", &src[..src.len() - 7]);
    // Torn appends: a record without its head, and a record cut short.
    let (last_record, _) = entries[entries.len() - 2];
    let (last_head, _) = entries[entries.len() - 1];
    write("audit_log_verify", "seed-torn-record", &src[..last_head]);
    write(
        "audit_log_verify",
        "seed-torn-prefix",
        &src[..last_record + 20],
    );
    write("audit_log_verify", "seed-header", &src[..entries[1].0]);

    let v = fuzz::InsecureCrypto(String::new());
    let logs: Vec<_> = [&src, &dst]
        .iter()
        .map(|l| convoy_protocol::audit::verify_log(l, &v).unwrap())
        .collect();
    let first = build_bundle(MigrationId([1; 16]), &logs).unwrap();
    let second = build_bundle(MigrationId([2; 16]), &logs).unwrap();
    convoy_protocol::evidence::check_bundle(&first.encode().unwrap(), &v).unwrap();
    let mut swapped = first.clone();
    swapped.sides[1].records[3] = second.sides[1].records[3].clone();
    let mut one_side = first.clone();
    one_side.sides.pop();
    let mut forged_head = first.clone();
    forged_head.sides[0].head.root = Digest([1; 32]);
    let mut wrong_proof = first.clone();
    wrong_proof.sides[0].records[1].proof.reverse();
    for (name, b) in [
        ("seed-first", &first),
        ("seed-second", &second),
        ("seed-swapped", &swapped),
        ("seed-one-side", &one_side),
        ("seed-forged-head", &forged_head),
        ("seed-wrong-proof", &wrong_proof),
    ] {
        write("evidence_check", name, &b.encode().unwrap());
    }
}

#[test]
fn replay_source_sequence() {
    replay("source_sequence", fuzz::source_sequence);
}

/// How the scripted destination of a `source_sequence` seed misbehaves.
#[derive(Clone, Copy, PartialEq)]
enum Script {
    /// Answers every message as it should.
    Honest,
    /// Cuts the link once the VM runs there, then resumes on the new one.
    CutAfterRunning,
    /// Ready names another memory root.
    WrongRoot,
    /// Started carries the Ready receipt.
    WrongReceipt,
    /// Aborts instead of Started.
    AbortAfterHandover,
    /// Asks for pages in post-copy, then goes on honestly.
    Faults,
    /// Honest, but the source's driver cannot record the commit (its
    /// journal fails): the source must roll back, never hand over.
    CommitFails,
}

/// A receipt of the `source_sequence` destination.
fn source_receipt(
    kind: ReceiptKind,
    state: convoy_protocol::receipt::StateDigests,
) -> convoy_protocol::receipt::SignedReceipt {
    let now = std::time::Instant::now();
    let ticket = convoy_protocol::receipt::ticket_digest(&fuzz::source_ticket());
    fuzz::InsecureCrypto::notary(fuzz::DESTINATION_ID, now)
        .sign(now, kind, fuzz::SOURCE_MIGRATION, ticket, state)
        .unwrap()
}

fn source_accept() -> Message {
    Message::Accept(Accept {
        version: VersionRange::OURS.max,
        capabilities: Capabilities::ZSTD,
        receipt: source_receipt(ReceiptKind::Accepted, None),
        bases: Vec::new(),
    })
}

/// A frame of `m`, as a `source_sequence` operation.
fn message_op(m: &Message) -> Vec<u8> {
    let mut v = vec![fuzz::op::MESSAGE];
    v.extend(m.encode().unwrap());
    v
}

/// A `source_sequence` input: the configuration, then a destination
/// answering what the source sends as `script` says, with the driver doing
/// its jobs (dirty logs collected with `dirty`) and time passing between.
fn source_convo(config: [u8; 2], dirty: u8, script: Script) -> Vec<u8> {
    use convoy_protocol::fuzz::op;
    let receipt = source_receipt;
    let (mut run, _) = fuzz::SourceRun::new(&config).unwrap();
    let mut input = config.to_vec();
    let mut state = None;
    let mut owed = Vec::new();
    let mut cut = script == Script::CutAfterRunning;
    let mut sent = run.take_sent();
    for _ in 0..200 {
        if run.outcome().is_some() {
            break;
        }
        let mut ops: Vec<Vec<u8>> = vec![vec![op::WAIT, 1], vec![op::DRIVER_ALL, dirty]];
        for m in sent.drain(..) {
            let answer = match m {
                Message::Propose(_) => source_accept(),
                Message::RoundEnd(r) => Message::RoundApplied(RoundApplied { round: r.round }),
                Message::PostcopySwitch(s) => {
                    owed = s.owed.clone();
                    Message::PostcopyRunning(PostcopyRunning { start_ms: 1 })
                }
                Message::Resume(_) => Message::Resumed(Resumed {
                    missing: std::mem::take(&mut owed),
                }),
                Message::Finish(f) => {
                    let digests = (
                        f.memory_root,
                        convoy_protocol::digest::device_state_digest(&f.device_state),
                    );
                    state = Some(digests);
                    let mut memory_root = f.memory_root;
                    if script == Script::WrongRoot {
                        memory_root.0[0] ^= 1;
                    }
                    Message::Ready(Ready {
                        memory_root,
                        device_digest: digests.1,
                        receipt: receipt(ReceiptKind::Ready, state),
                        faults: None,
                    })
                }
                Message::Handover(_) => match script {
                    Script::AbortAfterHandover => Message::Abort(Abort {
                        reason: Reason::ProtocolViolation("seed".into()),
                    }),
                    _ => Message::Started(Started {
                        start_ms: 1,
                        synced_ms: 0,
                        pause: DestinationPause::default(),
                        receipt: receipt(
                            if script == Script::WrongReceipt {
                                ReceiptKind::Ready
                            } else {
                                ReceiptKind::Started
                            },
                            state,
                        ),
                    }),
                },
                _ => continue,
            };
            let running = matches!(answer, Message::PostcopyRunning(_));
            let ready = matches!(answer, Message::Ready(_));
            ops.push(message_op(&answer));
            if ready && script == Script::CommitFails {
                ops.push(vec![op::DRIVER_JOB, fuzz::COMMIT_FAILS]);
            }
            if running && script == Script::Faults {
                ops.push(message_op(&Message::Fetch(Fetch {
                    pages: vec![PageIndex(0), PageIndex(3)],
                })));
                ops.push(vec![op::DRIVER_PART, 0]);
            }
            if running && cut {
                cut = false;
                ops.push(vec![op::LINK_LOST]);
            }
        }
        for o in ops {
            input.extend(&o);
            let mut rest = o.as_slice();
            assert!(run.step(&mut rest));
            sent.extend(run.take_sent());
        }
    }
    // What the seed reaches: an honest destination, a completion.
    let outcome = run.outcome().cloned();
    eprintln!("{config:?} {dirty:#x}: {outcome:?}");
    let completes = matches!(
        script,
        Script::Honest | Script::CutAfterRunning | Script::Faults
    );
    assert_eq!(
        outcome == Some(convoy_protocol::ctl::Outcome::Completed),
        completes,
        "{outcome:?}"
    );
    if script == Script::CommitFails {
        assert!(
            matches!(&outcome, Some(convoy_protocol::ctl::Outcome::Aborted(w)) if w.contains("could not be recorded")),
            "{outcome:?}"
        );
    }
    input
}

/// A source whose driver cannot record the handover rolls back and sends
/// `Abort`, never `Handover` (the run checks the second part itself).
#[test]
fn a_handover_that_cannot_be_recorded_is_not_made() {
    let shape = 15 | 1 << 6;
    source_convo([0b1000, shape], 0, Script::CommitFails);
}

/// Seeds of `source_sequence`: whole migrations in each mode, and a
/// destination that lies.
#[test]
fn write_source_seed_corpus_when_asked() {
    use convoy_protocol::fuzz::op;
    if std::env::var_os("CONVOY_WRITE_SEEDS").is_none() {
        return;
    }
    // 16 pages on 2 streams; force-stop.
    let shape = 15 | 1 << 6;
    let precopy = 0b1000;
    let seeds = [
        (
            "seed-precopy",
            source_convo([precopy, shape], 0, Script::Honest),
        ),
        (
            "seed-precopy-dirty",
            source_convo([precopy | 0b11_0000, shape], 0x64, Script::Honest),
        ),
        ("seed-postcopy", source_convo([1, shape], 0, Script::Honest)),
        (
            "seed-hybrid",
            source_convo([2, shape], 0x64, Script::Honest),
        ),
        (
            "seed-hybrid-after",
            source_convo([3, shape], 0x64, Script::Honest),
        ),
        (
            "seed-precopy-disk",
            source_convo([precopy | 1 << 6, shape], 0, Script::Honest),
        ),
        (
            "seed-storage-postcopy",
            source_convo([1 | 1 << 6 | 1 << 7, shape], 0, Script::Honest),
        ),
        (
            "seed-recovery",
            source_convo([1 | 1 << 2, shape], 0, Script::CutAfterRunning),
        ),
        ("seed-faults", source_convo([1, shape], 0, Script::Faults)),
        (
            "hostile-wrong-root",
            source_convo([precopy, shape], 0, Script::WrongRoot),
        ),
        (
            "hostile-wrong-receipt",
            source_convo([precopy, shape], 0, Script::WrongReceipt),
        ),
        (
            "hostile-abort-after-handover",
            source_convo([precopy, shape], 0, Script::AbortAfterHandover),
        ),
        (
            "hostile-postcopy-abort-after-handover",
            source_convo([1, shape], 0, Script::AbortAfterHandover),
        ),
        (
            "journal-fails-at-commit",
            source_convo([precopy, shape], 0, Script::CommitFails),
        ),
    ];
    for (name, bytes) in &seeds {
        write("source_sequence", name, bytes);
    }
    // Hand-made: a Started before anything, a cancel after Accept, a
    // Fetch of a page past the end, and time running out.
    let started = message_op(&Message::Started(Started {
        start_ms: 0,
        synced_ms: 0,
        pause: DestinationPause::default(),
        receipt: rc(ReceiptKind::Started),
    }));
    let mut early = vec![precopy, shape];
    early.extend(&started);
    write("source_sequence", "hostile-early-started", &early);
    let honest = &seeds[0].1;
    // The configuration, the first wait and driver ops, and the Accept.
    let accept_end = 2 + 2 + 2 + message_op(&source_accept()).len();
    let mut cancel = honest[..accept_end].to_vec();
    cancel.extend([op::DRIVER_PART, 0, op::CANCEL]);
    write("source_sequence", "hostile-cancel", &cancel);
    let mut far = seeds[2].1[..accept_end].to_vec();
    far.extend([op::DRIVER_ALL, 0]);
    far.extend(message_op(&Message::Fetch(Fetch {
        pages: vec![PageIndex(1 << 40)],
    })));
    write("source_sequence", "hostile-fetch-past-end", &far);
    let mut late = honest[..accept_end].to_vec();
    late.extend([op::WAIT, 255, op::TIMEOUT, op::LINK_LOST]);
    write("source_sequence", "hostile-late", &late);
}

#[test]
fn replay_qemu_manifest_admission() {
    replay("qemu_manifest_admission", fuzz::qemu_manifest_admission);
}

/// A proposal of a QEMU VM under ticket `choice`'s plan, with `disks`
/// copied disks, which `tweak` may then change.
fn qemu_propose(choice: u8, disks: usize, tweak: impl FnOnce(&mut Manifest)) -> Vec<u8> {
    use convoy_protocol::model::MigrationMode;
    use convoy_protocol::stream::{DiskManifest, QemuManifest};
    let plan = fuzz::admission_ticket(choice).plan;
    let multifd = if plan.mode == MigrationMode::Precopy && plan.streams > 1 {
        plan.streams
    } else {
        0
    };
    let spec = fuzz::qemu_spec(disks);
    let mut manifest = Manifest {
        memory: MemoryGeometry::new(PageSize::SIZE_4K, 4096).unwrap(),
        data_streams: plan.streams,
        qemu: Some(Box::new(QemuManifest {
            spec,
            mode: plan.mode,
            multifd_channels: multifd,
            disks: (0..disks)
                .map(|i| DiskManifest {
                    size: 1 << 20,
                    format: if i % 2 == 0 { "raw" } else { "qcow2" }.into(),
                })
                .collect(),
        })),
        postcopy: false,
        start_paused: false,
        plan,
        reuse: None,
        disks: Vec::new(),
    };
    tweak(&mut manifest);
    let m = Message::Propose(Propose {
        versions: VersionRange::OURS,
        capabilities: Capabilities::OURS,
        migration: MigrationId([3; 16]),
        vm: "vm".parse().unwrap(),
        attributes: Default::default(),
        manifest,
        ticket: SignedTicket::from_parts(vec![], vec![], vec![]),
    });
    let mut v = vec![choice];
    v.extend(&m.encode().unwrap()[4..]);
    v
}

/// Seeds of `qemu_manifest_admission`: a QEMU proposal admitted under each
/// ticket, and manifests off the plan or out of bounds.
#[test]
fn write_qemu_seed_corpus_when_asked() {
    use convoy_protocol::model::MigrationMode;
    use convoy_protocol::stream::DiskManifest;
    if std::env::var_os("CONVOY_WRITE_SEEDS").is_none() {
        return;
    }
    fn qemu(m: &mut Manifest) -> &mut convoy_protocol::stream::QemuManifest {
        m.qemu.as_deref_mut().unwrap()
    }
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("seed-precopy", qemu_propose(0, 0, |_| {})),
        (
            "seed-precopy-one-channel",
            qemu_propose(0, 0, |m| qemu(m).multifd_channels = 0),
        ),
        ("seed-postcopy", qemu_propose(1, 0, |_| {})),
        ("seed-hybrid", qemu_propose(2, 0, |_| {})),
        ("seed-storage", qemu_propose(3, 2, |_| {})),
        ("hostile-other-disks", qemu_propose(3, 8, |_| {})),
        (
            "hostile-bigger-vm",
            qemu_propose(0, 0, |m| qemu(m).spec.memory_mib = 64),
        ),
        (
            "seed-sim-manifest",
            qemu_propose(0, 0, |m| {
                m.qemu = None;
            }),
        ),
        ("hostile-disks-not-granted", qemu_propose(0, 1, |_| {})),
        (
            "hostile-mode",
            qemu_propose(0, 0, |m| qemu(m).mode = MigrationMode::Postcopy),
        ),
        (
            "hostile-multifd-postcopy",
            qemu_propose(1, 0, |m| qemu(m).multifd_channels = 2),
        ),
        (
            "hostile-multifd-fewer",
            qemu_propose(0, 0, |m| qemu(m).multifd_channels = 1),
        ),
        (
            "hostile-multifd-17",
            qemu_propose(0, 0, |m| qemu(m).multifd_channels = 17),
        ),
        (
            "hostile-disk-format",
            qemu_propose(3, 1, |m| qemu(m).disks[0].format = "vmdk".into()),
        ),
        (
            "hostile-disk-overflow",
            qemu_propose(3, 2, |m| {
                for d in &mut qemu(m).disks {
                    d.size = u64::MAX / 2 + 1;
                }
            }),
        ),
        ("hostile-too-many-disks", qemu_propose(3, 9, |_| {})),
        (
            "hostile-disks-mismatch",
            qemu_propose(3, 2, |m| {
                qemu(m).disks.push(DiskManifest {
                    size: 1,
                    format: "raw".into(),
                })
            }),
        ),
        (
            "hostile-postcopy-announced",
            qemu_propose(1, 0, |m| m.postcopy = true),
        ),
        (
            "hostile-plan-differs",
            qemu_propose(0, 0, |m| m.plan.max_rounds += 1),
        ),
        (
            "hostile-start-paused",
            qemu_propose(0, 0, |m| {
                m.plan.start_paused = true;
                m.start_paused = true;
            }),
        ),
    ];
    for (name, bytes) in &seeds {
        // The seeds are admitted, the hostile ones refused.
        let Ok(Message::Propose(p)) = Message::decode(Bytes::copy_from_slice(&bytes[1..])) else {
            panic!("{name} does not decode");
        };
        let t = fuzz::admission_ticket(bytes[0]);
        let valid = p
            .manifest
            .qemu
            .as_ref()
            .is_none_or(|q| q.validate().is_ok());
        let admitted =
            convoy_protocol::admission::admit(&t, &p.vm, p.migration, &p.manifest, &p.attributes);
        assert_eq!(
            valid && admitted.is_ok(),
            name.starts_with("seed"),
            "{name}: {admitted:?}"
        );
        write("qemu_manifest_admission", name, bytes);
    }
    let whole = &seeds[4].1;
    write(
        "qemu_manifest_admission",
        "hostile-truncated",
        &whole[..whole.len() / 2],
    );
}
