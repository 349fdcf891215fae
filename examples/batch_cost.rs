//! The batch-cost curve: time of one forward pass holding the decode tokens of n sequences
//! (each after its own `DEPTH`-token context, 256 by default), for n = 1..16 (`NS=1,2,4`),
//! the median over `ROUNDS` (5) rounds that each time every n in turn,
//! relative to n = 1. `n ÷ ratio` bounds what continuous batching can give over serving the
//! sequences one pass each: the aggregate decode rate of n clients, as a multiple of one.
//!
//! Then the cost of prompt tokens, which the curve leaves out: one pass of `PREFILL` (256)
//! prompt tokens on an empty cache, per token (median of the rounds), so that a load's prompts
//! can be priced beside its decode passes (`bench/serve-load.py`).
//!
//! `cargo run --release --example batch_cost -- MODEL [THREADS]` (a GGUF is transcoded first,
//! as the CLI does; `REPS=` timed passes per n).

use std::time::Instant;

use bitnest::engine::Engine;
use bitnest::model::{ALL_BITS, Span, SpanKind};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::PathBuf::from(args.get(1).map(String::as_str).unwrap_or("model.gguf"));
    let threads: usize = args.get(2).and_then(|t| t.parse().ok()).unwrap_or(2);
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (depth, reps) = (env("DEPTH", 256), env("REPS", 10));
    let ns: Vec<usize> = std::env::var("NS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or(vec![1, 2, 3, 4, 6, 8, 12, 16]);
    let path = if bitnest::format::bnest::BnestFile::sniff(&path) {
        path
    } else {
        bitnest::transcode::cached_planes(&path, true)?.unwrap_or(path)
    };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    pool.install(|| -> anyhow::Result<()> {
        let engine = Engine::load(&path, None)?;
        let model = &engine.model;
        let most = ns.iter().copied().max().unwrap_or(1);
        let mut sessions = Vec::new();
        for j in 0..most {
            let mut s = model.new_batched_session(depth + 8, 512);
            let ctx: Vec<u32> = (0..depth as u32).map(|i| (i * 7919 + j as u32 * 31) % 20000 + 10).collect();
            model.forward(&mut s, &ctx, 1)?;
            sessions.push(s);
        }
        let mut scratch = model.new_scratch(most);
        let tokens: Vec<u32> = (0..most as u32).map(|i| 100 + i * 13).collect();
        // Rounds over every n, so that a slow spell of a shared host falls on all of them; the
        // median of an n's round means is reported.
        let rounds = env("ROUNDS", 5);
        let mut means = vec![Vec::new(); ns.len()];
        for _ in 0..rounds {
            for (k, &n) in ns.iter().enumerate() {
                let mut sum = 0.0;
                for rep in 0..=reps {
                    let mut spans: Vec<Span> = sessions[..n]
                        .iter_mut()
                        .zip(&tokens)
                        .map(|(s, t)| {
                            s.truncate(depth);
                            Span { session: s, tokens: std::slice::from_ref(t), kind: SpanKind::Run { logits: 1 } }
                        })
                        .collect();
                    let t = Instant::now();
                    model.forward_batch(&mut scratch, &mut spans, ALL_BITS)?;
                    // (The first pass of each n warms up and is not counted.)
                    if rep > 0 {
                        sum += t.elapsed().as_secs_f64();
                    }
                }
                means[k].push(sum / reps.max(1) as f64);
            }
        }
        // Prompt tokens: one pass of `PREFILL` of them on an empty cache, as a prompt's chunk.
        let prefill = env("PREFILL", 256);
        let prompt: Vec<u32> = (0..prefill as u32).map(|i| (i * 7919) % 20000 + 10).collect();
        let mut fresh = model.new_batched_session(prefill + 8, prefill);
        let mut big = model.new_scratch(prefill);
        let mut prefill_times = Vec::new();
        for round in 0..=rounds {
            fresh.truncate(0);
            let mut spans = [Span { session: &mut fresh, tokens: &prompt, kind: SpanKind::Run { logits: 1 } }];
            let t = Instant::now();
            model.forward_batch(&mut big, &mut spans, ALL_BITS)?;
            // (The first pass warms up and is not counted.)
            if round > 0 {
                prefill_times.push(t.elapsed().as_secs_f64());
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let med: Vec<f64> = means.iter_mut().map(median).collect();
        println!(
            "{threads} threads, depth {depth}, median of {rounds} rounds of {reps} passes per n: {}",
            path.display()
        );
        for (k, &n) in ns.iter().enumerate() {
            println!(
                "n={n:3}  pass {:8.2} ms  ×{:5.2} of n={}  bound ×{:5.2} aggregate ({:7.1} tok/s)",
                med[k] * 1e3,
                med[k] / med[0],
                ns[0],
                n as f64 * med[0] / med[k],
                n as f64 / med[k]
            );
        }
        let p = median(&mut prefill_times);
        println!(
            "prefill {prefill} prompt tokens  pass {:8.2} ms  {:.4} ms per token ({:7.1} tok/s)",
            p * 1e3,
            p * 1e3 / prefill as f64,
            prefill as f64 / p
        );
        Ok(())
    })
}
