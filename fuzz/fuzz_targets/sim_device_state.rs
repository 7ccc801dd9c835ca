#![no_main]
//! See `convoy_agent::backend::sim::fuzz_device_state`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| convoy_agent::backend::sim::fuzz_device_state(data));
