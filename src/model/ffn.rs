//! The feed-forward half of a block: one gated MLP, or a mixture of experts, where a router
//! picks `k` of `E` gated MLPs for each token and sums their outputs by its weights (Mixtral,
//! Qwen-MoE, OLMoE; llama.cpp's `build_moe_ffn`).
//!
//! A mixture runs a batch the way llama.cpp's `mul_mat_id` does: the tokens are grouped by
//! the experts they chose, and each chosen expert runs once over all of its tokens, so a
//! prefill or verification pass reads each expert's planes once, however many of its tokens
//! chose it. A token's result depends only on its own row (every layer is batch invariant)
//! and its experts are summed in a fixed order (by expert number), so it is the same in any
//! batch.

use super::session::FFN_ROWS;
use super::state::{self, StateFormat};
use crate::kernels::{Linear, SyncPtr, forward_shared};

/// `gate ← act(gate)·up`, row by row.
pub type Act = fn(&mut [f32], &[f32]);

/// A gated MLP: `down · (act(gate·x) ⊙ up·x)`.
pub struct Mlp {
    pub gate: Box<dyn Linear>,
    pub up: Box<dyn Linear>,
    pub down: Box<dyn Linear>,
}

/// A mixture of experts.
pub struct Moe {
    /// `experts × dim`: one logit per expert.
    pub router: Box<dyn Linear>,
    pub experts: Vec<Mlp>,
    /// Experts each token runs (`expert_used_count`).
    pub used: usize,
    /// Whether the chosen experts' weights are divided by their sum.
    pub renormalize: bool,
    /// Whether every chosen expert counts with weight 1 instead (a moefied dense model).
    pub unit_weights: bool,
    /// An expert every token runs, scaled by σ(`shared_gate`·x) (Qwen2-MoE).
    pub shared: Option<(Mlp, Box<dyn Linear>)>,
}

/// A block's feed-forward layer.
pub enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

/// Buffers of a mixture's pass, grown to the largest pass seen and then reused.
#[derive(Default)]
pub struct MoeScratch {
    /// Router logits, then probabilities, `n × experts`.
    probs: Vec<f32>,
    /// Each token's chosen experts and their weights, `n × k`, best first.
    choice: Vec<(u32, f32)>,
    /// Indices into `choice` grouped by expert: expert `e`'s are `order[starts[e]..starts[e + 1]]`.
    order: Vec<u32>,
    starts: Vec<usize>,
    /// The next free place of each expert's run in `order` while it is filled.
    next: Vec<usize>,
    /// The input rows of one expert's tokens, and its output rows.
    xg: Vec<f32>,
    yg: Vec<f32>,
    /// The shared expert's output, `n × dim`.
    shared: Vec<f32>,
}

fn grow<T: Clone + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::default());
    }
    &mut v[..n]
}

/// What a feed-forward pass works with besides its input and output rows: the `gate` and `up`
/// buffers (each [`FFN_ROWS`] × the widest layer, or `n` × it if fewer), the activation, the
/// block format `mid` rounds the intermediate through (a BCT measurement), the planes read.
pub struct FfnPass<'a> {
    pub gate: &'a mut [f32],
    pub up: &'a mut [f32],
    pub act: Act,
    pub mid: Option<StateFormat>,
    pub max_bits: u32,
}

impl Mlp {
    /// The MLP over `n` rows of `x` into `out`, in chunks of [`FFN_ROWS`] tokens.
    pub fn forward(&self, x: &[f32], n: usize, out: &mut [f32], p: &mut FfnPass) {
        let FfnPass { gate, up, act, mid, max_bits } = p;
        let (act, mid, max_bits) = (*act, *mid, *max_bits);
        let (dim, f, o) = (self.gate.in_dim(), self.gate.out_dim(), self.down.out_dim());
        for r0 in (0..n).step_by(FFN_ROWS) {
            let m = (n - r0).min(FFN_ROWS);
            let (g, u) = (&mut gate[..m * f], &mut up[..m * f]);
            forward_shared(
                &[&*self.gate, &*self.up],
                &x[r0 * dim..(r0 + m) * dim],
                m,
                &mut [&mut *g, &mut *u],
                max_bits,
            );
            let gp = SyncPtr(g.as_mut_ptr());
            let u = &*u;
            super::llama::each_token(m, |t| {
                // SAFETY: token t owns row t of the gate buffer, which holds m rows.
                act(unsafe { super::llama::row_mut(gp, t, f) }, &u[t * f..(t + 1) * f])
            });
            state::apply(mid, g);
            self.down.forward_capped(g, m, &mut out[r0 * o..(r0 + m) * o], max_bits);
        }
    }

    pub fn linears(&self) -> [&dyn Linear; 3] {
        [&*self.gate, &*self.up, &*self.down]
    }
}

/// `p ← softmax(p)` as ggml computes it (f32 exponentials, their sum in f64).
fn softmax(p: &mut [f32]) {
    let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for v in p.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    p.iter_mut().for_each(|v| *v *= inv);
}

/// The `k` most probable experts of `probs` (ties to the lower number), best first, with their
/// weights, renormalized to sum to 1 if asked (the sum summed in f64 and clamped below at 2⁻¹⁴, as
/// ggml's `sum_rows` and llama.cpp's clamp make it).
fn route(probs: &[f32], k: usize, renormalize: bool, out: &mut [(u32, f32)]) {
    // A selection sort: k is small.
    for slot in 0..k {
        let mut best: Option<(usize, f32)> = None;
        for (e, &v) in probs.iter().enumerate() {
            if out[..slot].iter().any(|c| c.0 as usize == e) {
                continue;
            }
            if best.is_none_or(|(_, b)| v > b) {
                best = Some((e, v));
            }
        }
        let (e, v) = best.expect("k ≤ experts");
        out[slot] = (e as u32, v);
    }
    if renormalize {
        let sum = (out[..k].iter().map(|c| c.1 as f64).sum::<f64>() as f32).max(1.0 / 16384.0);
        out[..k].iter_mut().for_each(|c| c.1 /= sum);
    }
}

impl Moe {
    /// The mixture over `n` rows of `x` into `out`, each token through its `k` (≤ `used`)
    /// best experts, with the mixture's own buffers in `sc`.
    pub fn forward(&self, sc: &mut MoeScratch, x: &[f32], n: usize, k: usize, out: &mut [f32], p: &mut FfnPass) {
        let max_bits = p.max_bits;
        let (e_count, dim) = (self.experts.len(), self.router.in_dim());
        let k = k.clamp(1, self.used);
        // Route: softmax over every expert, the k best, their weights.
        let probs = grow(&mut sc.probs, n * e_count);
        self.router.forward_capped(&x[..n * dim], n, probs, max_bits);
        let choice = grow(&mut sc.choice, n * k);
        for t in 0..n {
            let p = &mut probs[t * e_count..(t + 1) * e_count];
            softmax(p);
            let c = &mut choice[t * k..(t + 1) * k];
            route(p, k, self.renormalize, c);
            if self.unit_weights {
                c.iter_mut().for_each(|c| c.1 = 1.0);
            }
        }
        // Group the (token, slot) pairs by expert (a counting sort, tokens in order).
        let starts = grow(&mut sc.starts, e_count + 1);
        starts.fill(0);
        for c in choice.iter() {
            starts[c.0 as usize + 1] += 1;
        }
        for e in 0..e_count {
            starts[e + 1] += starts[e];
        }
        let order = grow(&mut sc.order, n * k);
        let next = grow(&mut sc.next, e_count);
        next.copy_from_slice(&starts[..e_count]);
        for (i, c) in choice.iter().enumerate() {
            order[next[c.0 as usize]] = i as u32;
            next[c.0 as usize] += 1;
        }
        // Each chosen expert once over its tokens, in chunks of FFN_ROWS; its weighted rows
        // added to theirs, so a token's sum runs in the order of its experts' numbers.
        out[..n * dim].fill(0.0);
        let chunk = n.min(FFN_ROWS);
        let xg = grow(&mut sc.xg, chunk * dim);
        let yg = grow(&mut sc.yg, chunk * dim);
        for (e, expert) in self.experts.iter().enumerate() {
            for ids in order[starts[e]..starts[e + 1]].chunks(FFN_ROWS) {
                let m = ids.len();
                for (r, &i) in ids.iter().enumerate() {
                    let t = i as usize / k;
                    xg[r * dim..(r + 1) * dim].copy_from_slice(&x[t * dim..(t + 1) * dim]);
                }
                expert.forward(xg, m, yg, p);
                for (r, &i) in ids.iter().enumerate() {
                    let (t, w) = (i as usize / k, choice[i as usize].1);
                    let y = &yg[r * dim..(r + 1) * dim];
                    out[t * dim..(t + 1) * dim].iter_mut().zip(y).for_each(|(o, y)| *o += w * y);
                }
            }
        }
        // The shared expert, scaled by its gate, added after the routed ones (as llama.cpp).
        if let Some((mlp, shared_gate)) = &self.shared {
            let s = grow(&mut sc.shared, n * dim);
            mlp.forward(x, n, s, p);
            let g = &mut p.gate[..n.min(FFN_ROWS)];
            for r0 in (0..n).step_by(FFN_ROWS) {
                let m = (n - r0).min(FFN_ROWS);
                shared_gate.forward_capped(&x[r0 * dim..(r0 + m) * dim], m, &mut g[..m], max_bits);
                for t in r0..r0 + m {
                    let w = 1.0 / (1.0 + (-g[t - r0]).exp());
                    let y = &s[t * dim..(t + 1) * dim];
                    out[t * dim..(t + 1) * dim].iter_mut().zip(y).for_each(|(o, y)| *o += w * y);
                }
            }
        }
    }
}

impl Ffn {
    /// Every linear layer with its name within the block (`ffn_gate`, `ffn_gate.3` for
    /// expert 3, `ffn_gate_shexp`, `ffn_gate_inp` for the router), as the weights are named.
    pub fn linears(&self) -> Vec<(String, &dyn Linear)> {
        fn mlp<'a>(m: &'a Mlp, suffix: &str) -> Vec<(String, &'a dyn Linear)> {
            let names = ["ffn_gate", "ffn_up", "ffn_down"];
            names.iter().zip(m.linears()).map(|(n, l)| (format!("{n}{suffix}"), l)).collect()
        }
        match self {
            Ffn::Dense(m) => mlp(m, ""),
            Ffn::Moe(moe) => {
                let mut v: Vec<(String, &dyn Linear)> = vec![("ffn_gate_inp".into(), &*moe.router)];
                for (e, m) in moe.experts.iter().enumerate() {
                    v.extend(mlp(m, &format!(".{e}")));
                }
                if let Some((m, g)) = &moe.shared {
                    v.push(("ffn_gate_inp_shexp".into(), &**g));
                    v.extend(mlp(m, "_shexp"));
                }
                v
            }
        }
    }

    /// [`Ffn::linears`], mutable (to wrap layers, as calibration does).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Box<dyn Linear>)> {
        fn mlp<'a>(m: &'a mut Mlp, suffix: &str) -> Vec<(String, &'a mut Box<dyn Linear>)> {
            vec![
                (format!("ffn_gate{suffix}"), &mut m.gate),
                (format!("ffn_up{suffix}"), &mut m.up),
                (format!("ffn_down{suffix}"), &mut m.down),
            ]
        }
        match self {
            Ffn::Dense(m) => mlp(m, ""),
            Ffn::Moe(moe) => {
                let mut v: Vec<(String, &mut Box<dyn Linear>)> = vec![("ffn_gate_inp".into(), &mut moe.router)];
                for (e, m) in moe.experts.iter_mut().enumerate() {
                    v.extend(mlp(m, &format!(".{e}")));
                }
                if let Some((m, g)) = &mut moe.shared {
                    v.push(("ffn_gate_inp_shexp".into(), g));
                    v.extend(mlp(m, "_shexp"));
                }
                v
            }
        }
    }

    /// The dense MLP, if this is one.
    pub fn dense(&self) -> Option<&Mlp> {
        match self {
            Ffn::Dense(m) => Some(m),
            Ffn::Moe(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_takes_the_best_and_renormalizes() {
        let mut p = vec![0.1f32, 2.0, -1.0, 1.5, 2.0];
        softmax(&mut p);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let mut c = [(0, 0.0); 3];
        route(&p, 3, false, &mut c);
        // Ties go to the lower number.
        assert_eq!(c.map(|c| c.0), [1, 4, 3]);
        assert_eq!(c[0].1, p[1]);
        route(&p, 3, true, &mut c);
        assert!((c.iter().map(|c| c.1).sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(c[0].1 > p[1]);
    }
}
