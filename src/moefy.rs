//! `bitnest moefy`: a dense model's feed-forward layers cut into experts (MoEfication, Zhang et
//! al. 2022, train-free), so that a self-draft can run fewer of them.
//!
//! Each layer's `ffn` neurons are split into `E` equal groups by balanced k-means over their
//! gate rows (neurons whose gates point alike tend to fire together); expert `e` is the MLP of
//! its neurons (their gate and up rows, their down columns). The router scores an expert by
//! the mean of its neurons' gate rows against the input, and every chosen expert counts fully
//! (weight 1): with all `E` chosen, which is what the file runs by default, the sum of the
//! experts is the dense MLP (up to the order of the additions), and with fewer it is a draft.
//! MoEfication was shown on ReLU models, where few neurons fire; in SwiGLU models many do,
//! and the score is only a linear proxy for which fire most.

use std::collections::HashMap;

use anyhow::{Context, Result, ensure};

use crate::model::config::MoeConfig;
use crate::model::source::MemoryModel;
use crate::model::{LlamaConfig, ModelSource};

/// Rounds of balanced k-means.
const ROUNDS: usize = 8;

/// `source` with every layer's MLP cut into `experts` experts, as f32 tensors in memory.
pub fn moefy(source: &ModelSource, experts: usize) -> Result<ModelSource> {
    let cfg = source.config()?;
    ensure!(cfg.moe.is_none(), "the model is a mixture of experts already");
    ensure!(experts >= 2, "--experts {experts}: at least 2");
    ensure!(
        cfg.ffn_dim.is_multiple_of(experts),
        "--experts {experts} does not divide the feed-forward width {}",
        cfg.ffn_dim
    );
    let (dim, ffn, width) = (cfg.dim, cfg.ffn_dim, cfg.ffn_dim / experts);
    let mut tensors = HashMap::new();
    // Everything but the MLPs as it is.
    let names = crate::quantize::tensor_names(&cfg, source.has_tensor("output.weight"));
    for (name, _) in
        names.iter().filter(|(n, _)| !n.contains(".ffn_gate.") && !n.contains(".ffn_up.") && !n.contains(".ffn_down."))
    {
        if let Some(t) = source.tensor(name, &cfg)? {
            tensors.insert(name.clone(), t);
        }
    }
    for l in 0..cfg.n_layers {
        let get = |m: &str, shape: [usize; 2]| -> Result<Vec<f32>> {
            let name = format!("blk.{l}.{m}.weight");
            let (s, d) = source.tensor(&name, &cfg)?.with_context(|| format!("missing tensor {name}"))?;
            ensure!(s == shape, "tensor {name} has shape {s:?}, expected {shape:?}");
            Ok(d)
        };
        let (gate, up, down) = (get("ffn_gate", [ffn, dim])?, get("ffn_up", [ffn, dim])?, get("ffn_down", [dim, ffn])?);
        let groups = balanced_kmeans(&gate, ffn, dim, experts, l as u64);
        let mut router = vec![0f32; experts * dim];
        for (e, members) in groups.iter().enumerate() {
            let rows =
                |w: &[f32]| -> Vec<f32> { members.iter().flat_map(|&i| w[i * dim..(i + 1) * dim].to_vec()).collect() };
            let down = &down;
            let cols: Vec<f32> = (0..dim).flat_map(|r| members.iter().map(move |&i| down[r * ffn + i])).collect();
            for &i in members {
                for (c, &g) in router[e * dim..(e + 1) * dim].iter_mut().zip(&gate[i * dim..(i + 1) * dim]) {
                    *c += g / width as f32;
                }
            }
            tensors.insert(format!("blk.{l}.ffn_gate.{e}.weight"), (vec![width, dim], rows(&gate)));
            tensors.insert(format!("blk.{l}.ffn_up.{e}.weight"), (vec![width, dim], rows(&up)));
            tensors.insert(format!("blk.{l}.ffn_down.{e}.weight"), (vec![dim, width], cols));
        }
        tensors.insert(format!("blk.{l}.ffn_gate_inp.weight"), (vec![experts, dim], router));
    }
    let config = LlamaConfig {
        moe: Some(MoeConfig {
            experts,
            used: experts,
            expert_ffn: width,
            shared_ffn: None,
            renormalize: false,
            unit_weights: true,
        }),
        ..cfg
    };
    Ok(ModelSource::Memory(Box::new(MemoryModel {
        config,
        tensors,
        tokenizer: source.tokenizer()?.to_embedded()?,
        chat_template: source.chat_template(),
    })))
}

/// `k` groups of `n / k` rows each of the `n × d` matrix `w`, rows alike (by cosine) in one
/// group: k-means whose assignment fills groups greedily, the most similar (row, centre)
/// pairs first. Deterministic for a `seed`.
fn balanced_kmeans(w: &[f32], n: usize, d: usize, k: usize, seed: u64) -> Vec<Vec<usize>> {
    let size = n / k;
    let unit: Vec<f32> = w
        .chunks_exact(d)
        .flat_map(|r| {
            let norm = r.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            r.iter().map(move |x| x / norm).collect::<Vec<_>>()
        })
        .collect();
    // Initial centres: k rows spread by a fixed stride from a seeded start.
    let start = (seed as usize * 7919) % n;
    let mut centres: Vec<f32> = (0..k).flat_map(|c| unit[((start + c * size) % n) * d..][..d].to_vec()).collect();
    let mut groups = vec![Vec::with_capacity(size); k];
    for _ in 0..ROUNDS {
        let mut pairs: Vec<(f32, u32, u32)> = Vec::with_capacity(n * k);
        for i in 0..n {
            let r = &unit[i * d..(i + 1) * d];
            for c in 0..k {
                let s: f32 = r.iter().zip(&centres[c * d..(c + 1) * d]).map(|(a, b)| a * b).sum();
                pairs.push((s, i as u32, c as u32));
            }
        }
        pairs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let mut taken = vec![false; n];
        groups.iter_mut().for_each(|g| g.clear());
        for (_, i, c) in pairs {
            let (i, c) = (i as usize, c as usize);
            if !taken[i] && groups[c].len() < size {
                taken[i] = true;
                groups[c].push(i);
            }
        }
        for (c, g) in groups.iter().enumerate() {
            let centre = &mut centres[c * d..(c + 1) * d];
            centre.fill(0.0);
            for &i in g {
                centre.iter_mut().zip(&unit[i * d..(i + 1) * d]).for_each(|(a, b)| *a += b);
            }
        }
    }
    groups.iter_mut().for_each(|g| g.sort_unstable());
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_equal_and_cover_every_row() {
        let (n, d, k) = (48, 8, 4);
        let w: Vec<f32> = (0..n * d).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
        let g = balanced_kmeans(&w, n, d, k, 3);
        assert!(g.iter().all(|g| g.len() == n / k));
        let mut all: Vec<usize> = g.concat();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn alike_rows_share_a_group() {
        // Two kinds of rows, interleaved: each group holds one kind.
        let (n, d) = (16, 4);
        let w: Vec<f32> =
            (0..n).flat_map(|i| if i % 2 == 0 { [1.0, 0.1, 0.0, 0.0] } else { [0.0, 0.0, 1.0, 0.1] }).collect();
        for g in balanced_kmeans(&w, n, d, 2, 0) {
            assert!(g.iter().all(|&i| i % 2 == g[0] % 2), "{g:?}");
        }
    }
}
