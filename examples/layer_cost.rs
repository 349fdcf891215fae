//! Where a decode step's matmul time goes: every linear layer of the model timed alone at one
//! token, in cache (the same layer repeated) and streaming (all layers in turn, as decoding
//! does), by kind. The gap between the two is what waiting on memory costs.
//!
//! `cargo run --release --example layer_cost -- MODEL.bnest BITS [THREADS]`  (one thread unless given)

use std::time::Instant;

use bitnest::engine::Engine;
use bitnest::kernels::Linear;
use bitnest::model::BitsPlan;

/// A layer kind: its name and how to find it in a block.
type Kind = (&'static str, fn(&bitnest::model::llama::Block) -> &dyn Linear);

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::PathBuf::from(args.get(1).map(String::as_str).unwrap_or("model.bnest"));
    let bits: Option<u32> = args.get(2).and_then(|b| b.parse().ok());
    let threads: usize = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(1);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
    let engine = Engine::load(&path, bits.map(|b| BitsPlan::uniform(Some(b))))?;
    let m = &engine.model;
    let kinds: [Kind; 7] = [
        ("q", |b| &*b.wq),
        ("k", |b| &*b.wk),
        ("v", |b| &*b.wv),
        ("o", |b| &*b.wo),
        ("gate", |b| &*b.ffn.dense().expect("a dense model").gate),
        ("up", |b| &*b.ffn.dense().expect("a dense model").up),
        ("down", |b| &*b.ffn.dense().expect("a dense model").down),
    ];
    let (reps, rounds) = (5, 8);
    let mut tot_cache = 0.0;
    let mut tot_stream = 0.0;
    let mut run = |name: &str, layers: Vec<&dyn Linear>| {
        let x: Vec<f32> = (0..layers[0].in_dim()).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let mut y = vec![0f32; layers[0].out_dim()];
        // The fastest of several rounds: on a shared host the mean mostly measures neighbours.
        let (mut stream, mut cache) = (f64::MAX, f64::MAX);
        for _ in 0..rounds {
            let t = Instant::now();
            for _ in 0..reps {
                for l in &layers {
                    l.forward(&x, 1, &mut y);
                }
            }
            stream = stream.min(t.elapsed().as_secs_f64() / reps as f64);
            let t = Instant::now();
            for l in &layers {
                for _ in 0..reps {
                    l.forward(&x, 1, &mut y);
                }
            }
            cache = cache.min(t.elapsed().as_secs_f64() / reps as f64);
        }
        let macs = (layers[0].in_dim() * layers[0].out_dim() * layers.len()) as f64;
        println!(
            "{name:5} ×{:2}  stream {:6.3} ms ({:5.1} GMAC/s)  in cache {:6.3} ms ({:5.1} GMAC/s)",
            layers.len(),
            stream * 1e3,
            macs / stream / 1e9,
            cache * 1e3,
            macs / cache / 1e9
        );
        tot_stream += stream;
        tot_cache += cache;
    };
    for (name, f) in kinds {
        run(name, m.blocks.iter().map(f).collect());
    }
    run("head", vec![&*m.head]);
    println!("total stream {:.2} ms, in cache {:.2} ms", tot_stream * 1e3, tot_cache * 1e3);
    Ok(())
}
