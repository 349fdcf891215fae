//! Single-thread time of one bit-plane matmul over `n` tokens (best of many), per shape.
//! `cargo run --release --example gemm_cost -- [BITS]`, env NS=1,8,16.

use std::time::Instant;

use bitnest::kernels::PlaneLinear;
use bitnest::kernels::cpu::Isa;
use bitnest::quant::bitplane::{BitPlanes, QuantConfig};
use bitnest::quant::dtype::ALL;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn main() -> anyhow::Result<()> {
    rayon::ThreadPoolBuilder::new().num_threads(1).build_global()?;
    let r: u32 = std::env::args().nth(1).and_then(|b| b.parse().ok()).unwrap_or(4);
    let ns: Vec<usize> = std::env::var("NS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or(vec![1, 8, 16]);
    let mut rng = StdRng::seed_from_u64(1);
    for (rows, cols) in [(1536, 576), (576, 1536)] {
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0f32..1.0).powi(3)).collect();
        let bp = BitPlanes::quantize(&w, rows, cols, &QuantConfig::new(128, 8, ALL.to_vec()))?;
        let lin = PlaneLinear::from_bitplanes(&bp, 8)?;
        for &n in &ns {
            let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let mut y = vec![0f32; n * rows];
            let mut best = f64::MAX;
            for _ in 0..50 {
                let t = Instant::now();
                lin.forward_with(&x, n, &mut y, r, Isa::detect());
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!("{rows}x{cols} r{r} n={n:3}: {:8.1} us  ({:6.1} us/token)", best * 1e6, best * 1e6 / n as f64);
        }
    }
    Ok(())
}
