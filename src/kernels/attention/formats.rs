//! The block formats a KV cache can store keys or values in, one row (a token's keys or values
//! of one layer) at a time, and the rotation some of them apply first.
//!
//! - **q8_0** (llama.cpp's): per 32 values, int8 codes and one f16 step `d = amax/127`;
//!   8.5 bits a value.
//! - **q4_0** (llama.cpp's rule): per 32 values, 4-bit codes `c` (value `(c − 8)·d`) and one f16
//!   step `d = max/−8`, `max` the value of largest magnitude; 4.5 bits a value. The nibbles are
//!   packed per 64 values, byte `j` holding value `j` (low) and value `j + 32` (high), so one
//!   32-byte load unpacks to 64 codes in order (llama.cpp packs per 32; the codes are the same).
//! - **Hadamard rotation** (the `q4h` cache): each head's row is multiplied by the orthonormal
//!   `R = H·S/√n` (`H` the Sylvester Hadamard matrix, `S` a fixed diagonal of signs) before it is
//!   quantized. Scores are unchanged when the query is rotated alike (`Rq·Rk = q·k`), and a sum of
//!   rotated values is rotated back once per query. Rotation spreads a few large channels (the
//!   keys of Qwen2 have some) over all of them, so the 4-bit steps fit the rest far better
//!   (QuaRot, SpinQuant, KVQuant's observation on outlier channels).
//!
//! Each token's row is quantized from that row alone, when it is stored: a rolled-back draft
//! token never changes a block another token reads, and nothing depends on what else shares a
//! pass.

use half::f16;

/// Values per block (q8_0 and q4_0 alike).
pub const BLOCK: usize = 32;

/// `x` (a multiple of [`BLOCK`] long) as q8_0 blocks, as llama.cpp's `quantize_row_q8_0_ref`:
/// per block `d = amax/127`, codes `round(x·(1/d))` (halves away from zero), `d` kept as f16.
pub fn quantize_q8(x: &[f32], codes: &mut [i8], steps: &mut [f16]) {
    for ((xb, cb), d) in x.chunks_exact(BLOCK).zip(codes.chunks_exact_mut(BLOCK)).zip(steps) {
        let (dd, id) = step_q8(xb);
        for (c, &v) in cb.iter_mut().zip(xb) {
            *c = (v * id).round() as i8;
        }
        *d = f16::from_f32(dd);
    }
}

/// A q8_0 block's step `amax/127` and its inverse (zero for an all-zero block).
#[inline(always)]
pub(crate) fn step_q8(xb: &[f32]) -> (f32, f32) {
    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    (d, if d != 0.0 { 1.0 / d } else { 0.0 })
}

/// `x` (a multiple of 64 long) as q4_0 blocks, codes by llama.cpp's `quantize_row_q4_0_ref`:
/// per block of 32, `d = max/−8` (`max` the value of largest magnitude, the first such),
/// codes `min(15, trunc(x/d + 8.5))`, `d` kept as f16. `codes` gets `x.len()/2` bytes, packed per
/// 64 values (see the module docs).
pub fn quantize_q4(x: &[f32], codes: &mut [u8], steps: &mut [f16]) {
    assert!(x.len().is_multiple_of(64) && codes.len() >= x.len() / 2 && steps.len() >= x.len() / BLOCK);
    let mut c = [0u8; 64];
    for (k, chunk) in x.chunks_exact(64).enumerate() {
        for (h, xb) in chunk.chunks_exact(BLOCK).enumerate() {
            let max = signed_max(xb);
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            for (j, &v) in xb.iter().enumerate() {
                c[h * BLOCK + j] = ((v * id + 8.5) as i8).min(15) as u8;
            }
            steps[2 * k + h] = f16::from_f32(d);
        }
        for j in 0..32 {
            codes[32 * k + j] = c[j] | (c[j + 32] << 4);
        }
    }
}

/// `x` as q4_0 blocks (same codes' meaning and packing as [`quantize_q4`]) with each block's
/// step fitted rather than fixed: for a few shrinkings `t` of llama.cpp's `max/−8` the codes are
/// rounded (clamped to 0–15), the step refitted by least squares to those codes, and the pair
/// with the smallest squared error (step rounded to f16, as stored) is kept. Clipping the
/// largest value a little buys finer steps for the other 31; the rotated (`q4h`) cache uses it.
pub fn quantize_q4_fitted(x: &[f32], codes: &mut [u8], steps: &mut [f16]) {
    assert!(x.len().is_multiple_of(64) && codes.len() >= x.len() / 2 && steps.len() >= x.len() / BLOCK);
    const SHRINK: [f32; 6] = [1.0, 0.95, 0.9, 0.85, 0.8, 0.75];
    let mut c = [0u8; 64];
    for (k, chunk) in x.chunks_exact(64).enumerate() {
        for (h, xb) in chunk.chunks_exact(BLOCK).enumerate() {
            let max = signed_max(xb);
            let mut best = (f32::INFINITY, f16::ZERO, [8u8; BLOCK]);
            for t in SHRINK {
                let d0 = max / -8.0 * t;
                if d0 == 0.0 {
                    break;
                }
                let id = 1.0 / d0;
                let mut q = [0u8; BLOCK];
                let (mut xq, mut qq) = (0f32, 0f32);
                for (o, &v) in q.iter_mut().zip(xb) {
                    *o = (v * id + 8.5).clamp(0.0, 15.0) as u8;
                    let w = f32::from(*o) - 8.0;
                    xq += v * w;
                    qq += w * w;
                }
                let d = f16::from_f32(if qq > 0.0 { xq / qq } else { d0 });
                let df = d.to_f32();
                let err: f32 = xb.iter().zip(&q).map(|(&v, &o)| (v - (f32::from(o) - 8.0) * df).powi(2)).sum();
                if err < best.0 {
                    best = (err, d, q);
                }
            }
            c[h * BLOCK..(h + 1) * BLOCK].copy_from_slice(&best.2);
            steps[2 * k + h] = best.1;
        }
        for j in 0..32 {
            codes[32 * k + j] = c[j] | (c[j + 32] << 4);
        }
    }
}

/// The value of largest magnitude in `xb`, the first such (llama.cpp's q4_0 rule).
#[inline(always)]
fn signed_max(xb: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in xb {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// Code `j` (0–15) of a row packed by [`quantize_q4`].
#[inline(always)]
pub fn q4_code(row: &[u8], j: usize) -> u8 {
    let b = row[(j / 64) * 32 + j % 32];
    if j % 64 < 32 { b & 0x0f } else { b >> 4 }
}

/// Signs of the rotation's diagonal `S`, bit `i` for dimension `i` (fixed, arbitrary).
const SIGNS: [u64; 4] = [0x9e37_79b9_7f4a_7c15, 0xbf58_476d_1ce4_e5b9, 0x94d0_49bb_1331_11eb, 0x2545_f491_4f6c_dd1d];

/// Largest head the rotation takes.
pub const MAX_ROTATED: usize = 256;

/// Whether a head of `hd` dimensions can be rotated (a power of two up to [`MAX_ROTATED`]).
pub fn rotatable(hd: usize) -> bool {
    hd.is_power_of_two() && (2..=MAX_ROTATED).contains(&hd)
}

/// The unnormalized fast Walsh–Hadamard transform, in place (`x.len()` a power of two).
fn fwht(x: &mut [f32]) {
    let n = x.len();
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (x[j], x[j + h]);
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
        h *= 2;
    }
}

#[inline(always)]
fn negated(i: usize) -> bool {
    SIGNS[i / 64] >> (i % 64) & 1 == 1
}

/// `x ← R·x`, `R = H·S/√n` (one head of `n = x.len()` dimensions, [`rotatable`]).
pub fn rotate(x: &mut [f32]) {
    for (i, v) in x.iter_mut().enumerate() {
        if negated(i) {
            *v = -*v;
        }
    }
    fwht(x);
    let s = 1.0 / (x.len() as f32).sqrt();
    x.iter_mut().for_each(|v| *v *= s);
}

/// `y ← Rᵀ·y = S·H·y/√n`, the inverse of [`rotate`].
pub fn unrotate(y: &mut [f32]) {
    fwht(y);
    let s = 1.0 / (y.len() as f32).sqrt();
    for (i, v) in y.iter_mut().enumerate() {
        *v *= s;
        if negated(i) {
            *v = -*v;
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn q8_matches_llama_cpp_rule() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) / 7.0).collect();
        let mut codes = vec![0i8; 64];
        let mut steps = vec![f16::ZERO; 2];
        quantize_q8(&x, &mut codes, &mut steps);
        for b in 0..2 {
            let xb = &x[32 * b..32 * b + 32];
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(steps[b], f16::from_f32(amax / 127.0));
            assert!(codes[32 * b..32 * b + 32].iter().any(|&c| c.abs() == 127));
            for (j, &c) in codes[32 * b..32 * b + 32].iter().enumerate() {
                let back = c as f32 * (amax / 127.0);
                assert!((back - xb[j]).abs() <= amax / 127.0 / 2.0 + 1e-6);
            }
        }
        let zeros = [0f32; 32];
        quantize_q8(&zeros, &mut codes[..32], &mut steps[..1]);
        assert!(codes[..32].iter().all(|&c| c == 0) && steps[0] == f16::ZERO);
    }

    /// The codes are llama.cpp's (its rule written out here on unpacked blocks), packed so
    /// that [`q4_code`] finds them; the round trip is within half a step.
    #[test]
    fn q4_matches_llama_cpp_rule() {
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..50 {
            let n = 64 * rng.random_range(1..5);
            let amp = rng.random_range(0.01f32..10.0);
            let mut x: Vec<f32> = (0..n).map(|_| rng.random_range(-amp..amp)).collect();
            if rng.random_bool(0.2) {
                x[..32].fill(0.0);
            }
            let mut codes = vec![0u8; n / 2];
            let mut steps = vec![f16::ZERO; n / BLOCK];
            quantize_q4(&x, &mut codes, &mut steps);
            for (b, xb) in x.chunks_exact(BLOCK).enumerate() {
                let max = xb.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                assert_eq!(steps[b], f16::from_f32(d));
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                for (j, &v) in xb.iter().enumerate() {
                    let want = ((v * id + 8.5) as i8).min(15) as u8;
                    let got = q4_code(&codes, b * BLOCK + j);
                    assert_eq!(got, want, "block {b} value {j}");
                    let back = (got as f32 - 8.0) * steps[b].to_f32();
                    // Half a step, or a whole one where `+max` clamps to code 15 (`7·d`).
                    assert!((back - v).abs() <= d.abs() + amp * 2e-3, "{back} vs {v}");
                }
            }
        }
    }

    #[test]
    fn fitted_q4_steps_never_lose_to_the_fixed_rule() {
        let mut rng = StdRng::seed_from_u64(5);
        let (mut fixed_err, mut fitted_err) = (0f64, 0f64);
        for _ in 0..200 {
            // Roughly Gaussian, as rotated keys and values are.
            let x: Vec<f32> = (0..64).map(|_| (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum()).collect();
            let (mut c1, mut s1) = (vec![0u8; 32], vec![f16::ZERO; 2]);
            let (mut c2, mut s2) = (vec![0u8; 32], vec![f16::ZERO; 2]);
            quantize_q4(&x, &mut c1, &mut s1);
            quantize_q4_fitted(&x, &mut c2, &mut s2);
            let err = |c: &[u8], s: &[f16]| -> f64 {
                (0..64).map(|j| (x[j] - (f32::from(q4_code(c, j)) - 8.0) * s[j / 32].to_f32()).powi(2) as f64).sum()
            };
            let (a, b) = (err(&c1, &s1), err(&c2, &s2));
            // The fixed rule is the first candidate, before its step is refitted.
            assert!(b <= a * 1.0001 + 1e-9, "fitted {b} > fixed {a}");
            fixed_err += a;
            fitted_err += b;
        }
        assert!(fitted_err < 0.95 * fixed_err, "fitting gained little: {fitted_err} against {fixed_err}");
        // All-zero blocks stay exact.
        let (mut c, mut s) = (vec![0u8; 32], vec![f16::ONE; 2]);
        quantize_q4_fitted(&[0.0; 64], &mut c, &mut s);
        assert!(s.iter().all(|d| d.to_f32() == 0.0) && (0..64).all(|j| q4_code(&c, j) == 8));
    }

    #[test]
    fn rotation_is_orthonormal_and_inverted() {
        let mut rng = StdRng::seed_from_u64(9);
        for n in [2usize, 64, 128, 256] {
            let x: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let y: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let (mut rx, mut ry) = (x.clone(), y.clone());
            rotate(&mut rx);
            rotate(&mut ry);
            let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| *p as f64 * *q as f64).sum::<f64>();
            assert!((dot(&x, &y) - dot(&rx, &ry)).abs() < 1e-4, "n {n}: inner products kept");
            let mut back = rx.clone();
            unrotate(&mut back);
            assert!(back.iter().zip(&x).all(|(a, b)| (a - b).abs() < 1e-5), "n {n}: inverse");
        }
        // One large channel is spread over all of them.
        let mut spike = vec![0f32; 128];
        spike[5] = 8.0;
        rotate(&mut spike);
        assert!(spike.iter().all(|v| (v.abs() - 8.0 / 128f32.sqrt()).abs() < 1e-5));
    }
}
