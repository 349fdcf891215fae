//! One `.bnest` file of the real model runs at every precision from 2 to 8 bits, and its
//! 4-bit and higher views still follow the reference on the golden prompts.

use std::process::Command;

use bitnest::engine::Engine;
use bitnest::model::{BitsPlan, ModelSource};
use bitnest::quant::QuantConfig;
use bitnest::quant::dtype::ALL;
use bitnest::sampling::argmax;

mod common;

/// Fraction of golden positions (teacher forced) where the model's argmax is llama.cpp's token.
fn agreement(e: &Engine) -> f64 {
    let vocab = e.model.config.vocab_size;
    let (mut hit, mut total) = (0, 0);
    for g in common::golden() {
        let mut all = g.prompt_ids.clone();
        all.extend(&g.greedy_ids);
        let mut s = e.model.new_session(all.len(), 128);
        let n = g.greedy_ids.len();
        let logits = e.model.forward(&mut s, &all[..all.len() - 1], n).unwrap();
        for i in 0..n {
            hit += (argmax(&logits[i * vocab..(i + 1) * vocab]) == g.greedy_ids[i]) as usize;
            total += 1;
        }
    }
    hit as f64 / total as f64
}

#[test]
fn one_file_runs_at_every_precision() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2.bnest");
    let source = ModelSource::open(&common::model_path(), None).unwrap();
    // `bitnest quantize`'s defaults: 8 planes, groups of the model's width, 6-bit sub-blocks of 32.
    let cfg = QuantConfig {
        sub_group: 32,
        sub_bits: 6,
        ..QuantConfig::new(QuantConfig::default_group(576), 8, ALL.to_vec())
    };
    bitnest::quantize::quantize_model(&source, "smollm2", &cfg, &out, false).unwrap();

    let mut agree = Vec::new();
    for r in 2..=8u32 {
        let e = Engine::load(&out, Some(BitsPlan::uniform(Some(r)))).unwrap();
        // The embedded tokenizer and template reproduce llama.cpp's prompt ids.
        for g in common::golden() {
            assert_eq!(e.tokenizer.encode(&g.text, true).unwrap(), g.prompt_ids, "r={r} {}", g.name);
        }
        agree.push((r, agreement(&e)));
    }
    eprintln!("top-1 agreement with llama.cpp's greedy tokens per r: {agree:?}");
    for &(r, a) in &agree {
        let floor = match r {
            // Measured at r = 8 / 7 / 6 / 5 / 4: 0.973, 0.950, 0.897, 0.897, 0.855 (one-level
            // groups of 128: 0.935, 0.912, 0.893, 0.847, 0.668; see docs/QUALITY.md).
            8 => 0.94,
            7 => 0.92,
            6 => 0.86,
            5 => 0.86,
            4 => 0.82,
            _ => 0.0,
        };
        assert!(a >= floor, "r = {r}: agreement {a:.3} below {floor}");
    }
    // Fewer planes never agree better than more, beyond noise.
    assert!(agree[6].1 + 0.02 >= agree[2].1, "8 bits {agree:?} worse than 4 bits");

    // The CLI reads the same file at a plan and rejects impossible precisions.
    let bin = env!("CARGO_BIN_EXE_bitnest");
    let plan = dir.path().join("plan.txt");
    std::fs::write(&plan, "* 4\ntoken_embd 8\nblk.0. 6\n").unwrap();
    let ok = Command::new(bin)
        .args(["run", "--temperature", "0", "-n", "8", "--format", "json", "-p", "The capital of France is", "--model"])
        .arg(&out)
        .arg("--bits-plan")
        .arg(&plan)
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let v: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(v["ids"].as_array().unwrap().len(), 8);
    let bad = Command::new(bin).args(["run", "-p", "hi", "--bits", "9", "--model"]).arg(&out).output().unwrap();
    assert!(!bad.status.success());
    // A GGUF runs from its transcode, whose planes --bits reads; the f32 path has none.
    let gguf = Command::new(bin)
        .args(["run", "-p", "hi", "-n", "2", "--bits", "3", "--model"])
        .arg(common::model_path())
        .output()
        .unwrap();
    assert!(gguf.status.success(), "{}", String::from_utf8_lossy(&gguf.stderr));
    let f32 = Command::new(bin)
        .args(["run", "-p", "hi", "--bits", "4", "--f32", "--model"])
        .arg(common::model_path())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&f32.stderr).contains("need a .bnest file"));
}

/// Two-level scales (groups of 576 refined every 32 weights by 6-bit multipliers) give a 4-bit
/// file under 4.5 bits per weight all-in that follows the reference closely, and they run on the
/// bit-serial kernels (no f32 fallback).
#[test]
fn two_level_four_bit_file_stays_under_budget_and_close() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2-2l.bnest");
    let source = ModelSource::open(&common::model_path(), None).unwrap();
    let cfg = QuantConfig {
        objective: vec![(4, 1.0)],
        sub_group: 32,
        sub_bits: 6,
        ..QuantConfig::new(576, 4, ALL.iter().copied().filter(|d| d.native_bits() <= 4).collect())
    };
    bitnest::quantize::quantize_model(&source, "smollm2", &cfg, &out, false).unwrap();
    let file = bitnest::format::bnest::BnestFile::open(&out).unwrap();
    let bpw = file.bits_per_weight(|n, m| BitsPlan::uniform(Some(4)).bits_for(n, m)).unwrap();
    assert!(bpw <= 4.5, "{bpw} bits per weight");
    let e = Engine::load(&out, Some(BitsPlan::uniform(Some(4)))).unwrap();
    for b in &e.model.blocks {
        for (_, l) in b.linears() {
            assert!(l.format_name().ends_with("g576/32"), "{}", l.format_name());
        }
    }
    assert!(e.model.head.format_name().ends_with("g576/32"), "{}", e.model.head.format_name());
    let a = agreement(&e);
    eprintln!("two-level 4-bit file: {bpw:.3} bits/weight, top-1 agreement {a:.3}");
    // Measured: 0.859 (one-level groups of 128, 8-bit master read at r = 4: 0.668). Perplexity
    // shows the gap better: 25.0 against 39.9 for a direct 4-bit file of groups of 128
    // (docs/QUALITY.md).
    assert!(a >= 0.83, "agreement {a:.3}");
}
