//! An arbitrary template (a model file's Jinja program) on arbitrary messages must end, with
//! bounded output. Input: the template, a NUL, a flag field (odd length: add the generation
//! prompt), then NUL-separated role and content fields.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::chat_template(data));
