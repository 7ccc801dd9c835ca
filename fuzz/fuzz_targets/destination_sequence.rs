#![no_main]
//! See `convoy_protocol::fuzz::destination_sequence`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| convoy_protocol::fuzz::destination_sequence(data));
