//! `bitnest quantize`: any supported model → one `.bnest` file holding every precision.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, ensure};
use indicatif::{ProgressBar, ProgressStyle};

use crate::format::bnest::{self, Header, TensorData};
use crate::kernels::Linear;
use crate::model::ModelSource;
use crate::quant::{BitPlanes, QuantConfig};

/// Tensor names of a llama-family model, matrices first marked as such.
pub(crate) fn tensor_names(c: &crate::model::LlamaConfig, has_output: bool) -> Vec<(String, bool)> {
    let n_layers = c.n_layers;
    let mut v = vec![("token_embd.weight".to_string(), true)];
    if has_output {
        v.push(("output.weight".into(), true));
    }
    v.push(("output_norm.weight".into(), false));
    for r in ["rope_freqs", "rope_factors_short", "rope_factors_long"] {
        v.push((format!("{r}.weight"), false));
    }
    for l in 0..n_layers {
        for m in ["attn_q", "attn_k", "attn_v", "attn_output"] {
            v.push((format!("blk.{l}.{m}.weight"), true));
        }
        // The MLP, or a mixture's experts (each its own matrix, so that a token reads only its
        // experts' planes) and shared expert; routers stay f32 (a few kB, and a token's choice
        // of experts should not depend on the precision read).
        let mlp =
            |suffix: &str| ["ffn_gate", "ffn_up", "ffn_down"].map(|m| (format!("blk.{l}.{m}{suffix}.weight"), true));
        match c.moe {
            None => v.extend(mlp("")),
            Some(moe) => {
                (0..moe.experts).for_each(|e| v.extend(mlp(&format!(".{e}"))));
                v.extend(mlp("_shexp"));
                v.push((format!("blk.{l}.ffn_gate_inp.weight"), false));
                v.push((format!("blk.{l}.ffn_gate_inp_shexp.weight"), false));
            }
        }
        for b in ["attn_q", "attn_k", "attn_v"] {
            v.push((format!("blk.{l}.{b}.bias"), false));
        }
        v.push((format!("blk.{l}.attn_norm.weight"), false));
        v.push((format!("blk.{l}.attn_q_norm.weight"), false));
        v.push((format!("blk.{l}.attn_k_norm.weight"), false));
        v.push((format!("blk.{l}.ffn_norm.weight"), false));
        v.push((format!("blk.{l}.post_attention_norm.weight"), false));
        v.push((format!("blk.{l}.post_ffw_norm.weight"), false));
    }
    v
}

/// Mean square of each input column of every matrix, over the tokens of a calibration text:
/// what [`BitPlanes::quantize_weighted`] weights errors by. Keyed by tensor name; a tied
/// embedding gets its head's.
pub type Importance = HashMap<String, Vec<f32>>;

/// Sums of squared inputs seen by one layer.
#[derive(Default)]
struct Squares {
    sum: Vec<f64>,
    rows: usize,
}

/// A layer that records its inputs and computes with the one it wraps.
struct Tap {
    inner: Arc<dyn Linear>,
    seen: Arc<Mutex<Squares>>,
}

impl Linear for Tap {
    fn in_dim(&self) -> usize {
        self.inner.in_dim()
    }
    fn out_dim(&self) -> usize {
        self.inner.out_dim()
    }
    fn forward(&self, x: &[f32], n: usize, y: &mut [f32]) {
        let cols = self.inner.in_dim();
        let mut s = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if s.sum.len() != cols {
            s.sum = vec![0.0; cols];
        }
        for row in x[..n * cols].chunks_exact(cols) {
            s.sum.iter_mut().zip(row).for_each(|(a, &v)| *a += (v as f64) * (v as f64));
        }
        s.rows += n;
        drop(s);
        self.inner.forward(x, n, y)
    }
    fn weight_bytes(&self) -> usize {
        self.inner.weight_bytes()
    }
    fn format_name(&self) -> String {
        self.inner.format_name()
    }
    fn row(&self, i: usize, out: &mut [f32]) {
        self.inner.row(i, out)
    }
}

/// Runs the f32 model over up to `max_tokens` tokens of `text`, in windows of 512, and returns
/// every matrix's [`Importance`].
pub fn calibrate(source: &ModelSource, text: &str, max_tokens: usize) -> Result<Importance> {
    let ids = source.tokenizer()?.encode(text, false)?;
    ensure!(ids.len() >= 16, "the calibration text has only {} tokens", ids.len());
    calibrate_tokens(source, &ids[..ids.len().min(max_tokens)])
}

/// [`calibrate`] on token ids.
pub fn calibrate_tokens(source: &ModelSource, ids: &[u32]) -> Result<Importance> {
    let mut model = source.load_f32()?;
    // Exact keys and values: the statistics (and so the file written) do not depend on the
    // cache type a user decodes with.
    model.kv_type = crate::model::llama::KvTypes::both(crate::model::llama::KvType::F32);
    let vocab = model.config.vocab_size;
    ensure!(ids.iter().all(|&t| (t as usize) < vocab), "calibration token id outside the vocabulary");
    let mut taps: Vec<(Vec<String>, Arc<Mutex<Squares>>)> = Vec::new();
    let mut tap = |inner: Arc<dyn Linear>, names: Vec<String>| -> Arc<dyn Linear> {
        let seen = Arc::new(Mutex::new(Squares::default()));
        taps.push((names, seen.clone()));
        Arc::new(Tap { inner, seen })
    };
    for (l, b) in model.blocks.iter_mut().enumerate() {
        for (name, slot) in b.linears_mut() {
            let inner: Arc<dyn Linear> =
                Arc::from(std::mem::replace(slot, Box::new(crate::kernels::DenseF32::new(&[], 0, 0, None))));
            let t = tap(inner, vec![format!("blk.{l}.{name}.weight")]);
            *slot = Box::new(ArcLinear(t));
        }
    }
    // The head: its own matrix, or the embedding it is tied to.
    let tied = Arc::ptr_eq(&model.head, &model.embed);
    let head_names = if tied { vec!["token_embd.weight".to_string()] } else { vec!["output.weight".to_string()] };
    model.head = tap(model.head.clone(), head_names);
    // Windows of 512 tokens (as the perplexity is measured), or the model's context if shorter.
    let window = 512.min(model.config.max_seq);
    for w in ids.chunks(window) {
        let mut s = model.new_session(w.len(), w.len());
        model.forward(&mut s, w, 1)?;
    }
    let mut out = Importance::new();
    for (names, seen) in taps {
        let s = seen.lock().unwrap_or_else(|e| e.into_inner());
        if s.rows == 0 {
            continue;
        }
        let v: Vec<f32> = s.sum.iter().map(|a| (a / s.rows as f64) as f32).collect();
        for n in names {
            out.insert(n, v.clone());
        }
    }
    Ok(out)
}

/// An `Arc`ed layer where the model wants a `Box`.
struct ArcLinear(Arc<dyn Linear>);

impl Linear for ArcLinear {
    fn in_dim(&self) -> usize {
        self.0.in_dim()
    }
    fn out_dim(&self) -> usize {
        self.0.out_dim()
    }
    fn forward(&self, x: &[f32], n: usize, y: &mut [f32]) {
        self.0.forward(x, n, y)
    }
    fn weight_bytes(&self) -> usize {
        self.0.weight_bytes()
    }
    fn format_name(&self) -> String {
        self.0.format_name()
    }
    fn row(&self, i: usize, out: &mut [f32]) {
        self.0.row(i, out)
    }
}

/// Quantizes every matrix of `source` (embedding and head included) into bit planes and writes
/// `out` atomically. Norms and biases stay f32.
pub fn quantize_model(
    source: &ModelSource,
    source_name: &str,
    cfg: &QuantConfig,
    out: &Path,
    progress: bool,
) -> Result<()> {
    quantize_model_with(source, source_name, cfg, None, out, progress)
}

/// [`quantize_model`] with the [`Importance`] of a calibration run, if any.
pub fn quantize_model_with(
    source: &ModelSource,
    source_name: &str,
    cfg: &QuantConfig,
    importance: Option<&Importance>,
    out: &Path,
    progress: bool,
) -> Result<()> {
    cfg.validate()?;
    let config = source.config()?;
    let tokenizer = source.tokenizer()?.to_embedded()?;
    let names: Vec<(String, bool)> = tensor_names(&config, source.has_tensor("output.weight"))
        .into_iter()
        .filter(|(n, _)| source.has_tensor(n))
        .collect();
    let bar = if progress { ProgressBar::new(names.len() as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("quantizing {bar:40} {pos}/{len} tensors {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut tensors = Vec::with_capacity(names.len());
    for (name, matrix) in names {
        bar.set_message(name.clone());
        let (shape, data) = source.tensor(&name, &config)?.with_context(|| format!("missing tensor {name}"))?;
        let payload = if matrix && shape.len() == 2 {
            TensorData::Planes(
                BitPlanes::quantize_weighted(
                    &data,
                    shape[0],
                    shape[1],
                    cfg,
                    importance.and_then(|m| m.get(&name)).map(|v| v.as_slice()),
                )
                .with_context(|| format!("quantizing {name}"))?,
            )
        } else {
            TensorData::F32(data)
        };
        tensors.push((name, shape, payload));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let header = Header {
        format_version: bnest::VERSION,
        config: serde_json::to_value(&config)?,
        tokenizer,
        chat_template: source.chat_template(),
        quant: cfg.clone(),
        source: source_name.to_string(),
        tensors: Vec::new(),
    };
    bnest::write(out, header, tensors)
}
