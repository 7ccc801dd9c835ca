//! A snapshot made, signed, and taken apart again — and every way a
//! bucket can lie about it refused with an error that says where.

#![allow(clippy::cast_possible_truncation, clippy::type_complexity)] // Tests: small sizes.

use std::collections::BTreeMap;

use super::chunk::{ChunkError, NONCE_LEN};
use super::key::{WrappedKey, WRAPPED_LEN};
use super::manifest::{open_state, seal_state, FreshnessError, ManifestError, StateError, FORMAT};
use super::*;
use crate::digest::{device_state_digest, Digest};
use crate::fuzz::InsecureCrypto;
use crate::page::MemoryGeometry;

const PAGE: usize = 4096;
const SOURCE: &str = "spiffe://lab/agent/a";

/// A VM of `leaves` leaves: some zero, some equal, most distinct.
fn image(leaves: usize, seed: u8) -> Vec<u8> {
    let mut v = vec![0u8; leaves * PAGE];
    for (i, leaf) in v.chunks_exact_mut(PAGE).enumerate() {
        match i % 5 {
            0 => {}
            1 => leaf.fill(7),
            _ => {
                for (j, b) in leaf.iter_mut().enumerate() {
                    *b = (j as u8).wrapping_mul(31) ^ (i as u8) ^ seed;
                }
                leaf[1] = 1;
            }
        }
    }
    // A whole chunk of zeros: it costs nothing.
    if leaves >= 512 {
        v[256 * PAGE..512 * PAGE].fill(0);
    }
    v
}

struct Made {
    signed: SignedManifest,
    objects: BTreeMap<ChunkName, Vec<u8>>,
    key: DataKey,
}

fn make(raw: &[u8], generation: u64, key: DataKey, seed: u8) -> Made {
    let leaves = (raw.len() / PAGE) as u64;
    let memory = MemoryGeometry::from_bytes(raw.len() as u64).unwrap();
    let layout = ChunkLayout::for_leaves(leaves, PAGE).unwrap();
    let sealer = Sealer::new(&key, layout, 3);
    let mut capture = Capture::new(layout);
    let mut objects = BTreeMap::new();
    for i in 0..layout.chunks() {
        let r = layout.range(i);
        let s = sealer
            .seal(i, &raw[r.start as usize * PAGE..r.end as usize * PAGE])
            .unwrap();
        if let Some(c) = &s.chunk {
            objects.insert(c.name, c.bytes.clone());
        }
        capture.record(&s);
    }
    let (chunks, root) = capture.finish().unwrap();
    let snapshot = SnapshotId([seed; 16]);
    let state = b"device state".to_vec();
    let m = SnapshotManifest {
        format: FORMAT,
        snapshot,
        lineage: LineageId([1; 16]),
        generation,
        previous: (generation > 1).then_some(Digest([9; 32])),
        source: SOURCE.parse().unwrap(),
        created_at: 1_700_000_000,
        vm: "vm-1".parse().unwrap(),
        attributes: crate::vm::VmAttributes::default(),
        backend: qemu::SnapshotBackend::Sim,
        memory,
        disks: Vec::new(),
        chunk_leaves: layout.chunk_leaves,
        chunks,
        root,
        device_digest: device_state_digest(&state),
        device_state: seal_state(&key, &snapshot, &state),
        recipients: vec![WrappedKey {
            recipient: "spiffe://lab/agent/b".parse().unwrap(),
            key: Digest([3; 32]),
            enc: [4; 32],
            wrapped: vec![5; WRAPPED_LEN],
        }],
        ticket: None,
    };
    let signed = Signed::sign(&m, &InsecureCrypto(SOURCE.into())).unwrap();
    Made {
        signed,
        objects,
        key,
    }
}

use crate::signed::Signed;

/// A valid manifest, opened (for other modules' tests).
pub(super) fn manifest_for_tests() -> SnapshotManifest {
    let made = make(&image(8, 1), 1, DataKey::from_bytes([1; 32]), 1);
    open_manifest(&made.signed, &InsecureCrypto(String::new()))
        .unwrap()
        .0
}

/// Opens and restores `made`, fetching chunks from `objects`.
fn restore(made: &Made, objects: &BTreeMap<ChunkName, Vec<u8>>) -> Result<Vec<u8>, String> {
    let (m, layout) =
        open_manifest(&made.signed, &InsecureCrypto(String::new())).map_err(|e| e.to_string())?;
    let opener = Opener::new(&m, layout, &made.key);
    let mut restore = Restore::new(&m, layout);
    let mut image = vec![0u8; layout.leaves as usize * PAGE];
    for (i, name, _) in opener.stored().collect::<Vec<_>>() {
        let Some(bytes) = objects.get(&name) else {
            continue;
        };
        let c = opener.open(i, bytes).map_err(|e| e.to_string())?;
        let r = layout.range(i);
        image[r.start as usize * PAGE..r.end as usize * PAGE].copy_from_slice(&c.raw);
        restore.record(&c);
    }
    restore.finish().map_err(|e| e.to_string())?;
    open_state(&made.key, &m).map_err(|e| e.to_string())?;
    Ok(image)
}

#[test]
fn a_snapshot_restores_to_the_image_it_was_made_of() {
    let raw = image(1000, 1);
    let made = make(&raw, 1, DataKey::from_bytes([7; 32]), 1);
    assert_eq!(restore(&made, &made.objects).unwrap(), raw);
    let (m, _) = open_manifest(&made.signed, &InsecureCrypto(String::new())).unwrap();
    // Chunk 1 is all zero: not stored.
    assert_eq!(m.chunks[1], ChunkRef::Zero);
    assert_eq!(m.stored().0, 3);
    // The root is the one a live migration checks over the same leaves.
    let leaves: Vec<Digest> = raw.chunks(PAGE).map(crate::digest::leaf_digest).collect();
    assert_eq!(m.root, crate::digest::reference_root(&leaves));
}

#[test]
fn a_second_generation_shares_its_unchanged_chunks() {
    let key = DataKey::from_bytes([7; 32]);
    let raw = image(1000, 1);
    let mut changed = raw.clone();
    changed[900 * PAGE + 5] ^= 0xff;
    let a = make(&raw, 1, key.clone(), 1);
    let b = make(&changed, 2, key, 2);
    let shared = b
        .objects
        .keys()
        .filter(|n| a.objects.contains_key(n))
        .count();
    assert_eq!((a.objects.len(), b.objects.len(), shared), (3, 3, 2));
}

#[test]
fn a_tampered_swapped_missing_or_foreign_chunk_is_refused_naming_it() {
    let made = make(&image(1000, 1), 1, DataKey::from_bytes([7; 32]), 1);
    let (m, _) = open_manifest(&made.signed, &InsecureCrypto(String::new())).unwrap();
    let ChunkRef::Stored { name: first, .. } = m.chunks[0] else {
        panic!("chunk 0 is stored")
    };
    let ChunkRef::Stored { name: third, .. } = m.chunks[2] else {
        panic!("chunk 2 is stored")
    };

    let mut tampered = made.objects.clone();
    tampered.get_mut(&third).unwrap()[NONCE_LEN + 3] ^= 1;
    let e = restore(&made, &tampered).unwrap_err();
    assert!(e.starts_with("chunk 2 (leaves 512..768"), "{e}");
    assert!(e.contains("does not authenticate"), "{e}");

    // Chunk 0's bytes under chunk 2's name (same length or not).
    let mut swapped = made.objects.clone();
    let zero = swapped[&first].clone();
    swapped.insert(third, zero);
    let e = restore(&made, &swapped).unwrap_err();
    assert!(e.starts_with("chunk 2 "), "{e}");

    let mut missing = made.objects.clone();
    missing.remove(&third);
    let e = restore(&made, &missing).unwrap_err();
    assert!(
        e.contains("1 stored chunks never arrived, the first chunk 2"),
        "{e}"
    );

    // Another lineage's key sealed these: nothing opens.
    let other = Made {
        key: DataKey::from_bytes([8; 32]),
        ..make(&image(1000, 1), 1, DataKey::from_bytes([7; 32]), 1)
    };
    let e = restore(&other, &other.objects).unwrap_err();
    assert!(e.starts_with("chunk 0 "), "{e}");
}

#[test]
fn chunks_of_another_snapshot_of_the_same_lineage_fail_the_root() {
    // Same key, so each chunk opens — but they are another VM's.
    let key = DataKey::from_bytes([7; 32]);
    let a = make(&image(1000, 1), 1, key.clone(), 1);
    let b = make(&image(1000, 2), 2, key, 2);
    let mut mixed = a.objects.clone();
    mixed.extend(b.objects.clone());
    // a's manifest names a's chunks: still fine with extras around.
    assert!(restore(&a, &mixed).is_ok());
    // b's manifest body with a's chunk list: a manifest lying about its
    // root is caught only because the signature breaks.
    let (mut mb, _) = open_manifest(&b.signed, &InsecureCrypto(String::new())).unwrap();
    let (ma, _) = open_manifest(&a.signed, &InsecureCrypto(String::new())).unwrap();
    mb.chunks = ma.chunks;
    let resigned = Signed::sign(&mb, &InsecureCrypto(SOURCE.into())).unwrap();
    let lying = Made {
        signed: resigned,
        objects: mixed,
        key: b.key.clone(),
    };
    let e = restore(&lying, &lying.objects).unwrap_err();
    assert!(e.starts_with("the chunks make root"), "{e}");
}

#[test]
fn an_altered_or_misattributed_manifest_is_refused() {
    let made = make(&image(300, 1), 1, DataKey::from_bytes([7; 32]), 1);
    let v = InsecureCrypto(String::new());
    let mut altered = made.signed.clone();
    let n = altered.body.len();
    altered.body[n - 40] ^= 1;
    assert!(matches!(
        open_manifest(&altered, &v),
        Err(ManifestError::Envelope(_))
    ));
    // Signed by another agent than the source it names.
    let (m, _) = open_manifest(&made.signed, &v).unwrap();
    let by_c = Signed::sign(&m, &InsecureCrypto("spiffe://lab/agent/c".into())).unwrap();
    assert!(matches!(
        open_manifest(&by_c, &v),
        Err(ManifestError::Signer { .. })
    ));
    // Self-contradictions, each signed properly.
    let cases: Vec<(&str, Box<dyn Fn(&mut SnapshotManifest)>)> = vec![
        (
            "chunks listed",
            Box::new(|m| m.chunks.pop().map(|_| ()).unwrap_or(())),
        ),
        ("leaves a chunk", Box::new(|m| m.chunk_leaves = 100)),
        ("generation", Box::new(|m| m.generation = 2)),
        ("recipients", Box::new(|m| m.recipients.clear())),
        (
            "named twice",
            Box::new(|m| {
                let r = m.recipients[0].clone();
                m.recipients.push(r);
            }),
        ),
        (
            "more than",
            Box::new(|m| {
                if let ChunkRef::Stored { len, .. } = &mut m.chunks[0] {
                    *len = u32::MAX;
                }
            }),
        ),
    ];
    for (want, change) in cases {
        let mut bad = m.clone();
        change(&mut bad);
        let s = Signed::sign(&bad, &InsecureCrypto(SOURCE.into())).unwrap();
        let e = open_manifest(&s, &v).unwrap_err().to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
    let mut format = m.clone();
    format.format = FORMAT + 1;
    let s = Signed::sign(&format, &InsecureCrypto(SOURCE.into())).unwrap();
    assert_eq!(
        open_manifest(&s, &v).unwrap_err(),
        ManifestError::Format(FORMAT + 1)
    );
}

#[test]
fn an_older_generation_is_a_rollback_and_another_of_the_same_a_fork() {
    let d = Digest([1; 32]);
    assert_eq!(check_fresh(1, &d, None), Ok(()));
    assert_eq!(check_fresh(3, &d, Some((2, Digest([0; 32])))), Ok(()));
    assert_eq!(check_fresh(2, &d, Some((2, d))), Ok(()));
    assert_eq!(
        check_fresh(1, &d, Some((2, d))),
        Err(FreshnessError::Rollback { got: 1, seen: 2 })
    );
    assert_eq!(
        check_fresh(2, &d, Some((2, Digest([0; 32])))),
        Err(FreshnessError::Fork(2))
    );
}

#[test]
fn the_device_state_is_bound_to_its_snapshot_and_digest() {
    let made = make(&image(300, 1), 1, DataKey::from_bytes([7; 32]), 1);
    let (mut m, _) = open_manifest(&made.signed, &InsecureCrypto(String::new())).unwrap();
    assert_eq!(open_state(&made.key, &m).unwrap(), b"device state");
    let mut other = m.clone();
    other.snapshot = SnapshotId([2; 16]);
    assert_eq!(
        open_state(&made.key, &other),
        Err(StateError::Authentication)
    );
    m.device_digest = Digest([0; 32]);
    assert_eq!(open_state(&made.key, &m), Err(StateError::Digest));
}

#[test]
fn manifest_object_names_round_trip_and_refuse_other_spellings() {
    let id = SnapshotId([0xab; 16]);
    let name = manifest_object(42, &id);
    assert_eq!(name, format!("manifests/g{:020}-{}", 42, "ab".repeat(16)));
    assert_eq!(parse_manifest_object(&name), Some((42, id)));
    for bad in [
        "manifests/g42-abab",
        "manifests/x00000000000000000042-abababababababababababababababab",
        &name.to_uppercase(),
        "chunks/abc",
    ] {
        assert_eq!(parse_manifest_object(bad), None, "{bad}");
    }
    let _ = ChunkError::Name;
}
