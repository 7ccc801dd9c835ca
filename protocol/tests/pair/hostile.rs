//! Data and control messages altered in flight, illegal messages, a
//! destination without room: the migration aborts before handover and the
//! VM runs on at the source.

use std::time::{Duration, Instant};

use convoy_protocol::ctl::Outcome;
use convoy_protocol::destination::{
    Destination, DestinationConfig, DestinationError, DestinationEvent,
};
use convoy_protocol::fuzz::InsecureCrypto;
use convoy_protocol::message::{Capabilities, Message, Reason};
use convoy_protocol::page::{BatchHeader, RunKind};
use convoy_protocol::receipt::ReceiptKind;
use convoy_protocol::source::SourceError;

use crate::harness::{accepted_without_a_destination, handover, receipt_by, Pair, DST, PAGE, SRC};

/// Flips the last literal byte of every non-empty delta in a raw batch;
/// returns how many it flipped.
fn flip_delta_literals(h: &BatchHeader, payload: &mut [u8]) -> usize {
    let mut off = 0;
    let mut flipped = 0;
    for run in &h.runs {
        for _ in 0..run.len {
            match run.kind {
                RunKind::Data => off += PAGE,
                RunKind::Delta => {
                    let len = usize::from(u16::from_le_bytes([payload[off], payload[off + 1]]));
                    off += 2 + len;
                    if len > 0 {
                        payload[off - 1] ^= 0x10;
                        flipped += 1;
                    }
                }
                _ => {}
            }
        }
    }
    flipped
}

#[test]
fn an_altered_delta_is_caught_by_the_root_check() {
    let mut p = Pair::new(2048, 60, 50e6, 1 << 30);
    p.level = 0;
    let flipped = std::rc::Rc::new(std::cell::Cell::new(0));
    let counter = flipped.clone();
    p.tamper = Some(Box::new(move |_round, h, payload| {
        counter.set(counter.get() + flip_delta_literals(h, payload));
    }));
    p.run();
    let s = p.summary().clone();
    assert!(flipped.get() > 0, "no delta to alter");
    assert!(
        matches!(s.outcome, Outcome::Aborted(ref m) if m.contains("root")),
        "{s:?}"
    );
    assert!(p.rolled_back && !p.vm.discarded && p.started.is_none());
    assert!(matches!(
        p.dst_errors.as_slice(),
        [DestinationError::RootMismatch { .. }]
    ));
}

#[test]
fn a_page_altered_in_flight_aborts_and_the_vm_runs_at_the_source() {
    // Idle, so the altered page is never re-sent and overwritten.
    let mut p = Pair::new(512, 0, 50e6, 1 << 30);
    p.level = 0;
    let mut done = false;
    p.tamper = Some(Box::new(move |_round, h, payload| {
        if !done && h.compression == convoy_protocol::page::Compression::None && !payload.is_empty()
        {
            payload[100] ^= 1;
            done = true;
        }
    }));
    p.run();
    let s = p.summary().clone();
    assert!(
        matches!(s.outcome, Outcome::Aborted(ref m) if m.contains("root")),
        "{s:?}"
    );
    assert!(!s.verified);
    assert!(p.rolled_back && !p.vm.paused && !p.vm.discarded);
    assert!(p.staging.is_none(), "staging discarded");
    assert!(p.started.is_none());
    assert!(matches!(
        p.dst_errors.as_slice(),
        [DestinationError::RootMismatch { .. }]
    ));
}

#[test]
fn a_duplicated_batch_is_refused_and_nothing_starts() {
    let mut p = Pair::new(512, 0, 50e6, 1 << 30);
    let mut n = 0;
    p.tamper = Some(Box::new(move |_r, h, _| {
        n += 1;
        if n == 3 {
            h.seq -= 1;
        }
    }));
    p.run();
    assert!(matches!(p.summary().outcome, Outcome::Aborted(_)));
    assert!(p.rolled_back && p.started.is_none() && p.staging.is_none());
    assert!(matches!(
        p.dst_errors.first(),
        Some(DestinationError::Batch(_))
    ));
}

#[test]
fn a_destination_that_lacks_capacity_rejects_and_the_vm_stays() {
    let mut p = Pair::new(512, 5, 50e6, 4096 * 100);
    p.run();
    assert!(matches!(p.summary().outcome, Outcome::Aborted(ref m) if m.contains("refused")));
    assert!(p.rolled_back && !p.vm.paused);
    assert_eq!(p.summary().pages_sent, 0);
    assert!(matches!(p.dst_event, Some(DestinationEvent::Failed(_))));
}

#[test]
fn an_illegal_message_is_a_typed_error_naming_phase_and_message() {
    let mut p = Pair::new(64, 0, 50e6, 1 << 30);
    p.src.start(p.now);
    p.drain_src();
    let err = p.src.handle_message(p.now, handover()).unwrap_err();
    assert_eq!(
        err,
        SourceError::Unexpected {
            phase: "awaiting Accept",
            message: "Handover"
        }
    );
    p.drain_src();
    assert!(p.rolled_back);
    assert!(p.src.is_finished());

    let mut d = Destination::new(DestinationConfig {
        max_memory_bytes: 1 << 30,
        max_disk_bytes: 1 << 30,
        capabilities: Capabilities::OURS,
        handover_timeout: Duration::from_secs(1),
        peer: SRC.parse().unwrap(),
        notary: InsecureCrypto::notary(DST, Instant::now()),
        recovery: Duration::ZERO,
        silence: Duration::from_secs(60),
        max_bookkeeping_bytes: 1 << 30,
    });
    let err = d.handle_message(Instant::now(), handover()).unwrap_err();
    assert_eq!(
        err,
        DestinationError::Unexpected {
            phase: "awaiting Propose",
            message: "Handover"
        }
    );
}

#[test]
fn a_wrong_root_in_ready_makes_the_source_abort() {
    let mut p = accepted_without_a_destination();
    // The harness sends the pages synchronously: one drain ends round 1,
    // which the source measures once the destination says it applied it;
    // the next reaches AwaitReady, whose deadline is armed.
    p.drain_src();
    assert!(!p.src.is_finished(), "awaiting RoundApplied");
    p.to_dst.clear();
    p.src
        .handle_message(
            p.now,
            Message::RoundApplied(convoy_protocol::message::RoundApplied { round: 1 }),
        )
        .unwrap();
    p.drain_src();
    assert!(p.src.poll_timeout().is_some() && !p.src.is_finished());
    let err = p.src.handle_message(
        p.now,
        Message::Ready(convoy_protocol::message::Ready {
            memory_root: convoy_protocol::digest::Digest([9; 32]),
            device_digest: convoy_protocol::digest::Digest([9; 32]),
            receipt: receipt_by(
                DST,
                p.now,
                ReceiptKind::Ready,
                Some((
                    convoy_protocol::digest::Digest([9; 32]),
                    convoy_protocol::digest::Digest([9; 32]),
                )),
            ),
            faults: None,
        }),
    );
    assert!(
        matches!(err, Err(SourceError::RootMismatch { .. })),
        "{err:?}"
    );
    p.drain_src();
    assert!(p.rolled_back);
    let _ = Reason::RootMismatch;
}

#[test]
fn a_tampered_device_state_aborts_before_handover() {
    let mut p = Pair::new(128, 5, 50e6, 1 << 30);
    // The device state in Finish is altered in flight: the destination's
    // Ready digests it, the source sees a state it did not send.
    p.tamper_control = Some(Box::new(|m| {
        if let Message::Finish(f) = m {
            f.device_state[0] ^= 1;
        }
    }));
    p.run();
    assert!(
        matches!(p.src_errors.as_slice(), [SourceError::DeviceStateMismatch]),
        "{:?}",
        p.src_errors
    );
    assert!(matches!(p.summary().outcome, Outcome::Aborted(_)));
    assert!(p.rolled_back && !p.vm.paused && p.started.is_none() && p.staging.is_none());
}

#[test]
fn a_round_end_that_understates_what_was_sent_aborts_before_handover() {
    let mut p = Pair::new(128, 5, 50e6, 1 << 30);
    // The destination has applied round 1's batches when a RoundEnd
    // claiming none arrives: a protocol violation, not a confirmation.
    p.tamper_control = Some(Box::new(|m| {
        if let Message::RoundEnd(r) = m {
            r.batches.iter_mut().for_each(|b| *b = 0);
        }
    }));
    p.run();
    assert!(
        matches!(
            p.dst_errors.as_slice(),
            [DestinationError::BatchCount { .. }]
        ),
        "{:?}",
        p.dst_errors
    );
    assert!(matches!(p.summary().outcome, Outcome::Aborted(_)));
    assert!(p.rolled_back && !p.vm.paused && p.started.is_none() && p.staging.is_none());
}
