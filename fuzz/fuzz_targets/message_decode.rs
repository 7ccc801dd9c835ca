#![no_main]
//! See `convoy_protocol::fuzz::message_decode`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| convoy_protocol::fuzz::message_decode(data));
