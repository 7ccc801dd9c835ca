#![no_main]
//! See `convoy_agent::trust::identity::fuzz_spiffe_id`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| convoy_agent::trust::identity::fuzz_spiffe_id(data));
