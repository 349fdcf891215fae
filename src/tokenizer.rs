//! Text ↔ token ids, reproducing llama.cpp's tokenization of a GGUF vocabulary.
//!
//! A model only behaves as evaluated when it sees the ids it was trained on, and the reference
//! for a GGUF file is llama.cpp: the same text must give the same ids, byte for byte. For
//! byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`) the heavy lifting (BPE merges,
//! added-token matching, byte-level mapping) is delegated to the Hugging Face `tokenizers`
//! crate; this module only assembles its pieces the way llama.cpp configures its own tokenizer
//! for each `tokenizer.ggml.pre` name. SentencePiece vocabularies (`"llama"`, e.g. Gemma) merge
//! by score in an order a `tokenizers` merge list cannot express, so `Spm` reimplements
//! llama.cpp's algorithm and `tokenizers` only matches special tokens and decodes.

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail, ensure};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, Model, SplitDelimiterBehavior};

use crate::format::gguf::{GgufFile, Value};

mod spm;
use spm::{Spm, meta_scores};

/// GPT-2's split: contractions, letter runs, digit runs, punctuation runs, whitespace. llama.cpp
/// recognises this exact string and runs a hand-written matcher for it; the regex is equivalent.
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's split, in the form llama.cpp uses: the contractions are case-insensitive for ASCII
/// only (a plain `(?i:...)` would also fold e.g. U+017F to `s`, which llama.cpp does not).
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's split: Llama 3's, but every digit on its own.
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_DIGIT: &str = r"\p{N}";
const RE_BLOOM: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";
const RE_TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How llama.cpp prepares text for BPE under one `tokenizer.ggml.pre` name.
struct PreTokenizerSpec {
    /// Applied in order; each one splits every piece left by the previous ones, and both the
    /// matches and the text between them survive (llama.cpp's `unicode_regex_split`).
    regexes: &'static [&'static str],
    /// Use a word that is itself a vocabulary entry as one token instead of merging it.
    ignore_merges: bool,
    /// llama.cpp's BOS default for this name (the GGUF key `add_bos_token` overrides it).
    add_bos: bool,
    /// The vocabulary's BOS id is ignored by llama.cpp for this name.
    no_bos: bool,
}

impl PreTokenizerSpec {
    const fn new(regexes: &'static [&'static str]) -> Self {
        Self { regexes, ignore_merges: false, add_bos: false, no_bos: false }
    }
}

/// The table from llama.cpp's `llama_vocab::impl::load` and `llm_tokenizer_bpe`. Names it knows
/// but that are missing here (e.g. `deepseek-llm`, `chameleon`) are refused rather than guessed:
/// a near-miss split silently changes ids.
fn pre_tokenizer_spec(name: &str) -> Option<PreTokenizerSpec> {
    let spec = match name {
        "default" => PreTokenizerSpec::new(&[r"[\p{P}\$\+<=>\^~\|]+", RE_GPT2, r"\p{N}+", "[0-9][0-9][0-9]"]),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" => {
            PreTokenizerSpec { ignore_merges: true, add_bos: true, ..PreTokenizerSpec::new(&[RE_LLAMA3]) }
        }
        "dbrx" | "smaug-bpe" => PreTokenizerSpec::new(&[RE_LLAMA3]),
        "chatglm-bpe" => PreTokenizerSpec { no_bos: true, ..PreTokenizerSpec::new(&[RE_LLAMA3]) },
        "falcon" => PreTokenizerSpec::new(&[r"[\p{P}\$\+<=>\^~\|`]+", RE_GPT2, "[0-9][0-9][0-9]"]),
        "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "jina-es" | "jina-de" | "gigachat" | "jina-v1-en"
        | "jina-v2-es" | "jina-v2-de" | "jina-v2-code" | "roberta-bpe" => PreTokenizerSpec::new(&[RE_GPT2]),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            PreTokenizerSpec::new(&[RE_DIGIT, RE_GPT2])
        }
        "qwen2" | "stablelm2" | "megrez" => PreTokenizerSpec::new(&[RE_QWEN2]),
        "poro-chat" | "bloom" | "gpt3-finnish" => PreTokenizerSpec::new(&[RE_BLOOM]),
        "viking" => PreTokenizerSpec::new(&[RE_BLOOM, RE_DIGIT]),
        "tekken" => PreTokenizerSpec { ignore_merges: true, add_bos: true, ..PreTokenizerSpec::new(&[RE_TEKKEN]) },
        "deepseek-coder" => {
            PreTokenizerSpec::new(&[r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", RE_DIGIT])
        }
        _ => return None,
    };
    Some(spec)
}

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_UNKNOWN: u64 = 2;
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

/// A tokenizer that encodes like llama.cpp and decodes for display.
///
/// Two copies of the underlying tokenizer are kept because "parse special tokens or not" is a
/// per-call choice in llama.cpp but a mutable setting in `tokenizers`; cloning once is cheaper
/// and simpler than locking around every call.
pub struct Tokenizer {
    /// Control tokens written in the text become their ids.
    special: tokenizers::Tokenizer,
    /// Control tokens written in the text are plain text (user-defined tokens still match,
    /// as in llama.cpp).
    plain: tokenizers::Tokenizer,
    /// For SentencePiece vocabularies, the merging that `special`'s model does not do; `special`
    /// and `plain` then only cut out special tokens and decode.
    spm: Option<Spm>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    /// `special.get_vocab_size(true)`, which copies the whole vocabulary on every call.
    vocab_size: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("sentencepiece", &self.spm.is_some())
            .finish()
    }
}

fn tk_err(e: tokenizers::Error) -> anyhow::Error {
    anyhow!("{e}")
}

fn meta_str<'a>(gguf: &'a GgufFile, key: &str) -> Result<Option<&'a str>> {
    match gguf.get(key) {
        None => Ok(None),
        Some(v) => v.as_str().map(Some).with_context(|| format!("GGUF key {key} is not a string")),
    }
}

fn meta_str_array<'a>(gguf: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    let arr = gguf
        .get(key)
        .with_context(|| format!("GGUF has no {key}"))?
        .as_array()
        .with_context(|| format!("GGUF key {key} is not an array"))?;
    arr.iter().enumerate().map(|(i, v)| v.as_str().with_context(|| format!("{key}[{i}] is not a string"))).collect()
}

/// A special-token id from the metadata; like llama.cpp, an id outside the vocabulary is
/// treated as absent.
fn meta_token_id(gguf: &GgufFile, key: &str, n_vocab: usize) -> Option<u32> {
    let id = gguf.get(key)?.as_u64()?;
    (id < n_vocab as u64).then_some(id as u32)
}

/// Entries that llama.cpp treats as control tokens by their text, whatever their type says
/// (`llama_vocab::impl::load`): its end-of-generation names. Gemma 3's `</s>`, a user-defined
/// token, is one, so llama.cpp leaves `</s>` in text alone unless specials are parsed.
const EOG_NAMES: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// Fill-in-the-middle names, which llama.cpp also makes control tokens when the file does not
/// name that FIM token by id (the keys; it marks the first one it finds, in hash order, where
/// this marks them all).
const FIM_NAMES: &[(&[&str], &[&str])] = &[
    (
        &["tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.prefix_token_id"],
        &[
            "<|fim_prefix|>",
            "<fim-prefix>",
            "<fim_prefix>",
            "<｜fim▁begin｜>",
            "<PRE>",
            "▁<PRE>",
            "<|code_prefix|>",
            "<|prefix|>",
        ],
    ),
    (
        &["tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.suffix_token_id"],
        &[
            "<|fim_suffix|>",
            "<fim-suffix>",
            "<fim_suffix>",
            "<｜fim▁hole｜>",
            "<SUF>",
            "▁<SUF>",
            "<|code_suffix|>",
            "<|suffix|>",
        ],
    ),
    (
        &["tokenizer.ggml.fim_mid_token_id", "tokenizer.ggml.middle_token_id"],
        &[
            "<|fim_middle|>",
            "<fim-middle>",
            "<fim_middle>",
            "<｜fim▁end｜>",
            "<MID>",
            "▁<MID>",
            "<|code_middle|>",
            "<|middle|>",
        ],
    ),
    (&["tokenizer.ggml.fim_pad_token_id"], &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"]),
    (&["tokenizer.ggml.fim_rep_token_id"], &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"]),
    (&["tokenizer.ggml.fim_sep_token_id"], &["<|file_sep|>"]),
];

/// Whether llama.cpp makes an entry a control token by its text ([`EOG_NAMES`], [`FIM_NAMES`]).
/// Its per-model exceptions (gpt-oss's `<|channel|>` and friends made user-defined, `<|end|>`
/// beside `<|return|>`, `</s>` beside `<|tool_response>`) are not reproduced.
fn forced_control(gguf: &GgufFile, n_vocab: usize) -> impl Fn(&str) -> bool {
    let mut names: HashSet<&'static str> = EOG_NAMES.iter().copied().collect();
    for (keys, fim) in FIM_NAMES {
        if keys.iter().all(|k| meta_token_id(gguf, k, n_vocab).is_none()) {
            names.extend(fim.iter().copied());
        }
    }
    move |text| names.contains(text)
}

/// What a tokenizer model means when the file leaves something out.
struct Defaults {
    add_bos: bool,
    /// The vocabulary's BOS id is ignored (llama.cpp's `chatglm-bpe`).
    no_bos: bool,
    bos: Option<u32>,
    eos: Option<u32>,
}

/// llama.cpp's default id for a special token, dropped (as llama.cpp does) when the vocabulary
/// is too small to have it.
fn default_id(id: u32, n_vocab: usize) -> Option<u32> {
    ((id as usize) < n_vocab).then_some(id)
}

/// The byte-level BPE model, pre-tokenizer and decoder for a `gpt2` vocabulary.
fn byte_level_bpe(gguf: &GgufFile, vocab: Vocab, spec: &PreTokenizerSpec) -> Result<tokenizers::Tokenizer> {
    let merges = meta_str_array(gguf, "tokenizer.ggml.merges")?;
    let mut seen = HashSet::with_capacity(merges.len());
    let mut pairs = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        // llama.cpp searches for the separator from the second byte, so a pair whose left
        // half is a space still splits correctly.
        let pos = m
            .bytes()
            .skip(1)
            .position(|b| b == b' ')
            .map(|p| p + 1)
            .with_context(|| format!("merge {i} ({m:?}) has no space"))?;
        let pair = (m[..pos].to_string(), m[pos + 1..].to_string());
        // On duplicates llama.cpp keeps the first rank; `tokenizers` would keep the last.
        if seen.insert(pair.clone()) {
            pairs.push(pair);
        }
    }

    let bpe = BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .ignore_merges(spec.ignore_merges)
        .build()
        .map_err(|e| anyhow!("invalid BPE vocabulary or merges: {e}"))?;

    let mut splits = Vec::with_capacity(spec.regexes.len() + 1);
    for re in spec.regexes {
        let split = Split::new(SplitPattern::Regex((*re).to_string()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| anyhow!("pre-tokenizer regex {re:?}: {e}"))?;
        splits.push(PreTokenizerWrapper::Split(split));
    }
    splits.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)));

    let mut tk = tokenizers::Tokenizer::new(bpe);
    tk.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(splits))))
        .with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::new(false, false, false))));
    Ok(tk)
}

impl Tokenizer {
    /// Builds the tokenizer stored in a GGUF file's `tokenizer.ggml.*` metadata: byte-level BPE
    /// (`tokenizer.ggml.model = "gpt2"`) or SentencePiece BPE (`"llama"`).
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let model = meta_str(gguf, "tokenizer.ggml.model")?.context("GGUF has no tokenizer.ggml.model")?;
        ensure!(matches!(model, "gpt2" | "llama"), "unsupported tokenizer model {model:?}");

        let tokens = meta_str_array(gguf, "tokenizer.ggml.tokens")?;
        let n_vocab = tokens.len();
        ensure!(n_vocab > 0 && n_vocab <= u32::MAX as usize, "GGUF vocabulary has {n_vocab} tokens");
        let types: Vec<Option<u64>> = match gguf.get("tokenizer.ggml.token_type") {
            None => vec![None; n_vocab],
            Some(v) => {
                let arr = v.as_array().context("tokenizer.ggml.token_type is not an array")?;
                ensure!(
                    arr.len() == n_vocab,
                    "tokenizer.ggml.token_type has {} entries for {n_vocab} tokens",
                    arr.len()
                );
                arr.iter().map(Value::as_u64).collect()
            }
        };

        // Same placeholder as llama.cpp, so an empty entry cannot collide or match text.
        let text_of = |i: usize| -> Cow<'_, str> {
            if tokens[i].is_empty() { Cow::Owned(format!("[EMPTY_{i}]")) } else { Cow::Borrowed(tokens[i]) }
        };
        let mut vocab = Vocab::with_capacity(n_vocab);
        for i in 0..n_vocab {
            // One copy of each text only: this loop is most of the load time for a large vocabulary.
            if vocab.insert(text_of(i).into_owned(), i as u32).is_some() {
                bail!("token {:?} appears twice in the vocabulary", text_of(i));
            }
        }

        let flag = |key: &str, default: bool| gguf.get(key).and_then(Value::as_bool).unwrap_or(default);
        let (mut special, spm, defaults) = if model == "llama" {
            // llama.cpp ignores tokenizer.ggml.pre for SentencePiece vocabularies.
            let scores = meta_scores(gguf, n_vocab)?;
            let unk = meta_token_id(gguf, "tokenizer.ggml.unknown_token_id", n_vocab).or(default_id(0, n_vocab));
            let add_space_prefix = flag("tokenizer.ggml.add_space_prefix", true);
            let special = Spm::hf_tokenizer(vocab, unk.map(|id| text_of(id as usize).into_owned()), add_space_prefix)?;
            let spm = Spm::new(&special, scores, unk, add_space_prefix)?;
            // llama.cpp's defaults for "llama" files: BOS 1 and EOS 2, BOS added.
            let defaults =
                Defaults { add_bos: true, no_bos: false, bos: default_id(1, n_vocab), eos: default_id(2, n_vocab) };
            (special, Some(spm), defaults)
        } else {
            // llama.cpp falls back to "default" (with a loud warning) for files made before the key existed.
            let pre = meta_str(gguf, "tokenizer.ggml.pre")?.unwrap_or("default");
            let spec = pre_tokenizer_spec(pre).with_context(|| format!("unsupported pre-tokenizer {pre:?}"))?;
            let special = byte_level_bpe(gguf, vocab, &spec)?;
            let defaults = Defaults { add_bos: spec.add_bos, no_bos: spec.no_bos, bos: None, eos: None };
            (special, None, defaults)
        };

        // llama.cpp matches these in the raw text before splitting; control and unknown tokens
        // only when asked to parse specials, user-defined ones always.
        let forced = forced_control(gguf, n_vocab);
        let mut control = Vec::new();
        let mut user = Vec::new();
        for (i, ty) in types.iter().enumerate() {
            let text = text_of(i);
            if matches!(*ty, Some(TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN)) || forced(&text) {
                control.push(AddedToken::from(text.into_owned(), true).normalized(false));
            } else if *ty == Some(TOKEN_TYPE_USER_DEFINED) {
                user.push(AddedToken::from(text.into_owned(), false).normalized(false));
            }
        }
        special.add_special_tokens(&control);
        special.add_tokens(&user);

        let bos = if defaults.no_bos {
            None
        } else {
            meta_token_id(gguf, "tokenizer.ggml.bos_token_id", n_vocab).or(defaults.bos)
        };
        let eos = meta_token_id(gguf, "tokenizer.ggml.eos_token_id", n_vocab).or(defaults.eos);
        let add_bos = flag("tokenizer.ggml.add_bos_token", defaults.add_bos);
        let add_eos = flag("tokenizer.ggml.add_eos_token", false);
        Self::assemble(special, spm, bos, eos, add_bos, add_eos)
    }

    /// Loads a Hugging Face `tokenizer.json` (safetensors model directories).
    ///
    /// `config` is the parsed `tokenizer_config.json` or `config.json`: it names BOS/EOS
    /// (`bos_token_id`, or `bos_token` as text) and may say `add_bos_token`. Without an explicit
    /// `add_bos_token`, BOS is added exactly when the tokenizer's own post-processor adds it,
    /// which is what `transformers` does for a plain prompt.
    pub fn from_json_file(path: &Path, config: Option<&serde_json::Value>) -> Result<Self> {
        let mut special =
            tokenizers::Tokenizer::from_file(path).map_err(|e| anyhow!("loading tokenizer {}: {e}", path.display()))?;
        // A tokenizer.json may carry training-time padding or truncation; neither belongs in inference.
        special.with_truncation(None).map_err(tk_err)?;
        special.with_padding(None);

        let id_of = |which: &str| -> Option<u32> {
            let cfg = config?;
            let by_id = match cfg.get(format!("{which}_token_id")) {
                Some(serde_json::Value::Array(a)) => a.first().and_then(serde_json::Value::as_u64),
                v => v.and_then(serde_json::Value::as_u64),
            };
            by_id.and_then(|id| u32::try_from(id).ok()).or_else(|| {
                let tok = cfg.get(format!("{which}_token"))?;
                let text = tok.as_str().or_else(|| tok.get("content")?.as_str())?;
                special.token_to_id(text)
            })
        };
        let bos = id_of("bos");
        let eos = id_of("eos");

        let explicit = |key: &str| config.and_then(|c| c.get(key)).and_then(serde_json::Value::as_bool);
        let probe = |edge_id: Option<u32>, at_start: bool| -> Result<bool> {
            let Some(id) = edge_id else { return Ok(false) };
            let with = special.encode_fast("a", true).map_err(tk_err)?;
            let without = special.encode_fast("a", false).map_err(tk_err)?;
            let edge = |ids: &[u32]| if at_start { ids.first() } else { ids.last() }.copied();
            Ok(edge(with.get_ids()) == Some(id) && edge(without.get_ids()) != Some(id))
        };
        let add_bos = match explicit("add_bos_token") {
            Some(b) => b,
            None => probe(bos, true)?,
        };
        let add_eos = match explicit("add_eos_token") {
            Some(b) => b,
            None => probe(eos, false)?,
        };
        Self::assemble(special, None, bos, eos, add_bos, add_eos)
    }

    /// Everything needed to rebuild this tokenizer, as JSON: how a `.bnest` file carries it so
    /// the file alone is enough to run.
    pub fn to_embedded(&self) -> Result<serde_json::Value> {
        let mut v = serde_json::json!({
            "tokenizer_json": self.special.to_string(false).map_err(tk_err)?,
            "bos": self.bos,
            "eos": self.eos,
            "add_bos": self.add_bos,
            "add_eos": self.add_eos,
        });
        if let Some(spm) = &self.spm {
            v["spm"] = spm.to_embedded();
        }
        Ok(v)
    }

    /// Rebuilds a tokenizer from [`Tokenizer::to_embedded`]'s output.
    pub fn from_embedded(v: &serde_json::Value) -> Result<Self> {
        let json =
            v.get("tokenizer_json").and_then(|j| j.as_str()).context("embedded tokenizer lacks tokenizer_json")?;
        let special: tokenizers::Tokenizer = json.parse().map_err(|e| anyhow!("embedded tokenizer is invalid: {e}"))?;
        let id = |k: &str| v.get(k).and_then(|x| x.as_u64()).and_then(|x| u32::try_from(x).ok());
        let flag = |k: &str| v.get(k).and_then(|x| x.as_bool()).unwrap_or(false);
        let spm = v.get("spm").map(|s| Spm::from_embedded(s, &special)).transpose()?;
        Self::assemble(special, spm, id("bos"), id("eos"), flag("add_bos"), flag("add_eos"))
    }

    fn assemble(
        special: tokenizers::Tokenizer,
        spm: Option<Spm>,
        bos: Option<u32>,
        eos: Option<u32>,
        add_bos: bool,
        add_eos: bool,
    ) -> Result<Self> {
        ensure!(!add_bos || bos.is_some(), "the model asks for a BOS token but does not name one");
        ensure!(!add_eos || eos.is_some(), "the model asks for an EOS token but does not name one");
        let mut plain = special.clone();
        plain.set_encode_special_tokens(true);
        // `get_vocab_size(true)` copies the whole vocabulary to count it; count what it would.
        let model = special.get_model();
        let added_only = special.get_added_vocabulary().get_vocab().keys().filter(|t| model.token_to_id(t).is_none());
        let vocab_size = model.get_vocab_size() + added_only.count();
        Ok(Self { special, plain, spm, bos, eos, add_bos, add_eos, vocab_size })
    }

    /// Text to ids, with BOS (and EOS) added when the model asks for them, as llama.cpp's
    /// `llama_tokenize(.., add_special = true, parse_special)` does. `parse_special` turns
    /// control tokens written in the text (`<|im_start|>`) into their ids; leave it off for
    /// untrusted user text so it cannot forge turn boundaries.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let tk = if parse_special { &self.special } else { &self.plain };
        let mut ids = Vec::new();
        if self.add_bos {
            ids.extend(self.bos);
        }
        match &self.spm {
            Some(spm) => spm.encode(tk, text, &mut ids)?,
            None => {
                let enc = tk.encode_fast(text, false).map_err(|e| anyhow!("tokenizing failed: {e}"))?;
                ids.reserve(enc.len() + 1);
                ids.extend_from_slice(enc.get_ids());
            }
        }
        if self.add_eos {
            ids.extend(self.eos);
        }
        Ok(ids)
    }

    /// Ids to display text: special (control) tokens are dropped, as a chat front end wants.
    /// Bytes that do not form valid UTF-8 become U+FFFD. Ids outside the vocabulary are skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.special.decode(ids, true).map_err(tk_err)
    }

    /// Like [`decode`](Self::decode) but renders control tokens as their text, for debugging
    /// and for showing exactly what the model saw.
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String> {
        self.special.decode(ids, false).map_err(tk_err)
    }

    /// Number of ids the tokenizer can produce (base vocabulary plus added tokens).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The vocabulary entry for `id` as stored (byte-level form, e.g. `Ġthe`), not decoded text.
    pub fn token_str(&self, id: u32) -> Option<String> {
        self.special.id_to_token(id)
    }

    /// The id of a vocabulary entry given as stored, e.g. `<|im_end|>` to find a stop token.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.special.token_to_id(token)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether [`encode`](Self::encode) prepends BOS. A chat template that writes the BOS text
    /// itself would then give two BOS tokens (llama.cpp does the same and warns).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// A streaming detokenizer over this vocabulary.
    pub fn stream(&self) -> TokenStream<'_> {
        TokenStream::new(self)
    }
}

/// Most tokens a stream waits for a character to complete. A UTF-8 character is at most four
/// bytes, and byte tokens carry at least one byte each; past that the bytes are invalid for good
/// and are shown as U+FFFD instead of stalling the output.
const MAX_PENDING_TOKENS: usize = 8;

/// Turns generated ids into text as they arrive, emitting only completed characters.
///
/// Decoding one id at a time is wrong for two reasons: a character can be split across
/// byte-level tokens, and some decoders change a token's text depending on its neighbours
/// (e.g. dropping a leading space at the start). So the stream decodes a short window that
/// starts at the last clean boundary and emits what the newest ids added to it.
pub struct TokenStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the window: everything before it has been emitted and is context no more.
    prefix: usize,
    /// Everything before this has been emitted.
    read: usize,
}

impl<'a> TokenStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self { tokenizer, ids: Vec::new(), prefix: 0, read: 0 }
    }

    /// Adds one generated id and returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Option<String> {
        self.ids.push(id);
        let text = self.decode_window();
        if !text.ends_with('\u{FFFD}') {
            let end = self.ids.len();
            return self.emit(text, end);
        }
        if self.pending_with_bytes() < MAX_PENDING_TOKENS {
            return None;
        }
        // Held back long enough: these bytes are not all one character in the making. Emit up to
        // the last id boundary where the text is settled: its decoding is a prefix of the
        // window's and bytes follow it, so no later byte can change it. (Cutting inside a
        // character instead shows it as U+FFFD and then again; a fuzzer found that. A text
        // ending in U+FFFD is not settled either: the start of a character and more of it both
        // decode as one U+FFFD, and so does a U+FFFD of the text itself, which then waits for
        // `finish`; a property test found "\u{FFFD}\u{FFFD}€" cut inside the €.)
        for cut in (self.read + 1..self.ids.len()).rev() {
            if !self.ids[cut..].iter().any(|&i| self.has_bytes(i)) {
                continue;
            }
            let left = self.tokenizer.decode(&self.ids[self.prefix..cut]).unwrap_or_default();
            if text.starts_with(&left) && !left.ends_with('\u{FFFD}') {
                return self.emit(left, cut);
            }
        }
        None
    }

    /// Whether `id` decodes to some text (control tokens and ids outside the vocabulary do not).
    fn has_bytes(&self, id: u32) -> bool {
        self.tokenizer.decode(&[id]).is_ok_and(|t| !t.is_empty())
    }

    /// Held-back ids that decode to some bytes. Ids that decode to nothing (control tokens, ids
    /// outside the vocabulary) neither complete a character nor spoil one, so they do not count
    /// toward the wait: `decode(ids)` joins the bytes on either side of them, and so must the
    /// stream (a fuzzer found a character split by eight such ids shown as U+FFFD and then again).
    fn pending_with_bytes(&self) -> usize {
        self.ids[self.read..].iter().filter(|&&id| self.has_bytes(id)).count()
    }

    /// Returns whatever is still held back (an incomplete character shows as U+FFFD), so that
    /// the pieces returned by [`push`](Self::push) and `finish` add up to `decode(ids)`.
    pub fn finish(&mut self) -> Option<String> {
        if self.read == self.ids.len() {
            return None;
        }
        let text = self.decode_window();
        let end = self.ids.len();
        self.emit(text, end)
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    fn decode_window(&self) -> String {
        // Decoding cannot fail for the decoders we build; an error would only lose display text.
        self.tokenizer.decode(&self.ids[self.prefix..]).unwrap_or_default()
    }

    /// Emits what `text` (the decoding of `ids[prefix..end]`) adds to what was emitted, and
    /// moves the window on to `end`.
    fn emit(&mut self, text: String, end: usize) -> Option<String> {
        let before = self.tokenizer.decode(&self.ids[self.prefix..self.read]).unwrap_or_default();
        // The window's text normally extends the already-emitted text; if a decoder rewrote the
        // overlap, fall back to the longest common prefix that ends on a character boundary.
        let start = if text.starts_with(&before) {
            before.len()
        } else {
            text.char_indices()
                .zip(before.chars())
                .find(|((_, a), b)| a != b)
                .map_or_else(|| text.len().min(before.len()), |((i, _), _)| i)
        };
        let start = (0..=start).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        let new = &text[start..];
        self.prefix = self.read;
        self.read = end;
        (!new.is_empty()).then(|| new.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::gguf::GgufWriter;

    /// GPT-2's printable stand-ins for bytes, so the fixture can spell byte-level tokens.
    fn byte_char(b: u8) -> char {
        let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        if printable(b) {
            return char::from(b);
        }
        let shift = (0..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(256 + shift).unwrap()
    }

    fn byte_level(s: &str) -> String {
        s.bytes().map(byte_char).collect()
    }

    /// A tiny byte-level vocabulary: every byte, a few merges, two control tokens and a
    /// user-defined one, written as a real GGUF file.
    fn fixture(pre: Option<&str>, model: &str, add_bos: Option<bool>) -> Result<Tokenizer> {
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
        let mut types = vec![3i32, 3, 3];
        tokens.extend((0..=255u8).map(|b| byte_char(b).to_string()));
        types.extend(std::iter::repeat_n(1, 256));
        let merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"];
        for m in merges {
            let (a, b) = m.split_once(' ').unwrap();
            tokens.push(format!("{a}{b}"));
            types.push(1);
        }
        tokens.push("<tool>".into());
        types.push(4);

        let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
        let mut w = GgufWriter::new();
        w.meta("tokenizer.ggml.model", Value::String(model.into()))
            .meta("tokenizer.ggml.tokens", strings(tokens))
            .meta("tokenizer.ggml.token_type", Value::Array(types.into_iter().map(Value::I32).collect()))
            .meta("tokenizer.ggml.merges", strings(merges.iter().map(|s| s.to_string()).collect()))
            .meta("tokenizer.ggml.bos_token_id", Value::U32(1))
            .meta("tokenizer.ggml.eos_token_id", Value::U32(2));
        if let Some(pre) = pre {
            w.meta("tokenizer.ggml.pre", Value::String(pre.into()));
        }
        if let Some(b) = add_bos {
            w.meta("tokenizer.ggml.add_bos_token", Value::Bool(b));
        }
        let file = tempfile::NamedTempFile::new()?;
        w.write(file.path())?;
        Tokenizer::from_gguf(&GgufFile::open(file.path())?)
    }

    fn smollm() -> Tokenizer {
        fixture(Some("smollm"), "gpt2", Some(false)).unwrap()
    }

    #[test]
    fn merges_apply_and_specials_follow_parse_special() {
        let t = smollm();
        let hello = t.token_id("hello").unwrap();
        let world = t.token_id(&byte_level(" world")).unwrap();
        assert_eq!(t.encode("hello world", true).unwrap(), vec![hello, world]);

        let ids = t.encode("<|im_start|>hello<|im_end|>", true).unwrap();
        assert_eq!(ids, vec![1, hello, 2]);
        let plain = t.encode("<|im_start|>hello<|im_end|>", false).unwrap();
        assert!(!plain.contains(&1) && !plain.contains(&2), "{plain:?}");
        assert_eq!(t.decode(&plain).unwrap(), "<|im_start|>hello<|im_end|>");

        // User-defined tokens match even when specials are not parsed, as in llama.cpp.
        let tool = t.token_id("<tool>").unwrap();
        assert_eq!(t.encode("<tool>", false).unwrap(), vec![tool]);
        assert_eq!(t.encode("<tool>", true).unwrap(), vec![tool]);

        assert_eq!(t.decode(&ids).unwrap(), "hello");
        assert_eq!(t.decode_with_special(&ids).unwrap(), "<|im_start|>hello<|im_end|>");
    }

    #[test]
    fn smollm_isolates_digits() {
        let t = smollm();
        let ids = t.encode("a 123", true).unwrap();
        let pieces: Vec<String> = ids.iter().map(|&i| t.token_str(i).unwrap()).collect();
        assert_eq!(pieces, ["a", "Ġ", "1", "2", "3"]);
    }

    #[test]
    fn bos_follows_metadata_and_pre_defaults() {
        let t = smollm();
        assert!(!t.add_bos());
        assert_eq!((t.bos_id(), t.eos_id()), (Some(1), Some(2)));
        assert_eq!(t.encode("", true).unwrap(), Vec::<u32>::new());

        let t = fixture(Some("smollm"), "gpt2", Some(true)).unwrap();
        assert_eq!(t.encode("hello", true).unwrap()[0], 1);
        // llama-bpe turns BOS on unless the file says otherwise.
        let t = fixture(Some("llama-bpe"), "gpt2", None).unwrap();
        assert!(t.add_bos());
        assert_eq!(t.encode("", false).unwrap(), vec![1]);
    }

    #[test]
    fn unsupported_configurations_are_errors() {
        let err = fixture(Some("no-such-pre"), "gpt2", None).unwrap_err().to_string();
        assert!(err.contains("unsupported pre-tokenizer \"no-such-pre\""), "{err}");
        assert!(fixture(Some("smollm"), "bert", None).is_err());
        // Missing pre name: llama.cpp's "default" split.
        assert!(fixture(None, "gpt2", None).is_ok());
    }

    #[test]
    fn every_table_regex_compiles() {
        for name in [
            "default",
            "llama3",
            "dbrx",
            "chatglm-bpe",
            "falcon",
            "gpt-2",
            "smollm",
            "qwen2",
            "bloom",
            "viking",
            "tekken",
            "deepseek-coder",
        ] {
            fixture(Some(name), "gpt2", Some(false)).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        }
    }

    #[test]
    fn stream_waits_for_whole_characters() {
        let t = smollm();
        let ids = t.encode("é🚀x", false).unwrap();
        assert_eq!(ids.len(), 7, "one byte token per byte");
        let mut s = t.stream();
        let out: Vec<Option<String>> = ids.iter().map(|&id| s.push(id)).collect();
        let want = [None, Some("é"), None, None, None, Some("🚀"), Some("x")];
        assert_eq!(out, want.map(|o| o.map(String::from)));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn stream_flushes_incomplete_and_skips_specials() {
        let t = smollm();
        let rocket = t.encode("🚀", false).unwrap();
        let mut s = t.stream();
        assert_eq!(s.push(2), None);
        assert_eq!(s.push(rocket[0]), None);
        assert_eq!(s.push(rocket[1]), None);
        assert_eq!(s.finish().as_deref(), Some("\u{FFFD}"));
        assert_eq!(t.decode(&[2, rocket[0], rocket[1]]).unwrap(), "\u{FFFD}");

        // A stray continuation byte never completes: it is shown once the wait is over.
        let cont = t.token_id(&byte_char(0x80).to_string()).unwrap();
        let a = t.token_id("a").unwrap();
        let mut s = t.stream();
        let mut out = String::new();
        for id in std::iter::repeat_n(cont, MAX_PENDING_TOKENS + 2).chain([a]) {
            out.extend(s.push(id));
        }
        out.extend(s.finish());
        assert_eq!(out, t.decode(s.ids()).unwrap());

        // Many control tokens inside a character: the stream still gives what `decode` gives.
        let (lead, tail) = (rocket[0], rocket[1]);
        let mut s = t.stream();
        let mut out = String::new();
        for id in [a, lead].into_iter().chain(std::iter::repeat_n(2, MAX_PENDING_TOKENS + 3)).chain([tail, a]) {
            out.extend(s.push(id));
        }
        out.extend(s.finish());
        assert_eq!(out, t.decode(s.ids()).unwrap());
    }

    #[test]
    fn tokenizer_json_loads_with_config_and_post_processor() {
        let t = smollm();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        t.special.save(&path, false).unwrap();
        let text = "<|im_start|>hello world 42<|im_end|>";

        // Special tokens named by text; no post-processor, so no BOS.
        let cfg = serde_json::json!({"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>"});
        let j = Tokenizer::from_json_file(&path, Some(&cfg)).unwrap();
        assert_eq!((j.bos_id(), j.eos_id(), j.add_bos()), (Some(1), Some(2), false));
        assert_eq!(j.encode(text, true).unwrap(), t.encode(text, true).unwrap());
        assert_eq!(j.encode(text, false).unwrap(), t.encode(text, false).unwrap());

        // A post-processor that prepends BOS turns add_bos on; training-time truncation is ignored.
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        json["post_processor"] = serde_json::json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}
        });
        json["truncation"] =
            serde_json::json!({"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0});
        std::fs::write(&path, json.to_string()).unwrap();
        let cfg = serde_json::json!({"bos_token_id": 1, "eos_token_id": [2, 0]});
        let j = Tokenizer::from_json_file(&path, Some(&cfg)).unwrap();
        assert_eq!((j.bos_id(), j.eos_id(), j.add_bos()), (Some(1), Some(2), true));
        let ids = j.encode("hello world 42", false).unwrap();
        assert_eq!(ids[0], 1);
        assert_eq!(ids[1..], t.encode("hello world 42", false).unwrap()[..]);
        // An explicit add_bos_token wins over the probe.
        let cfg = serde_json::json!({"bos_token_id": 1, "add_bos_token": false});
        assert!(!Tokenizer::from_json_file(&path, Some(&cfg)).unwrap().add_bos());
        // No config: no ids, so nothing can be added.
        let j = Tokenizer::from_json_file(&path, None).unwrap();
        assert_eq!((j.bos_id(), j.eos_id(), j.add_bos()), (None, None, false));

        assert!(Tokenizer::from_json_file(&dir.path().join("missing.json"), None).is_err());
    }

    #[test]
    fn out_of_range_ids_do_not_panic() {
        let t = smollm();
        assert_eq!(t.decode(&[u32::MAX, 7]).unwrap(), t.decode(&[7]).unwrap());
        assert!(t.token_str(u32::MAX).is_none());
        let mut s = t.stream();
        assert_eq!(s.push(u32::MAX), None);
        assert_eq!(s.finish(), None);
    }

    /// A tiny SentencePiece vocabulary laid out like Gemma 3's: control tokens, user-defined
    /// newline and two-space tokens, the 256 byte tokens, then scored pieces. Returns
    /// `(text, token type, score)`.
    fn spm_vocab() -> Vec<(String, i32, f32)> {
        let mut v: Vec<(String, i32, f32)> = [
            ("<pad>", 3),
            ("<eos>", 3),
            ("<bos>", 3),
            ("<unk>", 2),
            ("<start_of_turn>", 3),
            ("<end_of_turn>", 3),
            ("\n", 4),
            ("  ", 4),
            ("</s>", 4),
        ]
        .into_iter()
        .map(|(t, ty)| (t.to_string(), ty, -1000.0))
        .collect();
        v.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), 6, 0.0)));
        let pieces = [
            // Single characters: never the result of a merge, so their scores do not matter.
            ("▁", -100.0),
            ("a", -100.0),
            ("b", -100.0),
            ("c", -100.0),
            ("d", -100.0),
            ("e", -100.0),
            ("h", -100.0),
            ("l", -100.0),
            ("o", -100.0),
            ("r", -100.0),
            ("w", -100.0),
            ("x", -100.0),
            ("y", -100.0),
            ("z", -100.0),
            ("=", -100.0),
            // `bc` outscores `ab`, so "abc" is a + bc although ab is further left.
            ("ab", -5.0),
            ("bc", -1.0),
            // A tie: llama.cpp takes the leftmost pair, whatever the ids (a merge list ranked by
            // id would take yz here).
            ("yz", -3.0),
            ("xy", -3.0),
            ("he", -10.0),
            ("ll", -11.0),
            ("hell", -12.0),
            ("hello", -13.0),
            ("▁hello", -14.0),
            ("▁w", -20.0),
            ("or", -21.0),
            ("▁wor", -22.0),
            ("ld", -23.0),
            ("▁world", -24.0),
            ("==", -30.0),
            ("===", -31.0),
        ];
        v.extend(pieces.into_iter().map(|(t, s)| (t.to_string(), 1, s)));
        v
    }

    /// The metadata of a Gemma-like "llama" GGUF over [`spm_vocab`], for a test to edit.
    fn spm_meta() -> std::collections::BTreeMap<String, Value> {
        let v = spm_vocab();
        let mut m = std::collections::BTreeMap::new();
        let mut put = |k: &str, val: Value| m.insert(k.to_string(), val);
        put("tokenizer.ggml.model", Value::String("llama".into()));
        put("tokenizer.ggml.pre", Value::String("default".into()));
        put("tokenizer.ggml.tokens", Value::Array(v.iter().map(|(t, ..)| Value::String(t.clone())).collect()));
        put("tokenizer.ggml.token_type", Value::Array(v.iter().map(|&(_, ty, _)| Value::I32(ty)).collect()));
        put("tokenizer.ggml.scores", Value::Array(v.iter().map(|&(.., s)| Value::F32(s)).collect()));
        put("tokenizer.ggml.bos_token_id", Value::U32(2));
        put("tokenizer.ggml.eos_token_id", Value::U32(1));
        put("tokenizer.ggml.unknown_token_id", Value::U32(3));
        put("tokenizer.ggml.add_space_prefix", Value::Bool(false));
        m
    }

    fn spm_from(meta: std::collections::BTreeMap<String, Value>) -> Result<Tokenizer> {
        let mut w = GgufWriter::new();
        for (k, v) in meta {
            w.meta(&k, v);
        }
        Tokenizer::from_gguf(&GgufFile::from_bytes(&w.to_bytes())?)
    }

    fn spm() -> Tokenizer {
        spm_from(spm_meta()).unwrap()
    }

    /// Ids as vocabulary entries, to make the expectations readable.
    fn pieces(t: &Tokenizer, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|&i| t.token_str(i).unwrap()).collect()
    }

    #[test]
    fn spm_merges_by_score_then_leftmost() {
        let t = spm();
        assert!(t.add_bos(), "llama.cpp adds BOS for \"llama\" vocabularies unless told otherwise");
        assert_eq!((t.bos_id(), t.eos_id()), (Some(2), Some(1)));
        let enc = |s: &str| pieces(&t, &t.encode(s, false).unwrap()[1..]);
        assert_eq!(enc("abc"), ["a", "bc"]);
        assert_eq!(enc("xyz"), ["xy", "z"]);
        assert_eq!(enc("hello"), ["hello"]);
        // Each merge pairs the new symbol with its neighbours again: the two leftmost `=`, then
        // the next two (== outscores ===), then what is left makes ===.
        assert_eq!(enc("====="), ["==", "==="]);
        assert_eq!(enc("==="), ["==="]);
    }

    #[test]
    fn spm_escapes_spaces_and_falls_back_to_bytes() {
        let t = spm();
        let enc = |s: &str| pieces(&t, &t.encode(s, true).unwrap()[1..]);
        // No space prefix (Gemma): only real spaces become ▁.
        assert_eq!(enc("hello world"), ["hello", "▁world"]);
        assert_eq!(enc(" hello"), ["▁hello"]);
        // Two spaces and a newline are user-defined tokens, cut out before merging.
        assert_eq!(enc("hello  world\n"), ["hello", "  ", "w", "or", "ld", "\n"]);
        assert_eq!(enc("a b"), ["a", "▁", "b"]);
        // Characters outside the vocabulary become their UTF-8 bytes.
        assert_eq!(enc("a€"), ["a", "<0xE2>", "<0x82>", "<0xAC>"]);
        assert_eq!(t.decode(&t.encode("a€", true).unwrap()).unwrap(), "a€");

        // With add_space_prefix, text at the start and after a special token gets a ▁.
        let mut meta = spm_meta();
        meta.insert("tokenizer.ggml.add_space_prefix".into(), Value::Bool(true));
        let p = spm_from(meta).unwrap();
        let ids = p.encode("hello world<start_of_turn>hello", true).unwrap();
        assert_eq!(pieces(&p, &ids), ["<bos>", "▁hello", "▁world", "<start_of_turn>", "▁hello"]);
        // ... and decoding drops the one it added at the start.
        assert_eq!(p.decode(&ids).unwrap(), "hello world hello");
        assert_eq!(p.decode(&p.encode("hello world", false).unwrap()).unwrap(), "hello world");
        assert_eq!(p.encode("", false).unwrap(), vec![2], "empty text: nothing to prefix");
    }

    #[test]
    fn spm_specials_follow_parse_special() {
        let t = spm();
        let text = "<start_of_turn>hello</s><end_of_turn>\n";
        let ids = t.encode(text, true).unwrap();
        assert_eq!(pieces(&t, &ids), ["<bos>", "<start_of_turn>", "hello", "</s>", "<end_of_turn>", "\n"]);
        // Without parsing, control tokens are text; so is `</s>`, user-defined but one of the
        // end-of-generation names llama.cpp treats as control. The newline still matches.
        let plain = t.encode(text, false).unwrap();
        assert!(!plain.iter().any(|&id| matches!(id, 4 | 5 | 8)), "{:?}", pieces(&t, &plain));
        assert_eq!(plain.last(), Some(&6));
        assert_eq!(t.decode(&plain).unwrap(), text);
        assert_eq!(t.decode_with_special(&ids[1..]).unwrap(), text);
        assert_eq!(t.encode("", true).unwrap(), vec![2]);
    }

    #[test]
    fn spm_stream_and_embedding_round_trip() {
        let t = spm();
        let text = "hello €world  ==\nxyz";
        let ids = t.encode(text, false).unwrap();
        let mut s = t.stream();
        let mut out: String = ids.iter().filter_map(|&id| s.push(id)).collect();
        out.extend(s.finish());
        assert_eq!(out, text);

        let embedded = t.to_embedded().unwrap();
        assert!(embedded["spm"]["scores"].is_array());
        let e = Tokenizer::from_embedded(&embedded).unwrap();
        for parse in [true, false] {
            assert_eq!(e.encode(text, parse).unwrap(), t.encode(text, parse).unwrap());
        }
        assert_eq!(e.decode(&ids).unwrap(), text);
        assert_eq!(e.vocab_size(), t.vocab_size());

        let mut bad = embedded.clone();
        bad["spm"]["scores"] = serde_json::json!([0.0]);
        assert!(Tokenizer::from_embedded(&bad).is_err());
    }

    #[test]
    fn spm_metadata_defaults_and_errors() {
        // Without scores every pair ties, and llama.cpp merges leftmost first.
        let mut meta = spm_meta();
        meta.remove("tokenizer.ggml.scores");
        let t = spm_from(meta).unwrap();
        assert_eq!(pieces(&t, &t.encode("abc", false).unwrap()[1..]), ["ab", "c"]);

        // llama.cpp's defaults for a "llama" file: BOS 1, EOS 2.
        let mut meta = spm_meta();
        meta.remove("tokenizer.ggml.bos_token_id");
        meta.remove("tokenizer.ggml.eos_token_id");
        let t = spm_from(meta).unwrap();
        assert_eq!((t.bos_id(), t.eos_id()), (Some(1), Some(2)));

        let n = spm_vocab().len();
        let with_scores = |scores: Vec<Value>| {
            let mut meta = spm_meta();
            meta.insert("tokenizer.ggml.scores".into(), Value::Array(scores));
            spm_from(meta).map(|_| ()).unwrap_err().to_string()
        };
        let err = with_scores(vec![Value::F32(0.0); n - 1]);
        assert!(err.contains("tokenizer.ggml.scores has"), "{err}");
        let err = with_scores(vec![Value::String("high".into()); n]);
        assert!(err.contains("scores[0] is not a number"), "{err}");
        let mut scores = vec![Value::F32(0.0); n];
        scores[7] = Value::F32(f32::NAN);
        let err = with_scores(scores);
        assert!(err.contains("scores[7] is NaN"), "{err}");
        let mut meta = spm_meta();
        meta.insert("tokenizer.ggml.scores".into(), Value::F32(1.0));
        assert!(spm_from(meta).unwrap_err().to_string().contains("not an array"));
    }

    proptest::proptest! {
        /// Without special parsing and without a space prefix, SentencePiece with byte fallback
        /// is lossless too, except for a literal `▁`, which decodes as a space (in llama.cpp as
        /// well).
        #[test]
        fn spm_plain_text_round_trips(text in "(\\PC|\\s|<start_of_turn>|</s>|hello|==|  |€){0,40}") {
            proptest::prop_assume!(!text.contains('▁'));
            let t = spm();
            let ids = t.encode(&text, false).unwrap();
            proptest::prop_assert_eq!(t.decode(&ids).unwrap(), text.clone());
            let mut s = t.stream();
            let mut out: String = ids.iter().filter_map(|&id| s.push(id)).collect();
            out.extend(s.finish());
            proptest::prop_assert_eq!(out, text.clone());
            let special = t.encode(&text, true).unwrap();
            proptest::prop_assert_eq!(t.decode_with_special(&special[1..]).unwrap(), text.clone());
        }

        /// Without special parsing, byte-level BPE is lossless: any text decodes back to itself.
        #[test]
        fn plain_text_round_trips(text in "(\\PC|\\s|<\\|im_(start|end)\\|>|'s|[0-9]{1,5}){0,40}") {
            let t = smollm();
            let ids = t.encode(&text, false).unwrap();
            proptest::prop_assert_eq!(t.decode(&ids).unwrap(), text.clone());
            let mut s = t.stream();
            let mut out: String = ids.iter().filter_map(|&id| s.push(id)).collect();
            out.extend(s.finish());
            proptest::prop_assert_eq!(out, text.clone());
            // Parsing specials must not panic either.
            t.encode(&text, true).unwrap();
        }
    }
}
