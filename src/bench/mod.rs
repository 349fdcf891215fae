//! Speed measurement the way `llama-bench -p 512 -n 128 -r 3` does it, so our numbers sit beside
//! llama.cpp's: prompt processing (one forward pass over `n_prompt` tokens from an empty cache)
//! and text generation (`n_gen` single-token forward passes from an empty cache), each warmed up
//! once and then repeated, reported as the mean and sample standard deviation of tok/s.
//!
//! Like llama-bench, the prompt is a fixed pseudo-random sequence over the vocabulary (BOS first
//! when the model adds one). Both tests run through the decode driver every other command uses
//! ([`crate::decode::Decoder`]); text generation samples greedily (an argmax over the vocabulary
//! per token, which llama-bench does not pay) and ignores end-of-text tokens, so every
//! repetition makes the same number of passes at the same positions.

pub mod spec;

use anyhow::{Result, ensure};
use serde::Serialize;

use std::ops::ControlFlow;

use crate::decode::{Decoder, GenerationStats, Sequence};
use crate::model::Llama;
use crate::sampling::{Sampler, SamplingParams};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Prompt tokens processed in one forward pass (llama-bench `-p`); 0 skips the test.
    pub n_prompt: usize,
    /// Tokens generated one forward pass at a time (llama-bench `-n`); 0 skips the test.
    pub n_gen: usize,
    /// Timed repetitions of each test (llama-bench `-r`).
    pub reps: usize,
    /// First token of every sequence, when the model adds one.
    pub bos: Option<u32>,
    /// Largest batch per forward pass (llama-bench's `-ub`, default 512).
    pub max_batch: usize,
    /// Tokens already in the cache when each test starts (llama-bench `-d`), filled untimed:
    /// what attention and the KV cache cost at long context.
    pub depth: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions { n_prompt: 512, n_gen: 128, reps: 3, bos: None, max_batch: 512, depth: 0 }
    }
}

/// Mean and sample standard deviation of per-repetition rates.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Rate {
    pub tok_s: f64,
    pub std: f64,
    /// tok/s of each timed repetition.
    pub samples: Vec<f64>,
}

impl Rate {
    fn from_samples(samples: Vec<f64>) -> Self {
        let n = samples.len() as f64;
        let tok_s = samples.iter().sum::<f64>() / n.max(1.0);
        let var = if samples.len() > 1 {
            samples.iter().map(|s| (s - tok_s) * (s - tok_s)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        Rate { tok_s, std: var.sqrt(), samples }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// Prompt processing; `None` when `n_prompt` is 0.
    pub pp: Option<Rate>,
    /// Text generation; `None` when `n_gen` is 0.
    pub tg: Option<Rate>,
    /// Bytes of the KV cache of the session the tests ran in.
    pub kv_bytes: usize,
    /// Threads of the pool the tests ran on.
    pub threads: usize,
}

/// The fixed token sequence of a test: BOS (if any), then a xorshift sequence over the vocabulary.
pub fn bench_tokens(n: usize, vocab: usize, bos: Option<u32>) -> Vec<u32> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % vocab as u64) as u32
    };
    (0..n).map(|i| if i == 0 { bos.unwrap_or_else(&mut next) } else { next() }).collect()
}

/// Runs the prompt-processing and text-generation tests on `model` in the current rayon pool.
pub fn run_bench(model: &Llama, opts: &BenchOptions) -> Result<BenchResult> {
    ensure!(opts.n_prompt > 0 || opts.n_gen > 0, "nothing to measure: both -p and -n are 0");
    ensure!(opts.reps > 0, "--reps must be at least 1");
    let vocab = model.config.vocab_size;
    ensure!(opts.bos.is_none_or(|b| (b as usize) < vocab), "BOS id outside the vocabulary");
    // One session for both tests, sized like llama-bench's context (n_prompt + n_gen).
    // Two more than llama-bench's context: the token each test starts generation from, and the
    // room the driver keeps for the last output token.
    let capacity = opts.depth + opts.n_prompt + opts.n_gen + 2;
    ensure!(
        capacity <= model.rope.max_pos(),
        "--depth {} plus -p {} plus -n {} exceeds the model's context length {}",
        opts.depth,
        opts.n_prompt,
        opts.n_gen,
        model.rope.max_pos()
    );
    let mut session = Some(model.new_batched_session(capacity, opts.max_batch.clamp(1, capacity)));
    // The context every test starts from: the same tokens each time, before the clock starts.
    let context = bench_tokens(opts.depth, vocab, opts.bos);
    // Both tests go through the decode driver, greedy and without end-of-text tokens: `tokens`
    // after the context, then `n` tokens generated. Returns the generation's statistics.
    let mut decoder = Decoder::new(model, Vec::new(), opts.max_batch);
    let mut test = |tokens: &[u32], n: usize| -> Result<GenerationStats> {
        let mut s = session.take().expect("the session comes back");
        s.reset();
        decoder.feed(&mut s, &context)?;
        let prompt: Vec<u32> = context.iter().chain(tokens).copied().collect();
        let mut seq = Sequence::new(s, &context, &prompt, n, Sampler::new(SamplingParams::greedy()), None)?;
        let stats = decoder.generate(&mut seq, |_, _| ControlFlow::Continue(()));
        session = Some(seq.into_parts().session);
        stats
    };

    let pp = if opts.n_prompt > 0 {
        let tokens = bench_tokens(opts.n_prompt, vocab, opts.bos);
        let mut samples = Vec::with_capacity(opts.reps);
        for rep in 0..=opts.reps {
            // One token out, right after the prompt's pass: the prefill time.
            let st = test(&tokens, 1)?;
            if rep > 0 {
                samples.push(opts.n_prompt as f64 / st.prefill_s);
            }
        }
        Some(Rate::from_samples(samples))
    } else {
        None
    };

    let tg = if opts.n_gen > 0 {
        let first = bench_tokens(1, vocab, opts.bos);
        let mut samples = Vec::with_capacity(opts.reps);
        for rep in 0..=opts.reps {
            // After the first (untimed) token, `n_gen` single-token passes: the last output
            // token goes into the cache too.
            let st = test(&first, opts.n_gen)?;
            ensure!(st.generated_tokens == opts.n_gen, "generation stopped after {} tokens", st.generated_tokens);
            if rep > 0 {
                samples.push(opts.n_gen as f64 / st.decode_s);
            }
        }
        Some(Rate::from_samples(samples))
    } else {
        None
    };

    let kv_bytes = session.as_ref().map_or(0, |s| s.kv_bytes());
    Ok(BenchResult { pp, tg, kv_bytes, threads: rayon::current_num_threads() })
}

/// Peak resident set size of this process in bytes (`VmHWM` of `/proc/self/status`); `None`
/// where that file does not exist (non-Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.trim_start_matches("VmHWM:").trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_mean_and_sample_stddev() {
        let r = Rate::from_samples(vec![10.0, 12.0, 14.0]);
        assert!((r.tok_s - 12.0).abs() < 1e-12);
        assert!((r.std - 2.0).abs() < 1e-12);
        assert_eq!(Rate::from_samples(vec![5.0]).std, 0.0);
    }

    #[test]
    fn tokens_are_fixed_in_range_and_start_with_bos() {
        let a = bench_tokens(1000, 77, Some(3));
        assert_eq!(a, bench_tokens(1000, 77, Some(3)));
        assert_eq!(a[0], 3);
        assert!(a.iter().all(|&t| t < 77));
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(distinct.len() > 50, "sequence should cover the vocabulary, got {}", distinct.len());
        assert!(bench_tokens(5, 77, None)[0] < 77);
    }

    #[test]
    fn peak_rss_is_reported_on_linux() {
        if cfg!(target_os = "linux") {
            let rss = peak_rss_bytes().expect("VmHWM on Linux");
            assert!(rss > 1 << 20, "peak RSS {rss} bytes is implausibly small");
        }
    }
}
