//! Property tests for the codecs and the Merkle tree.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // Tests: generated sizes and indexes are small.

use bytes::Bytes;
use convoy_protocol::delta::{self, PageCache};
use convoy_protocol::digest::{leaf_digest, reference_root, zero_leaf, MerkleTree};
use convoy_protocol::message::Message;
use convoy_protocol::page::{
    stream_for, BatchBuilder, Compressor, MemoryGeometry, PageData, PageIndex, PageSize,
    StreamReceiver,
};
use proptest::prelude::*;

/// A page of one of three kinds: zero, repetitive, or noisy.
fn page(kind: u8, seed: u8) -> Vec<u8> {
    match kind % 3 {
        0 => vec![0; 4096],
        1 => (0..4096)
            .map(|i| ((i / 64) as u8).wrapping_add(seed))
            .collect(),
        _ => (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(u32::from(seed)) >> 13) as u8)
            .collect(),
    }
}

proptest! {
    #[test]
    fn batches_round_trip(
        picks in proptest::collection::btree_set(0u64..512, 1..64),
        kinds in proptest::collection::vec(any::<u8>(), 64),
        level in 0i32..3,
        streams in 1u16..4,
    ) {
        let geometry = MemoryGeometry::new(PageSize::SIZE_4K, 512).unwrap();
        for s in 0..streams {
            let mine: Vec<u64> = picks
                .iter()
                .copied()
                .filter(|p| stream_for(PageIndex(*p), streams) == s)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let mut b = BatchBuilder::new(PageSize::SIZE_4K);
            for (i, p) in mine.iter().enumerate() {
                let bytes = page(kinds[i % kinds.len()], *p as u8);
                b.push_with(PageIndex(*p), |buf| buf.copy_from_slice(&bytes)).unwrap();
            }
            let enc = b.finish(0, 1, &mut Compressor::new(level).unwrap()).unwrap();
            // Through the wire encoding, too.
            let frame = Message::PageBatch(enc.header.clone(), Bytes::from(enc.payload.clone()))
                .encode()
                .unwrap();
            let Message::PageBatch(h, payload) =
                Message::decode(Bytes::from(frame).slice(4..)).unwrap()
            else {
                panic!("not a batch");
            };
            let mut rx = StreamReceiver::new(s, streams, geometry);
            let dec = rx.receive(&h, &payload).unwrap();
            let got: Vec<_> = dec
                .pages()
                .map(|(i, b)| match b {
                    PageData::Zero => (i.0, None),
                    PageData::Full(b) => (i.0, Some(b.to_vec())),
                    other => panic!("no cache, yet {other:?}"),
                })
                .collect();
            prop_assert_eq!(got.len(), mine.len());
            for (((idx, bytes), p), (leaf_idx, leaf)) in got.iter().zip(&mine).zip(&enc.leaves) {
                let expect = page(kinds[mine.iter().position(|x| x == p).unwrap() % kinds.len()], *p as u8);
                prop_assert_eq!(idx, p);
                prop_assert_eq!(leaf_idx.0, *p);
                match bytes {
                    None => {
                        prop_assert!(expect.iter().all(|b| *b == 0));
                        prop_assert_eq!(*leaf, zero_leaf(4096));
                    }
                    Some(b) => {
                        prop_assert_eq!(b, &expect);
                        prop_assert_eq!(*leaf, leaf_digest(&expect));
                    }
                }
            }
        }
    }

    #[test]
    fn delta_encode_then_apply_restores_the_new_page(
        len in 0usize..5000,
        seed in any::<u8>(),
        edits in proptest::collection::vec((any::<u16>(), 1usize..40, any::<u8>()), 0..40),
        limit in prop_oneof![Just(usize::MAX), 0usize..3000],
    ) {
        let old: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect();
        let mut new = old.clone();
        for (at, n, v) in edits {
            if len > 0 {
                let at = usize::from(at) % len;
                let end = (at + n).min(len);
                new[at..end].iter_mut().for_each(|b| *b ^= v);
            }
        }
        let mut out = vec![7u8];
        if delta::encode(&old, &new, &mut out, limit) {
            prop_assert!(out.len() - 1 <= limit);
            let mut page = old.clone();
            delta::apply(&mut page, &out[1..]).unwrap();
            prop_assert_eq!(&page, &new);
            prop_assert_eq!(out.len() == 1, old == new);
        } else {
            prop_assert_eq!(out, vec![7u8]);
            let mut all = Vec::new();
            prop_assert!(delta::encode(&old, &new, &mut all, usize::MAX));
            prop_assert!(all.len() > limit);
        }
    }

    /// Rounds of random edits sent through one cache: each round's batch
    /// mixes zero, whole and delta pages, and staging ends up equal to the
    /// memory with every leaf digest matching.
    #[test]
    fn batches_with_deltas_round_trip(
        rounds in proptest::collection::vec(
            proptest::collection::vec((0u64..64, any::<u8>(), any::<u16>()), 1..40),
            1..5,
        ),
        level in 0i32..3,
        cache_pages in 0usize..80,
    ) {
        let geometry = MemoryGeometry::new(PageSize::SIZE_4K, 64).unwrap();
        let mut memory: Vec<Vec<u8>> = (0..64).map(|p| page(p as u8, p as u8)).collect();
        let mut staging = vec![vec![0u8; 4096]; 64];
        let mut cache = PageCache::new(cache_pages * 4096, PageSize::SIZE_4K);
        let mut rx = StreamReceiver::new(0, 1, geometry);
        let mut comp = Compressor::new(level).unwrap();
        // Deltas sent, and those a cache that never evicts would send.
        let (mut deltas, mut expected) = (0, 0);
        let all: Vec<u64> = (0..64).collect();
        for seq in 0..=rounds.len() {
            let pages = if seq == 0 {
                all.clone()
            } else {
                let mut dirty = std::collections::BTreeSet::new();
                for &(p, v, at) in &rounds[seq - 1] {
                    let m = &mut memory[p as usize];
                    match v % 8 {
                        0 => m.fill(0),
                        1 => *m = page(v, at as u8),
                        _ => m[usize::from(at) % 4096] = v,
                    }
                    dirty.insert(p);
                }
                dirty.into_iter().collect()
            };
            let mut b = BatchBuilder::new(PageSize::SIZE_4K);
            for &p in &pages {
                let (held, bytes) = (&staging[p as usize], &memory[p as usize]);
                let mut d = Vec::new();
                if seq > 0
                    && held.iter().any(|b| *b != 0)
                    && bytes.iter().any(|b| *b != 0)
                    && delta::encode(held, bytes, &mut d, PageSize::SIZE_4K.delta_limit())
                {
                    expected += 1;
                }
                b.push_delta_with(PageIndex(p), &mut cache, |buf| buf.copy_from_slice(bytes))
                    .unwrap();
            }
            let enc = b.finish(seq as u64, 1 + seq as u32, &mut comp).unwrap();
            prop_assert_eq!(enc.stats.pages(), pages.len() as u64);
            deltas += enc.stats.delta;
            let dec = rx.receive(&enc.header, &Bytes::from(enc.payload)).unwrap();
            for ((idx, data), (leaf_idx, leaf)) in dec.pages().zip(&enc.leaves) {
                prop_assert_eq!(idx, *leaf_idx);
                let page = &mut staging[idx.0 as usize];
                data.write_to(page).unwrap();
                prop_assert_eq!(leaf_digest(page), *leaf);
            }
            prop_assert_eq!(&staging, &memory);
        }
        match cache_pages {
            0 => prop_assert_eq!(deltas, 0),
            64.. => prop_assert_eq!(deltas, expected),
            _ => prop_assert!(deltas <= expected),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        convoy_protocol::fuzz::message_decode(&data);
        convoy_protocol::fuzz::frame_decode(&data);
        convoy_protocol::fuzz::batch_decode(&data);
        convoy_protocol::fuzz::destination_sequence(&data);
        convoy_protocol::fuzz::delta_apply(&data);
    }

    #[test]
    fn incremental_merkle_equals_reference(
        n in 1usize..300,
        rounds in proptest::collection::vec(proptest::collection::vec((0usize..300, any::<u8>()), 0..20), 1..5),
    ) {
        let mut leaves = vec![zero_leaf(4096); n];
        let mut tree = MerkleTree::filled(n, zero_leaf(4096));
        for updates in rounds {
            for (i, v) in updates {
                let i = i % n;
                leaves[i] = leaf_digest(&[v, i as u8]);
                tree.set_leaf(i, leaves[i]);
            }
            prop_assert_eq!(tree.root(), reference_root(&leaves));
        }
    }
}
