//! Round trips of the batch codec: what [`super::BatchBuilder`] encodes,
//! [`super::StreamReceiver`] decodes, and what it refuses.

// Tests: small page counts, indexes and byte patterns.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use super::*;
use crate::delta::{DeltaError, PageCache};
use crate::digest::{leaf_digest, zero_leaf};

fn geometry(pages: u64) -> MemoryGeometry {
    MemoryGeometry::new(PageSize::SIZE_4K, pages).unwrap()
}

fn page_bytes(i: u64) -> Vec<u8> {
    match i % 3 {
        0 => vec![0; 4096],
        1 => (0..4096).map(|b| (b % 7) as u8).collect(),
        _ => (0..4096u64)
            .map(|b| (b.wrapping_mul(2654435761).wrapping_add(i * 97) >> 7) as u8)
            .collect(),
    }
}

fn build(pages: &[u64], seq: u64, level: i32) -> EncodedBatch {
    let mut b = BatchBuilder::new(PageSize::SIZE_4K);
    for &p in pages {
        b.push_with(PageIndex(p), |buf| buf.copy_from_slice(&page_bytes(p)))
            .unwrap();
    }
    b.finish(seq, 1, &mut Compressor::new(level).unwrap())
        .unwrap()
}

#[test]
fn round_trip_raw_and_zstd() {
    for level in [0, 1, 3] {
        let s = STRIPE_PAGES;
        let pages: Vec<u64> = (0..s).chain(2 * s..2 * s + 6).collect();
        let enc = build(&pages, 0, level);
        let mut rx = StreamReceiver::new(0, 2, geometry(1000));
        let dec = rx
            .receive(&enc.header, &bytes::Bytes::from(enc.payload.clone()))
            .unwrap();
        let got: Vec<_> = dec.pages().collect();
        assert_eq!(got.len(), pages.len());
        for ((idx, bytes), &p) in got.iter().zip(&pages) {
            assert_eq!(idx.0, p);
            let expect = page_bytes(p);
            match bytes {
                PageData::Zero => assert!(is_zero(&expect)),
                PageData::Full(b) => assert_eq!(*b, &expect[..]),
                PageData::Delta(_) => panic!("no cache, no delta"),
                PageData::Retained => panic!("no held leaves, no retained page"),
            }
        }
        assert_eq!(enc.stats.pages(), pages.len() as u64);
        assert_eq!(enc.leaves.len(), pages.len());
    }
}

#[test]
fn blocks_over_a_base_send_only_what_differs_and_zeros_where_the_base_is_not() {
    let zero = zero_leaf(4096);
    // Block 0 equals the base's; block 1 differs; block 2 is zero over
    // a non-zero base block (must be sent); block 3 is zero over a
    // zero base block (nothing to send).
    let base = [
        leaf_digest(&page_bytes(1)),
        leaf_digest(&page_bytes(8)),
        leaf_digest(&page_bytes(5)),
        zero,
    ];
    let mut b = BatchBuilder::new(PageSize::SIZE_4K);
    let mut added = Vec::new();
    for p in 0..4u64 {
        let fill = |buf: &mut [u8]| {
            if p < 2 {
                buf.copy_from_slice(&page_bytes(p + 1))
            }
        };
        added.push(
            b.push_over_base_with(PageIndex(p), base[p as usize], None, fill)
                .unwrap(),
        );
    }
    assert_eq!(added, [true, true, true, false]);
    let enc = b.finish(0, 1, &mut Compressor::new(0).unwrap()).unwrap();
    assert_eq!(
        (enc.stats.retained, enc.stats.raw, enc.stats.zero),
        (1, 1, 1)
    );
    assert_eq!(enc.payload.len(), 4096);
    let mut rx = StreamReceiver::new(0, 1, geometry(64));
    rx.accept_retained();
    let dec = rx
        .receive(&enc.header, &bytes::Bytes::from(enc.payload))
        .unwrap();
    let got: Vec<_> = dec.pages().map(|(i, d)| (i.0, d)).collect();
    assert_eq!(got[0], (0, PageData::Retained));
    assert!(matches!(got[1], (1, PageData::Full(_))));
    assert_eq!(got[2], (2, PageData::Zero));
    assert_eq!(got.len(), 3);
}

#[test]
fn retained_pages_carry_no_bytes_and_only_where_agreed() {
    let mut b = BatchBuilder::new(PageSize::SIZE_4K);
    // Page 0 held as is, page 1 held in another version, page 2 zero.
    let held = [
        Some(leaf_digest(&page_bytes(1))),
        Some(leaf_digest(&page_bytes(9))),
        None,
    ];
    for p in 0..3u64 {
        let fill = |buf: &mut [u8]| {
            if p < 2 {
                buf.copy_from_slice(&page_bytes(p + 1))
            }
        };
        let added = b
            .push_nonzero_reusing_with(PageIndex(p), held[p as usize], None, fill)
            .unwrap();
        assert_eq!(added, p < 2);
    }
    let enc = b.finish(0, 1, &mut Compressor::new(0).unwrap()).unwrap();
    assert_eq!((enc.stats.retained, enc.stats.raw), (1, 1));
    assert_eq!(enc.payload.len(), 4096);
    assert_eq!(enc.leaves[0], (PageIndex(0), leaf_digest(&page_bytes(1))));
    let payload = bytes::Bytes::from(enc.payload);
    let mut rx = StreamReceiver::new(0, 1, geometry(64));
    assert_eq!(
        rx.receive(&enc.header, &payload).unwrap_err(),
        BatchError::UnexpectedRetained { page: 0 }
    );
    let mut rx = StreamReceiver::new(0, 1, geometry(64));
    rx.accept_retained();
    let dec = rx.receive(&enc.header, &payload).unwrap();
    let got: Vec<_> = dec.pages().collect();
    assert_eq!(got[0], (PageIndex(0), PageData::Retained));
    assert!(matches!(got[1], (PageIndex(1), PageData::Full(_))));
    assert_eq!(
        PageData::Retained.write_to(&mut [0u8; 4096]),
        Err(DeltaError::Retained)
    );
}

/// Pages 0..8 sent twice through one cache. The second time pages 0,
/// 3 and 7 are unchanged, page 1 changed in 8 bytes, page 6 in 64
/// scattered bytes, page 2 throughout, page 4 became zero and page 5
/// (zero before, so not cached) non-zero.
fn two_versions(level: i32) -> (Vec<Vec<u8>>, Vec<Vec<u8>>, EncodedBatch, EncodedBatch) {
    let mut old: Vec<Vec<u8>> = (0..8).map(|i| page_bytes(3 * i + 2)).collect();
    old[5] = vec![0; 4096];
    let mut new = old.clone();
    new[1][100..108].copy_from_slice(b"changed!");
    new[2] = page_bytes(1000);
    new[4] = vec![0; 4096];
    new[5] = page_bytes(5);
    for i in 0..64 {
        new[6][i * 61 + 7] ^= 0x5a;
    }
    let mut cache = PageCache::new(8 * 4096, PageSize::SIZE_4K);
    let mut comp = Compressor::new(level).unwrap();
    let mut send = |pages: &[Vec<u8>], seq| {
        let mut b = BatchBuilder::new(PageSize::SIZE_4K);
        for (i, p) in pages.iter().enumerate() {
            b.push_delta_with(PageIndex(i as u64), &mut cache, |buf| {
                buf.copy_from_slice(p)
            })
            .unwrap();
        }
        b.finish(seq, 1, &mut comp).unwrap()
    };
    let first = send(&old, 0);
    let second = send(&new, 1);
    assert_eq!(
        cache.stats(),
        crate::delta::CacheStats {
            hits: 6,
            misses: 7 + 1,
            evictions: 0
        }
    );
    (old, new, first, second)
}

#[test]
fn deltas_round_trip_and_rebuild_the_new_pages() {
    for level in [0, 3] {
        let (old, new, first, second) = two_versions(level);
        assert_eq!(first.stats.delta, 0);
        let kinds: Vec<_> = second.header.runs.iter().map(|r| (r.len, r.kind)).collect();
        use RunKind::*;
        assert_eq!(
            kinds,
            [
                (2, Delta),
                (1, Data),
                (1, Delta),
                (1, Zero),
                (1, Data),
                (2, Delta)
            ]
        );
        assert_eq!(second.stats.delta, 5);
        assert_eq!(second.stats.zero, 1);
        assert_eq!(second.stats.pages(), 8);
        let mut rx = StreamReceiver::new(0, 1, geometry(64));
        let mut staging = vec![vec![0u8; 4096]; 8];
        for (enc, want) in [(&first, &old), (&second, &new)] {
            let dec = rx
                .receive(&enc.header, &bytes::Bytes::from(enc.payload.clone()))
                .unwrap();
            for ((idx, data), (leaf_idx, leaf)) in dec.pages().zip(&enc.leaves) {
                assert_eq!(idx, *leaf_idx);
                let page = &mut staging[idx.0 as usize];
                data.write_to(page).unwrap();
                assert_eq!(leaf_digest(page), *leaf);
            }
            assert_eq!(&staging, want);
        }
    }
}

#[test]
fn a_page_with_a_few_changed_bytes_costs_a_few_bytes() {
    let (_, _, _, second) = two_versions(0);
    // Pages 2 and 5 whole. Each delta has a u16 length: pages 0, 3 and
    // 7 nothing more; page 1 [100, 8, 8 XOR bytes]; page 6 three bytes
    // a changed byte (zero run, literal run, the byte).
    assert_eq!(
        second.payload.len(),
        2 * 4096 + 3 * 2 + (2 + 10) + (2 + 64 * 3)
    );
}

fn refused(header: &BatchHeader, payload: Vec<u8>) -> BatchError {
    let mut rx = StreamReceiver::new(0, 1, geometry(64));
    rx.receive(header, &bytes::Bytes::from(payload))
        .unwrap_err()
}

#[test]
fn hostile_delta_payloads_are_refused() {
    let header = BatchHeader {
        seq: 0,
        round: 2,
        runs: vec![Run {
            gap: 3,
            len: 2,
            kind: RunKind::Delta,
        }],
        compression: Compression::None,
    };
    let good = vec![3, 0, 5, 1, 1, 0, 0];
    let mut rx = StreamReceiver::new(0, 1, geometry(64));
    let dec = rx
        .receive(&header, &bytes::Bytes::from(good.clone()))
        .unwrap();
    let got: Vec<_> = dec.pages().collect();
    assert_eq!(
        got,
        vec![
            (PageIndex(3), PageData::Delta(&[5, 1, 1])),
            (PageIndex(4), PageData::Delta(&[]))
        ]
    );
    assert_eq!(
        refused(&header, good[..6].to_vec()),
        BatchError::PayloadTruncated { page: 4 }
    );
    assert_eq!(
        refused(&header, good[..4].to_vec()),
        BatchError::PayloadTruncated { page: 3 }
    );
    let mut trailing = good.clone();
    trailing.push(0);
    assert_eq!(
        refused(&header, trailing),
        BatchError::PayloadSize {
            expected: 7,
            got: 8
        }
    );
    assert!(matches!(
        refused(&header, vec![1, 8, 0, 0]),
        BatchError::DeltaTooLong {
            page: 3,
            len: 2049,
            max: 2048
        }
    ));
    assert!(matches!(
        refused(&header, vec![3, 0, 5, 0, 1, 0, 0]),
        BatchError::BadDelta {
            page: 3,
            error: DeltaError::EmptyLiteral { .. }
        }
    ));
    // 4096 as a zero run reaches past the page.
    assert!(matches!(
        refused(&header, vec![4, 0, 0x80, 0x20, 1, 0, 0, 0]),
        BatchError::BadDelta {
            page: 3,
            error: DeltaError::PastPageEnd { .. }
        }
    ));
    assert!(matches!(
        refused(&header, vec![0; 2 * 2051]),
        BatchError::PayloadTooLarge { max: 4100, .. }
    ));
    // A zstd payload is bounded by the same maximum.
    let mut z = Compressor::new(3).unwrap();
    let big = z.compress(&vec![0; 8192]).unwrap().unwrap();
    let zheader = BatchHeader {
        compression: Compression::Zstd,
        ..header
    };
    assert!(matches!(refused(&zheader, big), BatchError::Zstd(_)));
}

#[test]
fn a_cache_of_another_page_size_is_refused() {
    let size = PageSize::try_from(8192).unwrap();
    let mut cache = PageCache::new(1 << 20, size);
    let mut b = BatchBuilder::new(PageSize::SIZE_4K);
    assert_eq!(
        b.push_delta_with(PageIndex(0), &mut cache, |_| {}),
        Err(BuildError::CachePageSize {
            cache: 8192,
            batch: 4096
        })
    );
    assert_eq!(b.pages(), 0);
}

#[test]
fn a_skipped_zero_page_leaves_the_cache() {
    let mut cache = PageCache::new(1 << 20, PageSize::SIZE_4K);
    cache.insert(PageIndex(0), &[1; 4096]);
    let mut b = BatchBuilder::new(PageSize::SIZE_4K);
    assert_eq!(
        b.push_nonzero_delta_with(PageIndex(0), &mut cache, |_| {}),
        Ok(false)
    );
    assert!(cache.is_empty());
    assert_eq!(b.pages(), 0);
}

#[test]
fn out_of_order_and_wrong_stream_are_refused() {
    let enc = build(&[0, 1, 2], 1, 0);
    let mut rx = StreamReceiver::new(0, 2, geometry(100));
    assert!(matches!(
        rx.receive(&enc.header, &bytes::Bytes::from(enc.payload.clone())),
        Err(BatchError::OutOfOrder {
            expected: 0,
            got: 1,
            ..
        })
    ));
    let enc = build(&[STRIPE_PAGES], 0, 0);
    assert!(matches!(
        rx.receive(&enc.header, &bytes::Bytes::from(enc.payload.clone())),
        Err(BatchError::WrongStream { page, .. }) if page == STRIPE_PAGES
    ));
}

#[test]
fn payload_tampering_is_detected_by_size_or_zstd() {
    let enc = build(&[1, 2], 0, 0);
    let mut rx = StreamReceiver::new(0, 1, geometry(100));
    assert!(matches!(
        rx.receive(&enc.header, &bytes::Bytes::from(enc.payload[1..].to_vec())),
        Err(BatchError::PayloadSize { .. })
    ));
    let enc = build(&[1, 4], 0, 3);
    assert_eq!(enc.header.compression, Compression::Zstd);
    let mut bad = enc.payload.clone();
    bad.truncate(bad.len() - 3);
    assert!(rx.receive(&enc.header, &bytes::Bytes::from(bad)).is_err());
}

#[test]
fn pages_past_memory_are_refused() {
    let enc = build(&[5], 0, 0);
    let mut rx = StreamReceiver::new(0, 1, geometry(5));
    assert!(matches!(
        rx.receive(&enc.header, &bytes::Bytes::from(enc.payload.clone())),
        Err(BatchError::PageOutOfRange { .. })
    ));
}
