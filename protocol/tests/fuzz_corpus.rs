//! Replays the committed cargo-fuzz corpora (`fuzz/corpus/<target>/`) as
//! ordinary tests, and can regenerate the seed corpus from valid messages:
//! `CONVOY_WRITE_SEEDS=1 cargo test -p convoy-protocol --test fuzz_corpus`.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use convoy_protocol::ctl::{CtlRequest, MigrateOptions, MigrateRequest};
use convoy_protocol::digest::Digest;
use convoy_protocol::fuzz;
use convoy_protocol::message::*;
use convoy_protocol::names::MigrationId;
use convoy_protocol::page::{BatchBuilder, Compressor, MemoryGeometry, PageIndex, PageSize};
use convoy_protocol::receipt::ReceiptKind;

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn replay(target: &str, f: fn(&[u8])) {
    let dir = corpus(target);
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {} missing: {e}", dir.display()));
    let mut n = 0;
    for e in entries {
        let path = e.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        f(&data);
        n += 1;
    }
    assert!(n >= 5, "corpus {target} has only {n} inputs");
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
fn replay_destination_sequence() {
    replay("destination_sequence", fuzz::destination_sequence);
}

/// A receipt the fuzz targets' insecure crypto accepts.
fn rc(kind: ReceiptKind) -> convoy_protocol::receipt::SignedReceipt {
    let now = std::time::Instant::now();
    fuzz::InsecureCrypto::notary("spiffe://fuzz/agent/destination", now)
        .sign(now, kind, MigrationId([3; 16]), Digest([0; 32]), None)
        .unwrap()
}

fn seeds() -> Vec<Message> {
    let geometry = MemoryGeometry::new(PageSize::SIZE_4K, 64).unwrap();
    let mut b = BatchBuilder::new(PageSize::SIZE_4K);
    for p in 0..3u64 {
        b.push_with(PageIndex(p), |buf| buf.fill(p as u8)).unwrap();
    }
    let enc = b.finish(0, 1, &mut Compressor::new(1).unwrap()).unwrap();
    vec![
        Message::Propose(Propose {
            versions: VersionRange::OURS,
            capabilities: Capabilities::OURS,
            migration: MigrationId([3; 16]),
            vm: "vm".parse().unwrap(),
            attributes: Default::default(),
            manifest: Manifest {
                memory: geometry,
                data_streams: 1,
            },
            ticket: convoy_protocol::ticket::SignedTicket {
                body: vec![],
                signature: vec![],
                chain: vec![],
            },
        }),
        Message::Accept(Accept {
            version: 1,
            capabilities: Capabilities::OURS,
            receipt: rc(ReceiptKind::Accepted),
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
        }),
        Message::Handover(Handover {
            receipt: rc(ReceiptKind::Sent),
        }),
        Message::Started(Started {
            start_ms: 3,
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
        Message::CtlRequest(CtlRequest::Migrate(MigrateRequest {
            vm: "vm".parse().unwrap(),
            to: "b".parse().unwrap(),
            to_addr: Some("127.0.0.1:1".into()),
            options: MigrateOptions::default(),
            ticket: convoy_protocol::ticket::SignedTicket {
                body: vec![],
                signature: vec![],
                chain: vec![],
            },
        })),
    ]
}

#[test]
fn write_seed_corpus_when_asked() {
    if std::env::var_os("CONVOY_WRITE_SEEDS").is_none() {
        return;
    }
    let frames: Vec<Vec<u8>> = seeds().iter().map(|m| m.encode().unwrap()).collect();
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
