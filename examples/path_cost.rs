//! Every kernel path this CPU has, timed on the real layers of a `.bnest` model in cache, one
//! thread, paths alternated round by round and the best round kept: on a shared host that is
//! the number that compares paths, where a mean mostly measures the neighbours.
//!
//! `cargo run --release --example path_cost -- MODEL.bnest [TOKENS]`

use std::time::Instant;

use bitnest::engine::Engine;
use bitnest::kernels::Linear;
use bitnest::kernels::cpu::Isa;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::PathBuf::from(args.get(1).map(String::as_str).unwrap_or("model.bnest"));
    let n: usize = args.get(2).and_then(|t| t.parse().ok()).unwrap_or(1);
    rayon::ThreadPoolBuilder::new().num_threads(1).build_global()?;
    let engine = Engine::load(&path, None)?;
    let b = &engine.model.blocks[0];
    // The scalar reference is a hundred times slower and not a decode path.
    let paths: Vec<Isa> = Isa::available().into_iter().filter(|&p| p != Isa::Scalar).collect();
    let mlp = b.ffn.dense().expect("a dense model");
    for (name, layer) in [("q 576x576", &b.wq), ("gate 1536x576", &mlp.gate), ("down 576x1536", &mlp.down)] {
        let lin = layer.as_planes().expect("a bit-plane model");
        let x: Vec<f32> = (0..n * lin.in_dim()).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let mut y = vec![0f32; n * lin.out_dim()];
        for r in [2u32, 3, 4, 8] {
            let mut best = vec![f64::MAX; paths.len()];
            for _round in 0..15 {
                for (k, &isa) in paths.iter().enumerate() {
                    let reps = 50;
                    let t = Instant::now();
                    for _ in 0..reps {
                        lin.forward_with(&x, n, &mut y, r, isa);
                    }
                    best[k] = best[k].min(t.elapsed().as_secs_f64() / reps as f64 * 1e6);
                }
            }
            let row: Vec<String> = paths.iter().zip(&best).map(|(p, b)| format!("{p:?} {b:7.1} µs")).collect();
            println!("{name:14} r{r}  n{n}  {}", row.join("  "));
        }
    }
    Ok(())
}
