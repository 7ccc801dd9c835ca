//! Bodies of the cargo-fuzz targets in `fuzz/`, kept here so the committed
//! corpora replay as ordinary tests (`tests/fuzz_corpus.rs`) with exactly
//! the code the fuzzer runs. Each function must never panic, whatever the
//! input.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::audit::{
    encode_entry, entry_offsets, recover_log, verify_log, LogEntry, SignedTreeHead, VerifiedLog,
    HEAD_CONTEXT, RECORD_CONTEXT,
};
use crate::ctl::CtlMessage;
use crate::delta;
use crate::destination::{Destination, DestinationConfig};
use crate::evidence::{check_bundle, EvidenceBundle};
use crate::frame::split_frame;
use crate::logtree::{log_leaf, LogTree};
use crate::message::{Capabilities, DecodeError, EncodeError, Message};
use crate::names::Role;
use crate::page::{MemoryGeometry, PageData, PageSize, StreamReceiver};
use crate::receipt::{SignedReceipt, RECEIPT_CONTEXT};
use crate::signed::{
    sign_in_context, ChainError, ChainVerifier, SignError, SignatureError, Signer,
};
use crate::ticket::{SignedTicket, MAX_TICKET_LIFETIME_SECS, TICKET_CONTEXT};

mod snapshot;
mod source_run;

pub use snapshot::{snapshot_open, snapshot_seeds};
pub use source_run::{
    fuzz_leaf, op, source_ticket, SourceRun, COMMIT_FAILS, DESTINATION_ID, SOURCE_ID,
    SOURCE_MIGRATION,
};

/// Splits frames off arbitrary bytes and decodes each, as a migration
/// message and as an operator protocol frame.
pub fn frame_decode(data: &[u8]) {
    let mut rest = data;
    while let Ok(Some((frame, used))) = split_frame(rest) {
        let _ = Message::decode(Bytes::copy_from_slice(frame));
        let _ = CtlMessage::decode(frame);
        rest = &rest[used..];
    }
}

/// Decodes one frame body, as a migration message and as an operator
/// protocol frame; whatever decodes must re-encode, decode again, and
/// re-encode to the same bytes (compared as bytes: a report's `f64` may be
/// NaN, which is not equal to itself).
pub fn message_decode(data: &[u8]) {
    let migration = |b: &[u8]| Message::decode(Bytes::copy_from_slice(b));
    if let Ok(m) = migration(data) {
        round_trip(&m, Message::encode, migration);
    }
    if let Ok(m) = CtlMessage::decode(data) {
        round_trip(&m, CtlMessage::encode, CtlMessage::decode);
    }
}

/// Encodes `m`, decodes the frame's body and encodes again: the same bytes.
fn round_trip<M>(
    m: &M,
    encode: impl Fn(&M) -> Result<Vec<u8>, EncodeError>,
    decode: impl Fn(&[u8]) -> Result<M, DecodeError>,
) {
    let first = match encode(m) {
        Ok(b) => b,
        // Decode bounds the input to one frame, so this cannot happen.
        Err(e) => panic!("decoded message does not encode: {e}"),
    };
    let m2 = match decode(&first[crate::frame::LEN_PREFIX..]) {
        Ok(m2) => m2,
        Err(e) => panic!("re-encoded message does not decode: {e}"),
    };
    match encode(&m2) {
        Ok(second) => assert_eq!(first, second, "round trip changed the encoding"),
        Err(e) => panic!("decoded message does not encode: {e}"),
    }
}

/// Feeds page batches to a stream receiver of a geometry chosen by the
/// first bytes, and writes every page of what decodes into a scratch page:
/// a delta that passed decoding must apply, and applying it twice must
/// restore the page (XOR).
pub fn batch_decode(data: &[u8]) {
    let [pages_hi, pages_lo, streams, stream, rest @ ..] = data else {
        return;
    };
    // The high bit of the stream byte: a destination that holds a retained
    // image, which accepts retained pages.
    let reusing = *stream & 0x80 != 0;
    let pages = u64::from(u16::from_be_bytes([*pages_hi, *pages_lo])).max(1);
    let streams = u16::from(*streams % 4) + 1;
    let stream = u16::from(*stream) % streams;
    let Ok(geometry) = MemoryGeometry::new(PageSize::SIZE_4K, pages) else {
        return;
    };
    let mut rx = StreamReceiver::new(stream, streams, geometry);
    if reusing {
        rx.accept_retained();
    }
    let mut scratch: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    let mut input = rest;
    while let Ok(Some((frame, used))) = split_frame(input) {
        if let Ok(Message::PageBatch(h, payload)) = Message::decode(Bytes::copy_from_slice(frame)) {
            if let Ok(batch) = rx.receive(&h, &payload) {
                for (idx, page) in batch.pages() {
                    assert!(idx.0 < pages);
                    match page {
                        PageData::Full(b) => assert_eq!(b.len(), 4096),
                        PageData::Delta(d) => {
                            assert!(d.len() <= 2048);
                            let before = scratch.clone();
                            if let Err(e) = delta::apply(&mut scratch, d) {
                                panic!("a decoded delta does not apply: {e}");
                            }
                            if let Err(e) = delta::apply(&mut scratch, d) {
                                panic!("a delta applied once does not apply again: {e}");
                            }
                            assert_eq!(scratch, before, "a delta twice is not the identity");
                        }
                        PageData::Zero => {}
                        PageData::Retained => {
                            assert!(reusing, "a retained page was not agreed on");
                            assert!(page.write_to(&mut scratch).is_err());
                            continue;
                        }
                    }
                    if let Err(e) = page.write_to(&mut scratch) {
                        panic!("a decoded page does not write: {e}");
                    }
                }
            }
        }
        input = &input[used..];
    }
}

/// Applies arbitrary bytes as a delta to a page whose length the first two
/// bytes choose (big-endian, up to 8 KiB): a refused delta leaves the page
/// as it was and fails [`delta::check`] too; an accepted one passes it and
/// undoes itself when applied again. Then the same bytes, read as the XOR
/// of an old and a new page, must encode to a delta that restores the new
/// page, and not fit in a byte less.
pub fn delta_apply(data: &[u8]) {
    let [hi, lo, rest @ ..] = data else {
        return;
    };
    let len = usize::from(u16::from_be_bytes([*hi, *lo])) % 8193;
    // CAST: a remainder of division by 256.
    #[allow(clippy::cast_possible_truncation)]
    let old: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
    let mut page = old.clone();
    match delta::apply(&mut page, rest) {
        Err(e) => {
            assert_eq!(page, old, "refused delta changed the page: {e}");
            assert_eq!(delta::check(rest, len), Err(e));
        }
        Ok(()) => {
            assert_eq!(delta::check(rest, len), Ok(()));
            if let Err(e) = delta::apply(&mut page, rest) {
                panic!("an applied delta does not apply again: {e}");
            }
            assert_eq!(page, old, "a delta twice is not the identity");
        }
    }
    let new: Vec<u8> = old
        .iter()
        .zip(rest.iter().chain(std::iter::repeat(&0)))
        .map(|(a, b)| a ^ b)
        .collect();
    let mut out = vec![0xaa];
    assert!(delta::encode(&old, &new, &mut out, usize::MAX));
    let encoded = out.len() - 1;
    let mut page = old.clone();
    if let Err(e) = delta::apply(&mut page, &out[1..]) {
        panic!("an encoded delta does not apply: {e}");
    }
    assert_eq!(page, new, "encode then apply does not restore the page");
    if encoded > 0 {
        assert!(!delta::encode(&old, &new, &mut out, encoded - 1));
        assert_eq!(out.len(), encoded + 1, "a refused encode changed out");
    }
}

/// An insecure stand-in for the agent's crypto, for fuzzing and tests: a
/// "certificate chain" is the signer's SPIFFE ID as text, a "signature" is
/// a keyed BLAKE3 hash under that ID. It lets fuzzers and the Pair harness
/// reach code past signature checks; nothing else may use it.
#[derive(Debug, Clone)]
pub struct InsecureCrypto(pub String);

fn insecure_sig(who: &[u8], message: &[u8]) -> Vec<u8> {
    let key = blake3::hash(who);
    let h = blake3::keyed_hash(key.as_bytes(), message);
    let mut s = h.as_bytes().to_vec();
    s.extend_from_slice(h.as_bytes());
    s
}

impl Signer for InsecureCrypto {
    fn chain(&self) -> Vec<Vec<u8>> {
        vec![self.0.as_bytes().to_vec()]
    }
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        Ok(insecure_sig(self.0.as_bytes(), message))
    }
}

impl ChainVerifier for InsecureCrypto {
    fn verify_chain(
        &self,
        chain: &[Vec<u8>],
        _now: u64,
    ) -> Result<crate::names::SpiffeId, ChainError> {
        let leaf = chain.first().ok_or(ChainError::Empty)?;
        let s = std::str::from_utf8(leaf).map_err(|e| ChainError::Certificate(e.to_string()))?;
        s.parse()
            .map_err(|e: crate::names::NameError| ChainError::Certificate(e.to_string()))
    }
    fn verify_signature(
        &self,
        leaf: &[u8],
        message: &[u8],
        sig: &[u8],
    ) -> Result<(), SignatureError> {
        (insecure_sig(leaf, message) == sig)
            .then_some(())
            .ok_or(SignatureError::Invalid)
    }
    /// The "key" is the signer's name.
    fn public_key(&self, leaf: &[u8]) -> Result<Vec<u8>, SignatureError> {
        Ok(leaf.to_vec())
    }
}

impl InsecureCrypto {
    /// A notary signing as `id`.
    pub fn notary(id: &str, now: Instant) -> crate::receipt::Notary {
        let c = std::sync::Arc::new(InsecureCrypto(id.into()));
        crate::receipt::Notary::new(c.clone(), c, now, 1_700_000_000)
    }
}

/// Feeds an arbitrary sequence of messages to a destination state machine.
pub fn destination_sequence(data: &[u8]) {
    let mut now = Instant::now();
    let mut d = Destination::new(DestinationConfig {
        max_memory_bytes: 1 << 24,
        max_disk_bytes: 1 << 26,
        capabilities: Capabilities::OURS,
        handover_timeout: Duration::from_secs(1),
        peer: "spiffe://fuzz/agent/source".parse().expect("valid id"),
        notary: InsecureCrypto::notary("spiffe://fuzz/agent/destination", now),
        recovery: Duration::from_secs(1),
        silence: Duration::from_secs(5),
        max_bookkeeping_bytes: 1 << 30,
    });
    let source: crate::names::SpiffeId = "spiffe://fuzz/agent/source".parse().expect("valid id");
    let mut input = data;
    while let Ok(Some((frame, used))) = split_frame(input) {
        now += Duration::from_millis(10);
        match Message::decode(Bytes::copy_from_slice(frame)) {
            // A Resume arrives first on a new connection, never as a
            // message on the old one: fed the way a driver does.
            Ok(Message::Resume(r)) => {
                let _ = d.handle_resume(now, &source, &r);
            }
            // (A RoundApplied never reaches a destination:) it stands for
            // a broken link here, so that resuming is reached.
            Ok(Message::RoundApplied(_)) => d.handle_link_lost(now, "fuzz"),
            Ok(m) => {
                let _ = d.handle_message(now, m);
            }
            Err(_) => {}
        }
        while let Some(a) = d.poll_action() {
            if let crate::destination::DestinationAction::PrepareStaging { .. } = a {
                d.handle_staging_ready(now);
                let _ = d.handle_stream_opened(0);
            }
        }
        while d.poll_event().is_some() {}
        input = &input[used..];
    }
    d.handle_timeout(now + Duration::from_secs(5));
    while d.poll_action().is_some() {}
}

/// Runs `f` on every input of the committed corpus of `target` (under
/// `fuzz/corpus/`, beside the crate whose manifest directory is
/// `manifest_dir`), as the replay tests do; panics if the corpus is
/// missing or holds fewer than 5 inputs.
pub fn replay_corpus(manifest_dir: &str, target: &str, f: fn(&[u8])) {
    let dir = std::path::Path::new(manifest_dir)
        .join("../fuzz/corpus")
        .join(target);
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {} missing: {e}", dir.display()));
    let mut n = 0;
    for e in entries {
        let path = e.unwrap_or_else(|e| panic!("corpus {target}: {e}")).path();
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        f(&data);
        n += 1;
    }
    assert!(n >= 5, "corpus {target} has only {n} inputs");
}

/// Feeds a source state machine a hostile destination's messages, with
/// time, a broken link, a cancel and its driver's reports interleaved as
/// the input says (see [`SourceRun`]): it must not panic nor loop, must
/// finish once every deadline passed, and must hand the VM over or
/// complete only after a valid Accept, Ready and Started (receipts and
/// digests checked independently); a VM handed over is never resumed here
/// but on the destination's Abort before it ran there.
pub fn source_sequence(data: &[u8]) {
    let Some((mut run, mut input)) = SourceRun::new(data) else {
        return;
    };
    while run.step(&mut input) {}
    run.finish();
}

/// The ticket `qemu_manifest_admission` admits against, by `choice`
/// (modulo 4): pre-copy on 2 streams, post-copy, hybrid, and pre-copy on 4
/// streams copying storage; VM `vm`, migration `[3; 16]`.
pub fn admission_ticket(choice: u8) -> crate::ticket::Ticket {
    use crate::model::{MigrationMode, MigrationPlan};
    let plan = match choice % 4 {
        0 => MigrationPlan::default(),
        1 => MigrationPlan {
            mode: MigrationMode::Postcopy,
            ..MigrationPlan::default()
        },
        2 => MigrationPlan {
            mode: MigrationMode::Hybrid,
            ..MigrationPlan::default()
        },
        _ => MigrationPlan {
            streams: 4,
            copy_storage: true,
            ..MigrationPlan::default()
        },
    };
    // A 16 MiB VM; with storage, two 1 MiB disks.
    let disks = if choice % 4 == 3 { 2 } else { 0 };
    let subject = crate::vm::VmSubject {
        memory_bytes: 16 << 20,
        disks: (0..disks)
            .map(|i| crate::vm::DiskSubject {
                name: format!("d{i}.img"),
                bytes: 1 << 20,
            })
            .collect(),
        attributes: crate::vm::VmAttributes::default().digest(),
    };
    crate::ticket::Ticket {
        id: crate::names::MigrationId([3; 16]),
        vm: "vm".parse().expect("valid name"),
        subject,
        source: "spiffe://fuzz/agent/source".parse().expect("valid id"),
        destination: "spiffe://fuzz/agent/destination".parse().expect("valid id"),
        plan,
        issued_at: 1_700_000_000,
        expires_at: 1_700_000_300,
        nonce: [3; 16],
        approvers: Vec::new(),
        approvals: Vec::new(),
    }
}

/// A 16 MiB QEMU VM named `vm` with `disks` disks `d0.img`, `d1.img`…: the
/// definition the admission tests, seeds and fuzz tickets share.
pub fn qemu_spec(disks: usize) -> crate::ctl::QemuVmSpec {
    crate::ctl::QemuVmSpec {
        name: "vm".parse().expect("valid name"),
        binary: "qemu-system-x86_64".into(),
        memory_mib: 16,
        vcpus: 1,
        kernel: Some("vmlinuz".into()),
        initrd: None,
        append: String::new(),
        disks: (0..disks).map(|i| format!("d{i}.img")).collect(),
        accel: crate::ctl::Accel::Tcg,
        attributes: Default::default(),
    }
}

/// Decodes a `Propose` (the bytes after the first, which picks the ticket
/// of [`admission_ticket`]) and runs its QEMU manifest through
/// [`crate::stream::QemuManifest::validate`] and the proposal through
/// [`crate::admission::admit`]: a manifest that validates is within every
/// bound (channels, disks, formats, sizes); a proposal admitted is exactly
/// the ticket's VM, migration and plan, and its QEMU stream what the plan
/// grants (its multifd channels the plan's streams, or none).
pub fn qemu_manifest_admission(data: &[u8]) {
    use crate::model::MigrationMode;
    let [choice, body @ ..] = data else {
        return;
    };
    let ticket = admission_ticket(*choice);
    let Ok(Message::Propose(p)) = Message::decode(Bytes::copy_from_slice(body)) else {
        return;
    };
    let m = &p.manifest;
    let valid = m.qemu.as_deref().map(|q| (q, q.validate()));
    if let Some((q, Ok(()))) = valid {
        let streams = usize::from(crate::model::MAX_STREAMS);
        assert!(usize::from(q.multifd_channels) <= streams);
        assert!(q.multifd_channels == 0 || q.mode == MigrationMode::Precopy);
        assert!(q.disks.len() <= crate::stream::MAX_DISKS);
        assert!(q.disks.is_empty() || q.disks.len() == q.spec.disks.len());
        assert!(q
            .disks
            .iter()
            .all(|d| d.format == "raw" || d.format == "qcow2"));
        assert!(q.disk_bytes().is_some());
        assert!(q.channels() <= 1 + streams + crate::stream::MAX_DISKS);
    }
    let admitted = crate::admission::admit(&ticket, &p.vm, p.migration, m, &p.attributes);
    if admitted.is_err() {
        return;
    }
    // The VM the ticket was issued for, with the attributes it binds.
    assert_eq!(
        crate::admission::proposed_subject(m, &p.attributes),
        ticket.subject
    );
    let plan = &ticket.plan;
    assert_eq!(p.vm, ticket.vm);
    assert_eq!(p.migration, ticket.id);
    assert_eq!(&m.plan, plan);
    assert!(plan.validate().is_ok());
    assert_eq!(m.start_paused, plan.start_paused);
    match m.qemu.as_deref() {
        Some(q) => {
            assert_eq!(q.mode, plan.mode);
            // The plan's streams as multifd channels, or none (QEMU's one
            // stream, which a source may keep to): never others.
            let multifd = plan.mode == MigrationMode::Precopy && plan.streams > 1;
            let granted = if multifd { plan.streams } else { 0 };
            assert!(q.multifd_channels == granted || q.multifd_channels == 0);
            assert!(q.disks.is_empty() || plan.copy_storage);
            assert!(!m.postcopy && !plan.start_paused && !plan.storage_postcopy);
        }
        None => {
            assert_eq!(m.data_streams, plan.streams);
            assert_eq!(m.postcopy, plan.mode != MigrationMode::Precopy);
            assert!(m.disks.is_empty() || plan.copy_storage);
        }
    }
}

/// The clock of the signature targets: the first 8 bytes (big-endian), or
/// `None` when there are fewer.
fn clock(data: &[u8]) -> Option<(u64, &[u8])> {
    let (now, rest) = data.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*now), rest))
}

/// `body` signed under `context` by the insecure key of the chain's leaf,
/// so that a fuzzer reaches the checks behind the signature.
fn resign(chain: &[Vec<u8>], context: &[u8], body: &[u8]) -> Option<Vec<u8>> {
    let leaf = std::str::from_utf8(chain.first()?).ok()?;
    sign_in_context(&InsecureCrypto(leaf.into()), context, body).ok()
}

/// Re-signs each approval inside a ticket body by its own chain's insecure
/// key, so the fuzzer reaches the approval checks past their signatures.
fn resign_approvals(body: &[u8]) -> Option<Vec<u8>> {
    let mut t: crate::ticket::Ticket = postcard::from_bytes(body).ok()?;
    for a in &mut t.approvals {
        a.signature = resign(&a.chain, crate::ticket::approval::APPROVAL_CONTEXT, &a.body)?;
    }
    postcard::to_stdvec(&t).ok()
}

/// Verifies a signed ticket (after an 8-byte clock) as given, then with
/// its approvals and itself re-signed by their own chains' insecure keys;
/// what verifies must be an operator's, valid now within the skew, and
/// approved by as many distinct operators and keys as it carries
/// approvals.
pub fn ticket_verify(data: &[u8]) {
    let Some((now, rest)) = clock(data) else {
        return;
    };
    let Ok(t) = postcard::from_bytes::<SignedTicket>(rest) else {
        return;
    };
    let v = InsecureCrypto(String::new());
    let _ = t.verify(&v, now, 60);
    let body = resign_approvals(&t.body).unwrap_or(t.body);
    let Some(signature) = resign(&t.chain, TICKET_CONTEXT, &body) else {
        return;
    };
    let t = SignedTicket::from_parts(body, signature, t.chain);
    if let Ok(ok) = t.verify(&v, now, 60) {
        let (from, to) = (ok.ticket.issued_at, ok.ticket.expires_at);
        assert_eq!(ok.signer.role(), Role::Operator);
        assert!(from < to && to - from <= MAX_TICKET_LIFETIME_SECS);
        assert!(from <= now.saturating_add(60) && now < to.saturating_add(60));
        let a = &ok.approvals;
        assert_eq!(a.count(), ok.ticket.approvals.len());
        assert_eq!(a.principals().len(), a.count(), "one approval per operator");
        let keys: std::collections::BTreeSet<[u8; 32]> = a.0.iter().map(|x| x.key.0).collect();
        assert_eq!(keys.len(), a.count(), "one approval per key");
        assert!(a.count() >= ok.ticket.approvers.len(), "every approver met");
        assert!(a.0.iter().all(|x| x.principal.role() == Role::Operator));
    }
}

/// Verifies a signed receipt as given, then re-signed by its own chain's
/// insecure key; what verifies must be an agent's.
pub fn receipt_verify(data: &[u8]) {
    let Ok(r) = postcard::from_bytes::<SignedReceipt>(data) else {
        return;
    };
    let v = InsecureCrypto(String::new());
    let _ = r.verify(&v);
    let Some(signature) = resign(&r.chain, RECEIPT_CONTEXT, &r.body) else {
        return;
    };
    let r = SignedReceipt::from_parts(r.body, signature, r.chain);
    if let Ok(ok) = r.verify(&v) {
        assert_eq!(ok.signer.role(), Role::Agent);
    }
}

/// Verifies a log as given, then resealed: every record re-signed by the
/// header's insecure key and every tree head replaced by the right one, so
/// that a fuzzer reaches record decoding and sequence checks. A resealed
/// log that verifies has a head over exactly the records before it.
///
/// Torn tails: what [`recover_log`] cuts is the end of the input, after a
/// log that verifies alone; a resealed log that verifies, followed by the
/// input's last bytes (no whole frame), is never cut into; and every cut
/// inside its last append is torn back to exactly the head before it.
pub fn audit_log_verify(data: &[u8]) {
    let v = InsecureCrypto(String::new());
    let _ = verify_log(data, &v);
    torn_tail_holds_together(data, &v);
    let mut chain: Option<Vec<Vec<u8>>> = None;
    let mut tree = LogTree::new();
    let mut sealed = Vec::new();
    let mut rest = data;
    while let Ok(Some((frame, used))) = split_frame(rest) {
        rest = &rest[used..];
        let Ok(entry) = postcard::from_bytes::<LogEntry>(frame) else {
            return;
        };
        let entry = match (entry, &chain) {
            (LogEntry::Header { chain: c, at_unix }, _) => {
                chain = Some(c.clone());
                LogEntry::Header { chain: c, at_unix }
            }
            (LogEntry::Record { body, .. }, Some(c)) => {
                let Some(signature) = resign(c, RECORD_CONTEXT, &body) else {
                    return;
                };
                tree.push(log_leaf(&body));
                LogEntry::Record { body, signature }
            }
            (LogEntry::TreeHead(h), Some(c)) => {
                let (size, root) = (tree.len(), tree.root());
                let body = crate::audit::head_body(size, &root, h.at_unix);
                let Some(signature) = resign(c, HEAD_CONTEXT, &body) else {
                    return;
                };
                LogEntry::TreeHead(SignedTreeHead {
                    size,
                    root,
                    at_unix: h.at_unix,
                    signature,
                })
            }
            (e, None) => e,
        };
        match encode_entry(&entry) {
            Ok(b) => sealed.extend(b),
            Err(_) => return,
        }
    }
    if let Ok(log) = verify_log(&sealed, &v) {
        assert_eq!(log.records.len(), log.signed.len());
        assert_eq!(log.tree.len(), log.records.len() as u64);
        if let Some(h) = &log.last_head {
            assert_eq!(log.tree.root_at(h.size).ok(), Some(h.root));
        }
        let mut torn = sealed.clone();
        torn.extend_from_slice(rest);
        if let Ok(r) = recover_log(&torn, &v) {
            assert_eq!(r.log, log, "a cut removed verified history");
            if let Some(t) = r.torn {
                assert_eq!(t.offset, sealed.len(), "a cut reached into what verified");
            }
        }
        cuts_in_the_last_append_are_torn(&sealed, &log, data.len(), &v);
    }
}

/// A torn tail is the end of the input, and what comes before it verifies
/// alone as the log returned.
fn torn_tail_holds_together(data: &[u8], v: &InsecureCrypto) {
    let Ok(r) = recover_log(data, v) else {
        return;
    };
    let Some(t) = r.torn else {
        return;
    };
    assert!(t.len > 0);
    assert_eq!(t.offset + t.len, data.len());
    match verify_log(&data[..t.offset], v) {
        Ok(before) => assert_eq!(before, r.log),
        Err(e) => panic!("the log before a torn tail does not verify: {e}"),
    }
}

/// In a log whose last append is one record then its head, after a head
/// or the header, a cut anywhere inside that append (at `pick`, modulo)
/// is torn back to exactly where the append began.
fn cuts_in_the_last_append_are_torn(
    sealed: &[u8],
    log: &VerifiedLog,
    pick: usize,
    v: &InsecureCrypto,
) {
    let kind = |off: usize| {
        let (frame, _) = split_frame(&sealed[off..]).ok()??;
        postcard::from_bytes::<LogEntry>(frame).ok()
    };
    let at = entry_offsets(sealed);
    let [.., (before, _), (record, _), (head, head_len)] = at.as_slice() else {
        return;
    };
    let shape = (kind(*before), kind(*record), kind(*head));
    if !matches!(
        shape,
        (
            Some(LogEntry::Header { .. } | LogEntry::TreeHead(_)),
            Some(LogEntry::Record { .. }),
            Some(LogEntry::TreeHead(_))
        )
    ) {
        return;
    }
    let end = head + head_len;
    let cut = record + 1 + pick % (end - record - 1);
    match recover_log(&sealed[..cut], v) {
        Ok(r) => {
            let t = r.torn.expect("a cut inside the last append is torn");
            assert_eq!(t.offset, *record);
            assert_eq!(r.log.records.len() + 1, log.records.len());
        }
        Err(e) => panic!("a cut at {cut} inside the last append is refused: {e}"),
    }
}

/// Checks an evidence bundle as given, then resealed: its ticket, tree
/// heads and records re-signed by their own chains' insecure keys, so that
/// a fuzzer reaches the checks behind the signatures (inclusion proofs
/// still hold it to the logs' hashes). Whatever decodes re-encodes to a
/// bundle that decodes the same.
pub fn evidence_check(data: &[u8]) {
    let v = InsecureCrypto(String::new());
    let _ = check_bundle(data, &v);
    let Ok(mut b) = EvidenceBundle::decode(data) else {
        return;
    };
    match b.encode().map(|e| EvidenceBundle::decode(&e)) {
        Ok(Ok(again)) => assert_eq!(again, b, "round trip changed the bundle"),
        Ok(Err(e)) => panic!("re-encoded bundle does not decode: {e}"),
        Err(e) => panic!("decoded bundle does not encode: {e}"),
    }
    if let Some(s) = resign(&b.ticket.chain, TICKET_CONTEXT, &b.ticket.body) {
        b.ticket.signature = s;
    }
    for side in &mut b.sides {
        let h = &side.head;
        let body = crate::audit::head_body(h.size, &h.root, h.at_unix);
        if let Some(s) = resign(&side.chain, HEAD_CONTEXT, &body) {
            side.head.signature = s;
        }
        for r in &mut side.records {
            if let Some(s) = resign(&side.chain, RECORD_CONTEXT, &r.body) {
                r.signature = s;
            }
        }
    }
    let _ = b.check(&v);
}
