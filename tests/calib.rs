//! `bitnest quantize --calib`: the calibration run sees every matrix's inputs, and its
//! importances steer the quantizer.

use bitnest::model::ModelSource;
use bitnest::quant::dtype::ALL;
use bitnest::quant::{BitPlanes, QuantConfig};

mod common;

#[test]
fn calibration_measures_every_matrix_input() {
    let dir = tempfile::tempdir().unwrap();
    let (gguf, _) = common::write_tiny_llama(dir.path());
    let source = ModelSource::open(&gguf, None).unwrap();
    let cfg = source.config().unwrap();
    // The tiny model has no tokenizer: token ids straight away (several windows).
    let ids: Vec<u32> = (0..1100u32).map(|i| (i * 37 + 11) % cfg.vocab_size as u32).collect();
    let imp = bitnest::quantize::calibrate_tokens(&source, &ids).unwrap();
    let mut want = vec!["output.weight".to_string()];
    for l in 0..cfg.n_layers {
        for m in ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"] {
            want.push(format!("blk.{l}.{m}.weight"));
        }
    }
    assert_eq!(imp.len(), want.len(), "{:?}", imp.keys().collect::<Vec<_>>());
    for n in &want {
        let v = &imp[n];
        let cols = if n.ends_with("ffn_down.weight") { cfg.ffn_dim } else { cfg.dim };
        assert_eq!(v.len(), cols, "{n}");
        assert!(v.iter().all(|x| x.is_finite() && *x >= 0.0) && v.iter().any(|x| *x > 0.0), "{n}");
    }
    // The RMS-normed inputs of q/k/v are the same tensor: the same importance.
    assert_eq!(imp["blk.0.attn_q.weight"], imp["blk.0.attn_v.weight"]);

    // Each matrix quantizes with its importance (the tiny GGUF has no tokenizer to embed, so no
    // whole file here; `quantize_model_with` does exactly this per tensor).
    let q = QuantConfig { sub_group: 32, sub_bits: 6, ..QuantConfig::new(64, 4, ALL[..5].to_vec()) };
    let (shape, data) = source.tensor("blk.1.ffn_down.weight", &cfg).unwrap().unwrap();
    let bp = BitPlanes::quantize_weighted(&data, shape[0], shape[1], &q, Some(&imp["blk.1.ffn_down.weight"])).unwrap();
    assert_eq!((bp.rows, bp.cols), (shape[0], shape[1]));
}

/// Uniform importance changes nothing; a skewed one lowers the weighted error it is asked to.
#[test]
fn importance_steers_the_choice_and_uniform_changes_nothing() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let (rows, cols) = (32, 256);
    let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0f32..1.0).powi(3)).collect();
    for sub in [0, 32] {
        let cfg = QuantConfig {
            objective: vec![(4, 1.0)],
            scale_search: vec![1.0, 0.9, 0.8],
            sub_group: sub,
            sub_bits: if sub > 0 { 6 } else { 0 },
            ..QuantConfig::new(128, 4, ALL[..5].to_vec())
        };
        let plain = BitPlanes::quantize(&w, rows, cols, &cfg).unwrap();
        let ones = vec![1f32; cols];
        assert_eq!(BitPlanes::quantize_weighted(&w, rows, cols, &cfg, Some(&ones)).unwrap(), plain);
        let h: Vec<f32> = (0..cols).map(|c| if c % 7 == 0 { 50.0 } else { 1.0 }).collect();
        let weighted = BitPlanes::quantize_weighted(&w, rows, cols, &cfg, Some(&h)).unwrap();
        let err = |bp: &BitPlanes| -> f64 {
            let mut o = vec![0f32; rows * cols];
            bp.dequantize(4, &mut o).unwrap();
            w.iter().zip(&o).enumerate().map(|(i, (a, b))| h[i % cols] as f64 * ((a - b) as f64).powi(2)).sum()
        };
        assert!(err(&weighted) <= err(&plain), "sub {sub}: {} > {}", err(&weighted), err(&plain));
        assert_ne!(weighted, plain, "sub {sub}: the importance changed nothing");
    }
}
