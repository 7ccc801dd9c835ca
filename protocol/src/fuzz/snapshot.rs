//! The snapshot formats under hostile bytes: a bucket writes whatever it
//! likes where a manifest or a chunk should be.

use super::{resign, InsecureCrypto};
use crate::digest::Digest;
use crate::page::MemoryGeometry;
use crate::snapshot::chunk::{decode_plain, seal_chunk};
use crate::snapshot::key::{WrappedKey, WRAPPED_LEN};
use crate::snapshot::manifest::{seal_state, MANIFEST_CONTEXT};
use crate::snapshot::{
    open_manifest, Capture, ChunkKeys, ChunkLayout, DataKey, LineageId, Opener, QemuImage, Restore,
    Sealer, SignedManifest, SnapshotId, SnapshotManifest,
};

/// Leaves a fuzzed manifest may have before the target stops short of
/// restoring it (an agent bounds it by its capacity first).
const FUZZ_MAX_LEAVES: u64 = 1 << 16;

/// The first byte picks the target: even, a signed manifest (opened as
/// given, then re-signed by its own chain's insecure key; one that opens
/// lists one chunk per place and restores nothing it does not hold); odd,
/// a chunk's plaintext (`page = 64 << (b1 % 4)`, `count = b2 + 1`): one
/// that decodes has exactly `count` leaves and seals back to itself.
pub fn snapshot_open(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    if pick % 2 == 0 {
        manifest(rest);
    } else {
        plain(rest);
    }
}

fn manifest(data: &[u8]) {
    let Ok(m) = postcard::from_bytes::<SignedManifest>(data) else {
        return;
    };
    let v = InsecureCrypto(String::new());
    let _ = open_manifest(&m, &v);
    let Some(signature) = resign(&m.chain, MANIFEST_CONTEXT, &m.body) else {
        return;
    };
    let m = SignedManifest::from_parts(m.body, signature, m.chain);
    let Ok((man, layout)) = open_manifest(&m, &v) else {
        return;
    };
    assert_eq!(man.chunks.len() as u64, layout.chunks());
    if layout.leaves > FUZZ_MAX_LEAVES {
        return;
    }
    let key = DataKey::from_bytes([1; 32]);
    // A QEMU snapshot's state, once it opens, is checked against the
    // manifest before anything uses it.
    if let Ok(state) = crate::snapshot::manifest::open_state(&key, &man) {
        if let Ok(q) = QemuImage::decode(&state, &man) {
            assert!(q.stream_bytes <= man.memory.bytes());
            assert_eq!(q.definition.disks.len(), man.disks.len());
        }
    }
    let opener = Opener::new(&man, layout, &key);
    let mut restore = Restore::new(&man, layout);
    let stored: Vec<_> = opener.stored().collect();
    // Nothing opens under a key that sealed nothing.
    for (i, _, len) in &stored {
        let bytes = vec![0u8; *len as usize];
        assert!(opener.open(*i, &bytes).is_err());
    }
    if let Some(c) = stored
        .first()
        .and_then(|(i, _, _)| opener.open(*i, &[]).ok())
    {
        restore.record(&c);
    }
    if !stored.is_empty() {
        assert!(restore.finish().is_err());
    }
}

fn plain(data: &[u8]) {
    let [b1, b2, rest @ ..] = data else {
        return;
    };
    let page = 64usize << (b1 % 4);
    let count = usize::from(*b2) + 1;
    let Ok(raw) = decode_plain(rest, page, count) else {
        return;
    };
    assert_eq!(raw.len(), page * count);
    let keys = ChunkKeys::new(&DataKey::from_bytes([1; 32]));
    let Ok(Some(sealed)) = seal_chunk(&keys, &raw, page, 4096, 0) else {
        panic!("a decoded chunk is not all zero and seals");
    };
    let back = crate::snapshot::chunk::open_chunk(
        &keys,
        &sealed.name,
        &sealed.bytes,
        page,
        count,
        usize::MAX,
    );
    assert_eq!(back.ok(), Some(raw));
}

/// Seeds: a small snapshot's signed manifest, and the plaintexts of a
/// raw and a compressed chunk.
pub fn snapshot_seeds() -> Vec<Vec<u8>> {
    let page = 4096usize;
    let mut raw = vec![0u8; 300 * page];
    for (i, leaf) in raw.chunks_exact_mut(page).enumerate() {
        if i % 4 != 0 {
            leaf.fill(u8::try_from(i % 251).unwrap_or(1).max(1));
        }
    }
    let key = DataKey::from_bytes([1; 32]);
    let Some(layout) = ChunkLayout::for_leaves(300, page) else {
        return Vec::new();
    };
    let sealer = Sealer::new(&key, layout, 3);
    let mut capture = Capture::new(layout);
    for i in 0..layout.chunks() {
        let r = layout.range(i);
        let (a, b) = (
            usize::try_from(r.start).unwrap_or(0) * page,
            usize::try_from(r.end).unwrap_or(0) * page,
        );
        if let Ok(s) = sealer.seal(i, &raw[a..b]) {
            capture.record(&s);
        }
    }
    let Ok((chunks, root)) = capture.finish() else {
        return Vec::new();
    };
    let Ok(memory) = MemoryGeometry::from_bytes(300 * 4096) else {
        return Vec::new();
    };
    let snapshot = SnapshotId([2; 16]);
    let source = "spiffe://fuzz/agent/source";
    let Ok(source_id) = source.parse() else {
        return Vec::new();
    };
    let Ok(recipient) = "spiffe://fuzz/agent/destination".parse() else {
        return Vec::new();
    };
    let Ok(vm) = "vm-1".parse() else {
        return Vec::new();
    };
    let m = SnapshotManifest {
        format: crate::snapshot::manifest::FORMAT,
        snapshot,
        lineage: LineageId([3; 16]),
        generation: 1,
        previous: None,
        source: source_id,
        created_at: 1_700_000_000,
        vm,
        attributes: crate::vm::VmAttributes::default(),
        backend: crate::snapshot::SnapshotBackend::Sim,
        memory,
        disks: Vec::new(),
        chunk_leaves: layout.chunk_leaves,
        chunks,
        root,
        device_digest: crate::digest::device_state_digest(b"state"),
        device_state: seal_state(&key, &snapshot, b"state"),
        recipients: vec![WrappedKey {
            recipient,
            key: Digest([4; 32]),
            enc: [5; 32],
            wrapped: vec![6; WRAPPED_LEN],
        }],
        ticket: None,
    };
    let mut seeds = Vec::new();
    let sign = |m: &SnapshotManifest, seeds: &mut Vec<Vec<u8>>| {
        if let Ok(s) = SignedManifest::sign(m, &InsecureCrypto(source.into())) {
            if let Ok(mut b) = postcard::to_stdvec(&s) {
                b.insert(0, 0);
                seeds.push(b);
            }
        }
    };
    sign(&m, &mut seeds);
    // The same leaves as a QEMU VM's stream, its state sealed under the
    // key the target opens with.
    let qemu = QemuImage {
        definition: crate::vm::QemuVmSpec {
            name: m.vm.clone(),
            attributes: m.attributes.clone(),
            ..super::qemu_spec(0)
        },
        stream_bytes: 300 * 4096 - 10,
    };
    if let Ok(state) = qemu.encode() {
        let q = SnapshotManifest {
            backend: crate::snapshot::SnapshotBackend::Qemu,
            device_digest: crate::digest::device_state_digest(&state),
            device_state: seal_state(&key, &snapshot, &state),
            ..m.clone()
        };
        sign(&q, &mut seeds);
    }
    // Plaintexts: 64-byte pages, 3 leaves (one zero), raw and zstd.
    let mut body = vec![9u8; 128];
    body[64] = 1;
    let raw_plain = [&[1u8, 3, 0, 0b010, 0][..], &body].concat();
    seeds.push([&[1u8, 0, 2][..], &raw_plain].concat());
    if let Ok(z) = zstd::bulk::compress(&body, 3) {
        let z_plain = [&[1u8, 3, 0, 0b010, 1][..], &z].concat();
        seeds.push([&[1u8, 0, 2][..], &z_plain].concat());
    }
    // Refused ones: an unknown codec, every leaf zero, a manifest altered.
    seeds.push([&[1u8, 0, 2, 1, 3, 0, 0b010, 7][..], &body].concat());
    seeds.push(vec![1, 0, 2, 1, 3, 0, 0b111, 0]);
    if let Some(mut m) = seeds.first().cloned() {
        let n = m.len();
        m[n / 2] ^= 1;
        seeds.push(m);
    }
    seeds
}
