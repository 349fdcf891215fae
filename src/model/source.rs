//! Opening a model from a GGUF file or a Hugging Face directory, and building the f32 model.
//!
//! Both sources are presented under GGUF tensor names with GGUF's interleaved Q/K row order, so
//! [`Llama`] has exactly one loading path.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};

use super::arch::RopeStyle;
use super::config::LlamaConfig;
use super::ffn::{Ffn, Mlp, Moe};
use super::llama::{Block, KvTypes, Llama};
use super::plan::BitsPlan;
use crate::format::bnest::{BnestFile, Encoding};
use crate::format::gguf::{GgufFile, TensorInfo};
use crate::format::safetensors::{SafetensorsDir, hf_name, permute_qk};
use crate::kernels::ops::Rope;
use crate::kernels::{DenseF32, Linear, PlaneLinear, planes};
use crate::tokenizer::Tokenizer;

/// An opened model file or directory, before its weights are materialized.
#[allow(clippy::large_enum_variant)] // one per process; boxing buys nothing
pub enum ModelSource {
    Gguf(GgufFile),
    HfDir(SafetensorsDir),
    /// A bit-plane file, read at the precision `plan` asks for.
    Bnest(BnestFile, BitsPlan),
    /// f32 weights made in memory (a transformed model, as `bitnest moefy` makes), under GGUF
    /// names, on their way to a `.bnest` file.
    Memory(Box<MemoryModel>),
}

/// A model held as f32 tensors ([`ModelSource::Memory`]).
pub struct MemoryModel {
    pub config: LlamaConfig,
    /// Shape (rows first) and data by GGUF name.
    pub tensors: std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>,
    /// The tokenizer as a `.bnest` header embeds it.
    pub tokenizer: serde_json::Value,
    pub chat_template: Option<String>,
}

impl ModelSource {
    /// A directory is read as a Hugging Face checkpoint; a file is `.bnest` or GGUF. `plan`
    /// picks the precision of a `.bnest` file and must be absent for the others.
    pub fn open(path: &Path, plan: Option<BitsPlan>) -> Result<Self> {
        let bnest = path.is_file() && BnestFile::sniff(path);
        if plan.is_some() && !bnest {
            bail!(
                "--bits and --bits-plan need a .bnest file (make one with `bitnest quantize`); {} is not one",
                path.display()
            );
        }
        if path.is_dir() {
            Ok(Self::HfDir(SafetensorsDir::open(path)?))
        } else if bnest {
            let s = Self::Bnest(BnestFile::open(path)?, plan.unwrap_or_default());
            s.config().with_context(|| format!("invalid .bnest file {}", path.display()))?;
            Ok(s)
        } else if path.is_file() {
            Ok(Self::Gguf(GgufFile::open(path)?))
        } else {
            bail!("model path {} does not exist", path.display())
        }
    }

    pub fn config(&self) -> Result<LlamaConfig> {
        match self {
            Self::Gguf(g) => LlamaConfig::from_gguf(g),
            Self::HfDir(d) => LlamaConfig::from_hf_json(&d.config),
            Self::Bnest(b, _) => {
                let cfg: LlamaConfig = serde_json::from_value(b.header.config.clone())
                    .context("the .bnest header's config is not a valid model configuration")?;
                cfg.validate()?;
                Ok(cfg)
            }
            Self::Memory(m) => {
                m.config.validate()?;
                Ok(m.config.clone())
            }
        }
    }

    /// The tokenizer the model ships with.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match self {
            Self::Gguf(g) => Tokenizer::from_gguf(g),
            Self::HfDir(d) => {
                let tc = std::fs::read_to_string(d.dir.join("tokenizer_config.json"))
                    .ok()
                    .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
                Tokenizer::from_json_file(&d.dir.join("tokenizer.json"), tc.as_ref().or(Some(&d.config)))
            }
            Self::Bnest(b, _) => Tokenizer::from_embedded(&b.header.tokenizer),
            Self::Memory(m) => Tokenizer::from_embedded(&m.tokenizer),
        }
    }

    /// Frees what only [`ModelSource::tokenizer`] needed (a `.bnest` header's embedded
    /// tokenizer, tens of MB for a 150k vocabulary), so that it is not resident while the
    /// weights load.
    pub fn forget_tokenizer(&mut self) {
        if let Self::Bnest(b, _) = self {
            b.header.tokenizer = serde_json::Value::Null;
        }
    }

    /// The Jinja chat template the model ships with, if any.
    pub fn chat_template(&self) -> Option<String> {
        match self {
            Self::Gguf(g) => g.get("tokenizer.chat_template").and_then(|v| v.as_str()).map(str::to_string),
            Self::HfDir(d) => {
                let cfg = std::fs::read_to_string(d.dir.join("tokenizer_config.json")).ok()?;
                let v: serde_json::Value = serde_json::from_str(&cfg).ok()?;
                v.get("chat_template").and_then(|t| t.as_str()).map(str::to_string)
            }
            Self::Bnest(b, _) => b.header.chat_template.clone(),
            Self::Memory(m) => m.chat_template.clone(),
        }
    }

    /// A tensor by GGUF name as `(shape, f32 data)`; Q/K of HF checkpoints come permuted, and
    /// the parts of fused GGUF tensors come cut out of them ([`fused_part`]).
    pub fn tensor(&self, name: &str, cfg: &LlamaConfig) -> Result<Option<(Vec<usize>, Vec<f32>)>> {
        match self {
            // A part of a fused tensor (q/k/v of `attn_qkv`; gate or up of a gate+up `ffn_up`,
            // whose name is the fused tensor's own), else the tensor itself.
            Self::Gguf(g) => match (expert_part(g, name), fused_part(g, name), g.tensor(name)) {
                // One expert's matrix, within a tensor of them all.
                (Some(e), _, _) => {
                    Ok(Some((e.shape.clone(), g.tensor_f32(&e).with_context(|| format!("tensor {name}"))?)))
                }
                (None, Some((fused, rows)), _) => {
                    let data = g.tensor_f32(fused).with_context(|| format!("tensor {}", fused.name))?;
                    let cols: usize = fused.shape[1..].iter().product();
                    let mut shape = fused.shape.clone();
                    shape[0] = rows.len();
                    Ok(Some((shape, data[rows.start * cols..rows.end * cols].to_vec())))
                }
                (None, None, Some(info)) => {
                    Ok(Some((info.shape.clone(), g.tensor_f32(info).with_context(|| format!("tensor {name}"))?)))
                }
                (None, None, None) => Ok(None),
            },
            Self::HfDir(d) => {
                let Some(hf) = hf_name(name) else {
                    return Ok(None);
                };
                let Some((shape, data)) = (match d.tensor_f32(&hf)? {
                    Some(t) => Some(t),
                    None => hf_fused_part(d, name, cfg)?,
                }) else {
                    return Ok(None);
                };
                // Hugging Face stores Q/K rows in rotate-half order; architectures whose GGUF
                // files are interleaved get them permuted, so both sources load alike.
                let heads = if cfg.rope_style == RopeStyle::Neox {
                    None
                } else if name.contains(".attn_q.") {
                    Some(cfg.n_heads)
                } else if name.contains(".attn_k.") {
                    Some(cfg.n_kv_heads)
                } else {
                    None
                };
                Ok(Some(match heads {
                    Some(h) => {
                        let cols = if shape.len() == 2 { shape[1] } else { 1 };
                        ensure!(
                            shape[0] % (2 * h) == 0,
                            "tensor {hf}: {} rows cannot be split into {h} heads",
                            shape[0]
                        );
                        let p = permute_qk(&data, h, cols);
                        (shape, p)
                    }
                    None => (shape, data),
                }))
            }
            Self::Bnest(b, plan) => {
                let Some(t) = b.tensor(name) else { return Ok(None) };
                let data = match &t.encoding {
                    Encoding::F32 { .. } => b.f32_data(t)?,
                    Encoding::Planes { master_bits, .. } => {
                        let r = plan.bits_for(name, *master_bits)?;
                        let planes = b.planes(t, r)?;
                        let mut out = vec![0f32; planes.rows * planes.cols];
                        planes.dequantize(r, &mut out).with_context(|| format!("tensor {name}"))?;
                        out
                    }
                };
                Ok(Some((t.shape.clone(), data)))
            }
            Self::Memory(m) => Ok(m.tensors.get(name).cloned()),
        }
    }

    /// A bit-plane tensor as a layer that computes on its planes in place, at the precision
    /// the plan gives it; `None` for other sources and encodings, and for group sizes the
    /// kernel does not take (those are dequantized to f32 instead).
    /// `interleave`: whether the layer may compute from its own tile-interleaved copy (not for
    /// an embedding table that only ever gives rows: the mapped file serves the few rows read,
    /// where a copy would hold the whole table, 135 MB for Qwen2.5-Coder-1.5B).
    fn plane_linear(&self, name: &str, rows: usize, cols: usize, interleave: bool) -> Result<Option<PlaneLinear>> {
        let Self::Bnest(b, plan) = self else { return Ok(None) };
        let Some(t) = b.tensor(name) else { return Ok(None) };
        let Encoding::Planes { group, master_bits, sub, .. } = &t.encoding else { return Ok(None) };
        if planes::unsupported(*group, sub.map(|s| (s.size, s.bits))).is_some() {
            return Ok(None);
        }
        ensure!(t.shape == [rows, cols], "tensor {name} has shape {:?}, expected [{rows}, {cols}]", t.shape);
        let r = plan.bits_for(name, *master_bits)?;
        let pr = b.plane_ranges(t)?;
        let bytes = &pr.map[..];
        let u16s = |rg: &std::ops::Range<usize>| -> Vec<u16> {
            bytes[rg.clone()].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
        };
        let (scales, offsets) = (u16s(&pr.scales), u16s(&pr.offsets));
        let dtypes = bytes[pr.dtypes.clone()].to_vec();
        let sub = b.sub_scales(t)?;
        let l = PlaneLinear::new(
            pr.map.clone(),
            pr.planes,
            rows,
            cols,
            *group,
            &scales,
            &offsets,
            &dtypes,
            sub.as_ref(),
            r,
        )
        .with_context(|| format!("tensor {name}"))?;
        // Where the layer computes from its own tile-interleaved copy of the planes, their
        // mapped pages are dropped as each is copied, so the weights are never resident twice.
        // SAFETY (both calls): a read-only file mapping; a dropped page is read again from
        // the file if anything touches it.
        let drop_pages = |rg: std::ops::Range<usize>| {
            let _ = unsafe { pr.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, rg.start, rg.len()) };
        };
        if !interleave {
            return Ok(Some(l));
        }
        let mut copied = false;
        let l = l.interleaved(|rg| {
            copied = true;
            drop_pages(rg);
        });
        if copied {
            // Then the whole file's pages: what the kernel mapped around the pages read while
            // loading (neighbouring planes included) would otherwise stay resident for
            // nothing, about 30 MB over the model. Inference reads nothing of it.
            drop_pages(0..pr.map.len());
        }
        Ok(Some(l))
    }

    /// Per layer, the largest magnitude of the key projection's bias (0 where there is none):
    /// where it is large, keys stay wider than 4 bits in the cache (`KvTypes::for_layer`).
    pub fn key_bias(&self, cfg: &LlamaConfig) -> Result<Vec<f32>> {
        (0..cfg.n_layers)
            .map(|l| {
                let b = self.tensor(&format!("blk.{l}.attn_k.bias"), cfg)?;
                Ok(b.map_or(0.0, |(_, v)| v.iter().fold(0f32, |m, x| m.max(x.abs()))))
            })
            .collect()
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        match self {
            Self::Gguf(g) => {
                g.tensor(name).is_some() || fused_part(g, name).is_some() || expert_part(g, name).is_some()
            }
            Self::HfDir(d) => hf_name(name).is_some_and(|hf| d.names().any(|n| n == hf)),
            Self::Bnest(b, _) => b.tensor(name).is_some(),
            Self::Memory(m) => m.tensors.contains_key(name),
        }
    }

    /// Materializes the whole model as f32 weights.
    pub fn load_f32(&self) -> Result<Llama> {
        let cfg = self.config()?;
        let get = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let (s, d) = self.tensor(name, &cfg)?.with_context(|| format!("missing tensor {name}"))?;
            ensure!(s == shape, "tensor {name} has shape {s:?}, expected {shape:?}");
            Ok(d)
        };
        let opt_bias = |name: &str, len: usize| -> Result<Option<Vec<f32>>> {
            match self.tensor(name, &cfg)? {
                None => Ok(None),
                Some((s, d)) => {
                    ensure!(s == [len], "tensor {name} has shape {s:?}, expected [{len}]");
                    Ok(Some(d))
                }
            }
        };
        let (dim, q_dim, kv_dim, ffn) = (cfg.dim, cfg.n_heads * cfg.head_dim, cfg.kv_dim(), cfg.ffn_dim);
        let untied = self.has_tensor("output.weight");
        let dense = |name: &str, rows: usize, cols: usize| -> Result<Box<dyn Linear>> {
            let b = opt_bias(&format!("{name}.bias"), rows)?;
            let interleave = !(untied && name == "token_embd");
            let name = format!("{name}.weight");
            if let Some(l) = self.plane_linear(&name, rows, cols, interleave)? {
                return Ok(Box::new(l.with_bias(b)));
            }
            let w = get(&name, &[rows, cols])?;
            Ok(Box::new(DenseF32::new(&w, rows, cols, b)))
        };
        // A gated MLP of `width` (`ffn_gate{suffix}` …: the block's own, an expert's, the shared one).
        let mlp = |p: &str, suffix: &str, width: usize| -> Result<Mlp> {
            Ok(Mlp {
                gate: dense(&format!("{p}.ffn_gate{suffix}"), width, dim)?,
                up: dense(&format!("{p}.ffn_up{suffix}"), width, dim)?,
                down: dense(&format!("{p}.ffn_down{suffix}"), dim, width)?,
            })
        };
        // Q/K norms: per head (Qwen3, Gemma), or over the whole vector (OLMoE).
        let head_norm = |name: &str, whole: usize| -> Result<Option<Vec<f32>>> {
            match self.tensor(name, &cfg)? {
                None => Ok(None),
                Some((s, d)) => {
                    ensure!(
                        s == [cfg.head_dim] || s == [whole],
                        "tensor {name} has shape {s:?}, expected [{}] or [{whole}]",
                        cfg.head_dim
                    );
                    Ok(Some(d))
                }
            }
        };
        let embed: Arc<dyn Linear> = Arc::from(dense("token_embd", cfg.vocab_size, dim)?);
        let head: Arc<dyn Linear> = match untied {
            true => Arc::from(dense("output", cfg.vocab_size, dim)?),
            false => embed.clone(),
        };
        let key_bias = self.key_bias(&cfg)?;
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let p = format!("blk.{l}");
            blocks.push(Block {
                attn_norm: get(&format!("{p}.attn_norm.weight"), &[dim])?,
                wq: dense(&format!("{p}.attn_q"), q_dim, dim)?,
                wk: dense(&format!("{p}.attn_k"), kv_dim, dim)?,
                wv: dense(&format!("{p}.attn_v"), kv_dim, dim)?,
                q_norm: head_norm(&format!("{p}.attn_q_norm.weight"), q_dim)?,
                k_norm: head_norm(&format!("{p}.attn_k_norm.weight"), kv_dim)?,
                wo: dense(&format!("{p}.attn_output"), dim, q_dim)?,
                post_attn_norm: opt_bias(&format!("{p}.post_attention_norm.weight"), dim)?,
                window: cfg.layer_window(l),
                ffn_norm: get(&format!("{p}.ffn_norm.weight"), &[dim])?,
                ffn: match cfg.moe {
                    None => {
                        let router = format!("{p}.ffn_gate_inp.weight");
                        ensure!(
                            !self.has_tensor(&router),
                            "the file has experts ({router}) but no expert count: a mixture-of-experts model needs \
                             {}.expert_count and expert_used_count",
                            cfg.arch
                        );
                        Ffn::Dense(mlp(&p, "", ffn)?)
                    }
                    Some(m) => Ffn::Moe(Moe {
                        router: dense(&format!("{p}.ffn_gate_inp"), m.experts, dim)?,
                        experts: (0..m.experts)
                            .map(|e| mlp(&p, &format!(".{e}"), m.expert_ffn))
                            .collect::<Result<_>>()?,
                        used: m.used,
                        renormalize: m.renormalize,
                        unit_weights: m.unit_weights,
                        shared: match m.shared_ffn {
                            None => None,
                            Some(width) => {
                                let w = get(&format!("{p}.ffn_gate_inp_shexp.weight"), &[dim])?;
                                Some((
                                    mlp(&p, "_shexp", width)?,
                                    Box::new(DenseF32::new(&w, 1, dim, None)) as Box<dyn Linear>,
                                ))
                            }
                        },
                    }),
                },
                post_ffn_norm: opt_bias(&format!("{p}.post_ffw_norm.weight"), dim)?,
            });
        }
        let norm = get("output_norm.weight", &[dim])?;
        // Rope scaling baked into per-frequency factors: Llama 3.1's (`rope_freqs`), or Phi-3's
        // LongRoPE (`rope_factors_short` up to its original context, `rope_factors_long` past it).
        let half = cfg.head_dim / 2;
        let spec = cfg.spec();
        let rope_at = |base: f64, factors: Option<&[f32]>| {
            Rope::with_factors(
                cfg.head_dim,
                base,
                cfg.max_seq,
                cfg.rope_style == RopeStyle::Interleaved,
                factors,
                cfg.rope_scaling.attn_factor,
            )
        };
        let rope_with = |factors: Option<&[f32]>| rope_at(cfg.rope_base, factors);
        let freqs = match opt_bias("rope_freqs.weight", half)? {
            Some(f) => Some(f),
            None => cfg.rope_scaling.llama3.map(|l| l.factors(cfg.head_dim, cfg.rope_base)),
        };
        // Linear scaling divides every frequency by its factor (the local layers keep theirs).
        let freqs = freqs.or_else(|| cfg.rope_scaling.linear.map(|f| vec![f; half]));
        let short = opt_bias("rope_factors_short.weight", half)?;
        let long = opt_bias("rope_factors_long.weight", half)?;
        let rope = rope_with(freqs.as_deref().or(short.as_deref()));
        let rope_long = match (&freqs, &long, cfg.rope_scaling.original_ctx) {
            (None, Some(l), Some(orig)) => Some((rope_with(Some(l)), orig)),
            _ => None,
        };
        let rope_local = cfg.sliding_window.map(|sw| rope_at(sw.rope_base, None));
        let embed_scale = spec.embed_scale.then(|| (cfg.dim as f32).sqrt());
        Ok(Llama {
            config: cfg,
            embed,
            blocks,
            norm,
            head,
            rope,
            rope_long,
            rope_local,
            embed_scale,
            ffn_act: spec.ffn_act,
            kv_type: KvTypes::default(),
            key_bias,
            state: Default::default(),
        })
    }
}

/// A part of a tensor a Hugging Face checkpoint stores fused (Phi-3: `self_attn.qkv_proj` holds
/// q, k and v; `mlp.gate_up_proj` the gate then the up projection), cut out of it.
fn hf_fused_part(d: &SafetensorsDir, name: &str, cfg: &LlamaConfig) -> Result<Option<(Vec<usize>, Vec<f32>)>> {
    let Some((layer, rest)) = name.strip_prefix("blk.").and_then(|n| n.split_once('.')) else { return Ok(None) };
    let Some((part, kind)) = rest.split_once('.') else { return Ok(None) };
    let (q, kv, f) = (cfg.n_heads * cfg.head_dim, cfg.kv_dim(), cfg.ffn_dim);
    let (fused, total, rows) = match part {
        "attn_q" => ("self_attn.qkv_proj", q + 2 * kv, 0..q),
        "attn_k" => ("self_attn.qkv_proj", q + 2 * kv, q..q + kv),
        "attn_v" => ("self_attn.qkv_proj", q + 2 * kv, q + kv..q + 2 * kv),
        "ffn_gate" => ("mlp.gate_up_proj", 2 * f, 0..f),
        "ffn_up" => ("mlp.gate_up_proj", 2 * f, f..2 * f),
        _ => return Ok(None),
    };
    let hf = format!("model.layers.{layer}.{fused}.{kind}");
    let Some((mut shape, data)) = d.tensor_f32(&hf)? else { return Ok(None) };
    ensure!(shape.first() == Some(&total), "tensor {hf} has shape {shape:?}, not the {total} rows the config gives");
    let cols: usize = shape[1..].iter().product();
    shape[0] = rows.len();
    Ok(Some((shape, data[rows.start * cols..rows.end * cols].to_vec())))
}

/// A GGUF tensor as the model's tensors: itself, or for a fused one ([`fused_part`]) its parts,
/// each a view of the same bytes (whole rows of any encoding), named as the model names them.
pub fn gguf_parts(g: &GgufFile, t: &TensorInfo) -> Vec<TensorInfo> {
    if let Some((stem, suffix)) = t.name.strip_suffix(".weight").map(|s| (s, "weight"))
        && let Some(part) = stem.strip_suffix("_exps")
        && t.shape.len() == 3
    {
        // Experts stacked in one tensor: each its own matrix (`blk.N.ffn_gate.E.weight`).
        let parts: Vec<TensorInfo> =
            (0..t.shape[0]).filter_map(|e| expert_part(g, &format!("{part}.{e}.{suffix}"))).collect();
        if parts.len() == t.shape[0] {
            return parts;
        }
    }
    let Some((block, rest)) = t.name.strip_prefix("blk.").and_then(|n| n.split_once('.')) else {
        return vec![t.clone()];
    };
    let Some((part, suffix)) = rest.split_once('.') else { return vec![t.clone()] };
    let names: &[&str] = match part {
        "attn_qkv" => &["attn_q", "attn_k", "attn_v"],
        "ffn_up" => &["ffn_gate", "ffn_up"],
        _ => &[],
    };
    let parts: Vec<TensorInfo> = names
        .iter()
        .filter_map(|m| {
            let name = format!("blk.{block}.{m}.{suffix}");
            let (fused, rows) = fused_part(g, &name)?;
            (fused.name == t.name && t.shape[0] > 0).then(|| {
                let row_bytes = t.size_bytes / t.shape[0];
                let mut shape = t.shape.clone();
                shape[0] = rows.len();
                TensorInfo {
                    name,
                    shape,
                    dtype: t.dtype,
                    offset: t.offset + rows.start * row_bytes,
                    size_bytes: rows.len() * row_bytes,
                }
            })
        })
        .collect();
    if parts.len() == names.len() && !parts.is_empty() { parts } else { vec![t.clone()] }
}

/// Expert `E`'s matrix `blk.N.ffn_{gate,up,down}.E.weight` (the old Mixtral layout's names,
/// which the model uses) as a view of the tensor newer files stack every expert's into,
/// `blk.N.ffn_{gate,up,down}_exps.weight` (`[experts, rows, cols]`): its rows are whole blocks of
/// any encoding, and each expert's are contiguous. `None` where the file has the matrix itself
/// or no such expert.
fn expert_part(g: &GgufFile, name: &str) -> Option<TensorInfo> {
    if g.tensor(name).is_some() {
        return None;
    }
    let (block, rest) = name.strip_prefix("blk.")?.split_once('.')?;
    let (part, rest) = rest.split_once('.')?;
    let (expert, suffix) = rest.split_once('.')?;
    if !matches!(part, "ffn_gate" | "ffn_up" | "ffn_down") || suffix != "weight" {
        return None;
    }
    let e: usize = expert.parse().ok()?;
    let stacked = g.tensor(&format!("blk.{block}.{part}_exps.{suffix}"))?;
    let [experts, rows, cols] = stacked.shape[..] else { return None };
    if e >= experts || !stacked.size_bytes.is_multiple_of(experts) {
        return None;
    }
    let per = stacked.size_bytes / experts;
    Some(TensorInfo {
        name: name.to_string(),
        shape: vec![rows, cols],
        dtype: stacked.dtype,
        offset: stacked.offset + e * per,
        size_bytes: per,
    })
}

/// Matrices a GGUF file stores fused that the model keeps apart, as llama.cpp's loaders find
/// them (by which tensors exist, not by architecture): `blk.N.attn_qkv` holds q, k and v one
/// after the other (Phi-3), and an `ffn_up` twice as tall as `ffn_down` is wide holds the gate
/// then the up projection (Phi-3's fused SwiGLU input) when there is no `ffn_gate`. Returns the
/// fused tensor and the rows of `name` in it.
fn fused_part<'g>(g: &'g GgufFile, name: &str) -> Option<(&'g TensorInfo, std::ops::Range<usize>)> {
    let (block, rest) = name.strip_prefix("blk.")?.split_once('.')?;
    let (part, suffix) = rest.split_once('.')?;
    let p = |m: &str| format!("blk.{block}.{m}.{suffix}");
    match part {
        "attn_q" | "attn_k" | "attn_v" => {
            if g.tensor(name).is_some() {
                return None;
            }
            let fused = g.tensor(&p("attn_qkv"))?;
            // q is as wide as attn_output's input; k and v split the rest.
            let q = g.tensor(&format!("blk.{block}.attn_output.weight"))?.shape.get(1).copied()?;
            let kv = fused.shape[0].checked_sub(q)? / 2;
            match part {
                "attn_q" => Some((fused, 0..q)),
                "attn_k" => Some((fused, q..q + kv)),
                _ => Some((fused, q + kv..q + 2 * kv)),
            }
        }
        "ffn_gate" | "ffn_up" if suffix == "weight" => {
            if g.tensor(&p("ffn_gate")).is_some() {
                return None;
            }
            let up = g.tensor(&p("ffn_up"))?;
            let ffn = g.tensor(&p("ffn_down"))?.shape.get(1).copied()?;
            if up.shape[0] != 2 * ffn {
                return None;
            }
            Some((up, if part == "ffn_gate" { 0..ffn } else { ffn..2 * ffn }))
        }
        _ => None,
    }
}
