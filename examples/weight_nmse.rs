//! Weight-space NMSE of each quantization method on synthetic heavy-tailed matrices
//! (Student-t, ν = 5), so method quality shows independently of any model's origin.
//! Prints a markdown table; `bench/quality.sh` puts it in docs/QUALITY.md.
//!
//! `cargo run --release --example weight_nmse`

use bitnest::quant::dtype::ALL;
use bitnest::quant::{BitPlanes, GroupDtype, QuantConfig};
use rand::{Rng, SeedableRng, rngs::StdRng};

fn student_t(rng: &mut StdRng, nu: usize) -> f32 {
    let mut normal = || {
        let (u1, u2): (f64, f64) = (rng.random_range(f64::EPSILON..1.0), rng.random());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    };
    let z = normal();
    let v: f64 = (0..nu).map(|_| normal().powi(2)).sum();
    (z / (v / nu as f64).sqrt()) as f32
}

fn nmse(w: &[f32], bp: &BitPlanes, r: u32) -> f64 {
    let mut out = vec![0f32; w.len()];
    bp.dequantize(r, &mut out).unwrap();
    let err: f64 = w.iter().zip(&out).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    err / w.iter().map(|a| (*a as f64).powi(2)).sum::<f64>()
}

fn main() {
    let (rows, cols) = (256, 4096);
    let mut rng = StdRng::seed_from_u64(2025);
    let w: Vec<f32> = (0..rows * cols).map(|_| student_t(&mut rng, 5)).collect();
    let bitmod =
        |m: u32| -> Vec<GroupDtype> { ALL.iter().copied().filter(|d| !d.is_int() && d.native_bits() <= m).collect() };
    let both = |m: u32| -> Vec<GroupDtype> { ALL.iter().copied().filter(|d| d.native_bits() <= m).collect() };
    let cfg = |m: u32, dtypes: Vec<GroupDtype>, objective: Vec<(u32, f32)>, scales: Vec<f32>| QuantConfig {
        group: 128,
        master_bits: m,
        dtypes,
        objective,
        scale_search: scales,
        sub_group: 0,
        sub_bits: 0,
    };
    let master =
        BitPlanes::quantize(&w, rows, cols, &cfg(8, both(8), QuantConfig::default_objective(8), vec![1.0, 0.9]))
            .unwrap();
    println!("| r | (a) INT-asym RTN | (b) BitMoD | (c) nested view of 8-bit master | (d) direct r-bit (INT+BitMoD) |");
    println!("|---|---|---|---|---|");
    for r in [8u32, 6, 5, 4, 3, 2] {
        let a = BitPlanes::quantize(&w, rows, cols, &cfg(r, vec![GroupDtype::Int], vec![(r, 1.0)], vec![1.0])).unwrap();
        let b = if bitmod(r).is_empty() {
            "n/a".to_string()
        } else {
            let bp = BitPlanes::quantize(&w, rows, cols, &cfg(r, bitmod(r), vec![(r, 1.0)], vec![1.0])).unwrap();
            format!("{:.5}", nmse(&w, &bp, r))
        };
        let d = BitPlanes::quantize(&w, rows, cols, &cfg(r, both(r), vec![(r, 1.0)], vec![1.0, 0.9])).unwrap();
        println!("| {r} | {:.5} | {b} | {:.5} | {:.5} |", nmse(&w, &a, r), nmse(&w, &master, r), nmse(&w, &d, r));
    }

    // The objective's trade-off: how much 8-bit fidelity each weighting of the low views costs.
    println!();
    println!("Objective trade-off for an 8-bit master (INT+BitMoD, scale search {{1, 0.9}}): NMSE of each view.");
    println!();
    println!("| objective | r = 8 | r = 6 | r = 4 | r = 3 | r = 2 |");
    println!("|---|---|---|---|---|---|");
    let objectives: [&[(u32, f32)]; 5] = [
        &[(8, 1.0)],
        &[(8, 1.0), (4, 0.01), (3, 0.0025), (2, 0.000625)],
        &[(8, 1.0), (4, 0.1), (3, 0.025), (2, 0.00625)],
        &[(8, 1.0), (4, 1.0), (3, 0.25), (2, 0.0625)],
        &[(8, 1.0), (4, 1.0), (3, 1.0), (2, 1.0)],
    ];
    for obj in objectives {
        let bp = BitPlanes::quantize(&w, rows, cols, &cfg(8, both(8), obj.to_vec(), vec![1.0, 0.9])).unwrap();
        let name: Vec<String> = obj.iter().map(|(r, l)| format!("{r}:{l}")).collect();
        let cells: Vec<String> = [8, 6, 4, 3, 2].iter().map(|&r| format!("{:.5}", nmse(&w, &bp, r))).collect();
        println!("| `{}` | {} |", name.join(","), cells.join(" | "));
    }
}
