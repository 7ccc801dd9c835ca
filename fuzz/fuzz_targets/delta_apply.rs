#![no_main]
//! See `convoy_protocol::fuzz::delta_apply`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| convoy_protocol::fuzz::delta_apply(data));
