//! SentencePiece BPE as llama.cpp runs it (`tokenizer.ggml.model = "llama"`): the merging that
//! the `tokenizers` object beside it does not do.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use anyhow::{Context, Result, anyhow, bail, ensure};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::{OffsetReferential, OffsetType};

use super::tk_err;
use crate::format::gguf::{GgufFile, Value};

/// `tokenizer.ggml.scores`, one per token; absent, every score is 0 (as in llama.cpp, which then
/// merges leftmost first). Scores must be finite: the merge order compares them.
pub(super) fn meta_scores(gguf: &GgufFile, n_vocab: usize) -> Result<Vec<f32>> {
    let Some(v) = gguf.get("tokenizer.ggml.scores") else { return Ok(vec![0.0; n_vocab]) };
    let arr = v.as_array().context("tokenizer.ggml.scores is not an array")?;
    ensure!(arr.len() == n_vocab, "tokenizer.ggml.scores has {} entries for {n_vocab} tokens", arr.len());
    arr.iter()
        .enumerate()
        .map(|(i, v)| {
            let score = match *v {
                Value::F32(x) => x,
                Value::F64(x) => x as f32,
                Value::I32(x) => x as f32,
                _ => bail!("tokenizer.ggml.scores[{i}] is not a number: {}", GgufFile::describe_value(v)),
            };
            ensure!(score.is_finite(), "tokenizer.ggml.scores[{i}] is {score}");
            Ok(score)
        })
        .collect()
}

/// SentencePiece BPE exactly as llama.cpp runs it for `tokenizer.ggml.model = "llama"`
/// (`llm_tokenizer_spm`): spaces become `▁`, the text is split into characters, and the
/// adjacent pair whose concatenation is the highest-scoring vocabulary entry is merged, again
/// and again, ties going to the leftmost pair; a character that no entry covers becomes its
/// UTF-8 bytes (`<0xE2>`...).
///
/// This is hand-written rather than a `tokenizers` BPE with merges made from the scores (what
/// Hugging Face's converter does) for two reasons. A merge list gives every pair its own rank,
/// so where llama.cpp breaks a tie between equal scores by position, a merge list breaks it by
/// rank: vocabularies whose entries share scores (or have none, so all tie) come out
/// differently. And on Gemma 3's vocabulary, whose scores are all distinct and where such a list
/// did agree with llama.cpp on every text tried, it has 515k merges and took three times as long
/// to build as everything else here. The `tokenizers` object beside it only holds the
/// vocabulary, cuts out special tokens and decodes.
#[derive(Clone)]
pub(super) struct Spm {
    /// `tokenizer.ggml.scores`, by id.
    scores: Vec<f32>,
    /// The token for each byte value, for characters that no vocabulary entry covers: `<0xXX>`,
    /// else (ASCII only) the byte as a one-character entry, as llama.cpp's `byte_to_token`;
    /// else the unknown token. `None` if even that is missing.
    byte_ids: [Option<u32>; 256],
    unk: Option<u32>,
    /// Prepend a space to text at the start and after every special token
    /// (`tokenizer.ggml.add_space_prefix`).
    add_space_prefix: bool,
}

/// A run of the text being merged: one character at first, then whole vocabulary entries.
/// Symbols form a linked list in text order; a symbol merged into its left neighbour has `len == 0`.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of two adjacent symbols.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Bytes of the merged text: a left or right symbol that has changed since the bigram was
    /// queued no longer adds up to this, which marks the entry stale.
    len: usize,
}

impl Ord for Bigram {
    /// Higher score first, then the leftmost. Scores are finite (checked on loading), and
    /// `partial_cmp` treats -0.0 and 0.0 as equal, as llama.cpp's `<` does (Gemma's `▁t` has
    /// score -0.0 and its byte tokens 0.0).
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.partial_cmp(&other.score).unwrap_or(Ordering::Equal).then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

impl Spm {
    /// The `tokenizers` side of a SentencePiece vocabulary: the entries (no merges: [`Spm`]
    /// does the merging), and the normalizer and decoder of Hugging Face's Llama tokenizers, so
    /// that decoding maps `▁` back to spaces and byte tokens back to bytes.
    pub(super) fn hf_tokenizer(
        vocab: Vocab,
        unk: Option<String>,
        add_space_prefix: bool,
    ) -> Result<tokenizers::Tokenizer> {
        let mut builder = BPE::builder().vocab_and_merges(vocab, Vec::new()).byte_fallback(true);
        if let Some(unk) = unk {
            builder = builder.unk_token(unk);
        }
        let bpe = builder.build().map_err(|e| anyhow!("invalid SentencePiece vocabulary: {e}"))?;
        let mut normalizers = Vec::new();
        let mut decoders = vec![
            DecoderWrapper::Replace(Replace::new("▁", " ").map_err(tk_err)?),
            DecoderWrapper::ByteFallback(ByteFallback::new()),
            DecoderWrapper::Fuse(Fuse::new()),
        ];
        if add_space_prefix {
            normalizers.push(NormalizerWrapper::Prepend(Prepend::new("▁".into())));
            decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
        }
        normalizers.push(NormalizerWrapper::Replace(Replace::new(" ", "▁").map_err(tk_err)?));
        let mut tk = tokenizers::Tokenizer::new(bpe);
        tk.with_normalizer(Some(NormalizerWrapper::Sequence(NormalizerSequence::new(normalizers))))
            .with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(decoders))));
        Ok(tk)
    }

    /// `vocab` must hold the vocabulary that `scores` is indexed by.
    pub(super) fn new(
        vocab: &tokenizers::Tokenizer,
        scores: Vec<f32>,
        unk: Option<u32>,
        add_space_prefix: bool,
    ) -> Result<Self> {
        let n_vocab = vocab.get_vocab_size(false);
        ensure!(scores.len() == n_vocab, "SentencePiece tokenizer has {} scores for {n_vocab} tokens", scores.len());
        ensure!(scores.iter().all(|s| s.is_finite()), "SentencePiece scores must be finite");
        ensure!(unk.is_none_or(|id| (id as usize) < n_vocab), "unknown token id {unk:?} is outside the vocabulary");
        let byte_ids = std::array::from_fn(|b| {
            let b = b as u8;
            vocab
                .token_to_id(&format!("<0x{b:02X}>"))
                .or_else(|| if b.is_ascii() { vocab.token_to_id(&char::from(b).to_string()) } else { None })
                .or(unk)
        });
        Ok(Self { scores, byte_ids, unk, add_space_prefix })
    }

    /// `text` to ids, as llama.cpp's `tokenize_impl` for SPM vocabularies: the special and
    /// user-defined tokens that `tk` matches are cut out first, and each piece of text between
    /// them is escaped and merged on its own.
    pub(super) fn encode(&self, tk: &tokenizers::Tokenizer, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let pieces = tk.get_added_vocabulary().extract_and_normalize(None::<&NormalizerWrapper>, text);
        let mut after_special = true;
        let mut escaped = String::new();
        for (piece, _, tokens) in pieces.get_splits(OffsetReferential::Original, OffsetType::None) {
            if let Some(tokens) = tokens {
                out.extend(tokens.iter().map(|t| t.id));
                after_special = true;
                continue;
            }
            // Only the empty text gives an empty piece; llama.cpp tokenizes nothing for it.
            if piece.is_empty() {
                continue;
            }
            escaped.clear();
            if self.add_space_prefix && after_special {
                escaped.push('▁');
            }
            escaped.extend(piece.chars().map(|c| if c == ' ' { '▁' } else { c }));
            self.merge(tk, &escaped, out)?;
            after_special = false;
        }
        Ok(())
    }

    /// llama.cpp's `llm_tokenizer_spm_session::tokenize` on one escaped piece of text.
    fn merge(&self, tk: &tokenizers::Tokenizer, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut symbols: Vec<Symbol> = text
            .char_indices()
            .enumerate()
            .map(|(i, (start, c))| Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: (start + c.len_utf8() < text.len()).then_some(i + 1),
            })
            .collect();
        let mut queue = BinaryHeap::with_capacity(symbols.len());
        let add_bigram =
            |queue: &mut BinaryHeap<Bigram>, symbols: &[Symbol], left: Option<usize>, right: Option<usize>| {
                let (Some(left), Some(right)) = (left, right) else { return };
                let (l, r) = (symbols[left], symbols[right]);
                let merged = &text[l.start..r.start + r.len];
                if let Some(&score) = tk.token_to_id(merged).and_then(|id| self.scores.get(id as usize)) {
                    queue.push(Bigram { score, left, right, len: merged.len() });
                }
            };
        for i in 1..symbols.len() {
            add_bigram(&mut queue, &symbols, Some(i - 1), Some(i));
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (symbols[b.left], symbols[b.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != b.len {
                continue;
            }
            symbols[b.left].len += r.len;
            symbols[b.left].next = r.next;
            symbols[b.right].len = 0;
            if let Some(n) = r.next {
                symbols[n].prev = Some(b.left);
            }
            add_bigram(&mut queue, &symbols, l.prev, Some(b.left));
            add_bigram(&mut queue, &symbols, Some(b.left), r.next);
        }

        let mut at = (!symbols.is_empty()).then_some(0);
        while let Some(i) = at {
            let s = symbols[i];
            let piece = &text[s.start..s.start + s.len];
            // Merged symbols are vocabulary entries by construction; only a single character
            // can be missing, and it falls back to its bytes.
            match tk.token_to_id(piece) {
                Some(id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        out.push(self.byte_ids[b as usize].with_context(|| {
                            format!(
                                "the vocabulary has no token for byte 0x{b:02X} (of {piece:?}) and no unknown token"
                            )
                        })?);
                    }
                }
            }
            at = s.next;
        }
        Ok(())
    }

    /// What [`Tokenizer::to_embedded`] stores beside the `tokenizers` JSON, which has no scores.
    pub(super) fn to_embedded(&self) -> serde_json::Value {
        serde_json::json!({ "scores": self.scores, "unk": self.unk, "add_space_prefix": self.add_space_prefix })
    }

    pub(super) fn from_embedded(v: &serde_json::Value, vocab: &tokenizers::Tokenizer) -> Result<Self> {
        let scores: Vec<f32> = serde_json::from_value(v.get("scores").cloned().unwrap_or_default())
            .context("embedded SentencePiece scores are invalid")?;
        let unk = match v.get("unk") {
            None | Some(serde_json::Value::Null) => None,
            Some(id) => Some(
                id.as_u64().and_then(|id| u32::try_from(id).ok()).context("embedded unknown token id is invalid")?,
            ),
        };
        let add_space_prefix = v
            .get("add_space_prefix")
            .and_then(serde_json::Value::as_bool)
            .context("embedded SentencePiece tokenizer lacks add_space_prefix")?;
        Self::new(vocab, scores, unk, add_space_prefix)
    }
}
