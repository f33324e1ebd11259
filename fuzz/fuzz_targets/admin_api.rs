//! Fuzz target; the check and what it proves: `shunt_fuzz::admin_api`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shunt_fuzz::admin_api(data));
