//! Signed receipts: each side ends with the other's, verified, and a receipt
//! from the wrong agent or over other state stops the migration.

use convoy_protocol::ctl::Outcome;
use convoy_protocol::destination::{DestinationError, DestinationEvent};
use convoy_protocol::fuzz::InsecureCrypto;
use convoy_protocol::message::{Capabilities, Message};
use convoy_protocol::receipt::ReceiptKind;
use convoy_protocol::source::SourceError;

use crate::harness::{receipt_by, Pair, DST, SRC};

#[test]
fn both_sides_end_with_each_others_verified_receipts() {
    let mut p = Pair::new(256, 5, 50e6, 1 << 30);
    p.run();
    let s = p.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed);
    // Source: Accepted, Ready, our Sent, Started.
    let verifier = InsecureCrypto("unused".into());
    let kinds: Vec<_> = s
        .receipts
        .iter()
        .map(|r| r.verify(&verifier).unwrap().receipt.kind)
        .collect();
    assert_eq!(
        kinds,
        vec![
            ReceiptKind::Accepted,
            ReceiptKind::Ready,
            ReceiptKind::Sent,
            ReceiptKind::Started
        ]
    );
    let Some(DestinationEvent::Started {
        receipts,
        memory_root,
    }) = &p.dst_event
    else {
        panic!("destination did not start: {:?}", p.dst_event);
    };
    assert_eq!(Some(*memory_root), s.memory_root);
    // Destination: its own Accepted and Ready, the source's Sent, its Started.
    let signers: Vec<_> = receipts
        .iter()
        .map(|r| r.verify(&verifier).unwrap().signer.to_string())
        .collect();
    assert_eq!(signers, vec![DST, DST, SRC, DST]);
}

#[test]
fn a_receipt_from_the_wrong_agent_aborts_before_handover() {
    let mut p = Pair::new(64, 0, 50e6, 1 << 30);
    p.src.start(p.now);
    p.drain_src();
    p.to_dst.clear();
    // Accepted, but signed by an agent that is not the destination.
    let err = p.src.handle_message(
        p.now,
        Message::Accept(convoy_protocol::message::Accept {
            version: convoy_protocol::message::PROTOCOL_VERSION,
            capabilities: Capabilities(Capabilities::ZSTD.0 | Capabilities::DELTA.0),
            receipt: receipt_by(
                "spiffe://pair.test/agent/mallory",
                p.now,
                ReceiptKind::Accepted,
                None,
            ),
            bases: Vec::new(),
        }),
    );
    assert!(matches!(err, Err(SourceError::Receipt(_))), "{err:?}");
    p.drain_src();
    assert!(p.rolled_back);
    assert!(matches!(p.summary().outcome, Outcome::Aborted(_)));
}

#[test]
fn a_forged_sent_receipt_keeps_the_destination_from_starting() {
    let mut p = Pair::new(128, 0, 50e6, 1 << 30);
    let now = p.now;
    // An attacker swaps the source's Sent receipt for one over other state.
    p.tamper_control = Some(Box::new(move |m| {
        if let Message::Handover(h) = m {
            h.receipt = receipt_by(
                SRC,
                now,
                ReceiptKind::Sent,
                Some((
                    convoy_protocol::digest::Digest([1; 32]),
                    convoy_protocol::digest::Digest([2; 32]),
                )),
            );
        }
    }));
    p.run();
    assert!(
        matches!(p.dst_errors.as_slice(), [DestinationError::Receipt(_)]),
        "{:?}",
        p.dst_errors
    );
    assert!(p.started.is_none() && p.staging.is_none());
    // The destination said it did not start: the VM runs at the source.
    assert!(
        matches!(p.summary().outcome, Outcome::Aborted(_)),
        "{:?}",
        p.summary()
    );
    assert!(p.rolled_back && !p.vm.paused);
}
