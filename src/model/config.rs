//! Architecture hyper-parameters of a llama-family model, read from GGUF metadata or an HF
//! `config.json`, and checked for consistency before any weight is touched.

use anyhow::{Context, Result, bail, ensure};
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
    /// Local (sliding-window) layers, for architectures that interleave them with global ones.
    #[serde(default)]
    pub sliding_window: Option<LocalLayers>,
    /// The factor on q·k where it is not 1/√head_dim: Gemma 3 27B's 1/√(width ÷ heads), which
    /// llama.cpp picks by its 62 layers (a `config.json` says `query_pre_attn_scalar`).
    #[serde(default)]
    pub query_scale: Option<f32>,
    /// Mixture-of-experts feed-forward blocks, in models that have them.
    #[serde(default)]
    pub moe: Option<MoeConfig>,
}

/// A mixture-of-experts block's shape: `experts` gated MLPs of width `expert_ffn`, of which the
/// router picks `used` per token (GGUF `expert_count`, `expert_used_count`,
/// `expert_feed_forward_length`; the architecture says how the router weighs them).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    pub experts: usize,
    pub used: usize,
    pub expert_ffn: usize,
    /// The shared expert's width (`expert_shared_feed_forward_length`), where the architecture
    /// has one.
    pub shared_ffn: Option<usize>,
    /// The k weights are renormalized to sum to 1 ([`super::arch::Routing::renormalize`]).
    pub renormalize: bool,
    /// Every chosen expert's output counts fully (weight 1): a dense model cut into experts
    /// (`bitnest moefy`), which with every expert chosen is the dense model again.
    #[serde(default)]
    pub unit_weights: bool,
}

/// Which layers attend to a window only, how far, and with which rope base.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LocalLayers {
    /// Positions a local layer attends to, itself included (`attention.sliding_window`).
    pub window: usize,
    /// Of every `period` layers, the first `period − 1` are local
    /// (`attention.sliding_window_pattern`, else the architecture's).
    pub period: usize,
    /// The local layers' rope base (`rope.freq_base_swa`, else the architecture's).
    pub rope_base: f64,
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
    /// Llama 3.1's scaling from a Hugging Face `config.json` (a GGUF file carries it as the
    /// `rope_freqs` tensor instead).
    #[serde(default)]
    pub llama3: Option<Llama3Rope>,
    /// Linear position scaling (`rope.scaling.type` = `linear`: positions ÷ `factor`) of the
    /// global layers (Gemma 3 4B and larger; every layer of a model without local ones).
    #[serde(default)]
    pub linear: Option<f32>,
}

impl Default for RopeScaling {
    fn default() -> Self {
        RopeScaling { original_ctx: None, attn_factor: 1.0, llama3: None, linear: None }
    }
}

/// `rope_scaling` of type `llama3` (Llama 3.1 and later).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Llama3Rope {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_ctx: f64,
}

impl Llama3Rope {
    /// The per-frequency factors llama.cpp's converter writes as `rope_freqs` for it.
    pub fn factors(&self, head_dim: usize, base: f64) -> Vec<f32> {
        let (low_wavelen, high_wavelen) =
            (self.original_ctx / self.low_freq_factor, self.original_ctx / self.high_freq_factor);
        (0..head_dim / 2)
            .map(|i| {
                let freq = 1.0 / base.powf(2.0 * i as f64 / head_dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let f = if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    self.factor
                } else {
                    let smooth = (self.original_ctx / wavelen - self.low_freq_factor)
                        / (self.high_freq_factor - self.low_freq_factor);
                    1.0 / ((1.0 - smooth) / self.factor + smooth)
                };
                f as f32
            })
            .collect()
    }
}

/// `rope_scaling` of a Hugging Face `config.json`: none, `default`, or `llama3`; others are an
/// error rather than a model that silently rotates wrong.
fn hf_rope_scaling(v: &serde_json::Value) -> Result<RopeScaling> {
    let Some(rs) = v.get("rope_scaling").filter(|r| !r.is_null()) else { return Ok(RopeScaling::default()) };
    let ty = rs.get("rope_type").or_else(|| rs.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
    let num = |k: &str, d: f64| rs.get(k).and_then(|x| x.as_f64()).unwrap_or(d);
    match ty {
        "default" => Ok(RopeScaling::default()),
        "llama3" => {
            let l = Llama3Rope {
                factor: num("factor", 8.0),
                low_freq_factor: num("low_freq_factor", 1.0),
                high_freq_factor: num("high_freq_factor", 4.0),
                original_ctx: num("original_max_position_embeddings", 8192.0),
            };
            ensure!(
                [l.factor, l.low_freq_factor, l.high_freq_factor, l.original_ctx]
                    .iter()
                    .all(|x| x.is_finite() && *x > 0.0)
                    && l.high_freq_factor > l.low_freq_factor,
                "config.json: rope_scaling {rs} is not a valid llama3 scaling"
            );
            Ok(RopeScaling { llama3: Some(l), ..RopeScaling::default() })
        }
        "linear" => {
            let f = num("factor", 1.0);
            ensure!(f.is_finite() && f > 0.0, "config.json: rope_scaling {rs} has no valid factor");
            Ok(RopeScaling { linear: (f != 1.0).then_some(f as f32), ..RopeScaling::default() })
        }
        other => bail!(
            "config.json: rope scaling {other:?} is not supported from safetensors yet (llama3 and linear are; a GGUF \
             conversion carries the others as tensors bitnest reads)"
        ),
    }
}

impl LlamaConfig {
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// The widest feed-forward layer of a block: the MLP's, or of a mixture the widest expert.
    pub fn ffn_width(&self) -> usize {
        match self.moe {
            Some(m) => m.expert_ffn.max(m.shared_ffn.unwrap_or(0)),
            None => self.ffn_dim,
        }
    }

    /// The architecture's description (validated when the config was read).
    pub fn spec(&self) -> &'static Arch {
        Arch::from_gguf(&self.arch).unwrap_or(&super::arch::ARCHS[0])
    }

    /// The window of layer `l` if it is a sliding-window (local) layer, else `None`.
    pub fn layer_window(&self, l: usize) -> Option<usize> {
        let sw = self.sliding_window?;
        (l % sw.period < sw.period - 1).then_some(sw.window)
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
        if let Some(cap) = float("final_logit_softcapping").or_else(|| float("attn_logit_softcapping")) {
            ensure!(cap == 0.0, "logit soft-capping ({cap}) is not supported");
        }
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
                llama3: None,
                linear: match g.get(&format!("{arch}.rope.scaling.type")).and_then(|v| v.as_str()) {
                    Some("linear") => float("rope.scaling.factor").map(|f| f as f32).filter(|&f| f != 1.0),
                    _ => None,
                },
            },
            sliding_window: match (spec.sliding_window, int("attention.sliding_window")) {
                (Some(sw), Ok(window)) if window > 0 => Some(LocalLayers {
                    window,
                    period: int("attention.sliding_window_pattern").unwrap_or(sw.period),
                    rope_base: float("rope.freq_base_swa").unwrap_or(sw.rope_base),
                }),
                _ => None,
            },
            query_scale: (arch == "gemma3" && int("block_count")? == 62).then(|| 1.0 / ((dim / n_heads) as f32).sqrt()),
            moe: moe_from_gguf(g, &arch, spec)?,
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
            rope_scaling: hf_rope_scaling(v)?,
            sliding_window: match (spec.sliding_window, int("sliding_window")) {
                (Some(sw), Ok(window)) if window > 0 => Some(LocalLayers {
                    window,
                    period: int("sliding_window_pattern").unwrap_or(sw.period),
                    rope_base: v.get("rope_local_base_freq").and_then(|x| x.as_f64()).unwrap_or(sw.rope_base),
                }),
                _ => None,
            },
            query_scale: v.get("query_pre_attn_scalar").and_then(|x| x.as_f64()).map(|q| 1.0 / (q as f32).sqrt()),
            moe: None,
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
        Arch::from_gguf(&c.arch)?;
        if let Some(sw) = c.sliding_window {
            ensure!(
                sw.window > 0 && sw.period > 0,
                "sliding window {} / pattern {} must be positive",
                sw.window,
                sw.period
            );
            ensure!(sw.rope_base.is_finite() && sw.rope_base > 0.0, "local RoPE base {} is not positive", sw.rope_base);
        }
        if let Some(q) = c.query_scale {
            ensure!(q.is_finite() && q > 0.0, "query scale {q} is not positive");
        }
        if let Some(f) = c.rope_scaling.linear {
            ensure!(f.is_finite() && f > 0.0, "linear rope scaling factor {f} is not positive");
        }
        let a = c.rope_scaling.attn_factor;
        ensure!(a.is_finite() && a > 0.0, "rope scaling attn_factor {a} is not positive");
        if let Some(m) = c.moe {
            ensure!(m.experts > 0 && m.experts <= 1 << 12, "expert count {} out of range (1 to 4096)", m.experts);
            ensure!(
                m.used > 0 && m.used <= m.experts,
                "{} experts used per token, of {}: must be between 1 and the expert count",
                m.used,
                m.experts
            );
            ensure!(
                m.expert_ffn > 0 && m.expert_ffn <= 1 << 18,
                "expert feed-forward size {} out of range",
                m.expert_ffn
            );
            if let Some(s) = m.shared_ffn {
                ensure!(s > 0 && s <= 1 << 18, "shared expert feed-forward size {s} out of range");
            }
        } else if c.spec().experts.is_some_and(|r| r.required) {
            bail!("{} is a mixture-of-experts architecture, but the model has no experts", c.arch);
        }
        Ok(())
    }
}

/// The mixture-of-experts shape of a GGUF model: from `expert_count` on, for architectures that
/// route (an `expert_count` of 0 is a dense model, as in llama.cpp, unless the architecture is
/// only ever a mixture).
fn moe_from_gguf(g: &GgufFile, arch: &str, spec: &Arch) -> Result<Option<MoeConfig>> {
    let key = |k: &str| format!("{arch}.{k}");
    let int = |k: &str| -> Result<Option<usize>> {
        match g.get(&key(k)) {
            None => Ok(None),
            Some(v) => {
                Ok(Some(v.as_u64().map(|v| v as usize).with_context(|| format!("{} is not an integer", key(k)))?))
            }
        }
    };
    let Some(routing) = spec.experts else {
        ensure!(
            int("expert_count")?.unwrap_or(0) == 0,
            "{arch} has no mixture-of-experts blocks, but the file sets {}",
            key("expert_count")
        );
        return Ok(None);
    };
    let experts = match int("expert_count")? {
        Some(0) | None if !routing.required => return Ok(None),
        Some(0) => bail!("{} is 0: {arch} needs experts", key("expert_count")),
        None => bail!("missing {}: {arch} needs experts", key("expert_count")),
        Some(n) => n,
    };
    let used = int("expert_used_count")?.with_context(|| format!("missing {}", key("expert_used_count")))?;
    let ffn = int("feed_forward_length")?.with_context(|| format!("missing {}", key("feed_forward_length")))?;
    let expert_ffn = int("expert_feed_forward_length")?.unwrap_or(ffn);
    let shared_ffn = match routing.shared_expert {
        true => Some(int("expert_shared_feed_forward_length")?.unwrap_or(ffn)),
        false => None,
    };
    Ok(Some(MoeConfig { experts, used, expert_ffn, shared_ffn, renormalize: routing.renormalize, unit_weights: false }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_factors_are_the_converters() {
        // tests/synth/make_gguf.py's llama3 factors (head 16, base 10000, original context 32),
        // as written into its file: [1, 3.2995389, 8, 8, 8, 8, 8, 8].
        let l = Llama3Rope { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_ctx: 32.0 };
        let f = l.factors(16, 10000.0);
        let want = [1.0, 3.2995389, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0];
        for (a, b) in f.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{f:?}");
        }
    }

    #[test]
    fn hf_rope_scaling_is_read_or_refused() {
        let base = serde_json::json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100});
        let mut v = base.clone();
        v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        assert!(LlamaConfig::from_hf_json(&v).unwrap().rope_scaling.llama3.is_some());
        v["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 4.0});
        assert!(LlamaConfig::from_hf_json(&v).unwrap_err().to_string().contains("yarn"));
        v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": -1.0});
        assert!(LlamaConfig::from_hf_json(&v).is_err());
        assert!(LlamaConfig::from_hf_json(&base).unwrap().rope_scaling.llama3.is_none());
    }
}
