#![no_main]
//! See `convoy_protocol::fuzz::ticket_verify`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| convoy_protocol::fuzz::ticket_verify(data));
