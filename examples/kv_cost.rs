//! Decode speed with several KV cache types, alternated in one process (on a shared host only
//! paired rounds compare): `N` greedy tokens after `DEPTH` prompt tokens, per round. `KV` lists
//! the types, `K/V` for keys and values apart (default `f32,f16`).
//!
//! `KV=f16,q8_0,q4h,f16/q4_0 cargo run --release --example kv_cost -- MODEL.bnest BITS [DEPTH] [N] [ROUNDS]`  (2 threads)

use std::time::Instant;

use bitnest::engine::Engine;
use bitnest::model::BitsPlan;
use bitnest::model::llama::{KvType, KvTypes};
use bitnest::sampling::argmax;
use clap::ValueEnum;

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let path = std::path::PathBuf::from(a.get(1).map(String::as_str).unwrap_or("model.bnest"));
    let num = |i: usize, d: usize| a.get(i).and_then(|v| v.parse().ok()).unwrap_or(d);
    let (bits, depth, n, rounds) = (num(2, 4) as u32, num(3, 0), num(4, 128), num(5, 15));
    rayon::ThreadPoolBuilder::new().num_threads(2).build_global()?;
    let mut e = Engine::load(&path, Some(BitsPlan::uniform(Some(bits))))?;
    let parse = |s: &str| KvType::from_str(s, true).map_err(|e| anyhow::anyhow!("cache type {s}: {e}"));
    let mut kinds = Vec::new();
    for t in std::env::var("KV").unwrap_or_else(|_| "f32,f16".into()).split(',') {
        let (k, v) = t.split_once('/').unwrap_or((t, t));
        kinds.push(KvTypes { k: parse(k)?, v: parse(v)? });
    }
    let mut sessions = Vec::new();
    for &k in &kinds {
        e.model.kv_type = k;
        sessions.push(e.model.new_session(depth + n + 1, 512));
    }
    let prompt: Vec<u32> = (0..depth as u32).map(|i| 100 + i * 7 % 20000).collect();
    let mut rates = vec![Vec::new(); kinds.len()];
    for _ in 0..rounds {
        for (k, s) in sessions.iter_mut().enumerate() {
            s.reset();
            if depth > 0 {
                e.model.forward(s, &prompt, 1)?;
            }
            let t = Instant::now();
            let mut tok = 1u32;
            for _ in 0..n {
                tok = argmax(e.model.forward(s, &[tok], 1)?);
            }
            rates[k].push(n as f64 / t.elapsed().as_secs_f64());
        }
    }
    // Every type against the first, paired by round.
    for k in 1..kinds.len() {
        let mut ratio: Vec<f64> = rates[k].iter().zip(&rates[0]).map(|(a, b)| a / b).collect();
        ratio.sort_by(|a, b| a.total_cmp(b));
        let q = |f: f64| ratio[((ratio.len() - 1) as f64 * f) as usize];
        println!(
            "{} / {}, paired by round: median {:.3} (quartiles {:.3}–{:.3})",
            kinds[k].name(),
            kinds[0].name(),
            q(0.5),
            q(0.25),
            q(0.75)
        );
    }
    for (k, r) in kinds.iter().zip(&mut rates) {
        r.sort_by(|a, b| b.total_cmp(a));
        println!("{}: best {:.1} median {:.1} tok/s", k.name(), r[0], r[r.len() / 2]);
    }
    Ok(())
}
