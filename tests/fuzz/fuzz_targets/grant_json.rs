#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_bridge::grant::fuzz::grant_json(data));
