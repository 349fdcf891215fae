//! Prefill matmul throughput: every linear layer of the first `BLOCKS` blocks timed over a
//! batch of `N` tokens (best of `ROUNDS`), grouped by kind and weight format, in GMAC/s. What
//! `bench -p 512` spends most of its time in, without attention or the rest of the pass.
//!
//! `N=128 BLOCKS=4 cargo run --release --example prefill_cost -- MODEL.bnest [BITS] [THREADS]`

use std::time::Instant;

use bitnest::engine::Engine;
use bitnest::kernels::Linear;
use bitnest::model::BitsPlan;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::PathBuf::from(args.get(1).map(String::as_str).unwrap_or("model.bnest"));
    let bits: Option<u32> = args.get(2).and_then(|b| b.parse().ok());
    let threads: usize = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(1);
    let (n, blocks, rounds) = (env("N", 128), env("BLOCKS", 4), env("ROUNDS", 3));
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
    let engine = Engine::load(&path, bits.map(|b| BitsPlan::uniform(Some(b))))?;
    let m = &engine.model;
    let mut total = (0.0, 0.0);
    for b in m.blocks.iter().take(blocks) {
        let layers: [(&str, &dyn Linear); 7] = [
            ("q", &*b.wq),
            ("k", &*b.wk),
            ("v", &*b.wv),
            ("o", &*b.wo),
            ("gate", &*b.ffn.dense().expect("a dense model").gate),
            ("up", &*b.ffn.dense().expect("a dense model").up),
            ("down", &*b.ffn.dense().expect("a dense model").down),
        ];
        for (name, l) in layers {
            let x: Vec<f32> = (0..n * l.in_dim()).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
            let mut y = vec![0f32; n * l.out_dim()];
            let mut best = f64::MAX;
            for _ in 0..rounds {
                let t = Instant::now();
                l.forward(&x, n, &mut y);
                best = best.min(t.elapsed().as_secs_f64());
            }
            let macs = (l.in_dim() * l.out_dim() * n) as f64;
            total.0 += macs;
            total.1 += best;
            println!(
                "{name:5} {:>24} {:5}x{:5} n={n}: {:8.2} ms  {:6.1} GMAC/s",
                l.format_name(),
                l.out_dim(),
                l.in_dim(),
                best * 1e3,
                macs / best / 1e9
            );
        }
    }
    println!("total {:.1} ms, {:.1} GMAC/s", total.1 * 1e3, total.0 / total.1 / 1e9);
    Ok(())
}
