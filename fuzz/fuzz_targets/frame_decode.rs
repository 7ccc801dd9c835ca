#![no_main]
//! See `convoy_protocol::fuzz::frame_decode`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| convoy_protocol::fuzz::frame_decode(data));
