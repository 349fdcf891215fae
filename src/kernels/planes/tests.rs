use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::quant::bitplane::QuantConfig;
// The datatypes bitnest's quantizer chooses among (the kernel's `ALL` is every datatype).
use crate::quant::dtype::ALL;

fn heavy(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u: f32 = rng.random_range(-1.0..1.0);
            u * u * u * 2.0
        })
        .collect()
}

fn layer(rng: &mut StdRng, rows: usize, cols: usize, group: usize, m: u32, dtypes: &[GroupDtype]) -> BitPlanes {
    two_level(rng, rows, cols, group, m, dtypes, None)
}

/// A layer with sub-block scales `(size, bits)` when given.
fn two_level(
    rng: &mut StdRng,
    rows: usize,
    cols: usize,
    group: usize,
    m: u32,
    dtypes: &[GroupDtype],
    sub: Option<(usize, u32)>,
) -> BitPlanes {
    let w = heavy(rng, rows * cols);
    let mut cfg = QuantConfig::new(group, m, dtypes.to_vec());
    if let Some((size, bits)) = sub {
        (cfg.sub_group, cfg.sub_bits) = (size, bits);
    }
    let bp = BitPlanes::quantize(&w, rows, cols, &cfg).unwrap();
    assert_eq!(bp.sub.is_some(), sub.is_some());
    bp
}

#[test]
fn levels_are_exact_where_promised() {
    for d in ALL {
        for m in d.native_bits()..=MAX_BITS {
            for r in 1..=m {
                let lv = Levels::get(d, m, r);
                let view = d.grid(m).view(r);
                let step = view.windows(2).fold(f32::INFINITY, |a, w| a.min(w[1] - w[0]));
                for (c, &v) in view.iter().enumerate() {
                    let back = lv.mu * (lv.table[c] as f32 - lv.z);
                    if lv.exact {
                        assert!((back - v).abs() <= 1e-6 * v.abs().max(1.0), "{d:?} m{m} r{r} code {c}");
                    } else {
                        assert!((back - v).abs() <= lv.mu * 0.5 + 1e-5, "{d:?} m{m} r{r} code {c}");
                    }
                }
                // Uniform grids always fit, and so does any view at or below native width.
                if d.is_int() || r <= d.native_bits() {
                    assert!(lv.exact, "{d:?} m{m} r{r} should be exact (step {step})");
                }
                if d.is_int() {
                    assert!(lv.identity);
                }
            }
        }
    }
}

/// The kernel computes `Σ level·q` exactly; check it against f64 over the exact levels.
#[test]
fn matches_dequantized_reference_where_levels_are_exact() {
    let mut rng = StdRng::seed_from_u64(7);
    for &(rows, cols, group, sub) in &[
        (8, 128, 64, None),
        (13, 200, 128, None),
        (4, 576, 128, None),
        (16, 576, 576, Some((32, 6))),
        (13, 224, 192, Some((32, 5))),
    ] {
        let dts = [GroupDtype::Int, GroupDtype::Fp4ErPos, GroupDtype::Fp4EaNeg];
        let bp = two_level(&mut rng, rows, cols, group, 4, &dts, sub);
        let lin = PlaneLinear::from_bitplanes(&bp, 4).unwrap();
        for r in 1..=4 {
            let n = 3;
            let x = heavy(&mut rng, n * cols);
            let mut y = vec![0f32; n * rows];
            lin.forward_with(&x, n, &mut y, r, Isa::Scalar);
            let mut w = vec![0f32; rows * cols];
            bp.dequantize(r, &mut w).unwrap();
            for t in 0..n {
                for o in 0..rows {
                    let exact: f64 = (0..cols).map(|k| w[o * cols + k] as f64 * x[t * cols + k] as f64).sum::<f64>();
                    let mag: f64 =
                        (0..cols).map(|k| (w[o * cols + k] as f64 * x[t * cols + k] as f64).abs()).sum::<f64>();
                    // Activations are off by at most half a step: of 16383 per group for
                    // one-level layers, of 127 per block of 32 for two-level ones.
                    let xt = &x[t * cols..(t + 1) * cols];
                    let act = if sub.is_some() {
                        (0..cols)
                            .map(|k| {
                                let block = &xt[k / 32 * 32..(k / 32 * 32 + 32).min(cols)];
                                let amax = block.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                                (w[o * cols + k] as f64).abs() * amax / 127.0 / 2.0
                            })
                            .sum::<f64>()
                    } else {
                        0.0
                    };
                    let err = (y[t * rows + o] as f64 - exact).abs();
                    assert!(
                        err <= 1.01 * act + 1e-4 * mag + 1e-5,
                        "r{r} {rows}x{cols} t{t} o{o}: {} vs {exact}",
                        y[t * rows + o]
                    );
                }
            }
        }
    }
}

#[test]
fn every_path_equals_the_scalar_reference_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(11);
    let all = ALL.to_vec();
    for &(rows, cols, group, m, sub) in &[
        // Full 16-row tiles (SIMD paths) and ragged tails (the scalar path).
        (16, 64, 64, 8, None),
        (48, 576, 128, 8, None),
        (41, 1000, 192, 6, None),
        (36, 1536, 256, 5, None),
        (32, 130, 64, 4, None),
        (16, 128, 128, 3, None),
        // Two-level layers, an empty sub-block slot past the row's end included.
        (32, 576, 576, 8, Some((32, 6))),
        (17, 224, 192, 4, Some((32, 5))),
        (16, 1536, 576, 6, Some((32, 6))),
    ] {
        let dts: Vec<GroupDtype> = all.iter().copied().filter(|d| d.native_bits() <= m).collect();
        let bp = two_level(&mut rng, rows, cols, group, m, &dts, sub);
        let lin = PlaneLinear::from_bitplanes(&bp, m).unwrap();
        for r in 1..=m {
            for n in [1, 2, 3, 4, 5, 7, 21] {
                let x = heavy(&mut rng, n * cols);
                let mut want = vec![0f32; n * rows];
                lin.forward_with(&x, n, &mut want, r, Isa::Scalar);
                for isa in Isa::available() {
                    let mut got = vec![1f32; n * rows];
                    lin.forward_with(&x, n, &mut got, r, isa);
                    let same = want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{isa:?} differs: {rows}x{cols} g{group} m{m} r{r} n{n}");
                }
            }
        }
    }
}

#[test]
fn batch_invariant_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(3);
    let (rows, cols) = (36, 576);
    for (group, sub) in [(128, None), (576, Some((32, 6)))] {
        let bp = two_level(&mut rng, rows, cols, group, 8, &ALL, sub);
        let lin = PlaneLinear::from_bitplanes(&bp, 8).unwrap();
        // 150 tokens run as chunks of 128 and 22 (`token_chunk`).
        for (n, r) in [(9, 2), (9, 4), (9, 8), (150, 4)] {
            let x = heavy(&mut rng, n * cols);
            let mut batch = vec![0f32; n * rows];
            lin.forward_with(&x, n, &mut batch, r, Isa::detect());
            for t in 0..n {
                let mut one = vec![0f32; rows];
                lin.forward_with(&x[t * cols..(t + 1) * cols], 1, &mut one, r, Isa::detect());
                assert!(one.iter().zip(&batch[t * rows..]).all(|(a, b)| a.to_bits() == b.to_bits()), "r{r} token {t}");
            }
        }
    }
}

#[test]
fn shared_input_layers_equal_separate_forwards() {
    let mut rng = StdRng::seed_from_u64(21);
    let cols = 320;
    let shapes = [(48, 8), (16, 6), (37, 8)];
    let lins: Vec<PlaneLinear> = shapes
        .iter()
        .map(|&(rows, m)| {
            let dts: Vec<GroupDtype> = ALL.iter().copied().filter(|d| d.native_bits() <= m).collect();
            PlaneLinear::from_bitplanes(&layer(&mut rng, rows, cols, 64, m, &dts), m).unwrap()
        })
        .collect();
    for n in [1, 2, 5, 9] {
        let x = heavy(&mut rng, n * cols);
        for isa in Isa::available() {
            let bits = [3, 6, 8];
            let mut want: Vec<Vec<f32>> = Vec::new();
            for (l, &r) in lins.iter().zip(&bits) {
                let mut y = vec![0f32; n * l.rows];
                l.forward_with(&x, n, &mut y, r, isa);
                want.push(y);
            }
            let mut got: Vec<Vec<f32>> = lins.iter().map(|l| vec![7f32; n * l.rows]).collect();
            let mut ys: Vec<&mut [f32]> = got.iter_mut().map(|v| v.as_mut_slice()).collect();
            let ls: Vec<&PlaneLinear> = lins.iter().collect();
            PlaneLinear::forward_shared(&ls, &x, n, &mut ys, &bits, isa);
            for (g, w) in got.iter().zip(&want) {
                assert!(g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits()), "{isa:?} n{n}");
            }
        }
    }
}

#[test]
fn row_decodes_like_bitplanes() {
    let mut rng = StdRng::seed_from_u64(5);
    // The two-level layer has two full tiles, which a GFNI machine reads from the
    // tile-interleaved copy, and a ragged tail read from the row-major planes.
    for bp in
        [layer(&mut rng, 10, 320, 64, 6, &ALL[..5]), two_level(&mut rng, 40, 320, 64, 6, &ALL[..5], Some((32, 4)))]
    {
        let lin = PlaneLinear::from_bitplanes(&bp, 6).unwrap();
        for r in 1..=6 {
            let mut w = vec![0f32; bp.rows * 320];
            bp.dequantize(r, &mut w).unwrap();
            for i in 0..bp.rows {
                let mut row = vec![0f32; 320];
                lin.row_at(i, &mut row, r);
                assert_eq!(row, &w[i * 320..(i + 1) * 320]);
            }
        }
    }
}

#[test]
fn odd_group_sizes_are_refused() {
    assert!(unsupported(32, None).is_some());
    assert!(unsupported(512, None).is_some());
    assert!(unsupported(128, None).is_none());
    assert!(unsupported(576, Some((32, 6))).is_none());
    assert!(unsupported(576, Some((64, 6))).is_some());
    assert!(unsupported(576, Some((32, 8))).is_none());
    assert!(unsupported(576, Some((32, 9))).is_some());
    assert!(unsupported(4096, Some((32, 6))).is_some());
    assert!(unsupported(576, Some((32, 16))).is_none(), "f16 pairs");
    assert!(unsupported(256, Some((16, 8))).is_none(), "sub-blocks of 16");
}

#[test]
fn activation_quantization_is_the_same_on_every_path() {
    let mut rng = StdRng::seed_from_u64(13);
    for &(n, cols, group) in &[(1, 64, 64), (3, 300, 128), (2, 576, 128), (5, 1000, 192), (1, 1536, 256), (2, 70, 64)] {
        let mut x = heavy(&mut rng, n * cols);
        // A group of zeros, exact halves, and large values.
        x[..group.min(cols)].fill(0.0);
        if cols > group + 3 {
            x[group] = 1.0;
            x[group + 1] = 0.5 / QMAX;
            x[group + 2] = -1e30;
        }
        let mut want = QuantActs::default();
        want.quantize_with(&x, n, cols, group, Isa::Scalar);
        for isa in Isa::available() {
            let mut got = QuantActs::default();
            got.quantize_with(&x, n, cols, group, isa);
            let p = n * want.padded;
            let g = n * want.groups;
            assert_eq!((got.padded, got.groups), (want.padded, want.groups));
            assert_eq!(got.hi[..p], want.hi[..p], "{isa:?} n{n} cols{cols}");
            assert_eq!(got.lo[..p], want.lo[..p], "{isa:?} n{n} cols{cols}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.d[..g]), bits(&want.d[..g]));
            assert_eq!(bits(&got.dsum[..g]), bits(&want.dsum[..g]));
        }
    }
}

#[test]
fn block_quantization_is_the_same_on_every_path() {
    let mut rng = StdRng::seed_from_u64(19);
    for &(n, cols) in &[(1, 64), (3, 300), (2, 576), (4, 1536), (2, 70)] {
        let mut x = heavy(&mut rng, n * cols);
        // A block of zeros, exact halves of a step, and a huge value.
        x[..32].fill(0.0);
        x[40] = 1.0;
        x[41] = 0.5 / Q8MAX;
        x[cols - 1] = -1e30;
        let mut want = QuantActs::default();
        want.quantize_blocks_with(&x, n, cols, Isa::Scalar);
        for isa in Isa::available() {
            let mut got = QuantActs::default();
            got.quantize_blocks_with(&x, n, cols, isa);
            let (p, b) = (n * want.padded, n * want.padded / SUB);
            assert_eq!(got.q8[..p], want.q8[..p], "{isa:?} n{n} cols{cols}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.e[..b]), bits(&want.e[..b]));
            assert_eq!(bits(&got.eq[..b]), bits(&want.eq[..b]));
        }
    }
}

#[test]
fn block_quantization_round_trips_within_half_a_step() {
    let mut rng = StdRng::seed_from_u64(17);
    let (n, cols) = (3, 200);
    let mut x = heavy(&mut rng, n * cols);
    x[32..64].fill(0.0);
    let mut a = QuantActs::default();
    a.quantize_blocks(&x, n, cols);
    let blocks = a.padded / SUB;
    assert_eq!(blocks, 8, "200 columns pad to 256");
    for t in 0..n {
        for b in 0..blocks {
            let e = a.e[t * blocks + b];
            let qs: Vec<i32> = (0..SUB).map(|j| a.q8[t * a.padded + b * SUB + j] as i32).collect();
            assert!(qs.iter().all(|q| q.abs() <= 127));
            assert_eq!(a.eq[t * blocks + b].to_bits(), (e * qs.iter().sum::<i32>() as f32).to_bits());
            for (j, q) in qs.iter().enumerate() {
                let c = b * SUB + j;
                let want = if c < cols { x[t * cols + c] } else { 0.0 };
                assert!((*q as f32 * e - want).abs() <= 0.5 * e * 1.0001 + 1e-7, "t{t} col {c}");
            }
            if (t == 0 && b == 1) || b * SUB >= cols {
                assert_eq!(e, 0.0, "an all-zero or padding block has step 0");
            }
        }
    }
}

#[test]
fn activation_quantization_round_trips_within_half_a_step() {
    let mut rng = StdRng::seed_from_u64(9);
    let (n, cols, group) = (3, 300, 128);
    let x = heavy(&mut rng, n * cols);
    let mut a = QuantActs::default();
    a.quantize(&x, n, cols, group);
    for t in 0..n {
        for c in 0..cols {
            let d = a.d[t * a.groups + c / group];
            let at = t * a.padded + c;
            assert!(a.lo[at] >= 0);
            let back = (a.hi[at] as i32 * 128 + a.lo[at] as i32) as f32 * d;
            assert!((back - x[t * cols + c]).abs() <= 0.5 * d + 1e-7);
        }
        assert!(a.hi[t * a.padded + cols..(t + 1) * a.padded].iter().all(|&q| q == 0));
        assert!(a.lo[t * a.padded + cols..(t + 1) * a.padded].iter().all(|&q| q == 0));
    }
    let _ = rng.random::<u8>();
}

/// A layer as GGUF tensors transcode into (`crate::transcode`): random codes of one integer
/// datatype, random group scale and offset, and sub-blocks of `size` of the given kind.
#[allow(clippy::too_many_arguments)]
fn ggml_layer(
    rng: &mut StdRng,
    rows: usize,
    cols: usize,
    group: usize,
    m: u32,
    dtype: GroupDtype,
    size: usize,
    kind: SubKind,
) -> BitPlanes {
    let rb = row_bytes(cols);
    let mut planes = vec![vec![0u8; rows * rb]; m as usize];
    for r in 0..rows {
        for c in 0..cols {
            let q: u32 = rng.random_range(0..1u32 << m);
            for (p, plane) in planes.iter_mut().enumerate() {
                if (q >> (m - 1 - p as u32)) & 1 == 1 {
                    plane[r * rb + c / 8] |= 1 << (c % 8);
                }
            }
        }
    }
    let groups = rows * cols.div_ceil(group);
    let h = |v: f32| f16::from_f32(v).to_bits();
    let half = kind == SubKind::Half;
    let scales = (0..groups).map(|_| if half { h(1.0) } else { h(rng.random_range(0.001..0.01)) }).collect();
    let offsets = (0..groups).map(|_| if half { h(1.0) } else { h(rng.random_range(0.0..0.02)) }).collect();
    let n = rows * cols.div_ceil(size);
    let sub = match kind {
        SubKind::Half => SubScales {
            size,
            bits: 16,
            kind,
            scale: Vec::new(),
            offset: Vec::new(),
            half_scale: (0..n).map(|_| h(rng.random_range(0.001..0.05))).collect(),
            half_offset: (0..n).map(|_| h(rng.random_range(-0.1..0.1))).collect(),
        },
        SubKind::Signed => SubScales::ints(
            size,
            8,
            kind,
            (0..n).map(|_| rng.random_range(-128i32..128) as i8 as u8).collect(),
            (0..n).map(|_| rng.random_range(-63i32..=0) as i8).collect(),
        ),
        SubKind::Unsigned => SubScales::ints(
            size,
            8,
            kind,
            (0..n).map(|_| rng.random_range(0..64u32) as u8).collect(),
            (0..n).map(|_| rng.random_range(-63i32..=0) as i8).collect(),
        ),
    };
    BitPlanes {
        rows,
        cols,
        group,
        master_bits: m,
        planes,
        scales,
        offsets,
        dtypes: vec![dtype.id(); groups],
        sub: Some(sub),
    }
}

/// The layouts GGUF tensors become: integer levels, signed sub-block scales of 16 (`Q6_K`,
/// `Q3_K`, `Q2_K`) or 32 (`IQ4_XS`), unsigned ones (`Q4_K`, `Q5_K`) and f16 pairs per 32
/// (`Q4_0` … `Q8_0`, `IQ4_NL`): every path gives the scalar reference's bits, the rows decode
/// like the format's reference, and the product stays near the exact one.
#[test]
fn transcoded_layouts_on_every_path() {
    let mut rng = StdRng::seed_from_u64(77);
    let cases = [
        (32, 512, 256, 6, GroupDtype::Sint, 16, SubKind::Signed),
        (48, 768, 256, 3, GroupDtype::Sint, 16, SubKind::Signed),
        (16, 256, 256, 2, GroupDtype::Uint, 16, SubKind::Unsigned),
        (32, 512, 256, 4, GroupDtype::Uint, 32, SubKind::Unsigned),
        (20, 512, 256, 5, GroupDtype::Uint, 32, SubKind::Unsigned),
        (32, 256, 256, 4, GroupDtype::Iq4, 32, SubKind::Signed),
        (32, 576, 576, 4, GroupDtype::Uint, 32, SubKind::Half),
        (17, 576, 576, 8, GroupDtype::Sint, 32, SubKind::Half),
        (32, 512, 512, 4, GroupDtype::Iq4, 32, SubKind::Half),
    ];
    for (rows, cols, group, m, dt, size, kind) in cases {
        let bp = ggml_layer(&mut rng, rows, cols, group, m, dt, size, kind);
        let lin = PlaneLinear::from_bitplanes(&bp, m).unwrap();
        let what = format!("{dt:?} {kind:?}/{size} {rows}x{cols} m{m}");
        for r in 1..=m {
            let mut w = vec![0f32; rows * cols];
            bp.dequantize(r, &mut w).unwrap();
            for i in 0..rows {
                let mut row = vec![0f32; cols];
                lin.row_at(i, &mut row, r);
                assert_eq!(row, &w[i * cols..(i + 1) * cols], "{what} r{r} row {i}");
            }
            for n in [1, 3, 4, 6, 8, 9, 21] {
                let x = heavy(&mut rng, n * cols);
                let mut want = vec![0f32; n * rows];
                lin.forward_with(&x, n, &mut want, r, Isa::Scalar);
                for isa in Isa::available() {
                    let mut got = vec![1f32; n * rows];
                    lin.forward_with(&x, n, &mut got, r, isa);
                    let same = want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{isa:?} differs: {what} r{r} n{n}");
                }
                // Against the f64 product with the decoded weights: int8 activations per 32.
                for t in 0..n {
                    let xt = &x[t * cols..(t + 1) * cols];
                    for o in 0..rows {
                        let wr = &w[o * cols..(o + 1) * cols];
                        let exact: f64 = wr.iter().zip(xt).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let bound: f64 = (0..cols)
                            .map(|k| {
                                let b = &xt[k / 32 * 32..(k / 32 * 32 + 32).min(cols)];
                                let amax = b.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                                (wr[k] as f64).abs() * amax / 127.0 / 2.0
                            })
                            .sum::<f64>();
                        let mag: f64 = wr.iter().zip(xt).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                        let err = (want[t * rows + o] as f64 - exact).abs();
                        assert!(err <= 1.01 * bound + 1e-4 * mag + 1e-5, "{what} r{r} t{t} o{o}: {err} > {bound}");
                    }
                }
            }
        }
    }
}
