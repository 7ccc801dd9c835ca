//! Torn tails against real logs: every cut inside an append is torn back
//! to exactly the head before it; every other damage is refused where it
//! is.

// Test code: test lengths are small.
#![allow(clippy::cast_possible_truncation)]

use super::*;
use crate::audit::{
    append, encode_entry, entry_offsets, recover_log, torn_digest, verify_log, AuditEvent,
    SignedTreeHead, VerifiedLog,
};
use crate::fuzz::InsecureCrypto;
use crate::signed::Signer;

const AGENT: &str = "spiffe://t/agent/a";

fn crypto() -> InsecureCrypto {
    InsecureCrypto(AGENT.into())
}

/// A log of `n` records, every third with a reason long enough that its
/// body length takes two varint bytes.
fn log(n: u64) -> Vec<u8> {
    let c = crypto();
    let mut bytes = encode_entry(&LogEntry::Header {
        chain: c.chain(),
        at_unix: 1000,
    })
    .unwrap();
    let mut tree = LogTree::new();
    for i in 0..n {
        bytes.extend(one_append(&mut tree, i, &c));
    }
    bytes
}

/// The bytes of the append of record `seq`.
fn one_append(tree: &mut LogTree, seq: u64, c: &InsecureCrypto) -> Vec<u8> {
    let reason = if seq % 3 == 2 {
        "r".repeat(300)
    } else {
        "test".into()
    };
    let event = AuditEvent::Refused {
        migration: None,
        peer: format!("peer {seq}"),
        reason,
    };
    let mut out = Vec::new();
    for e in append(tree, seq, 1_000_000 + seq, event, c).unwrap() {
        out.extend(encode_entry(&e).unwrap());
    }
    out
}

fn v() -> InsecureCrypto {
    InsecureCrypto(String::new())
}

fn recover(b: &[u8]) -> Result<crate::audit::RecoveredLog, AuditError> {
    recover_log(b, &v())
}

fn verified(b: &[u8]) -> VerifiedLog {
    verify_log(b, &v()).unwrap()
}

#[test]
fn tags_are_postcards_variant_indexes() {
    let head = LogEntry::TreeHead(SignedTreeHead {
        size: 1,
        root: Digest([0; 32]),
        at_unix: 0,
        signature: vec![0; SIGNATURE_LEN],
    });
    let record = LogEntry::Record {
        body: vec![],
        signature: vec![0; SIGNATURE_LEN],
    };
    assert_eq!(encode_entry(&record).unwrap()[LEN_PREFIX], RECORD_TAG);
    let h = encode_entry(&head).unwrap();
    assert_eq!(h[LEN_PREFIX], HEAD_TAG);
    assert_eq!(h.len() - LEN_PREFIX, MIN_HEAD_FRAME);
    assert_eq!(h[h.len() - SIGNATURE_LEN - 1], SIGNATURE_LEN_BYTE);
    let longest = LogEntry::TreeHead(SignedTreeHead {
        size: u64::MAX,
        root: Digest([0; 32]),
        at_unix: u64::MAX,
        signature: vec![0; SIGNATURE_LEN],
    });
    assert_eq!(
        encode_entry(&longest).unwrap().len() - LEN_PREFIX,
        MAX_HEAD_FRAME
    );
}

/// Every byte offset inside every append — the last one as the brief
/// demands, and the earlier ones as the last of a shorter log — is torn
/// back to exactly the head before it, and the log up to there is the
/// log that was verified before the append began.
#[test]
fn every_cut_inside_an_append_is_torn_back_to_the_head_before_it() {
    let good = log(6);
    let at = entry_offsets(&good);
    assert_eq!(at.len(), 13);
    for k in 0..6 {
        let (start, _) = at[1 + 2 * k];
        let (head, head_len) = at[2 + 2 * k];
        let end = head + head_len;
        let before = verified(&good[..start]);
        assert_eq!(before.records.len(), k);
        assert!(recover(&good[..start]).unwrap().torn.is_none());
        assert!(recover(&good[..end]).unwrap().torn.is_none());
        for cut in start + 1..end {
            let r = recover(&good[..cut]).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            assert_eq!(
                r.torn,
                Some(TornTail {
                    offset: start,
                    entry: 1 + 2 * k,
                    len: cut - start,
                    whole_record: cut >= head,
                }),
                "cut at {cut}"
            );
            assert_eq!(r.log, before, "cut at {cut}");
            // Not a verified log as it stands: verify_log names where the
            // torn append begins.
            let e = verify_log(&good[..cut], &v()).unwrap_err();
            assert_eq!((e.entry, e.offset), (1 + 2 * k, start), "{e}");
            assert_eq!(e.what, LogFault::TornTail { len: cut - start });
        }
    }
}

/// What the agent does with a torn tail: cut, then append the record of
/// the cut. The result verifies and extends the log before the crash.
#[test]
fn a_cut_log_takes_the_next_append_and_verifies() {
    let good = log(4);
    let at = entry_offsets(&good);
    let torn = &good[..at[8].0 + 10];
    let r = recover(torn).unwrap();
    let t = r.torn.unwrap();
    let mut bytes = torn[..t.offset].to_vec();
    let mut tree = r.log.tree.clone();
    let event = AuditEvent::TornTailCut {
        offset: t.offset as u64,
        bytes: t.len as u64,
        digest: torn_digest(&torn[t.offset..]),
    };
    let seq = r.log.records.len() as u64;
    for e in append(&mut tree, seq, 2_000_000, event.clone(), &crypto()).unwrap() {
        bytes.extend(encode_entry(&e).unwrap());
    }
    let after = verified(&bytes);
    assert_eq!(after.records.len(), 4);
    assert_eq!(after.records[3].event, event);
    assert_eq!(after.records[..3], r.log.records[..]);
}

/// One flipped bit anywhere in an entry before the last head is refused,
/// never taken for a torn tail, and located at that entry (a flip in a
/// length prefix may misframe what follows: found there or later).
#[test]
fn damage_before_the_last_head_is_refused_at_its_entry() {
    let good = log(4);
    let at = entry_offsets(&good);
    for (entry, &(off, len)) in at.iter().enumerate().take(at.len() - 1).skip(1) {
        for i in 0..len {
            let mut bad = good.clone();
            bad[off + i] ^= 0x08;
            let e = recover(&bad).unwrap_err();
            assert!(
                !matches!(e.what, LogFault::TornTail { .. }),
                "entry {entry} byte {i}: {e}"
            );
            if i >= LEN_PREFIX {
                assert_eq!((e.entry, e.offset), (entry, off), "byte {i}: {e}");
            } else {
                assert!(e.entry >= entry, "byte {i}: {e}");
            }
        }
    }
    // The last head, whole but altered, is damage too, not a torn write.
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 3] ^= 1;
    let e = recover(&bad).unwrap_err();
    assert!(matches!(e.what, LogFault::HeadSignature(_)), "{e}");
    assert_eq!(e.offset, at[at.len() - 1].0);
}

/// Bytes after a complete head that no append writes are refused at the
/// entry and byte where they start.
#[test]
fn garbage_after_the_last_head_is_refused() {
    let good = log(3);
    let end = good.len();
    let next = |tail: &[u8]| -> LogFault {
        let mut b = good.clone();
        b.extend_from_slice(tail);
        let e = recover(&b).unwrap_err();
        assert_eq!((e.entry, e.offset), (7, end), "{e}");
        e.what
    };
    // Text: its first bytes make a length past the limit, whole or cut.
    assert!(matches!(
        next(b"garbage"),
        LogFault::Frame(FrameError::Oversized { .. })
    ));
    assert!(matches!(
        next(b"g"),
        LogFault::Partial(PartialFault::Bounds { .. })
    ));
    // Zeros (a file system's unwritten blocks): an empty frame.
    assert!(matches!(next(&[0; 40]), LogFault::Frame(FrameError::Empty)));
    // Another kind of entry.
    assert_eq!(
        next(&[0, 0, 0, 80, HEAD_TAG, 3]),
        LogFault::Partial(PartialFault::Kind {
            found: HEAD_TAG,
            expected: "record"
        })
    );
    // A record length that does not add up to the frame's.
    assert!(matches!(
        next(&[0, 0, 1, 0, RECORD_TAG, 5]),
        LogFault::Partial(PartialFault::Length { .. })
    ));
    // The next append's bytes, but of another record number: a record
    // replayed from earlier in the log, cut short.
    let at = entry_offsets(&good);
    let (r1, r1_len) = at[3];
    assert_eq!(
        next(&good[r1..r1 + r1_len - 1]),
        LogFault::Partial(PartialFault::Sequence {
            seq: 1,
            expected: 3
        })
    );
    // …or whole.
    assert!(matches!(
        next(&good[r1..r1 + r1_len]),
        LogFault::Sequence {
            seq: 1,
            expected: 3
        }
    ));
}

/// After a whole record, only its own head may follow, cut short.
#[test]
fn after_a_headless_record_only_its_head_may_follow() {
    let full = log(3);
    let at = entry_offsets(&full);
    let (r2, _) = at[5];
    let (h2, h2_len) = at[6];
    let with_record = &full[..h2];
    // Another record after it, whole: no single append writes two.
    let mut tree = verified(&full).tree;
    let [next, _] = append(
        &mut tree,
        3,
        7,
        AuditEvent::PolicyRejected { reason: "x".into() },
        &crypto(),
    )
    .unwrap();
    let mut two = with_record.to_vec();
    two.extend(encode_entry(&next).unwrap());
    assert_eq!(verify_log(&full[..r2], &v()).unwrap().records.len(), 2);
    let e = recover(&two).unwrap_err();
    assert_eq!(e.what, LogFault::UnanchoredRecord, "{e}");
    assert_eq!((e.entry, e.offset), (6, h2));
    // An earlier head, cut short: wrong size.
    let (h1, h1_len) = at[4];
    let mut wrong = with_record.to_vec();
    wrong.extend_from_slice(&full[h1..h1 + h1_len - 5]);
    let e = recover(&wrong).unwrap_err();
    assert!(
        matches!(
            e.what,
            LogFault::Partial(PartialFault::HeadSize {
                size: 2,
                expected: 3
            })
        ),
        "{e}"
    );
    // The right size, another root.
    let mut root = full[..h2 + h2_len - 20].to_vec();
    root[h2 + LEN_PREFIX + 2 + 5] ^= 1;
    let e = recover(&root).unwrap_err();
    assert_eq!(e.what, LogFault::Partial(PartialFault::HeadRoot), "{e}");
    // A head frame longer than any head.
    let mut long = with_record.to_vec();
    long.extend_from_slice(&[0, 0, 1, 0, HEAD_TAG]);
    let e = recover(&long).unwrap_err();
    assert!(
        matches!(
            e.what,
            LogFault::Partial(PartialFault::Bounds { declared: 256, .. })
        ),
        "{e}"
    );
    // Its own head but a declared length one byte off.
    let mut off = full[..h2 + h2_len - 1].to_vec();
    off[h2 + 3] += 1;
    let e = recover(&off).unwrap_err();
    assert!(
        matches!(e.what, LogFault::Partial(PartialFault::Length { .. })),
        "{e}"
    );
}

/// An attacker who rewrites a record's lengths so that the rest of the log
/// reads as one record cut short cannot get verified history cut: the
/// signed heads in what would be cut give it away.
#[test]
fn lengths_edited_to_swallow_the_log_hide_no_signed_head() {
    let good = log(6);
    let at = entry_offsets(&good);
    let (r3, _) = at[7];
    // Record 3's frame: prefix, tag, body length (1 byte: a short body).
    let body_len = usize::from(good[r3 + LEN_PREFIX + 1]);
    assert!(body_len < 0x80);
    let swallowed = good.len() - r3 + 1000;
    let mut varint = postcard::to_stdvec(&(swallowed as u64)).unwrap();
    let content = 1 + varint.len() + swallowed + 1 + SIGNATURE_LEN;
    let mut bad = good[..r3].to_vec();
    bad.extend_from_slice(&(content as u32).to_be_bytes());
    bad.push(RECORD_TAG);
    bad.append(&mut varint);
    bad.extend_from_slice(&good[r3 + LEN_PREFIX + 2..]);
    let e = recover(&bad).unwrap_err();
    let (h3, _) = at[8];
    let shift = bad.len() - good.len();
    assert_eq!(
        e.what,
        LogFault::HiddenHead {
            at: h3 + shift,
            size: 4
        },
        "{e}"
    );
    assert_eq!((e.entry, e.offset), (7, r3));
    // The length prefix alone edited: the fields do not add up.
    let mut bad = good.clone();
    bad[r3..r3 + LEN_PREFIX].copy_from_slice(&((good.len() - r3) as u32 + 9).to_be_bytes());
    let e = recover(&bad).unwrap_err();
    assert!(
        matches!(e.what, LogFault::Partial(PartialFault::Length { .. })),
        "{e}"
    );
}

#[test]
fn a_header_cut_short_is_not_a_torn_tail() {
    let good = log(1);
    let at = entry_offsets(&good);
    for cut in 1..at[1].0 {
        let e = recover(&good[..cut]).unwrap_err();
        assert_eq!((e.entry, e.what), (0, LogFault::Truncated), "cut at {cut}");
    }
    assert_eq!(recover(&[]).unwrap_err().what, LogFault::Empty);
}

#[test]
fn a_torn_digest_is_plain_blake3() {
    assert_eq!(
        torn_digest(b"abc").to_hex(),
        "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
    );
}
