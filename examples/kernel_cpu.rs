//! CPU time (not wall time) per GEMV of the bit-plane kernel, one thread: a measurement that
//! stays meaningful on a loaded machine. `cargo run --release --example kernel_cpu`.

use bitnest::kernels::cpu::Isa;
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
        let cfg = QuantConfig::new(128, 8, dtypes);
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
    // The roofline's other half: how fast one thread and the whole pool read memory.
    {
        let buf: Vec<u64> = (0..(256usize << 20) / 8).map(|i| i as u64).collect();
        for threads in [1usize, 2] {
            let p = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let w0 = std::time::Instant::now();
            let mut total = 0u64;
            for _ in 0..5 {
                total = total.wrapping_add(p.install(|| {
                    use rayon::prelude::*;
                    buf.par_chunks(1 << 20).map(|c| c.iter().fold(0u64, |a, &b| a ^ b)).reduce(|| 0, |a, b| a ^ b)
                }));
            }
            let gbs = 5.0 * (buf.len() * 8) as f64 / w0.elapsed().as_secs_f64() / 1e9;
            println!("memory read, {threads} thread(s): {gbs:6.2} GB/s (checksum {total})");
        }
    }
    // Streaming from memory: a matrix far larger than the caches (random planes, INT groups).
    {
        let (rows, cols, group, m) = (196_608usize, 576usize, 128usize, 8u32);
        let rb = bitnest::quant::bitplane::row_bytes(cols);
        let mut bytes = vec![0u8; rows * rb * m as usize];
        rng.fill(&mut bytes[..]);
        let ranges = (0..m as usize).map(|p| p * rows * rb..(p + 1) * rows * rb).collect();
        let gpr = cols.div_ceil(group);
        let scales = vec![half::f16::from_f32(0.01).to_bits(); rows * gpr];
        let offsets = vec![0u16; rows * gpr];
        let dtypes = vec![0u8; rows * gpr];
        let lin = PlaneLinear::new(
            std::sync::Arc::new(bytes),
            ranges,
            rows,
            cols,
            group,
            &scales,
            &offsets,
            &dtypes,
            None,
            m,
        )
        .unwrap();
        let mut y = vec![0f32; rows];
        for r in [2u32, 4, 8] {
            let iters = 20;
            let (t0, w0) = (cpu_seconds(), std::time::Instant::now());
            pool.install(|| {
                for _ in 0..iters {
                    lin.forward_with(&x, 1, &mut y, r, Isa::detect());
                }
            });
            let dt = (cpu_seconds() - t0) / iters as f64;
            let wall = w0.elapsed().as_secs_f64() / iters as f64;
            let bytes = (rows * rb * r as usize) as f64;
            println!(
                "stream {rows}x{cols} r={r}: {:8.1} ms/call cpu ({:5.1} wall)  {:6.2} GB/s of planes",
                dt * 1e3,
                wall * 1e3,
                bytes / dt / 1e9
            );
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
