//! Encoding arbitrary text and decoding arbitrary ids (the first byte picks which). Checked
//! beyond "no panic": decoding what was encoded gives the text back (less the characters the
//! vocabulary has no token for), and a stream's pieces add up to the decoding of the whole id
//! sequence (the contract of `TokenStream`).
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(init: checks::tokenizer_init(), |data: &[u8]| checks::tokenizer(data));
