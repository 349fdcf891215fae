//! Shared by the integration tests: where the real model and the golden data are.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use serde::Deserialize;

/// The project's shared data: `$BITNEST_SHARED`, else `../shared` beside the checkout.
pub fn shared(rel: &str) -> PathBuf {
    let base = std::env::var_os("BITNEST_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared")));
    base.join(rel)
}

#[derive(Deserialize, Clone)]
pub struct Golden {
    pub name: String,
    pub text: String,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub greedy_text: String,
    pub ref_top5_ids: Vec<Vec<u32>>,
    pub ref_top5_logits: Vec<Vec<f32>>,
    pub ref_margin: Vec<f32>,
}

pub fn golden() -> Vec<Golden> {
    let path = shared("golden/smollm2-135m-instruct.jsonl");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("golden line parses"))
        .collect()
}

/// The default model: `$BITNEST_TEST_MODEL`, else the cached (fetched on first use) default.
pub fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| match std::env::var_os("BITNEST_TEST_MODEL") {
        Some(p) => PathBuf::from(p),
        None => bitnest::fetch::resolve_model(bitnest::fetch::DEFAULT_MODEL).expect("fetch the default model"),
    })
    .clone()
}

/// A tiny random llama (2 layers, dim 64, GQA 4/2, untied head) written both as a Hugging Face
/// directory (f32 safetensors, rotate-half Q/K) and as GGUF (Q/K rows permuted the way
/// llama.cpp's converter does). Returns `(gguf file, hf directory)`.
pub fn write_tiny_llama(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    write_tiny_model(dir, "llama")
}

/// [`write_tiny_llama`] for architecture `arch`: `llama` (GGUF Q/K rows permuted to interleaved
/// pairs), `qwen2` (GGUF rows kept in rotate-half order, as llama.cpp's converter leaves them,
/// and Q/K/V biases), `qwen3` (q/k head norms, no biases, a head size of 32 ≠ width ÷ heads),
/// `llama3` (Llama with `rope_scaling` of type `llama3` in `config.json`, the converter's
/// `rope_freqs` factors in the GGUF file) or `phi3` (q, k, v and gate, up fused in both forms:
/// `qkv_proj`/`gate_up_proj` and `attn_qkv`/`ffn_up`; rotate-half).
pub fn write_tiny_model(dir: &std::path::Path, arch: &str) -> (PathBuf, PathBuf) {
    use bitnest::format::gguf::{GgufWriter, Value};
    use bitnest::format::safetensors::{hf_name, permute_qk};
    use bitnest::quant::ggml::GgmlType;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    let hd = if arch == "qwen3" { 32 } else { 16 };
    let (dim, heads, kv_heads, ffn, layers, vocab) = (64usize, 4usize, 2usize, 96usize, 2usize, 128usize);
    let neox = matches!(arch, "qwen2" | "qwen3" | "phi3");
    let gguf_arch = if arch == "llama3" { "llama" } else { arch };
    let llama3 = bitnest::model::config::Llama3Rope {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_ctx: 32.0,
    };
    let mut rng = StdRng::seed_from_u64(42);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut add = |name: &str, shape: Vec<usize>, scale: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| offset + scale * rng.random_range(-1.0f32..1.0)).collect();
        tensors.push((name.to_string(), shape, data));
    };
    add("token_embd.weight", vec![vocab, dim], 1.0, 0.0);
    add("output.weight", vec![vocab, dim], 0.2, 0.0);
    add("output_norm.weight", vec![dim], 0.1, 1.0);
    for l in 0..layers {
        let p = format!("blk.{l}");
        add(&format!("{p}.attn_norm.weight"), vec![dim], 0.1, 1.0);
        add(&format!("{p}.ffn_norm.weight"), vec![dim], 0.1, 1.0);
        if arch == "qwen2" {
            add(&format!("{p}.attn_q.bias"), vec![heads * hd], 0.3, 0.0);
            add(&format!("{p}.attn_k.bias"), vec![kv_heads * hd], 0.3, 0.0);
            add(&format!("{p}.attn_v.bias"), vec![kv_heads * hd], 0.3, 0.0);
        }
        add(&format!("{p}.attn_q.weight"), vec![heads * hd, dim], 0.3, 0.0);
        add(&format!("{p}.attn_k.weight"), vec![kv_heads * hd, dim], 0.3, 0.0);
        add(&format!("{p}.attn_v.weight"), vec![kv_heads * hd, dim], 0.2, 0.0);
        add(&format!("{p}.attn_output.weight"), vec![dim, heads * hd], 0.2, 0.0);
        if arch == "qwen3" {
            add(&format!("{p}.attn_q_norm.weight"), vec![hd], 0.1, 1.0);
            add(&format!("{p}.attn_k_norm.weight"), vec![hd], 0.1, 1.0);
        }
        add(&format!("{p}.ffn_gate.weight"), vec![ffn, dim], 0.2, 0.0);
        add(&format!("{p}.ffn_up.weight"), vec![ffn, dim], 0.2, 0.0);
        add(&format!("{p}.ffn_down.weight"), vec![dim, ffn], 0.2, 0.0);
    }

    // Hugging Face directory.
    let hf = dir.join(format!("tiny-{arch}-hf"));
    std::fs::create_dir_all(&hf).unwrap();
    let class = match arch {
        "qwen2" => "Qwen2ForCausalLM",
        "qwen3" => "Qwen3ForCausalLM",
        "phi3" => "Phi3ForCausalLM",
        _ => "LlamaForCausalLM",
    };
    let mut config = serde_json::json!({
        "architectures": [class], "hidden_size": dim, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "intermediate_size": ffn, "num_hidden_layers": layers,
        "vocab_size": vocab, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 256,
        "tie_word_embeddings": false, "head_dim": hd
    });
    if arch == "llama3" {
        config["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32});
    }
    std::fs::write(hf.join("config.json"), config.to_string()).unwrap();
    // Phi-3 stores q, k, v in one tensor and gate, up in another, in both forms.
    let fused = |tensors: &[(String, Vec<usize>, Vec<f32>)], hf: bool| -> Vec<(String, Vec<usize>, Vec<f32>)> {
        if arch != "phi3" {
            return tensors.to_vec();
        }
        let get = |n: &str| tensors.iter().find(|t| t.0 == n).unwrap().clone();
        let mut out: Vec<_> = tensors
            .iter()
            .filter(|t| !["attn_q.", "attn_k.", "attn_v.", "ffn_gate.", "ffn_up."].iter().any(|m| t.0.contains(m)))
            .cloned()
            .collect();
        for l in 0..layers {
            let p = format!("blk.{l}");
            let join = |parts: &[&str]| {
                let ts: Vec<_> = parts.iter().map(|m| get(&format!("{p}.{m}.weight"))).collect();
                (ts.iter().map(|t| t.1[0]).sum::<usize>(), ts.iter().flat_map(|t| t.2.clone()).collect::<Vec<f32>>())
            };
            let (r, d) = join(&["attn_q", "attn_k", "attn_v"]);
            let qkv =
                if hf { format!("model.layers.{l}.self_attn.qkv_proj.weight") } else { format!("{p}.attn_qkv.weight") };
            out.push((qkv, vec![r, dim], d));
            let (r, d) = join(&["ffn_gate", "ffn_up"]);
            let up =
                if hf { format!("model.layers.{l}.mlp.gate_up_proj.weight") } else { format!("{p}.ffn_up.weight") };
            out.push((up, vec![r, dim], d));
        }
        out
    };
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = fused(&tensors, true)
        .iter()
        .map(|(n, s, d)| {
            let name = if n.starts_with("model.") { n.clone() } else { hf_name(n).unwrap() };
            (name, s.clone(), d.iter().flat_map(|v| v.to_le_bytes()).collect())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &hf.join("model.safetensors")).unwrap();

    // GGUF file.
    let mut w = GgufWriter::new();
    let k = |key: &str| format!("{gguf_arch}.{key}");
    w.meta("general.architecture", Value::String(gguf_arch.into()))
        .meta(&k("attention.key_length"), Value::U32(hd as u32))
        .meta(&k("block_count"), Value::U32(layers as u32))
        .meta(&k("embedding_length"), Value::U32(dim as u32))
        .meta(&k("feed_forward_length"), Value::U32(ffn as u32))
        .meta(&k("attention.head_count"), Value::U32(heads as u32))
        .meta(&k("attention.head_count_kv"), Value::U32(kv_heads as u32))
        .meta(&k("rope.freq_base"), Value::F32(10000.0))
        .meta(&k("attention.layer_norm_rms_epsilon"), Value::F32(1e-5))
        .meta(&k("context_length"), Value::U32(256))
        .meta(&k("vocab_size"), Value::U32(vocab as u32));
    let mut gguf_tensors = fused(&tensors, false);
    if arch == "llama3" {
        gguf_tensors.push(("rope_freqs.weight".into(), vec![hd / 2], llama3.factors(hd, 10000.0)));
    }
    for (name, shape, data) in &gguf_tensors {
        let cols = if shape.len() == 2 { shape[1] } else { 1 };
        let data = if neox || name.starts_with("rope_freqs") {
            data.clone()
        } else if name.contains("attn_q") {
            permute_qk(data, heads, cols)
        } else if name.contains("attn_k") {
            permute_qk(data, kv_heads, cols)
        } else {
            data.clone()
        };
        w.tensor(name, shape, GgmlType::F32, GgmlType::F32.quantize(&data).unwrap());
    }
    let gguf = dir.join(format!("tiny-{arch}.gguf"));
    w.write(&gguf).unwrap();
    (gguf, hf)
}

/// Generates up to `n` tokens after `prompt` in a fresh session through the decode driver,
/// plain or with `spec`: the output ids and the final cache position.
#[allow(dead_code)]
pub fn generate(
    model: &bitnest::model::Llama,
    prompt: &[u32],
    n: usize,
    params: &bitnest::sampling::SamplingParams,
    stop: &[u32],
    spec: Option<bitnest::spec::Speculator>,
) -> (Vec<u32>, usize, Option<bitnest::spec::Speculator>) {
    use bitnest::decode::{Decoder, Sequence};
    let session = model.new_session(prompt.len() + n + 16, 512);
    let sampler = bitnest::sampling::Sampler::new(params.clone());
    let mut seq = Sequence::new(session, &[], prompt, n, sampler, spec).unwrap();
    let mut out = Vec::new();
    Decoder::new(model, stop.to_vec(), 512)
        .generate(&mut seq, |t, _| {
            out.push(t);
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    let p = seq.into_parts();
    (out, p.session.pos, p.spec)
}

/// A small random-weight GGUF of `arch` (`tests/synth/make_gguf.py`; matrices `f32` or `q8_0`)
/// with SmolLM2's tokenizer borrowed, written as `dir/name.gguf`.
pub fn synth_gguf(dir: &std::path::Path, name: &str, arch: &str, ty: &str) -> PathBuf {
    let out = dir.join(format!("{name}.gguf"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/synth/make_gguf.py");
    let r = std::process::Command::new("python3")
        .arg(script)
        .args(["--arch", arch, "--type", ty, "--tokenizer-from"])
        .arg(model_path())
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run python3");
    assert!(
        r.status.success(),
        "tests/synth/make_gguf.py failed (it needs the `gguf` and `numpy` packages: \
         python3 -m pip install gguf numpy; .ci/run does this): {}",
        String::from_utf8_lossy(&r.stderr)
    );
    out
}
