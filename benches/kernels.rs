//! Per-kernel throughput: weight bytes streamed per second (GEMV, one token) and integer
//! multiply-adds per second (GEMM, a batch), for the bit-plane kernel at several precisions
//! beside the f32 reference. `cargo bench --bench kernels`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use bitnest::kernels::cpu::Isa;
use bitnest::kernels::{DenseF32, Linear, PlaneLinear};
use bitnest::quant::bitplane::{BitPlanes, QuantConfig};
use bitnest::quant::dtype::ALL;

fn weights(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0).powi(3)).collect()
}

fn planes(rows: usize, cols: usize) -> BitPlanes {
    let mut rng = StdRng::seed_from_u64(1);
    let cfg = QuantConfig::new(128, 8, ALL.to_vec());
    BitPlanes::quantize(&weights(&mut rng, rows * cols), rows, cols, &cfg).unwrap()
}

fn gemv(c: &mut Criterion) {
    // SmolLM2-135M's shapes: the MLP up projection and the tied output head.
    for (rows, cols) in [(1536, 576), (49152, 576)] {
        let bp = planes(rows, cols);
        let lin = PlaneLinear::from_bitplanes(&bp, 8).unwrap();
        let mut rng = StdRng::seed_from_u64(2);
        let x = weights(&mut rng, cols);
        let mut y = vec![0f32; rows];
        let mut g = c.benchmark_group(format!("gemv_{rows}x{cols}"));
        for r in [2, 3, 4, 6, 8] {
            g.throughput(Throughput::Bytes((rows * bitnest::quant::bitplane::row_bytes(cols) * r) as u64));
            for isa in Isa::available().into_iter().skip(1) {
                g.bench_with_input(BenchmarkId::new(format!("planes_{isa:?}"), r), &r, |b, &r| {
                    b.iter(|| lin.forward_with(&x, 1, &mut y, r as u32, isa))
                });
            }
        }
        let mut w = vec![0f32; rows * cols];
        bp.dequantize(8, &mut w).unwrap();
        let dense = DenseF32::new(&w, rows, cols, None);
        g.throughput(Throughput::Bytes((rows * cols * 4) as u64));
        g.bench_function("f32", |b| b.iter(|| dense.forward(&x, 1, &mut y)));
        g.finish();
    }
}

fn gemm(c: &mut Criterion) {
    let (rows, cols, n) = (1536, 576, 64);
    let lin = PlaneLinear::from_bitplanes(&planes(rows, cols), 8).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let x = weights(&mut rng, n * cols);
    let mut y = vec![0f32; n * rows];
    let mut g = c.benchmark_group(format!("gemm_{rows}x{cols}_n{n}"));
    // Multiply-adds per second.
    g.throughput(Throughput::Elements((rows * cols * n) as u64));
    for r in [2, 4, 8] {
        g.bench_with_input(BenchmarkId::new("planes", r), &r, |b, &r| {
            b.iter(|| lin.forward_with(&x, n, &mut y, r as u32, Isa::detect()))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(2));
    targets = gemv, gemm
}
criterion_main!(benches);
