//! The Hugging Face checkpoint reader. Input: a 2-byte little-endian length, that many bytes of
//! `config.json`, then the one shard.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::safetensors(data));
