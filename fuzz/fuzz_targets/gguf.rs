//! The GGUF reader: header, metadata, tensor table, every tensor's dequantization, and the
//! model built from the file.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::gguf(data));
