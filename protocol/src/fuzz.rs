//! Bodies of the cargo-fuzz targets in `fuzz/`, kept here so the committed
//! corpora replay as ordinary tests (`tests/fuzz_corpus.rs`) with exactly
//! the code the fuzzer runs. Each function must never panic, whatever the
//! input.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::destination::{Destination, DestinationConfig};
use crate::frame::split_frame;
use crate::message::{Capabilities, Message};
use crate::page::{MemoryGeometry, PageSize, StreamReceiver};

/// Splits frames off arbitrary bytes and decodes each.
pub fn frame_decode(data: &[u8]) {
    let mut rest = data;
    while let Ok(Some((frame, used))) = split_frame(rest) {
        let _ = Message::decode(Bytes::copy_from_slice(frame));
        rest = &rest[used..];
    }
}

/// Decodes one frame body; whatever decodes must re-encode, decode again,
/// and re-encode to the same bytes (compared as bytes: a report's `f64`
/// may be NaN, which is not equal to itself).
pub fn message_decode(data: &[u8]) {
    if let Ok(m) = Message::decode(Bytes::copy_from_slice(data)) {
        let first = match m.encode() {
            Ok(b) => b,
            // Decode bounds the input to one frame, so this cannot happen.
            Err(e) => panic!("decoded message does not encode: {e}"),
        };
        let m2 = match Message::decode(Bytes::from(first.clone()).slice(crate::frame::LEN_PREFIX..))
        {
            Ok(m2) => m2,
            Err(e) => panic!("re-encoded message does not decode: {e}"),
        };
        match m2.encode() {
            Ok(second) => assert_eq!(first, second, "round trip changed the encoding"),
            Err(e) => panic!("decoded message does not encode: {e}"),
        }
    }
}

/// Feeds page batches to a stream receiver of a geometry chosen by the
/// first bytes.
pub fn batch_decode(data: &[u8]) {
    let [pages_hi, pages_lo, streams, stream, rest @ ..] = data else {
        return;
    };
    let pages = u64::from(u16::from_be_bytes([*pages_hi, *pages_lo])).max(1);
    let streams = u16::from(*streams % 4) + 1;
    let stream = u16::from(*stream) % streams;
    let Ok(geometry) = MemoryGeometry::new(PageSize::SIZE_4K, pages) else {
        return;
    };
    let mut rx = StreamReceiver::new(stream, streams, geometry);
    let mut input = rest;
    while let Ok(Some((frame, used))) = split_frame(input) {
        if let Ok(Message::PageBatch(h, payload)) = Message::decode(Bytes::copy_from_slice(frame)) {
            if let Ok(batch) = rx.receive(&h, &payload) {
                for (idx, bytes) in batch.pages() {
                    assert!(idx.0 < pages);
                    assert!(bytes.is_none_or(|b| b.len() == 4096));
                }
            }
        }
        input = &input[used..];
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

impl crate::ticket::TicketSigner for InsecureCrypto {
    fn chain(&self) -> Vec<Vec<u8>> {
        vec![self.0.as_bytes().to_vec()]
    }
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        Ok(insecure_sig(self.0.as_bytes(), message))
    }
}

impl crate::ticket::TicketVerifier for InsecureCrypto {
    fn verify_chain(&self, chain: &[Vec<u8>], _now: u64) -> Result<crate::names::SpiffeId, String> {
        let leaf = chain.first().ok_or("empty chain")?;
        let s = std::str::from_utf8(leaf).map_err(|e| e.to_string())?;
        s.parse()
            .map_err(|e: crate::names::NameError| e.to_string())
    }
    fn verify_signature(&self, leaf: &[u8], message: &[u8], sig: &[u8]) -> Result<(), String> {
        (insecure_sig(leaf, message) == sig)
            .then_some(())
            .ok_or_else(|| "bad signature".into())
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
        capabilities: Capabilities::OURS,
        handover_timeout: Duration::from_secs(1),
        peer: "spiffe://fuzz/agent/source".parse().expect("valid id"),
        notary: InsecureCrypto::notary("spiffe://fuzz/agent/destination", now),
    });
    let mut input = data;
    while let Ok(Some((frame, used))) = split_frame(input) {
        now += Duration::from_millis(10);
        if let Ok(m) = Message::decode(Bytes::copy_from_slice(frame)) {
            let _ = d.handle_message(now, m);
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
