//! Perplexity the way `llama-perplexity` measures it, so our numbers sit beside llama.cpp's.
//!
//! The text is tokenized once, cut into non-overlapping chunks of `ctx` tokens, each chunk run
//! from an empty cache (its first token replaced by BOS when the model adds one), and only the
//! second half of each chunk scored: early positions see too little context to be informative.

use anyhow::{Result, ensure};

use crate::model::Llama;
use crate::sampling::log_softmax_at;

/// Running result of a perplexity measurement.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Perplexity {
    pub chunks: usize,
    pub tokens_scored: usize,
    sum_nll: f64,
    sum_nll2: f64,
}

impl Perplexity {
    pub fn ppl(&self) -> f64 {
        (self.sum_nll / self.tokens_scored as f64).exp()
    }
    /// Standard error of the PPL estimate (llama.cpp's formula: PPL·σ(nll)/√(N−1)).
    pub fn stderr(&self) -> f64 {
        let n = self.tokens_scored as f64;
        let mean = self.sum_nll / n;
        let var = (self.sum_nll2 / n - mean * mean).max(0.0);
        self.ppl() * (var / (n - 1.0).max(1.0)).sqrt()
    }
}

/// Scores `tokens` in chunks of `ctx`; `on_chunk` sees the running result after each chunk.
pub fn perplexity(
    model: &Llama,
    tokens: &[u32],
    ctx: usize,
    max_chunks: Option<usize>,
    bos: Option<u32>,
    mut on_chunk: impl FnMut(&Perplexity),
) -> Result<Perplexity> {
    ensure!(ctx >= 4, "context {ctx} is too small for perplexity (need ≥ 4)");
    ensure!(
        tokens.len() >= 2 * ctx,
        "the text has {} tokens; perplexity at ctx {ctx} needs at least {}",
        tokens.len(),
        2 * ctx
    );
    let n_chunks = (tokens.len() / ctx).min(max_chunks.unwrap_or(usize::MAX));
    let first = ctx / 2;
    let vocab = model.config.vocab_size;
    let mut session = model.new_session(ctx, ctx);
    let mut acc = Perplexity::default();
    let mut chunk = vec![0u32; ctx];
    for i in 0..n_chunks {
        chunk.copy_from_slice(&tokens[i * ctx..(i + 1) * ctx]);
        if let Some(b) = bos {
            chunk[0] = b;
        }
        session.reset();
        // Logits for positions first..ctx-1; position p predicts token p+1.
        let logits = model.forward(&mut session, &chunk, ctx - first)?;
        for p in first..ctx - 1 {
            let row = &logits[(p - first) * vocab..(p - first + 1) * vocab];
            let nll = -log_softmax_at(row, tokens[i * ctx + p + 1]);
            acc.sum_nll += nll;
            acc.sum_nll2 += nll * nll;
            acc.tokens_scored += 1;
        }
        acc.chunks += 1;
        on_chunk(&acc);
    }
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ppl_and_stderr_follow_llamacpp_formula() {
        let p = Perplexity { chunks: 1, tokens_scored: 4, sum_nll: 4.0, sum_nll2: 4.0 + 4.0 * 0.25 };
        assert!((p.ppl() - 1f64.exp()).abs() < 1e-12);
        // var = 0.25, stderr = e · sqrt(0.25 / 3)
        assert!((p.stderr() - 1f64.exp() * (0.25f64 / 3.0).sqrt()).abs() < 1e-12);
    }
}
