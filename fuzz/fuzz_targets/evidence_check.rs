#![no_main]
//! See `convoy_protocol::fuzz::evidence_check`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| convoy_protocol::fuzz::evidence_check(data));
