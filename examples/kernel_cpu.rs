//! CPU time (not wall time) per GEMV of the bit-plane kernel, one thread: a measurement that
//! stays meaningful on a loaded machine. `cargo run --release --example kernel_cpu`.

use bitnest::kernels::planes::Isa;
use bitnest::kernels::{DenseF32, Linear, PlaneLinear};
use bitnest::quant::bitplane::{BitPlanes, QuantConfig};
use bitnest::quant::dtype::{ALL, GroupDtype};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Process CPU seconds (user + system) from /proc/self/stat.
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

fn main() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let (rows, cols) = (1536, 576);
    let mut rng = StdRng::seed_from_u64(1);
    let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0f32..1.0).powi(3)).collect();
    let x: Vec<f32> = (0..cols * 64).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    for (name, dtypes) in [("int", vec![GroupDtype::Int]), ("int+bitmod", ALL.to_vec())] {
        let cfg = QuantConfig {
            group: 128,
            master_bits: 8,
            dtypes,
            objective: QuantConfig::default_objective(8),
            scale_search: vec![1.0],
        };
        let bp = BitPlanes::quantize(&w, rows, cols, &cfg).unwrap();
        let lin = PlaneLinear::from_bitplanes(&bp, 8).unwrap();
        let mut y = vec![0f32; rows * 64];
        let only_n: Option<usize> = std::env::var("KERNEL_N").ok().and_then(|v| v.parse().ok());
        for n in [1usize, 64] {
            if only_n.is_some_and(|o| o != n) {
                continue;
            }
            for r in [2u32, 3, 4, 6, 8] {
                let iters = if n == 1 { 4000 } else { 100 };
                let t0 = cpu_seconds();
                pool.install(|| {
                    for _ in 0..iters {
                        lin.forward_with(&x, n, &mut y, r, Isa::detect());
                    }
                });
                let dt = (cpu_seconds() - t0) / iters as f64;
                let bytes = (rows * cols * r as usize) as f64 / 8.0;
                println!(
                    "{name:10} n={n:2} r={r}: {:8.1} µs/call  {:6.2} GB/s of planes  {:6.1} G MAC/s",
                    dt * 1e6,
                    bytes / dt / 1e9,
                    (rows * cols * n) as f64 / dt / 1e9
                );
            }
        }
    }
    let dense = DenseF32::new(&w, rows, cols, None);
    let mut y = vec![0f32; rows];
    let t0 = cpu_seconds();
    pool.install(|| {
        for _ in 0..1000 {
            dense.forward(&x, 1, &mut y);
        }
    });
    let dt = (cpu_seconds() - t0) / 1000.0;
    println!("f32 dense n=1: {:8.1} µs/call  {:6.2} GB/s", dt * 1e6, (rows * cols * 4) as f64 / dt / 1e9);
}
