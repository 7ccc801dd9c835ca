//! The log format against logs written with the insecure test crypto.
use super::*;
use crate::fuzz::InsecureCrypto;

fn log(n: u64) -> Vec<u8> {
    let c = InsecureCrypto("spiffe://t/agent/a".into());
    let mut bytes = encode_entry(&LogEntry::Header {
        chain: c.chain(),
        at_unix: 1000,
    })
    .unwrap();
    let mut tree = LogTree::new();
    for i in 0..n {
        let event = AuditEvent::Refused {
            migration: None,
            peer: format!("peer {i}"),
            reason: "test".into(),
        };
        for e in append(&mut tree, i, 1000 + i, event, &c).unwrap() {
            bytes.extend(encode_entry(&e).unwrap());
        }
    }
    bytes
}

fn verify(b: &[u8]) -> Result<VerifiedLog, AuditError> {
    verify_log(b, &InsecureCrypto("unused".into()))
}

#[test]
fn a_written_log_verifies() {
    let v = verify(&log(5)).unwrap();
    assert_eq!(v.records.len(), 5);
    assert_eq!(v.agent.to_string(), "spiffe://t/agent/a");
    assert_eq!(v.last_head.unwrap().size, 5);
    // The signed records as written: leaf i of the tree is record i.
    assert_eq!(v.created_at_unix, 1000);
    assert_eq!(v.chain, vec![b"spiffe://t/agent/a".to_vec()]);
    let leaves: Vec<Digest> = v.signed.iter().map(|r| log_leaf(&r.body)).collect();
    assert_eq!(leaves, v.tree.leaves());
}

#[test]
fn edits_deletions_reorderings_and_cuts_are_found_and_located() {
    let good = log(4);
    let at = entry_offsets(&good);
    // Edit a byte inside record 2 (entry 5: header, r0, h0, r1, h1, r2).
    let mut edited = good.clone();
    let (off, len) = at[5];
    edited[off + len - 70] ^= 1;
    let e = verify(&edited).unwrap_err();
    assert_eq!(e.entry, 5, "{e}");
    // Delete record 1 and its head.
    let mut deleted = good[..at[3].0].to_vec();
    deleted.extend_from_slice(&good[at[5].0..]);
    let e = verify(&deleted).unwrap_err();
    assert!(matches!(e.what, LogFault::Sequence { .. }), "{e}");
    // Swap records 1 and 2 (with their heads).
    let mut swapped = good[..at[3].0].to_vec();
    swapped.extend_from_slice(&good[at[5].0..at[7].0]);
    swapped.extend_from_slice(&good[at[3].0..at[5].0]);
    swapped.extend_from_slice(&good[at[7].0..]);
    assert!(verify(&swapped).is_err());
    // Cut inside the last entry: a torn append, reported where it
    // begins (tail::tests has every offset).
    let cut = &good[..good.len() - 3];
    let e = verify(cut).unwrap_err();
    assert_eq!(
        e.what,
        LogFault::TornTail {
            len: cut.len() - at[7].0
        },
        "{e}"
    );
    assert_eq!((e.entry, e.offset), (7, at[7].0));
    // Whole trailing entries removed: valid, but shorter — visible by
    // comparing the last head with one held elsewhere.
    let shorter = verify(&good[..at[5].0]).unwrap();
    assert_eq!(shorter.last_head.unwrap().size, 2);
}

#[test]
fn a_log_must_start_with_a_header() {
    let good = log(1);
    let at = entry_offsets(&good);
    let e = verify(&good[at[1].0..]).unwrap_err();
    assert_eq!(e.what, LogFault::NoHeader, "{e}");
}
