//! GGUF and Hugging Face safetensors must yield the same model: a tiny random llama written in
//! both forms gives identical logits, and both agree with an independent float64 forward that
//! uses Hugging Face's own rotate-half RoPE on the unpermuted weights.

use bitnest::format::safetensors::SafetensorsDir;
use bitnest::model::ModelSource;

mod common;

const TOKENS: [u32; 7] = [5, 17, 99, 3, 64, 127, 0];

fn logits(path: &std::path::Path) -> Vec<f32> {
    let mut m = ModelSource::open(path, None).unwrap().load_f32().unwrap();
    // An exact cache: these tests hold the loaders to an f64 reference within 1e-3, tighter
    // than rounding keys and values to f16 allows.
    m.kv_type = bitnest::model::llama::KvTypes::both(bitnest::model::llama::KvType::F32);
    let mut s = m.new_session(32, 8);
    m.forward(&mut s, &TOKENS, TOKENS.len()).unwrap().to_vec()
}

#[test]
fn gguf_and_safetensors_give_identical_logits() {
    let dir = tempfile::tempdir().unwrap();
    let (gguf, hf) = common::write_tiny_llama(dir.path());
    let a = logits(&gguf);
    let b = logits(&hf);
    assert_eq!(a.len(), TOKENS.len() * 128);
    assert_eq!(a, b);
}

/// Plain float64 llama forward over HF tensors, rotate-half RoPE, no KV cache tricks.
fn reference_forward(d: &SafetensorsDir, tokens: &[u32]) -> Vec<f64> {
    let get = |n: &str| -> Vec<f64> { d.tensor_f32(n).unwrap().unwrap().1.into_iter().map(|v| v as f64).collect() };
    let (dim, heads, kvh, hd, layers, vocab) = (64, 4, 2, 16, 2, 128);
    let matvec = |w: &[f64], x: &[f64]| -> Vec<f64> {
        w.chunks(x.len()).map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum()).collect()
    };
    let norm = |x: &[f64], g: &[f64]| -> Vec<f64> {
        let r = (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + 1e-5).sqrt();
        x.iter().zip(g).map(|(v, g)| v / r * g).collect()
    };
    let rope = |x: &mut [f64], pos: usize| {
        for h in x.chunks_mut(hd) {
            for j in 0..hd / 2 {
                let th = pos as f64 * 10000f64.powf(-2.0 * j as f64 / hd as f64);
                let (a, b) = (h[j], h[j + hd / 2]);
                h[j] = a * th.cos() - b * th.sin();
                h[j + hd / 2] = a * th.sin() + b * th.cos();
            }
        }
    };
    let emb = get("model.embed_tokens.weight");
    let mut xs: Vec<Vec<f64>> =
        tokens.iter().map(|&t| emb[t as usize * dim..(t as usize + 1) * dim].to_vec()).collect();
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        let w = |n: &str| get(&format!("{p}.{n}.weight"));
        let bias = |n: &str, v: Vec<f64>| -> Vec<f64> {
            match d.tensor_f32(&format!("{p}.{n}.bias")).unwrap() {
                Some((_, b)) => v.iter().zip(b).map(|(a, b)| a + b as f64).collect(),
                None => v,
            }
        };
        let (wq, wk, wv, wo) =
            (w("self_attn.q_proj"), w("self_attn.k_proj"), w("self_attn.v_proj"), w("self_attn.o_proj"));
        let (g1, g2) = (w("input_layernorm"), w("post_attention_layernorm"));
        let (wg, wu, wd) = (w("mlp.gate_proj"), w("mlp.up_proj"), w("mlp.down_proj"));
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        let mut qs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let xn = norm(x, &g1);
            let mut q = bias("self_attn.q_proj", matvec(&wq, &xn));
            let mut k = bias("self_attn.k_proj", matvec(&wk, &xn));
            rope(&mut q, pos);
            rope(&mut k, pos);
            qs.push(q);
            ks.push(k);
            vs.push(bias("self_attn.v_proj", matvec(&wv, &xn)));
        }
        for (t, x) in xs.iter_mut().enumerate() {
            let mut att = vec![0f64; heads * hd];
            for h in 0..heads {
                let g = h / (heads / kvh);
                let s: Vec<f64> = (0..=t)
                    .map(|p| (0..hd).map(|i| qs[t][h * hd + i] * ks[p][g * hd + i]).sum::<f64>() / (hd as f64).sqrt())
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                for (p, sv) in s.iter().enumerate() {
                    for i in 0..hd {
                        att[h * hd + i] += (sv - m).exp() / z * vs[p][g * hd + i];
                    }
                }
            }
            x.iter_mut().zip(matvec(&wo, &att)).for_each(|(a, b)| *a += b);
            let xn = norm(x, &g2);
            let (gate, up) = (matvec(&wg, &xn), matvec(&wu, &xn));
            let h: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            x.iter_mut().zip(matvec(&wd, &h)).for_each(|(a, b)| *a += b);
        }
    }
    let (gn, head) = (get("model.norm.weight"), get("lm_head.weight"));
    assert_eq!(head.len(), vocab * dim);
    xs.iter().flat_map(|x| matvec(&head, &norm(x, &gn))).collect()
}

#[test]
fn both_loaders_match_an_independent_rotate_half_reference() {
    for arch in ["llama", "qwen2"] {
        check_against_reference(arch);
    }
}

/// `qwen2` GGUF files keep Hugging Face's rotate-half Q/K order (llama.cpp runs them with NEOX
/// rope); reading them as interleaved was the cause of a 266 perplexity on Qwen2.5-Coder.
#[test]
fn qwen2_gguf_and_safetensors_give_identical_logits() {
    let dir = tempfile::tempdir().unwrap();
    let (gguf, hf) = common::write_tiny_model(dir.path(), "qwen2");
    assert_eq!(logits(&gguf), logits(&hf));
}

/// Qwen3 (q/k head norms, a head size from `head_dim`), Llama 3.1 (`rope_scaling` of type
/// `llama3` in `config.json` against the GGUF's `rope_freqs` tensor) and Phi-3 (`qkv_proj` and
/// `gate_up_proj` cut apart) from safetensors give, bit for bit, the logits of the same weights
/// as GGUF, the form `tests/arch_synth.rs` proves against llama.cpp.
#[test]
fn newer_architectures_from_safetensors_equal_their_gguf() {
    for arch in ["qwen3", "llama3", "phi3"] {
        let dir = tempfile::tempdir().unwrap();
        let (gguf, hf) = common::write_tiny_model(dir.path(), arch);
        let (a, b) = (logits(&gguf), logits(&hf));
        assert_eq!(a.len(), TOKENS.len() * 128, "{arch}");
        assert!(a == b, "{arch}: safetensors and GGUF logits differ");
    }
    // The rope scaling matters: without it the Llama 3.1 logits are not these.
    let dir = tempfile::tempdir().unwrap();
    let (scaled, _) = common::write_tiny_model(dir.path(), "llama3");
    let (plain, _) = common::write_tiny_model(dir.path(), "llama");
    assert!(logits(&scaled) != logits(&plain), "llama3 rope scaling changed nothing");
}

fn check_against_reference(arch: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (gguf, hf) = common::write_tiny_model(dir.path(), arch);
    let want = reference_forward(&SafetensorsDir::open(&hf).unwrap(), &TOKENS);
    for path in [&gguf, &hf] {
        let got = logits(path);
        let worst = got.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-3, "{arch} {}: max |Δlogit| {worst}", path.display());
    }
}
