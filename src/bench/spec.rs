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

use crate::chat::Message;
use crate::decode::{Decoder, Sequence};
use crate::engine::Engine;
use crate::model::Session;
use crate::sampling::{Sampler, SamplingParams};
use crate::spec::{SpecOptions, SpecStats, Speculator, TokenRecycler};

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
    /// The counts behind `mat`, nodes per pass and `self_acceptance`, so that the results of
    /// several runs over parts of a prompt set combine exactly.
    pub steps: usize,
    pub tokens: usize,
    pub nodes: usize,
    pub self_drafted: usize,
    pub self_accepted: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct SpecBenchResult {
    pub mode: String,
    pub draft_bits: u32,
    pub draft_experts: String,
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

fn prompt_ids(engine: &Engine, p: &BenchPrompt) -> Result<Vec<u32>> {
    engine.chat_prompt(&[Message::new("user", p.turns[0].as_str())])
}

/// Greedy decoding of one prompt, plain (`spec` None) or speculative: the tokens and the
/// decode rate. The session and speculator come back through the slots they came from.
fn decode(
    dec: &mut Decoder,
    session: &mut Option<Session>,
    ids: &[u32],
    max_tokens: usize,
    spec: &mut Option<Speculator>,
) -> Result<(Vec<u32>, f64)> {
    let mut s = session.take().expect("a session");
    s.reset();
    let mut seq = Sequence::new(s, &[], ids, max_tokens, Sampler::new(SamplingParams::greedy()), spec.take())?;
    let mut out = Vec::new();
    let st = dec.generate(&mut seq, |t, _| {
        out.push(t);
        ControlFlow::Continue(())
    });
    let parts = seq.into_parts();
    *session = Some(parts.session);
    *spec = parts.spec;
    let st = st?;
    Ok((out, st.generated_tokens as f64 / st.decode_s.max(1e-9)))
}

/// Decodes every prompt plainly (greedy) and then with each configuration in turn, prompt
/// after prompt, so that a slow or fast spell of a shared machine hits the plain rate and the
/// speculative rates it is divided into alike. Each configuration keeps its own Token
/// Recycling matrix, warmed by `warmup` generations of the first prompt, as the paper's
/// evaluation does, and kept across prompts (hot start). `progress` hears each prompt done.
pub fn run(
    engine: &Engine,
    prompts: &[BenchPrompt],
    configs: &[SpecOptions],
    max_tokens: usize,
    ctx: usize,
    warmup: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<SpecBenchResult>> {
    let mut session = Some(engine.model.new_batched_session(ctx, 512));
    let mut dec = Decoder::new(&engine.model, engine.stop_ids(), 512);
    let first = prompt_ids(engine, &prompts[0])?;
    let mut specs = Vec::new();
    for o in configs {
        let recycler = Arc::new(Mutex::new(TokenRecycler::new(engine.model.config.vocab_size)));
        let spec = Speculator::new(*o, recycler);
        spec.check(&engine.model)?;
        let mut spec = Some(spec);
        for _ in 0..warmup {
            decode(&mut dec, &mut session, &first, max_tokens, &mut spec)?;
        }
        let mut spec = spec.expect("the speculator comes back");
        spec.stats = SpecStats::default();
        specs.push(Some(spec));
    }
    #[derive(Default)]
    struct Acc {
        n: usize,
        rate: f64,
        plain: f64,
        identical: bool,
        stats: SpecStats,
    }
    let mut cats: Vec<BTreeMap<String, Acc>> = configs.iter().map(|_| BTreeMap::new()).collect();
    let mut mismatches = vec![Vec::new(); configs.len()];
    let mut plain_total = 0.0;
    for (i, p) in prompts.iter().enumerate() {
        let ids = prompt_ids(engine, p)?;
        let (want, plain_rate) = decode(&mut dec, &mut session, &ids, max_tokens, &mut None)?;
        plain_total += plain_rate;
        for (c, spec) in specs.iter_mut().enumerate() {
            let before = spec.as_ref().expect("a speculator").stats.clone();
            let (out, rate) = decode(&mut dec, &mut session, &ids, max_tokens, spec)?;
            let spec = spec.as_ref().expect("the speculator comes back");
            let same = out == want;
            if !same {
                mismatches[c].push(p.question_id.clone());
            }
            let a = cats[c].entry(p.category.clone()).or_insert(Acc { identical: true, ..Acc::default() });
            a.n += 1;
            a.rate += rate;
            a.plain += plain_rate;
            a.identical &= same;
            let s = &spec.stats;
            a.stats.steps += s.steps - before.steps;
            a.stats.tokens += s.tokens - before.tokens;
            a.stats.nodes += s.nodes - before.nodes;
            a.stats.self_drafted += s.self_drafted - before.self_drafted;
            a.stats.self_accepted += s.self_accepted - before.self_accepted;
        }
        progress(i + 1);
    }
    let summarize = |n: usize, rate: f64, plain_rate: f64, identical: bool, st: &SpecStats| CategoryResult {
        prompts: n,
        mat: st.mat(),
        tok_s: rate / n as f64,
        plain_tok_s: plain_rate / n as f64,
        speedup: rate / plain_rate,
        identical,
        self_acceptance: st.self_acceptance(),
        steps: st.steps,
        tokens: st.tokens,
        nodes: st.nodes,
        self_drafted: st.self_drafted,
        self_accepted: st.self_accepted,
    };
    let n = prompts.len();
    let mut results = Vec::new();
    for (c, (opts, spec)) in configs.iter().zip(specs.iter().flatten()).enumerate() {
        let categories: BTreeMap<String, CategoryResult> =
            cats[c].iter().map(|(k, a)| (k.clone(), summarize(a.n, a.rate, a.plain, a.identical, &a.stats))).collect();
        let rate: f64 = cats[c].values().map(|a| a.rate).sum();
        let st = &spec.stats;
        results.push(SpecBenchResult {
            mode: opts.mode.to_string(),
            draft_bits: opts.draft_bits,
            draft_experts: opts.draft_experts.to_string(),
            tree_nodes: opts.tree_nodes,
            max_draft: opts.max_draft,
            adaptive: opts.adaptive,
            speedup: rate / plain_total,
            mat: st.mat(),
            tok_s: rate / n as f64,
            plain_tok_s: plain_total / n as f64,
            identical: mismatches[c].is_empty(),
            self_acceptance: st.self_acceptance(),
            nodes_per_pass: if st.steps == 0 { 0.0 } else { st.nodes as f64 / st.steps as f64 },
            categories,
            mismatches: std::mem::take(&mut mismatches[c]),
        });
    }
    Ok(results)
}
