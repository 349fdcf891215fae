//! The server's request handling before the model runs: every endpoint's body parsed and
//! validated (`src/serve/api.rs`), then as the handlers do, the chat rendered with SmolLM2's
//! template and tokenized, or the prompt tokenized, or its ids checked and decoded.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(init: checks::request_init(), |data: &[u8]| checks::request(data));
