//! Fuzz target; the check and what it proves: `shunt_fuzz::fault_rules`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shunt_fuzz::fault_rules(data));
