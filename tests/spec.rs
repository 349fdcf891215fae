//! Speculative decoding is lossless: greedy output equals plain decoding token for token in
//! every mode, tree verification reproduces sequential logits bit for bit, and sampling follows
//! plain decoding's distribution.

use std::sync::{Arc, Mutex};

use bitnest::chat::Message;
use bitnest::engine::Engine;
use bitnest::model::{ALL_BITS, BitsPlan, KvType, KvTypes, Llama, ModelSource};
use bitnest::quant::QuantConfig;
use bitnest::quant::dtype::ALL;
use bitnest::sampling::SamplingParams;
use bitnest::spec::{SpecMode, SpecOptions, Speculator, TokenRecycler};

mod common;

fn plain(model: &Llama, prompt: &[u32], n: usize, params: &SamplingParams, stop: &[u32]) -> Vec<u32> {
    common::generate(model, prompt, n, params, stop, None).0
}

fn speculative(
    model: &Llama,
    prompt: &[u32],
    n: usize,
    params: &SamplingParams,
    stop: &[u32],
    spec: &mut Speculator,
) -> (Vec<u32>, usize) {
    let taken = std::mem::replace(spec, Speculator::new(spec.opts, Arc::new(Mutex::new(TokenRecycler::new(1)))));
    let (out, pos, back) = common::generate(model, prompt, n, params, stop, Some(taken));
    *spec = back.expect("the speculator comes back");
    (out, pos)
}

fn speculator(model: &Llama, mode: SpecMode, draft_bits: u32, tree_nodes: usize) -> Speculator {
    let rec = Arc::new(Mutex::new(TokenRecycler::new(model.config.vocab_size)));
    let s = Speculator::new(SpecOptions { mode, draft_bits, max_draft: 6, tree_nodes, ..SpecOptions::default() }, rec);
    s.check(model).unwrap();
    s
}

/// The real model as one 8-plane `.bnest` file.
fn real_bnest(dir: &std::path::Path) -> std::path::PathBuf {
    let out = dir.join("smollm2.bnest");
    let source = ModelSource::open(&common::model_path(), None).unwrap();
    bitnest::quantize::quantize_model(&source, "smollm2", &QuantConfig::new(128, 8, ALL.to_vec()), &out, false)
        .unwrap();
    out
}

#[test]
fn greedy_output_is_identical_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = real_bnest(dir.path());
    let greedy = SamplingParams::greedy();
    for (bits, draft) in [(8u32, 3u32), (5, 3)] {
        let e = Engine::load(&path, Some(BitsPlan::uniform(Some(bits)))).unwrap();
        let stop = e.stop_ids();
        // A prompt that asks for a copy, so that context lookup has something to find.
        let copy = e
            .chat_prompt(&[Message::new(
                "user",
                "Repeat this sentence three times: the old lighthouse keeper counted the ships every night.",
            )])
            .unwrap();
        let prompts: Vec<(String, Vec<u32>)> = common::golden()
            .into_iter()
            .map(|g| (g.name, g.prompt_ids))
            .chain(std::iter::once(("copy".to_string(), copy)))
            .collect();
        for mode in ["self", "recycle", "both", "lookup", "recycle+lookup", "self+recycle+lookup", "auto"] {
            let mode: SpecMode = mode.parse().unwrap();
            // One speculator across prompts: the recycling matrix stays warm, as in a server.
            let mut spec = speculator(&e.model, mode, draft, 6);
            for (name, ids) in &prompts {
                let want = plain(&e.model, ids, 40, &greedy, &stop);
                let (got, _) = speculative(&e.model, ids, 40, &greedy, &stop, &mut spec);
                assert_eq!(got, want, "bits {bits}, --spec {mode}, prompt {name}");
            }
            let st = &spec.stats;
            eprintln!("bits {bits} --spec {mode}: {} passes, MAT {:.2}", st.steps, st.mat());
            // Drafts were really accepted, so the comparison exercised the tree walk.
            assert!(st.tokens > st.steps, "bits {bits} --spec {mode}: no draft accepted ({st:?})");
            if mode == SpecMode::LOOKUP {
                assert!(st.accepted_lookup_source > 0, "bits {bits}: no context-lookup draft accepted");
            }
        }
    }
    // Block-format caches, keys and values alike or not: each position's keys and values are
    // quantized from its own row when stored, so drafts that are rolled back change nothing
    // later tokens see.
    let mut e = Engine::load(&path, Some(BitsPlan::uniform(Some(5)))).unwrap();
    let stop = e.stop_ids();
    let types = [(KvType::Q8_0, KvType::Q8_0), (KvType::Q4H, KvType::Q4H), (KvType::F16, KvType::Q4_0)];
    for (k, v) in types {
        e.model.kv_type = KvTypes { k, v };
        let name = e.model.kv_type.name();
        for mode in ["self+recycle+lookup", "both"] {
            let mode: SpecMode = mode.parse().unwrap();
            let mut spec = speculator(&e.model, mode, 3, 6);
            for g in common::golden() {
                let want = plain(&e.model, &g.prompt_ids, 40, &greedy, &stop);
                let (got, _) = speculative(&e.model, &g.prompt_ids, 40, &greedy, &stop, &mut spec);
                assert_eq!(got, want, "{name} cache, --spec {mode}, prompt {}", g.name);
            }
            assert!(spec.stats.tokens > spec.stats.steps, "{name} cache, --spec {mode}: no draft accepted");
        }
    }
    // At the real model's reference precision the first golden answers match llama.cpp too.
    let e = Engine::load(&path, None).unwrap();
    let g = &common::golden()[0];
    let mut spec = speculator(&e.model, SpecMode::BOTH, 3, 6);
    let (got, _) = speculative(&e.model, &g.prompt_ids, 8, &greedy, &e.stop_ids(), &mut spec);
    assert_eq!(got[..8], g.greedy_ids[..8]);
}

/// Plain and speculative runs with the same seed draw the same random numbers in the same
/// order for the same distributions, so they give the same tokens.
#[test]
fn seeded_sampling_gives_the_same_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (_, m) = tiny_models(dir.path());
    let params = SamplingParams {
        temperature: 0.7,
        top_k: 4,
        top_p: 1.0,
        min_p: 0.0,
        seed: Some(7),
        ..SamplingParams::default()
    };
    let prompt = [1u32, 17, 42, 99];
    let all: SpecMode = "self+recycle+lookup".parse().unwrap();
    for mode in [SpecMode::SELF, SpecMode::RECYCLE, SpecMode::BOTH, all] {
        let mut spec = speculator(&m, mode, 3, 8);
        for seed in 0..20u64 {
            let p = SamplingParams { seed: Some(seed), ..params.clone() };
            let want = plain(&m, &prompt, 24, &p, &[]);
            let (got, _) = speculative(&m, &prompt, 24, &p, &[], &mut spec);
            assert_eq!(got, want, "--spec {mode}, seed {seed}");
        }
        assert!(spec.stats.tokens > spec.stats.steps, "--spec {mode}: nothing accepted");
    }
}

/// The tiny random llama of `common`, dense (f32) and as 8 bit planes per layer (group 64,
/// INT + BitMoD groups): the second reads at fewer planes, so it can draft for itself.
fn tiny_models(dir: &std::path::Path) -> (Llama, Llama) {
    use bitnest::kernels::{Linear, PlaneLinear};
    use bitnest::quant::bitplane::BitPlanes;
    let (gguf, _) = common::write_tiny_llama(dir);
    let load = || ModelSource::open(&gguf, None).unwrap().load_f32().unwrap();
    let dense = load();
    let mut planes = load();
    let cfg = QuantConfig::new(64, 8, ALL.to_vec());
    let convert = |l: &dyn Linear| -> PlaneLinear {
        let (rows, cols) = (l.out_dim(), l.in_dim());
        let mut w = vec![0f32; rows * cols];
        for (i, row) in w.chunks_mut(cols).enumerate() {
            l.row(i, row);
        }
        PlaneLinear::from_bitplanes(&BitPlanes::quantize(&w, rows, cols, &cfg).unwrap(), 8).unwrap()
    };
    for b in &mut planes.blocks {
        for (_, l) in b.linears_mut() {
            *l = Box::new(convert(l.as_ref()));
        }
    }
    planes.head = Arc::new(convert(planes.head.as_ref()));
    assert_eq!(planes.bits(), Some(8));
    (dense, planes)
}

/// Every node of a verification tree gets the logits plain decoding computes for its path,
/// bit for bit, and after committing a path decoding continues exactly as plain decoding.
#[test]
fn tree_pass_equals_sequential_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let (dense, planes) = tiny_models(dir.path());
    for (name, m) in [("dense", &dense), ("planes", &planes)] {
        let vocab = m.config.vocab_size;
        let prefix = [3u32, 14, 15, 92, 65];
        // root 7 → {8 → {9, 10 → 11}, 12}
        let tokens = [7u32, 8, 12, 9, 10, 11];
        let parents = [None, Some(0), Some(0), Some(1), Some(1), Some(4)];
        let mut s = m.new_session(64, 16);
        m.forward(&mut s, &prefix, 1).unwrap();
        let tree = m.forward_tree(&mut s, &tokens, &parents, ALL_BITS).unwrap().to_vec();
        assert_eq!(s.pos, prefix.len(), "a tree pass does not advance the sequence");
        for node in 0..tokens.len() {
            let mut path = vec![node];
            while let Some(p) = parents[*path.last().unwrap()] {
                path.push(p);
            }
            path.reverse();
            let mut seq = prefix.to_vec();
            seq.extend(path.iter().map(|&i| tokens[i]));
            let mut r = m.new_session(64, 1);
            // One token at a time, as plain decoding runs.
            let mut last = Vec::new();
            for &t in &seq {
                last = m.forward(&mut r, &[t], 1).unwrap().to_vec();
            }
            assert_eq!(tree[node * vocab..(node + 1) * vocab], last[..], "{name}: node {node}");
        }
        // Commit root → 8 → 10 and decode one more token: the cache now equals plain decoding's.
        s.accept_path(&[0, 1, 4], m.config.n_layers);
        let after = m.forward(&mut s, &[11], 1).unwrap().to_vec();
        let mut r = m.new_session(64, 1);
        for &t in prefix.iter().chain(&[7, 8, 10, 11]) {
            let l = m.forward(&mut r, &[t], 1).unwrap().to_vec();
            if t == 11 {
                assert_eq!(after, l, "{name}: after compaction");
            }
        }
    }
}

/// Regularized upper incomplete gamma Q(a, x) (series / continued fraction, Numerical Recipes
/// style): the chi-square survival function is Q(df/2, x/2).
fn gamma_q(a: f64, x: f64) -> f64 {
    fn ln_gamma(z: f64) -> f64 {
        // Lanczos approximation (g = 7, n = 9).
        const C: [f64; 9] = [
            0.999_999_999_999_809_9,
            676.520_368_121_885_1,
            -1_259.139_216_722_402_8,
            771.323_428_777_653_1,
            -176.615_029_162_140_6,
            12.507_343_278_686_905,
            -0.138_571_095_265_720_12,
            9.984_369_578_019_572e-6,
            1.505_632_735_149_311_6e-7,
        ];
        let z = z - 1.0;
        let t = z + 7.5;
        let s: f64 = C[0] + (1..9).map(|i| C[i] / (z + i as f64)).sum::<f64>();
        0.5 * (2.0 * std::f64::consts::PI).ln() + (z + 0.5) * t.ln() - t + s.ln()
    }
    if x < a + 1.0 {
        let (mut sum, mut del, mut ap) = (1.0 / a, 1.0 / a, a);
        for _ in 0..1000 {
            ap += 1.0;
            del *= x / ap;
            sum += del;
        }
        1.0 - sum * (-x + a * x.ln() - ln_gamma(a)).exp()
    } else {
        let (mut b, mut c, mut d) = (x + 1.0 - a, 1e300, 1.0 / (x + 1.0 - a));
        let mut h = d;
        for i in 1..1000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = 1.0 / (an * d + b);
            c = b + an / c;
            h *= d * c;
        }
        (-x + a * x.ln() - ln_gamma(a)).exp() * h
    }
}

/// Two-sample chi-square homogeneity statistic over the cells both samples use.
fn chi_square(a: &[f64], b: &[f64]) -> (f64, usize) {
    let (na, nb): (f64, f64) = (a.iter().sum(), b.iter().sum());
    let mut stat = 0.0;
    let mut cells = 0usize;
    for (&x, &y) in a.iter().zip(b) {
        let t = x + y;
        if t == 0.0 {
            continue;
        }
        cells += 1;
        let (ea, eb) = (t * na / (na + nb), t * nb / (na + nb));
        stat += (x - ea).powi(2) / ea + (y - eb).powi(2) / eb;
    }
    (stat, cells.saturating_sub(1))
}

/// Speculative sampling follows plain sampling's distribution: the joint distribution of the
/// 2nd and 3rd sampled tokens (where drafts are accepted or rejected) from independent seeds,
/// compared with a chi-square homogeneity test at significance 0.001. The test's power is
/// computed alongside by simulation against a distribution 0.05 away in total variation.
#[test]
fn speculative_sampling_follows_the_plain_distribution() {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    let dir = tempfile::tempdir().unwrap();
    let (_, planes) = tiny_models(dir.path());
    let m = &planes;
    let vocab = m.config.vocab_size;
    let prompt = [1u32, 17, 42, 99];
    let base = SamplingParams { temperature: 0.8, top_k: 3, top_p: 1.0, min_p: 0.0, ..SamplingParams::default() };
    let n = 3000u64;
    let cell = |out: &[u32]| out[1] as usize * vocab + out[2] as usize;
    let mut plain_counts = vec![0f64; vocab * vocab];
    for seed in 0..n {
        let p = SamplingParams { seed: Some(seed), ..base.clone() };
        plain_counts[cell(&plain(m, &prompt, 3, &p, &[]))] += 1.0;
    }
    for mode in [SpecMode::SELF, SpecMode::RECYCLE, SpecMode::BOTH] {
        let mut spec = speculator(m, mode, 2, 8);
        let mut counts = vec![0f64; vocab * vocab];
        for seed in n..2 * n {
            let p = SamplingParams { seed: Some(seed), ..base.clone() };
            counts[cell(&speculative(m, &prompt, 3, &p, &[], &mut spec).0)] += 1.0;
        }
        // (Every mode draws the same tokens for the same seed, so the statistics coincide.)
        let (stat, df) = chi_square(&plain_counts, &counts);
        let p_value = gamma_q(df as f64 / 2.0, stat / 2.0);
        eprintln!("--spec {mode}: chi2 {stat:.1}, df {df}, p {p_value:.3}, MAT {:.2}", spec.stats.mat());
        assert!(spec.stats.tokens > spec.stats.steps, "--spec {mode}: no draft accepted");
        assert!(p_value > 0.001, "--spec {mode}: distributions differ (chi2 {stat:.1}, df {df}, p {p_value:.2e})");
    }

    // Power: how often the same test, same sample sizes, rejects when the second sample comes
    // from a distribution 0.05 away in total variation (mass moved from the likeliest cell to
    // the second likeliest).
    let total: f64 = plain_counts.iter().sum();
    let p: Vec<f64> = plain_counts.iter().map(|c| c / total).collect();
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    let mut q = p.clone();
    q[order[0]] -= 0.05;
    q[order[1]] += 0.05;
    let mut rng = StdRng::seed_from_u64(99);
    let mut draw = |dist: &[f64]| {
        let mut c = vec![0f64; dist.len()];
        for _ in 0..n {
            let mut u: f64 = rng.random();
            let i = dist.iter().position(|&w| {
                u -= w;
                u < 0.0
            });
            c[i.unwrap_or(dist.len() - 1)] += 1.0;
        }
        c
    };
    let trials = 200;
    let rejected = (0..trials)
        .filter(|_| {
            let (a, b) = (draw(&p), draw(&q));
            let (stat, df) = chi_square(&a, &b);
            gamma_q(df as f64 / 2.0, stat / 2.0) <= 0.001
        })
        .count();
    let power = rejected as f64 / trials as f64;
    eprintln!("power against a 0.05 total-variation shift at alpha 0.001 with {n} + {n} samples: {power:.2}");
    assert!(power >= 0.8, "the test is too weak to mean anything: power {power:.2}");
}
