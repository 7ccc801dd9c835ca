#![no_main]
//! See `convoy_protocol::fuzz::snapshot_open`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| convoy_protocol::fuzz::snapshot_open(data));
