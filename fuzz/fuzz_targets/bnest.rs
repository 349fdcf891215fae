//! The `.bnest` reader: preamble, header JSON, every section's bounds, and the model read at the
//! planes the input's last byte picks (0: all). Fuzz builds skip the CRC checks
//! (`cfg(fuzzing)`), so mutations reach the validation behind them.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::bnest(data));
