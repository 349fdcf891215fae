//! `bitnest bench`: llama-bench-style pp/tg measurement, through the library on a tiny model and
//! through the command line (JSON) on the real one.

use std::process::Command;

use bitnest::bench::{BenchOptions, peak_rss_bytes, run_bench};
use bitnest::model::ModelSource;

mod common;

fn positive(v: &serde_json::Value, key: &str) -> f64 {
    let x = v[key].as_f64().unwrap_or_else(|| panic!("{key} missing or not a number in {v}"));
    assert!(x.is_finite() && x > 0.0, "{key} = {x} should be positive and finite");
    x
}

#[test]
fn library_bench_measures_both_tests_on_a_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    let (gguf, _) = common::write_tiny_llama(dir.path());
    let mut model = ModelSource::open(&gguf, None).unwrap().load_f32().unwrap();
    let opts = BenchOptions { n_prompt: 32, n_gen: 8, reps: 3, bos: Some(1), max_batch: 16, depth: 0 };
    let r = run_bench(&model, &opts).unwrap();
    for rate in [r.pp.as_ref().unwrap(), r.tg.as_ref().unwrap()] {
        assert_eq!(rate.samples.len(), 3);
        assert!(rate.samples.iter().all(|s| s.is_finite() && *s > 0.0), "{:?}", rate.samples);
        let mean = rate.samples.iter().sum::<f64>() / 3.0;
        assert!((rate.tok_s - mean).abs() <= 1e-9 * mean);
        assert!(rate.std.is_finite() && rate.std >= 0.0);
    }
    // KV cache for n_prompt + n_gen positions and two more (the token generation starts from,
    // and room for the last output): 2 layers × 42 × kv_dim 32 × (K and V) × 2 bytes (f16 by
    // default).
    assert_eq!(r.kv_bytes, 2 * 42 * 32 * 2 * 2);
    assert!(r.threads >= 1);

    // Either test can be skipped; asking for nothing, or for more than the context, is an error.
    let pp_only = run_bench(&model, &BenchOptions { n_gen: 0, reps: 1, ..opts.clone() }).unwrap();
    assert!(pp_only.pp.is_some() && pp_only.tg.is_none());
    assert!(run_bench(&model, &BenchOptions { n_prompt: 0, n_gen: 0, ..opts.clone() }).is_err());
    assert!(run_bench(&model, &BenchOptions { n_prompt: 200, n_gen: 100, ..opts.clone() }).is_err());
    assert!(run_bench(&model, &BenchOptions { reps: 0, ..opts.clone() }).is_err());
    // A depth fills the cache first: the session then holds depth + n_prompt + n_gen + 2 positions,
    // and a depth past the context is an error like any other overflow.
    let deep = run_bench(&model, &BenchOptions { depth: 24, reps: 1, ..opts.clone() }).unwrap();
    assert_eq!(deep.kv_bytes, 2 * (24 + 42) * 32 * 2 * 2);
    assert!(deep.tg.unwrap().samples[0] > 0.0);
    assert!(run_bench(&model, &BenchOptions { depth: 230, ..opts.clone() }).is_err());
    // An f32 cache holds twice the bytes.
    model.kv_type = bitnest::model::llama::KvTypes::both(bitnest::model::llama::KvType::F32);
    let wide = run_bench(&model, &BenchOptions { reps: 1, ..opts }).unwrap();
    assert_eq!(wide.kv_bytes, 2 * 42 * 32 * 2 * 4);
    if cfg!(target_os = "linux") {
        assert!(peak_rss_bytes().unwrap() as usize >= model.weight_bytes());
    }
}

#[test]
fn cli_bench_json_reports_speed_and_memory_of_the_real_model() {
    let model = common::model_path();
    // The f32 reference path (`--f32`): the GGUF dequantized at load.
    let out = Command::new(env!("CARGO_BIN_EXE_bitnest"))
        .args(["bench", "-t", "2", "-p", "16", "-n", "4", "-r", "2", "--format", "json", "--f32", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(out.status.success(), "bench failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    positive(&v, "pp512_tok_s");
    positive(&v, "tg128_tok_s");
    assert!(v["pp512_std"].as_f64().unwrap() >= 0.0 && v["tg128_std"].as_f64().unwrap() >= 0.0);
    assert_eq!(v["n_prompt"], 16);
    assert_eq!(v["n_gen"], 4);
    assert_eq!(v["threads"], 2);
    assert_eq!(v["cache_type"], "f16");
    assert_eq!(v["pp512_samples"].as_array().unwrap().len(), 2);
    let file_mb = positive(&v, "file_mb");
    let size = std::fs::metadata(&model).unwrap().len() as f64 / 1048576.0;
    assert!((file_mb - size).abs() < 1e-6, "file_mb {file_mb} vs {size}");
    // SmolLM2: 30 layers × (16 + 4 + 2) positions × kv_dim 192 × K and V × 2 bytes (f16).
    assert!((positive(&v, "kv_mb") - (30 * 22 * 192 * 2 * 2) as f64 / 1048576.0).abs() < 1e-9);
    // The weights are held in memory (f32 today), so the peak RSS must cover them.
    let weights_mb = positive(&v, "weights_mb");
    assert!(weights_mb > 100.0, "SmolLM2-135M has more than 100 MiB of weights, got {weights_mb}");
    if cfg!(target_os = "linux") {
        let rss = positive(&v, "peak_rss_mb");
        assert!(rss >= weights_mb, "peak RSS {rss} MiB below the {weights_mb} MiB of weights");
    } else {
        assert!(v["peak_rss_mb"].is_null());
    }
    assert!(v["bits"].is_null() && v["bits_per_weight"].is_null(), "a GGUF has no bit planes: {v}");

    // The default: the GGUF's lossless transcode into bit planes, cached beside it.
    let planes = bitnest::transcode::cached_planes(&model, false).unwrap().expect("the Q4_1 GGUF transcodes");
    let out = Command::new(env!("CARGO_BIN_EXE_bitnest"))
        .args(["bench", "-t", "2", "-p", "16", "-n", "4", "-r", "1", "--format", "json", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(out.status.success(), "bench failed: {}", String::from_utf8_lossy(&out.stderr));
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    positive(&p, "tg128_tok_s");
    let size = std::fs::metadata(&planes).unwrap().len() as f64 / 1048576.0;
    assert!((positive(&p, "file_mb") - size).abs() < 1e-6, "the run reads the transcoded file: {p}");
    // Q4_1 matrices (4 planes + an f16 pair per 32) and a Q8_0 embedding: about 5.9 bits/weight.
    let bpw = positive(&p, "bits_per_weight");
    assert!((5.0..6.5).contains(&bpw), "{bpw} bits/weight");
    // Computed on the mapped planes: far below the f32 weights' 500+ MiB.
    assert!(positive(&p, "peak_rss_mb") < size + 100.0, "{p}");

    let text = Command::new(env!("CARGO_BIN_EXE_bitnest"))
        .args(["bench", "-t", "1", "-p", "8", "-n", "0", "-r", "1", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(text.status.success(), "{}", String::from_utf8_lossy(&text.stderr));
    let s = String::from_utf8(text.stdout).unwrap();
    assert!(s.contains("pp8") && s.contains("peak RSS"), "{s}");

    // `--cache-type f32` doubles the cache; an unknown type is a usage error, not a panic.
    let wide = Command::new(env!("CARGO_BIN_EXE_bitnest"))
        .args([
            "bench",
            "-t",
            "1",
            "-p",
            "8",
            "-n",
            "2",
            "-r",
            "1",
            "--format",
            "json",
            "--cache-type",
            "f32",
            "--model",
        ])
        .arg(&model)
        .output()
        .unwrap();
    assert!(wide.status.success(), "{}", String::from_utf8_lossy(&wide.stderr));
    let w: serde_json::Value = serde_json::from_slice(&wide.stdout).unwrap();
    assert_eq!(w["cache_type"], "f32");
    assert!((positive(&w, "kv_mb") - (30 * 12 * 192 * 2 * 4) as f64 / 1048576.0).abs() < 1e-9);
    let bad = Command::new(env!("CARGO_BIN_EXE_bitnest"))
        .args(["bench", "-p", "8", "-n", "0", "--cache-type", "q4", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "{}", String::from_utf8_lossy(&bad.stderr));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("f16"));
}

#[test]
fn inspect_sizes_the_kv_cache_for_the_chosen_cache_type() {
    let model = common::model_path();
    // SmolLM2-135M: 30 layers × 3 KV heads × head_dim 64 × (K and V) × element bytes, the sum
    // llama.cpp also uses; its trained context is 8192 tokens.
    // q8_0: a byte a value and an f16 step per 32 values (34 bytes per 32, as llama.cpp's).
    for (ty, bytes, mib) in [
        ("f16", 30 * 3 * 64 * 2 * 2, "180.0"),
        ("f32", 30 * 3 * 64 * 2 * 4, "360.0"),
        ("q8_0", 30 * 2 * (3 * 64 + 2 * 3 * 64 / 32), "95.6"),
        // q4_0 and q4h: half a byte a value and an f16 step per 32 (18 bytes per 32).
        ("q4_0", 30 * 2 * (3 * 64 / 2 + 2 * 3 * 64 / 32), "50.6"),
        ("q4h", 30 * 2 * (3 * 64 / 2 + 2 * 3 * 64 / 32), "50.6"),
        // Keys and values apart.
        ("q8_0/q4h", 30 * (3 * 64 + 2 * 3 * 64 / 32 + 3 * 64 / 2 + 2 * 3 * 64 / 32), "73.1"),
    ] {
        let (k, v) = ty.split_once('/').unwrap_or((ty, ty));
        let out = Command::new(env!("CARGO_BIN_EXE_bitnest"))
            .args(["inspect", "--cache-type-k", k, "--cache-type-v", v, "--model"])
            .arg(&model)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let want = format!("KV cache ({ty}): {bytes} bytes per token, {mib} MiB at the trained context of 8192");
        assert!(text.contains(&want), "no {want:?} in:\n{text}");
    }
}

/// A cache type the model cannot use, and f32 keys with other values (or the reverse), are refused
/// with a message and a non-zero exit, not a panic.
#[test]
fn unusable_cache_types_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    // The tiny model's heads have 16 dimensions: q8_0 blocks are 32 wide.
    let (gguf, _) = common::write_tiny_llama(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_bitnest"))
        .args(["inspect", "--cache-type", "q8_0", "--model"])
        .arg(&gguf)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("multiple of 32") && err.contains("16"), "{err}");
    for (args, want) in [
        (["--cache-type-k", "q4_0"], "multiple of 64"),
        (["--cache-type-v", "q4h"], "power of two"),
        (["--cache-type-k", "f32"], "f32"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_bitnest"))
            .arg("inspect")
            .args(args)
            .arg("--model")
            .arg(&gguf)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
