//! `bitnest bench spec`: speculative decoding on a prompt set, against plain decoding of the
//! same model at the same precision, the way Spec-Bench reports it: per category the mean
//! accepted tokens per verification pass (MAT), tokens per second (mean of per-prompt rates),
//! the speedup over plain decoding, and whether every output was token-identical to it.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};

use super::{SpecOptions, SpecStats, Speculator, TokenRecycler, generate_spec};
use crate::chat::Message;
use crate::engine::Engine;
use crate::generate::generate;
use crate::sampling::{Sampler, SamplingParams};

/// One prompt of a Spec-Bench style JSONL file (`{"question_id", "category", "turns": [...]}`).
#[derive(Debug, Clone, Deserialize)]
pub struct BenchPrompt {
    #[serde(default)]
    pub question_id: serde_json::Value,
    pub category: String,
    pub turns: Vec<String>,
}

/// Reads a prompt file; Spec-Bench's MT-bench categories (writing, roleplay, …) are reported
/// together as `mt_bench`, as Spec-Bench does.
pub fn read_prompts(path: &Path) -> Result<Vec<BenchPrompt>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let mut p: BenchPrompt =
            serde_json::from_str(line).with_context(|| format!("{}:{}: not a prompt object", path.display(), i + 1))?;
        ensure!(!p.turns.is_empty(), "{}:{}: no turns", path.display(), i + 1);
        const MT: &[&str] = &["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"];
        if MT.contains(&p.category.as_str()) {
            p.category = "mt_bench".into();
        }
        out.push(p);
    }
    ensure!(!out.is_empty(), "{} holds no prompts", path.display());
    Ok(out)
}

/// Per-category (and overall) figures of one speculative configuration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CategoryResult {
    pub prompts: usize,
    pub mat: f64,
    pub tok_s: f64,
    pub plain_tok_s: f64,
    pub speedup: f64,
    pub identical: bool,
    /// Fraction of self-drafted tokens accepted (self and both modes).
    pub self_acceptance: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SpecBenchResult {
    pub mode: String,
    pub draft_bits: u32,
    pub tree_nodes: usize,
    pub max_draft: usize,
    pub adaptive: bool,
    pub speedup: f64,
    pub mat: f64,
    pub tok_s: f64,
    pub plain_tok_s: f64,
    pub identical: bool,
    pub self_acceptance: f64,
    /// Mean nodes per verification pass.
    pub nodes_per_pass: f64,
    pub categories: BTreeMap<String, CategoryResult>,
    /// Prompt ids whose output differed from plain decoding.
    pub mismatches: Vec<serde_json::Value>,
}

/// Plain greedy decoding of every prompt: the reference tokens and rates.
pub struct PlainRun {
    pub outputs: Vec<Vec<u32>>,
    pub tok_s: Vec<f64>,
}

fn prompt_ids(engine: &Engine, p: &BenchPrompt) -> Result<Vec<u32>> {
    engine.chat_prompt(&[Message::new("user", p.turns[0].as_str())])
}

/// Decodes every prompt plainly (greedy) with `max_tokens` new tokens.
pub fn run_plain(engine: &Engine, prompts: &[BenchPrompt], max_tokens: usize, ctx: usize) -> Result<PlainRun> {
    let mut session = engine.model.new_session(ctx, 512);
    let (mut outputs, mut tok_s) = (Vec::new(), Vec::new());
    for p in prompts {
        session.reset();
        let ids = prompt_ids(engine, p)?;
        let mut out = Vec::new();
        let mut sampler = Sampler::new(SamplingParams::greedy());
        let st = generate(
            &engine.model,
            &mut session,
            &ids,
            max_tokens,
            &mut sampler,
            &engine.stop_ids(),
            &mut Vec::new(),
            |t| {
                out.push(t);
                ControlFlow::Continue(())
            },
        )?;
        tok_s.push(st.generated_tokens as f64 / st.decode_s.max(1e-9));
        outputs.push(out);
    }
    Ok(PlainRun { outputs, tok_s })
}

/// Decodes every prompt with speculative decoding and compares with `plain`. The Token
/// Recycling matrix is warmed by `warmup` generations of the first prompt, as the paper's
/// evaluation does, and then kept across prompts (hot start).
pub fn run_spec(
    engine: &Engine,
    prompts: &[BenchPrompt],
    plain: &PlainRun,
    opts: &SpecOptions,
    max_tokens: usize,
    ctx: usize,
    warmup: usize,
) -> Result<SpecBenchResult> {
    let recycler = Arc::new(Mutex::new(TokenRecycler::new(engine.model.config.vocab_size)));
    let mut spec = Speculator::new(opts.clone(), recycler);
    spec.check(&engine.model)?;
    let mut session = engine.model.new_session(ctx, 512);
    let mut decode = |spec: &mut Speculator, p: &BenchPrompt| -> Result<(Vec<u32>, f64)> {
        session.reset();
        let ids = prompt_ids(engine, p)?;
        let mut out = Vec::new();
        let mut sampler = Sampler::new(SamplingParams::greedy());
        let stop = engine.stop_ids();
        let st = generate_spec(
            &engine.model,
            &mut session,
            &ids,
            max_tokens,
            &mut sampler,
            &stop,
            &mut Vec::new(),
            spec,
            |t| {
                out.push(t);
                ControlFlow::Continue(())
            },
        )?;
        Ok((out, st.generated_tokens as f64 / st.decode_s.max(1e-9)))
    };
    for _ in 0..warmup {
        decode(&mut spec, &prompts[0])?;
    }
    spec.stats = SpecStats::default();
    struct Acc {
        n: usize,
        rate: f64,
        plain: f64,
        identical: bool,
        stats: SpecStats,
    }
    let mut cats: BTreeMap<String, Acc> = BTreeMap::new();
    let mut mismatches = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let before = spec.stats.clone();
        let (out, rate) = decode(&mut spec, p)?;
        let same = out == plain.outputs[i];
        if !same {
            mismatches.push(p.question_id.clone());
        }
        let a = cats.entry(p.category.clone()).or_insert(Acc {
            n: 0,
            rate: 0.0,
            plain: 0.0,
            identical: true,
            stats: SpecStats::default(),
        });
        a.n += 1;
        a.rate += rate;
        a.plain += plain.tok_s[i];
        a.identical &= same;
        let s = &spec.stats;
        a.stats.steps += s.steps - before.steps;
        a.stats.tokens += s.tokens - before.tokens;
        a.stats.self_drafted += s.self_drafted - before.self_drafted;
        a.stats.self_accepted += s.self_accepted - before.self_accepted;
    }
    let summarize = |n: usize, rate: f64, plain_rate: f64, identical: bool, st: &SpecStats| CategoryResult {
        prompts: n,
        mat: st.mat(),
        tok_s: rate / n as f64,
        plain_tok_s: plain_rate / n as f64,
        speedup: rate / plain_rate,
        identical,
        self_acceptance: st.self_acceptance(),
    };
    let categories: BTreeMap<String, CategoryResult> =
        cats.iter().map(|(k, a)| (k.clone(), summarize(a.n, a.rate, a.plain, a.identical, &a.stats))).collect();
    let n = prompts.len();
    let rate: f64 = cats.values().map(|a| a.rate).sum();
    let plain_rate: f64 = plain.tok_s.iter().sum();
    let st = &spec.stats;
    Ok(SpecBenchResult {
        mode: opts.mode.to_string(),
        draft_bits: opts.draft_bits,
        tree_nodes: opts.tree_nodes,
        max_draft: opts.max_draft,
        adaptive: opts.adaptive,
        speedup: rate / plain_rate,
        mat: st.mat(),
        tok_s: rate / n as f64,
        plain_tok_s: plain_rate / n as f64,
        identical: mismatches.is_empty(),
        self_acceptance: st.self_acceptance(),
        nodes_per_pass: if st.steps == 0 { 0.0 } else { st.nodes as f64 / st.steps as f64 },
        categories,
        mismatches,
    })
}
