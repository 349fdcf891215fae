//! Architecture hyper-parameters of a llama-family model, read from GGUF metadata or an HF
//! `config.json`, and checked for consistency before any weight is touched.

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};

use super::arch::{Arch, RopeStyle};
use crate::format::gguf::GgufFile;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Architecture name as the source file spells it (`llama`, `qwen2`, `mistral`…).
    pub arch: String,
    pub n_layers: usize,
    pub dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_dim: usize,
    pub vocab_size: usize,
    pub rope_base: f64,
    pub rms_eps: f32,
    /// Training context length; the default upper bound for a session.
    pub max_seq: usize,
    /// How the Q/K rows pair up under rotary embeddings (absent in files written before it was
    /// recorded, which were all interleaved).
    #[serde(default)]
    pub rope_style: RopeStyle,
    /// Rope scaling read from metadata (per-frequency factors come as tensors).
    #[serde(default)]
    pub rope_scaling: RopeScaling,
}

/// Rope scaling beyond per-frequency factors: Phi-3's LongRoPE picks its long factors
/// (`rope_factors_long`) for contexts longer than the original one, the short ones otherwise,
/// as llama.cpp does by the context it is given; and both scale cos and sin by `attn_factor`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// `rope.scaling.original_context_length`.
    pub original_ctx: Option<usize>,
    /// `rope.scaling.attn_factor` (1 when absent).
    pub attn_factor: f32,
}

impl Default for RopeScaling {
    fn default() -> Self {
        RopeScaling { original_ctx: None, attn_factor: 1.0 }
    }
}

impl LlamaConfig {
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch =
            g.get("general.architecture").and_then(|v| v.as_str()).context("missing general.architecture")?.to_string();
        let spec = Arch::from_gguf(&arch)?;
        let int = |k: &str| -> Result<usize> {
            let key = format!("{arch}.{k}");
            g.get(&key)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .with_context(|| format!("missing or non-integer {key}"))
        };
        let float = |k: &str| g.get(&format!("{arch}.{k}")).and_then(|v| v.as_f64());
        let dim = int("embedding_length")?;
        let n_heads = int("attention.head_count")?;
        ensure!(n_heads > 0, "attention.head_count is 0");
        // The head size: `attention.key_length` where the file states it (Qwen3's and Gemma's
        // differ from width ÷ heads), else the rotated dimensions, else width ÷ heads.
        let head_dim = int("attention.key_length").or_else(|_| int("rope.dimension_count")).unwrap_or(dim / n_heads);
        let vocab_size = match int("vocab_size") {
            Ok(v) => v,
            Err(_) => g
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
                .context("vocabulary size unknown")?,
        };
        let cfg = LlamaConfig {
            n_layers: int("block_count")?,
            dim,
            n_heads,
            n_kv_heads: int("attention.head_count_kv").unwrap_or(n_heads),
            head_dim,
            ffn_dim: int("feed_forward_length")?,
            vocab_size,
            rope_base: float("rope.freq_base").unwrap_or(10000.0),
            rms_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f32,
            max_seq: int("context_length").unwrap_or(2048),
            rope_style: spec.rope,
            rope_scaling: RopeScaling {
                original_ctx: int("rope.scaling.original_context_length").ok(),
                attn_factor: float("rope.scaling.attn_factor").unwrap_or(1.0) as f32,
            },
            arch,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a Hugging Face `config.json` (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM).
    pub fn from_hf_json(v: &serde_json::Value) -> Result<Self> {
        let arch_name = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .or_else(|| v.get("model_type").and_then(|m| m.as_str()))
            .context("config.json has neither architectures nor model_type")?;
        let spec = Arch::from_hf(arch_name)?;
        let int = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .with_context(|| format!("config.json: missing or non-integer {k}"))
        };
        let dim = int("hidden_size")?;
        let n_heads = int("num_attention_heads")?;
        ensure!(n_heads > 0, "num_attention_heads is 0");
        let cfg = LlamaConfig {
            arch: spec.name.to_string(),
            n_layers: int("num_hidden_layers")?,
            dim,
            n_heads,
            n_kv_heads: int("num_key_value_heads").unwrap_or(n_heads),
            head_dim: int("head_dim").unwrap_or(dim / n_heads),
            ffn_dim: int("intermediate_size")?,
            vocab_size: int("vocab_size")?,
            rope_base: v.get("rope_theta").and_then(|x| x.as_f64()).unwrap_or(10000.0),
            rms_eps: v.get("rms_norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-5) as f32,
            max_seq: int("max_position_embeddings").unwrap_or(2048),
            rope_style: spec.rope,
            rope_scaling: RopeScaling::default(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let c = self;
        ensure!(c.n_layers > 0 && c.n_layers <= 1024, "layer count {} out of range", c.n_layers);
        ensure!(c.dim > 0 && c.dim <= 1 << 16, "embedding size {} out of range", c.dim);
        ensure!(c.ffn_dim > 0 && c.ffn_dim <= 1 << 18, "feed-forward size {} out of range", c.ffn_dim);
        ensure!(c.vocab_size > 0 && c.vocab_size <= 1 << 21, "vocabulary size {} out of range", c.vocab_size);
        ensure!(
            c.n_kv_heads > 0 && c.n_heads.is_multiple_of(c.n_kv_heads),
            "{} heads cannot be grouped over {} KV heads",
            c.n_heads,
            c.n_kv_heads
        );
        ensure!(
            c.head_dim > 0 && c.head_dim.is_multiple_of(2) && c.head_dim <= 1024,
            "head size {} must be even and ≤ 1024",
            c.head_dim
        );
        ensure!(c.rope_base.is_finite() && c.rope_base > 0.0, "RoPE base {} is not positive", c.rope_base);
        ensure!(c.rms_eps.is_finite() && c.rms_eps >= 0.0, "RMSNorm epsilon {} is invalid", c.rms_eps);
        ensure!(c.max_seq > 0, "context length is 0");
        let a = c.rope_scaling.attn_factor;
        ensure!(a.is_finite() && a > 0.0, "rope scaling attn_factor {a} is not positive");
        Ok(())
    }
}
