#![no_main]
//! See `convoy_protocol::fuzz::source_sequence`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| convoy_protocol::fuzz::source_sequence(data));
