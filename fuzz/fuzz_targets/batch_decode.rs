#![no_main]
//! See `convoy_protocol::fuzz::batch_decode`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| convoy_protocol::fuzz::batch_decode(data));
