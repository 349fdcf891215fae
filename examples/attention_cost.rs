//! Prefill attention of one layer (SmolLM2's shape: 9 query heads over 3 KV heads of 64) in
//! cache, one thread, best of several rounds: the kernel as the model calls it, with the
//! queries of 8 tokens per call (what prefill does) and of one token per call; then one
//! decoded token at a few context lengths, each query head alone and a KV head's together;
//! then a verification tree's nodes over an f16 cache (what decoding stores), a node's query
//! heads per call or every node's.
//!
//! `cargo run --release --example attention_cost -- [TOKENS]`

use std::time::Instant;

use bitnest::kernels::attention::{HeadView, Query, attend_group};

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|t| t.parse().ok()).unwrap_or(512);
    let (heads, kv_heads, hd) = (9usize, 3usize, 64usize);
    let group = heads / kv_heads;
    let kv_dim = kv_heads * hd;
    let fill = |len: usize, k: usize| -> Vec<f32> { (0..len).map(|i| (((i * k) % 97) as f32 - 48.0) / 50.0).collect() };
    let (keys, values, q) = (fill(n * kv_dim, 31), fill(n * kv_dim, 17), fill(n * heads * hd, 13));
    let mut att = vec![0f32; n * heads * hd];
    let mut sc = vec![0f32; 32 * n];
    let scale = 1.0 / (hd as f32).sqrt();
    for per in [1usize, 8] {
        let mut best = f64::MAX;
        for _ in 0..7 {
            let t = Instant::now();
            for g in 0..kv_heads {
                let kv = HeadView { keys: &keys, values: &values, stride: kv_dim, offset: g * hd };
                for t0 in (0..n).step_by(per) {
                    let mut outs = att[t0 * heads * hd..(t0 + per).min(n) * heads * hd].chunks_mut(hd);
                    let mut qs: Vec<Query> = Vec::new();
                    for t in t0..(t0 + per).min(n) {
                        for h in 0..heads {
                            let out = outs.next().unwrap();
                            if h / group == g {
                                let at = (t * heads + h) * hd;
                                qs.push(Query { q: &q[at..at + hd], prefix: t + 1, extra: &[], out });
                            }
                        }
                    }
                    attend_group(kv, scale, &mut qs, &mut sc);
                }
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        let scores = (heads * n * (n + 1) / 2) as f64;
        println!(
            "{n} tokens, {per} per call: {:.2} ms, {:.1} ns per score ({:.2} GFLOP/s)",
            best * 1e3,
            best * 1e9 / scores,
            4.0 * hd as f64 * scores / best / 1e9
        );
    }
    for len in [64usize, 128, 512, n] {
        for per_call in [1usize, group] {
            let mut best = f64::MAX;
            for _ in 0..7 {
                let t = Instant::now();
                for _ in 0..20 {
                    for g in 0..kv_heads {
                        let kv = HeadView { keys: &keys, values: &values, stride: kv_dim, offset: g * hd };
                        let mut outs = att[g * group * hd..(g + 1) * group * hd].chunks_mut(hd);
                        let mut qs: Vec<Query> = (0..group)
                            .map(|j| {
                                let at = (g * group + j) * hd;
                                Query { q: &q[at..at + hd], prefix: len, extra: &[], out: outs.next().unwrap() }
                            })
                            .collect();
                        for part in qs.chunks_mut(per_call) {
                            attend_group(kv, scale, part, &mut sc);
                        }
                    }
                }
                best = best.min(t.elapsed().as_secs_f64() / 20.0);
            }
            println!(
                "decode at {len} positions, {per_call} query heads per call: {:.2} µs, {:.1} ns per score",
                best * 1e6,
                best * 1e9 / (heads * len) as f64
            );
        }
    }
    let half = |x: &[f32]| x.iter().map(|&v| half::f16::from_f32(v)).collect::<Vec<_>>();
    let (k16, v16) = (half(&keys), half(&values));
    let slots: Vec<u32> = (n as u32 - 8..n as u32).collect();
    for nodes in [1usize, 4, 8] {
        let prefix = n - 8;
        for all in [false, true] {
            let mut best = f64::MAX;
            for _ in 0..7 {
                let t = Instant::now();
                for _ in 0..20 {
                    for g in 0..kv_heads {
                        let kv = HeadView { keys: &k16, values: &v16, stride: kv_dim, offset: g * hd };
                        let mut outs = att.chunks_mut(hd);
                        let mut qs: Vec<Query> = (0..nodes * group)
                            .map(|i| {
                                let (node, j) = (i / group, i % group);
                                let at = (node * heads + g * group + j) * hd;
                                let extra = &slots[..node + 1];
                                Query { q: &q[at..at + hd], prefix, extra, out: outs.next().unwrap() }
                            })
                            .collect();
                        for part in qs.chunks_mut(if all { nodes * group } else { group }) {
                            attend_group(kv, scale, part, &mut sc);
                        }
                    }
                }
                best = best.min(t.elapsed().as_secs_f64() / 20.0);
            }
            println!(
                "f16 tree of {nodes} nodes at {prefix} positions, {}: {:.2} µs, {:.1} ns per score",
                if all { "all nodes per call" } else { "one node per call" },
                best * 1e6,
                best * 1e9 / (heads * nodes * prefix) as f64
            );
        }
    }
}
