//! Property tests for the codecs and the Merkle tree.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use bytes::Bytes;
use convoy_protocol::digest::{leaf_digest, reference_root, zero_leaf, MerkleTree};
use convoy_protocol::message::Message;
use convoy_protocol::page::{
    stream_for, BatchBuilder, Compressor, MemoryGeometry, PageIndex, PageSize, StreamReceiver,
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
            let got: Vec<_> = dec.pages().map(|(i, b)| (i.0, b.map(<[u8]>::to_vec))).collect();
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
    fn arbitrary_bytes_never_panic_the_decoder(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        convoy_protocol::fuzz::message_decode(&data);
        convoy_protocol::fuzz::frame_decode(&data);
        convoy_protocol::fuzz::batch_decode(&data);
        convoy_protocol::fuzz::destination_sequence(&data);
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
