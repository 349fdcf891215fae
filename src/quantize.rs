//! `bitnest quantize`: any supported model → one `.bnest` file holding every precision.

use std::path::Path;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::format::bnest::{self, Header, TensorData};
use crate::model::ModelSource;
use crate::quant::{BitPlanes, QuantConfig};

/// Tensor names of a llama-family model, matrices first marked as such.
fn tensor_names(n_layers: usize, has_output: bool) -> Vec<(String, bool)> {
    let mut v = vec![("token_embd.weight".to_string(), true)];
    if has_output {
        v.push(("output.weight".into(), true));
    }
    v.push(("output_norm.weight".into(), false));
    for l in 0..n_layers {
        for m in ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"] {
            v.push((format!("blk.{l}.{m}.weight"), true));
        }
        for b in ["attn_q", "attn_k", "attn_v"] {
            v.push((format!("blk.{l}.{b}.bias"), false));
        }
        v.push((format!("blk.{l}.attn_norm.weight"), false));
        v.push((format!("blk.{l}.ffn_norm.weight"), false));
    }
    v
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
    cfg.validate()?;
    let config = source.config()?;
    let tokenizer = source.tokenizer()?.to_embedded()?;
    let names: Vec<(String, bool)> = tensor_names(config.n_layers, source.has_tensor("output.weight"))
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
                BitPlanes::quantize(&data, shape[0], shape[1], cfg).with_context(|| format!("quantizing {name}"))?,
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
        config,
        tokenizer,
        chat_template: source.chat_template(),
        quant: cfg.clone(),
        source: source_name.to_string(),
        tensors: Vec::new(),
    };
    bnest::write(out, header, tensors)
}
