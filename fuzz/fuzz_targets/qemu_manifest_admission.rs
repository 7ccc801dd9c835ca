#![no_main]
//! See `convoy_protocol::fuzz::qemu_manifest_admission`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| convoy_protocol::fuzz::qemu_manifest_admission(data));
