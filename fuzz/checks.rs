//! What each fuzz target checks, one function per target. The targets in `fuzz_targets/` are
//! one-line wrappers, and `tests/fuzz_regressions.rs` runs every saved finding
//! (`tests/fuzz/<target>/`) through the same function in the normal test suite.
//!
//! For the readers an error is the expected outcome for most inputs; a panic, a hang, or an
//! allocation past the fuzzer's limit is the bug. Some targets also assert properties.
#![allow(dead_code)] // each includer uses some of the functions

use std::path::Path;
use std::sync::OnceLock;

use bitnest::chat::{ChatTemplate, MAX_TEMPLATE_EXTRA_OUTPUT, Message};
use bitnest::engine::Engine;
use bitnest::format::bnest::BnestFile;
use bitnest::format::gguf::GgufFile;
use bitnest::format::safetensors::SafetensorsDir;
use bitnest::model::{BitsPlan, ModelSource};
use bitnest::tokenizer::Tokenizer;

// The server's request parsing: the binary's own modules (`api` names `super::error`).
#[allow(dead_code)]
#[path = "../src/serve/api.rs"]
mod api;
#[allow(dead_code)]
#[path = "../src/serve/error.rs"]
mod error;

/// The GGUF reader: header, metadata, tensor table, every tensor's dequantization, and the
/// model built from the file.
pub fn gguf(data: &[u8]) {
    let Ok(g) = GgufFile::from_bytes(data) else { return };
    for v in g.metadata.values() {
        let _ = GgufFile::describe_value(v);
    }
    for t in &g.tensors {
        if t.n_elements() <= 1 << 20 {
            let _ = g.tensor_f32(t);
        }
    }
    model(ModelSource::Gguf(g));
}

/// The `.bnest` reader: preamble, header JSON, every section's bounds, and the model read at the
/// planes the input's last byte picks (0: all). Fuzz builds skip the CRC checks
/// (`cfg(fuzzing)`), so mutations reach the validation behind them.
pub fn bnest(data: &[u8]) {
    let Some((&bits, file)) = data.split_last() else { return };
    let Ok(b) = BnestFile::from_bytes(file) else { return };
    let plan = match bits % 9 {
        0 => BitsPlan::uniform(None),
        r => BitsPlan::uniform(Some(u32::from(r))),
    };
    model(ModelSource::Bnest(b, plan));
}

/// The Hugging Face checkpoint reader. Input: a 2-byte little-endian length, that many bytes of
/// `config.json`, then the one shard.
pub fn safetensors(data: &[u8]) {
    let Some((len, rest)) = data.split_first_chunk::<2>() else { return };
    let n = usize::from(u16::from_le_bytes(*len)).min(rest.len());
    let (config, shard) = rest.split_at(n);
    // No tokenizer.json is found: the directory does not exist.
    let Ok(d) = SafetensorsDir::from_parts(Path::new("/nonexistent-fuzz-dir"), config, &[shard]) else { return };
    let names: Vec<String> = d.names().map(str::to_string).collect();
    for n in &names {
        let _ = d.tensor_f32(n);
    }
    model(ModelSource::HfDir(d));
}

/// Everything a later `bitnest run` does with an accepted model file, on a tiny budget:
/// configuration, tokenizer, chat template, weights, and two tokens through the model.
fn model(source: ModelSource) {
    let _ = source.config();
    let _ = source.chat_template();
    if let Ok(t) = source.tokenizer() {
        let _ = t.encode("Hello, world!", true);
    }
    let Ok(engine) = Engine::from_source(source, Path::new("fuzz-input")) else { return };
    let _ = engine.chat_prompt(&[Message::new("user", "Hi")]);
    let vocab = engine.model.config.vocab_size as u32;
    let mut s = engine.model.new_session(4, 2);
    let _ = engine.model.forward(&mut s, &[0, vocab - 1], 1);
}

/// A tokenizer and the bytes it cannot represent: SmolLM2's vocabulary lacks tokens for some
/// bytes, which its encoding drops (llama.cpp's `llama-tokenize` drops the same: "ab\x14\x14cd"
/// is [369, 13133] in both, and "a\u{4E38E}b" is [81, 232, 232, 232, 82], its lead byte gone).
struct Tok {
    t: Tokenizer,
    /// Bytes the byte-level vocabulary has no token for (SmolLM2 lacks 21, among them 0xF1, the
    /// lead byte of U+40000..U+7FFFF; llama.cpp drops them as well).
    dropped: [bool; 256],
}

/// GPT-2's printable stand-in for a byte: how byte-level vocabularies spell byte tokens.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return char::from(b);
    }
    char::from_u32(256 + (0..b).filter(|&x| !printable(x)).count() as u32).expect("a valid char")
}

/// The real models' tokenizers, read once from the cached model files (`BITNEST_CACHE`, fetched
/// on first use as every command does): SmolLM2's always, Qwen2.5-Coder's when it is cached.
fn tokenizers() -> &'static [Tok] {
    static T: OnceLock<Vec<Tok>> = OnceLock::new();
    T.get_or_init(|| {
        let mut out = Vec::new();
        for name in ["smollm2-135m", "qwen2.5-coder-1.5b"] {
            let m = bitnest::fetch::known_model(name).expect("a known model");
            let cached = bitnest::fetch::cache_dir().join(m.name).join(m.file_name);
            let path = match name {
                "smollm2-135m" => bitnest::fetch::fetch(m).expect("fetch SmolLM2 for its tokenizer"),
                _ if cached.is_file() => cached,
                _ => continue,
            };
            let g = GgufFile::open(&path).expect("open the cached model");
            let t = Tokenizer::from_gguf(&g).expect("read its tokenizer");
            let dropped = std::array::from_fn(|b| t.token_id(&byte_char(b as u8).to_string()).is_none());
            out.push(Tok { t, dropped });
        }
        out
    })
}

/// One-time setup of the tokenizer target, run before the first input (libFuzzer's init), so
/// that loading the tokenizers does not count against the first input's timeout.
pub fn tokenizer_init() {
    tokenizers();
}

/// Encoding arbitrary text and decoding arbitrary ids (the first byte picks which). Checked
/// beyond "no panic": decoding what was encoded gives the text back (less the bytes the
/// vocabulary has no token for), and a stream's pieces add up to the decoding of the whole id
/// sequence (the contract of `TokenStream`).
pub fn tokenizer(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    for Tok { t, dropped } in tokenizers() {
        if mode & 1 == 0 {
            let text = String::from_utf8_lossy(rest);
            let _ = t.encode(&text, true);
            let ids = t.encode(&text, false).expect("encoding text never fails");
            let back = t.decode(&ids).expect("decoding encoded ids never fails");
            // The text less the bytes the vocabulary cannot spell (the rest of a character whose
            // lead byte is dropped shows as U+FFFD, as in llama.cpp).
            let kept: Vec<u8> = text.bytes().filter(|&b| !dropped[b as usize]).collect();
            let expected = String::from_utf8_lossy(&kept);
            assert_eq!(back, expected, "decode(encode(text)) != text");
        } else {
            // Ids, some beyond the vocabulary.
            let bound = t.vocab_size() as u32 + 64;
            let ids: Vec<u32> =
                rest.chunks(3).map(|c| c.iter().fold(0u32, |a, &b| a << 8 | u32::from(b)) % bound).collect();
            let _ = t.decode_with_special(&ids);
            if let Ok(whole) = t.decode(&ids) {
                let mut s = t.stream();
                let mut pieces = String::new();
                for &id in &ids {
                    pieces.extend(s.push(id));
                }
                pieces.extend(s.finish());
                assert_eq!(pieces, whole, "stream pieces differ from decoding all ids");
            }
        }
    }
}

/// An arbitrary template (a model file's Jinja program) on arbitrary messages must end, with
/// bounded output. Input: the template, a NUL, a flag field (odd length: add the generation
/// prompt), then NUL-separated role and content fields.
pub fn chat_template(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut fields = text.split('\0');
    let template = fields.next().unwrap_or_default();
    let flag = fields.next().unwrap_or_default();
    let rest: Vec<&str> = fields.collect();
    let messages: Vec<Message> = rest.chunks(2).map(|p| Message::new(p[0], p.get(1).copied().unwrap_or(""))).collect();
    let Ok(t) = ChatTemplate::new(template, "<|im_start|>", "<|im_end|>") else { return };
    if let Ok(out) = t.render(&messages, flag.len() % 2 == 1) {
        let input: usize = messages.iter().map(|m| m.role.len() + m.content.len()).sum();
        assert!(out.len() <= input * 4 + MAX_TEMPLATE_EXTRA_OUTPUT, "output past its bound");
    }
}

fn engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        let m = bitnest::fetch::known_model(bitnest::fetch::DEFAULT_MODEL).expect("the default model");
        let gguf = bitnest::fetch::fetch(m).expect("fetch the default model");
        let planes = bitnest::transcode::cached_planes(&gguf, false).expect("transcode").unwrap_or(gguf);
        Engine::load(&planes, None).expect("load the default model")
    })
}

/// One-time setup of the request target (loading SmolLM2), before the first input.
pub fn request_init() {
    engine();
}

/// The server's request handling before the model runs: every endpoint's body parsed and
/// validated (`src/serve/api.rs`), then as the handlers do, the chat rendered with SmolLM2's
/// template and tokenized, or the prompt tokenized, or its ids checked and decoded.
pub fn request(data: &[u8]) {
    let e = engine();
    if let Ok((messages, _params)) = api::parse_chat(data) {
        let _ = e.chat_prompt(&messages);
    }
    if let Ok((prompt, _params)) = api::parse_completion(data) {
        match prompt {
            api::PromptInput::Text(t) => {
                let _ = e.tokenizer.encode(&t, true);
            }
            api::PromptInput::Ids(ids) => {
                if ids.iter().all(|&id| (id as usize) < e.model.config.vocab_size) {
                    let _ = e.tokenizer.decode(&ids);
                }
            }
        }
    }
    let _ = api::parse::<api::TokenizeRequest>(data);
    let _ = api::parse::<api::DetokenizeRequest>(data);
}
