#![no_main]
//! See `convoy_protocol::fuzz::receipt_verify`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| convoy_protocol::fuzz::receipt_verify(data));
