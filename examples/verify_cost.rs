//! Time of one forward pass over `n` tokens after a 256-token context (`DEPTH=…` for another),
//! for n = 1..64 (`NS=1,2,4`): what a speculative verification pass costs relative to a plain
//! decode step. `TREE=1` runs the tokens as a draft tree (a chain) through `forward_tree`.
//!
//! `cargo run --release --example verify_cost -- MODEL.bnest BITS [THREADS]`

use std::time::Instant;

use bitnest::engine::Engine;
use bitnest::model::BitsPlan;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::PathBuf::from(args.get(1).map(String::as_str).unwrap_or("model.bnest"));
    let bits: Option<u32> = args.get(2).and_then(|b| b.parse().ok());
    let threads: usize = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(2);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
    let engine = Engine::load(&path, bits.map(|b| BitsPlan::uniform(Some(b))))?;
    let model = &engine.model;
    let depth: u32 = std::env::var("DEPTH").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let tree = std::env::var_os("TREE").is_some();
    let mut s = model.new_session(depth as usize + 128, 128);
    let ctx: Vec<u32> = (0..depth).map(|i| (i * 7919) % 40000 + 10).collect();
    model.forward(&mut s, &ctx, 1)?;
    let base = s.pos;
    let mut t1 = 0.0;
    let ns: Vec<usize> = std::env::var("NS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or(vec![1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]);
    for n in ns {
        let toks: Vec<u32> = (0..n as u32).map(|i| 100 + i * 13).collect();
        let reps = std::env::var("REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(12);
        let mut best = f64::MAX;
        let mut sum = 0.0;
        let mut cpu_best = f64::MAX;
        for _ in 0..reps {
            s.truncate(base);
            let c = cpu_seconds();
            let t = Instant::now();
            if tree {
                let parents: Vec<Option<usize>> = (0..n).map(|i| i.checked_sub(1)).collect();
                model.forward_tree(&mut s, &toks, &parents, bitnest::model::ALL_BITS)?;
            } else {
                model.forward(&mut s, &toks, n)?;
            }
            let e = t.elapsed().as_secs_f64();
            cpu_best = cpu_best.min(cpu_seconds() - c);
            best = best.min(e);
            sum += e;
        }
        let mean = sum / reps as f64;
        if n == 1 {
            t1 = mean;
        }
        println!(
            "n={n:3}  mean {:7.2} ms  best {:7.2} ms  ×{:5.2} of n=1  cpu best {:7.2} ms",
            mean * 1e3,
            best * 1e3,
            mean / t1,
            cpu_best * 1e3
        );
    }
    Ok(())
}

/// CPU time of every thread of this process so far (Linux schedstat; 0 elsewhere): unlike wall
/// time, it hardly moves when another process shares the cores.
fn cpu_seconds() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return 0.0 };
    dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum::<f64>()
        * 1e-9
}
