//! Mixture-of-experts models beyond their agreement with llama.cpp (`tests/arch_synth.rs`
//! proves the f32 runs of Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE files against it):
//! - their `.bnest` views run at every precision from 1 to 8 planes, each giving the perplexity
//!   of an f32 run of the very codes it reads;
//! - a batched pass (a prefill, a verification tree) reads each chosen expert's planes once,
//!   counted inside the kernel, where token-by-token decoding reads them once per token, and
//!   every token's logits are the same either way;
//! - malformed mixture metadata is a clear error.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use bitnest::engine::Engine;
use bitnest::kernels::{DenseF32, Linear};
use bitnest::model::ffn::Ffn;
use bitnest::model::{BitsPlan, Llama};

const BIN: &str = env!("CARGO_BIN_EXE_bitnest");
const ARCHS: [&str; 4] = ["mixtral", "qwen2moe", "qwen3moe", "olmoe"];

/// `arch`'s synthetic file quantized to `.bnest` (8 planes, the default).
fn quantized(dir: &Path, arch: &str) -> PathBuf {
    let gguf = common::synth_gguf(dir, arch, arch, "f32");
    let out = dir.join(format!("{arch}.bnest"));
    let q = Command::new(BIN).arg("quantize").arg(&gguf).arg("-o").arg(&out).args(["-t", "1"]).output().unwrap();
    assert!(q.status.success(), "{arch}: quantize: {}", String::from_utf8_lossy(&q.stderr));
    out
}

/// A bit-plane layer as an f32 matrix of the codes it reads (its bias recovered as its output
/// for a zero input, which the kernel gives exactly).
fn dense_of_codes(l: &dyn Linear) -> DenseF32 {
    let (rows, cols) = (l.out_dim(), l.in_dim());
    let mut w = vec![0f32; rows * cols];
    for (i, row) in w.chunks_mut(cols).enumerate() {
        l.row(i, row);
    }
    let mut bias = vec![0f32; rows];
    l.forward(&vec![0f32; cols], 1, &mut bias);
    DenseF32::new(&w, rows, cols, bias.iter().any(|&b| b != 0.0).then_some(bias))
}

fn ppl(model: &Llama, tokens: &[u32]) -> f64 {
    bitnest::ppl::perplexity(model, tokens, 128, Some(4), None, |_| {}).unwrap().ppl()
}

#[test]
fn every_view_is_the_f32_run_of_its_codes() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(common::shared("data/wikitext-2-raw-test.txt")).expect("WikiText-2");
    for arch in ARCHS {
        let bnest = quantized(dir.path(), arch);
        for r in 1..=8 {
            let mut e = Engine::load(&bnest, Some(BitsPlan::uniform(Some(r)))).unwrap();
            let tokens = e.tokenizer.encode(&text[..20_000], false).unwrap();
            assert_eq!(e.model.bits(), Some(r), "{arch}: a view of {r} planes");
            let planes = ppl(&e.model, &tokens);
            for b in &mut e.model.blocks {
                for (_, l) in b.linears_mut() {
                    *l = Box::new(dense_of_codes(l.as_ref()));
                }
            }
            e.model.head = std::sync::Arc::new(dense_of_codes(e.model.head.as_ref()));
            assert_eq!(e.model.bits(), None, "every layer is f32 now");
            let f32_of_codes = ppl(&e.model, &tokens);
            let rel = (planes - f32_of_codes).abs() / f32_of_codes;
            println!("{arch} r={r}: PPL {planes:.5e} on the planes, {f32_of_codes:.5e} f32 of the same codes");
            // The plane kernels round activations to 8 bits; the f32 path does not.
            assert!(planes.is_finite() && rel < 0.02, "{arch} at {r} planes: {planes} against {f32_of_codes}");
        }
    }
}

/// Sweeps so far of every expert matrix, `[layer][expert][gate, up, down]`.
fn expert_sweeps(m: &Llama) -> Vec<Vec<[u64; 3]>> {
    m.blocks
        .iter()
        .map(|b| match &b.ffn {
            Ffn::Moe(moe) => moe
                .experts
                .iter()
                .map(|x| x.linears().map(|l| l.weight_sweeps().expect("bit-plane layers count their sweeps")))
                .collect(),
            Ffn::Dense(_) => panic!("a mixture"),
        })
        .collect()
}

/// Per layer, how many times each expert matrix was read between two counts (asserting that
/// an expert's three matrices were read alike).
fn reads(before: &[Vec<[u64; 3]>], after: &[Vec<[u64; 3]>]) -> Vec<Vec<u64>> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| {
            b.iter()
                .zip(a)
                .map(|(b, a)| {
                    let d = [a[0] - b[0], a[1] - b[1], a[2] - b[2]];
                    assert!(d[0] == d[1] && d[1] == d[2], "an expert's gate, up and down read {d:?} times");
                    d[0]
                })
                .collect()
        })
        .collect()
}

#[test]
fn a_batched_pass_reads_each_chosen_expert_once() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ["mixtral", "qwen2moe"] {
        let bnest = quantized(dir.path(), arch);
        let e = Engine::load(&bnest, None).unwrap();
        let m = &e.model;
        let (experts, k) = (m.config.moe.unwrap().experts, m.config.moe.unwrap().used);
        let vocab = m.config.vocab_size;
        let n = 64;
        let tokens: Vec<u32> = (0..n as u32).map(|i| (i * 7919 + 13) % vocab as u32).collect();

        // Prefill: one pass over 64 tokens, 128 (token, expert) pairs per layer.
        let mut s = m.new_session(256, n);
        let before = expert_sweeps(m);
        let batched = m.forward(&mut s, &tokens, n).unwrap().to_vec();
        let prefill = reads(&before, &expert_sweeps(m));
        for (l, r) in prefill.iter().enumerate() {
            assert!(r.iter().all(|&x| x <= 1), "{arch} layer {l}: a prefill read experts {r:?} times");
            let chosen = r.iter().sum::<u64>();
            assert!(chosen as usize >= k && chosen as usize <= experts, "{arch} layer {l}: {r:?}");
            println!(
                "{arch} layer {l}: prefill of {n} tokens ({} token-expert pairs) read {chosen} experts once each",
                n * k
            );
        }

        // Decoding the same tokens one at a time reads each token's k experts: n·k reads a
        // layer, and gives every token the logits the batched pass gave it.
        let mut s1 = m.new_session(256, 1);
        let before = expert_sweeps(m);
        for (i, &t) in tokens.iter().enumerate() {
            let got = m.forward(&mut s1, &[t], 1).unwrap();
            assert!(got == &batched[i * vocab..(i + 1) * vocab], "{arch}: token {i} alone and in the batch differ");
        }
        for (l, r) in reads(&before, &expert_sweeps(m)).iter().enumerate() {
            assert_eq!(r.iter().sum::<u64>() as usize, n * k, "{arch} layer {l}: decoding read {r:?}");
        }

        // A verification tree (a chain of 16 nodes after a prompt of 8) reads each once too.
        let mut s2 = m.new_session(256, 16);
        m.forward(&mut s2, &tokens[..8], 1).unwrap();
        let parents: Vec<Option<usize>> = (0..16usize).map(|i| i.checked_sub(1)).collect();
        let before = expert_sweeps(m);
        let tree = m.forward_tree(&mut s2, &tokens[8..24], &parents, u32::MAX).unwrap().to_vec();
        for (l, r) in reads(&before, &expert_sweeps(m)).iter().enumerate() {
            assert!(r.iter().all(|&x| x <= 1), "{arch} layer {l}: a tree pass read experts {r:?} times");
        }
        assert!(tree == batched[8 * vocab..24 * vocab], "{arch}: the tree's logits are the prefill's");
    }
}

#[test]
fn malformed_mixtures_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("qwen2moe", "expert-count-0", "qwen2moe.expert_count is 0"),
        ("qwen2moe", "no-expert-count", "missing qwen2moe.expert_count"),
        ("qwen3moe", "used-over-count", "9 experts used per token, of 8"),
        ("mixtral", "no-expert-count", "has experts (blk.0.ffn_gate_inp.weight) but no expert count"),
        ("olmoe", "missing-expert", "missing tensor blk.1.ffn_down.0.weight"),
        ("mixtral-old", "missing-expert", "missing tensor blk.1.ffn_down.0.weight"),
        ("qwen3moe", "expert-shape", "tensor blk.0.ffn_down.0.weight has shape [64, 48], expected [64, 64]"),
    ];
    for (arch, breakage, want) in cases {
        let out = dir.path().join(format!("{arch}-{breakage}.gguf"));
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/synth/make_gguf.py");
        let r = Command::new("python3")
            .arg(script)
            .args(["--arch", arch, "--break", breakage, "--tokenizer-from"])
            .arg(common::model_path())
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(r.status.success(), "make_gguf.py: {}", String::from_utf8_lossy(&r.stderr));
        let run = Command::new(BIN)
            .arg("run")
            .arg("--model")
            .arg(&out)
            .args(["--f32", "--prompt", "hi", "--max-tokens", "1"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "{arch} {breakage}: {err}");
        assert!(err.contains(want) && !err.contains("panicked"), "{arch} {breakage}: {err}");
    }
}

/// The expert axis of the self-draft: a draft that runs fewer experts per token (at all planes,
/// and at fewer; of a `.bnest` view and of an f32 GGUF without planes) proposes tokens, and the
/// output stays exactly the model's.
#[test]
fn fewer_experts_draft_and_the_output_is_the_models() {
    use bitnest::sampling::SamplingParams;
    use bitnest::spec::{DraftExperts, SpecOptions, Speculator, TokenRecycler};
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let bnest = quantized(dir.path(), "qwen2moe");
    let gguf = dir.path().join("qwen2moe.gguf");
    for (path, draft_bits) in [(&bnest, 8), (&bnest, 3), (&gguf, 8)] {
        let e = Engine::load(path, None).unwrap();
        let m = &e.model;
        let prompt = e.tokenizer.encode("The history of the city", true).unwrap();
        let greedy = SamplingParams::greedy();
        let plain = common::generate(m, &prompt, 48, &greedy, &[], None).0;
        for experts in [DraftExperts::Count(1), DraftExperts::Auto] {
            let rec = Arc::new(Mutex::new(TokenRecycler::new(m.config.vocab_size)));
            let opts = SpecOptions {
                mode: "self".parse().unwrap(),
                draft_bits,
                draft_experts: experts,
                max_draft: 4,
                adaptive: false,
                ..SpecOptions::default()
            };
            let spec = Speculator::new(opts, rec);
            spec.check(m).unwrap();
            let view = spec.draft_view(m).expect("a cheaper view");
            assert_eq!(view.experts, Some(1), "{experts:?} of 2 experts");
            let (out, _, spec) = common::generate(m, &prompt, 48, &greedy, &[], Some(spec));
            let st = spec.unwrap().stats;
            println!(
                "{} draft bits {draft_bits}, experts {experts}: {} self-drafted, {} accepted",
                path.display(),
                st.self_drafted,
                st.self_accepted
            );
            assert!(st.self_drafted > 0, "the draft ran");
            assert_eq!(out, plain, "speculative output differs from plain decoding");
        }
    }
}

/// `bitnest moefy` cuts SmolLM2's MLPs into 8 experts of 192 neurons: with all 8 running (the
/// file's default) it is the dense model, up to the order of the additions (f32 weights both,
/// from the same GGUF; 30 layers of rounding apart): the same greedy tokens, logits within 0.1% of
/// the largest, perplexity within 1e-5.
#[test]
fn a_moefied_model_with_every_expert_is_the_dense_model() {
    use bitnest::model::ModelSource;
    let source = ModelSource::open(&common::model_path(), None).unwrap();
    let dense = source.load_f32().unwrap();
    let moe = bitnest::moefy::moefy(&source, 8).unwrap().load_f32().unwrap();
    let cfg = moe.config.moe.expect("a mixture");
    assert_eq!((cfg.experts, cfg.used, cfg.expert_ffn), (8, 8, 192));
    assert!(matches!(&moe.blocks[0].ffn, Ffn::Moe(m) if m.experts.len() == 8));
    let tok = source.tokenizer().unwrap();
    let text = std::fs::read_to_string(common::shared("data/wikitext-2-raw-test.txt")).unwrap();
    let tokens = tok.encode(&text[..20_000], false).unwrap();
    let (a, b) = (ppl(&dense, &tokens), ppl(&moe, &tokens));
    println!("SmolLM2 f32: PPL {a:.6} dense, {b:.6} moefied into 8 experts, all running");
    assert!((a - b).abs() / a < 1e-5, "{a} against {b}");
    let vocab = dense.config.vocab_size;
    let (mut sd, mut sm) = (dense.new_session(64, 64), moe.new_session(64, 64));
    let (ld, lm) =
        (dense.forward(&mut sd, &tokens[..48], 48).unwrap(), moe.forward(&mut sm, &tokens[..48], 48).unwrap());
    let worst = ld.iter().zip(lm).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let top = ld.iter().fold(0f32, |m, x| m.max(x.abs()));
    println!("logits of 48 positions differ by up to {worst} (largest logit {top})");
    assert!(worst < 1e-3 * top, "logits differ by up to {worst}");
    for t in 0..48 {
        let row = |l: &[f32]| bitnest::sampling::argmax(&l[t * vocab..(t + 1) * vocab]);
        assert_eq!(row(ld), row(lm), "greedy token after position {t}");
    }
}
