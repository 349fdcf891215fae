//! Small element-wise kernels of the transformer block.

use super::cpu::{self, exp_ref};

/// RMSNorm: `out = x / sqrt(mean(x²) + eps) · w`. The sum is taken in f64 so the result does not
/// depend on vector width.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let scale = (1.0 / (ss / x.len() as f64 + eps as f64).sqrt()) as f32;
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

/// [`rms_norm`] of each `w.len()`-wide head of `x`, in place, with the one weight vector `w`:
/// the query and key norms of Qwen3 and Gemma 3, applied to every head before RoPE.
pub fn rms_norm_heads(x: &mut [f32], w: &[f32], eps: f32) {
    for head in x.chunks_exact_mut(w.len()) {
        // The same operations as `rms_norm`, in place.
        let ss: f64 = head.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let scale = (1.0 / (ss / head.len() as f64 + eps as f64).sqrt()) as f32;
        for (v, &g) in head.iter_mut().zip(w) {
            *v = *v * scale * g;
        }
    }
}

/// SiLU-gated product used by the llama MLP: `gate ← silu(gate) · up`.
///
/// `silu(g) = g·σ(g)`, with `σ` from `e = e^(−|g|)` by [`exp_ref`] (whose argument must not be
/// positive): `1/(1 + e)` for `g ≥ 0`, `e/(1 + e)` below. The AVX-512 path does the same
/// operations on 16 lanes, so a token's result does not depend on the path or on the other
/// tokens of its pass; it replaces a libm `expf` call per element, which took 1.5–5% of a
/// decode or prefill profile on the caller's thread.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if cpu::avx512() {
        // SAFETY: AVX-512F and FMA checked by `cpu::avx512`.
        done = unsafe { x86::silu_mul_avx512(&mut gate[..n], &up[..n]) };
    }
    for (g, &u) in gate[done..n].iter_mut().zip(&up[done..n]) {
        *g = silu_ref(*g) * u;
    }
}

/// GELU-gated product of Gemma's MLP: `gate ← gelu(gate) · up`, GELU in its tanh form,
/// `0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³)))`, as llama.cpp's `ggml_gelu`. Scalar: 2,048
/// values a token and layer on Gemma 3 270M, a small fraction of a pass.
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = 0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x)).tanh()) * u;
    }
}

/// `g·σ(g)`, the scalar reference of [`silu_mul`].
fn silu_ref(g: f32) -> f32 {
    let e = exp_ref(-g.abs());
    let s = if g >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
    g * s
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use crate::kernels::cpu::x86::exp16;

    /// [`super::silu_mul`] over whole vectors of 16; returns how many elements it did.
    ///
    /// # Safety
    /// AVX-512F and FMA present.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn silu_mul_avx512(gate: &mut [f32], up: &[f32]) -> usize {
        let full = gate.len() / 16 * 16;
        let one = _mm512_set1_ps(1.0);
        for i in (0..full).step_by(16) {
            unsafe {
                let g = _mm512_loadu_ps(gate.as_ptr().add(i));
                let u = _mm512_loadu_ps(up.as_ptr().add(i));
                let e = exp16(_mm512_xor_ps(_mm512_abs_ps(g), _mm512_set1_ps(-0.0)));
                let d = _mm512_add_ps(one, e);
                let pos = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(g, _mm512_setzero_ps());
                let s = _mm512_div_ps(_mm512_mask_blend_ps(pos, e, one), d);
                _mm512_storeu_ps(gate.as_mut_ptr().add(i), _mm512_mul_ps(_mm512_mul_ps(g, s), u));
            }
        }
        full
    }
}

/// Dot product with eight interleaved partial sums, so the compiler vectorizes it on any
/// target while the summation order stays fixed (and results reproducible).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let full = n / 8 * 8;
    let mut acc = [0f32; 8];
    for (ca, cb) in a[..full].chunks_exact(8).zip(b[..full].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for k in full..n {
        s += a[k] * b[k];
    }
    s
}

/// `y += a · x`, element-wise.
#[inline(always)]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

/// In-place softmax; returns nothing because callers reuse the buffer as weights.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// Rotary-embedding angles for positions `0..max_pos`, precomputed for the first
/// [`Rope::TABLE_POSITIONS`] and computed the same way on the fly beyond (bit-identical), so a
/// model that declares a context of millions of tokens does not cost a table of gigabytes.
///
/// Frequency `i` (of `head_dim / 2`) rotates one pair of a head's dimensions: `2i` and `2i + 1`
/// when `interleaved` (GGUF `llama` files, whose converter permuted the Q/K rows), `i` and
/// `i + head_dim/2` otherwise (rotate-half: Hugging Face order, GGUF `qwen2`). The architecture
/// says which (`model::arch::RopeStyle`).
pub struct Rope {
    half: usize,
    interleaved: bool,
    max_pos: usize,
    /// `base^(−2i/head_dim)` (÷ its factor) for each frequency `i`.
    freqs: Vec<f64>,
    mscale: f32,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    /// Positions whose angles are kept in a table (8 MiB for 128-dimension heads).
    pub const TABLE_POSITIONS: usize = 1 << 15;

    pub fn new(head_dim: usize, base: f64, max_pos: usize, interleaved: bool) -> Self {
        Self::with_factors(head_dim, base, max_pos, interleaved, None, 1.0)
    }

    /// [`Rope::new`] with each frequency divided by a factor: the `rope_freqs` tensor through
    /// which GGUF files carry Llama 3.1's rope scaling (and Phi-3's long factors), applied as
    /// llama.cpp's `ggml_rope_ext` does (θ = pos · base^(−2i/d) ÷ factor[i]); cos and sin are
    /// scaled by `mscale` (its `attn_factor`, 1 but for LongRoPE and YaRN).
    pub fn with_factors(
        head_dim: usize,
        base: f64,
        max_pos: usize,
        interleaved: bool,
        factors: Option<&[f32]>,
        mscale: f32,
    ) -> Self {
        let half = head_dim / 2;
        let freqs: Vec<f64> = (0..half)
            .map(|i| base.powf(-2.0 * i as f64 / head_dim as f64) / factors.map_or(1.0, |f| f[i] as f64))
            .collect();
        let table = max_pos.min(Self::TABLE_POSITIONS);
        let mut cos = Vec::with_capacity(table * half);
        let mut sin = Vec::with_capacity(table * half);
        for p in 0..table {
            for &f in &freqs {
                let theta = p as f64 * f;
                cos.push(theta.cos() as f32 * mscale);
                sin.push(theta.sin() as f32 * mscale);
            }
        }
        Rope { half, interleaved, max_pos, freqs, mscale, cos, sin }
    }

    /// Rotates every head of `x` (`n_heads × head_dim`) for position `pos`.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let h = self.half;
        let (mut cf, mut sf) = (Vec::new(), Vec::new());
        let (c, s) = if (pos + 1) * h <= self.cos.len() {
            (&self.cos[pos * h..(pos + 1) * h], &self.sin[pos * h..(pos + 1) * h])
        } else {
            for &f in &self.freqs {
                let theta = pos as f64 * f;
                cf.push(theta.cos() as f32 * self.mscale);
                sf.push(theta.sin() as f32 * self.mscale);
            }
            (&cf[..], &sf[..])
        };
        for head in x.chunks_exact_mut(h * 2) {
            for i in 0..h {
                let (ia, ib) = if self.interleaved { (2 * i, 2 * i + 1) } else { (i, i + h) };
                let (a, b) = (head[ia], head[ib]);
                head[ia] = a * c[i] - b * s[i];
                head[ib] = a * s[i] + b * c[i];
            }
        }
    }

    pub fn max_pos(&self) -> usize {
        self.max_pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silu_is_accurate_and_the_same_on_every_path() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        // Typical gates, large ones of both signs, zeros, infinities and NaN; a length that
        // leaves a scalar tail.
        let mut g: Vec<f32> = (0..1000).map(|_| rng.random_range(-12.0f32..12.0)).collect();
        g.extend([0.0, -0.0, 90.0, -90.0, 1e-30, -1e-30, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1e30, -1e30]);
        let u: Vec<f32> = (0..g.len()).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        let mut got = g.clone();
        silu_mul(&mut got, &u);
        for ((&x, &u), &y) in g.iter().zip(&u).zip(&got) {
            // The scalar reference, bit for bit (the SIMD path ran on AVX-512 machines).
            let want = silu_ref(x) * u;
            assert!(want.to_bits() == y.to_bits() || (want.is_nan() && y.is_nan()), "silu({x})·{u}: {y} vs {want}");
            // Against f64: within a few ulp where finite.
            let exact = (x as f64) / (1.0 + (-(x as f64)).exp()) * u as f64;
            if exact.is_finite() && x.is_finite() {
                // Below e^-87 the exponential flushes to zero (as in attention).
                assert!((y as f64 - exact).abs() <= 4e-7 * exact.abs() + 1e-30, "silu({x})·{u}: {y} vs {exact}");
            }
        }
    }

    #[test]
    fn head_norms_equal_the_row_norm_of_each_head() {
        let x: Vec<f32> = (0..12).map(|i| (i as f32 - 5.5) * 0.7).collect();
        let w = [1.5f32, -0.5, 2.0, 1.0];
        let mut y = x.clone();
        rms_norm_heads(&mut y, &w, 1e-6);
        for h in 0..3 {
            let mut want = [0f32; 4];
            rms_norm(&x[h * 4..h * 4 + 4], &w, 1e-6, &mut want);
            assert_eq!(&y[h * 4..h * 4 + 4], &want);
        }
    }

    #[test]
    fn rms_norm_unit_rms() {
        let x = [3.0f32, -4.0, 0.0, 5.0];
        let mut out = [0f32; 4];
        rms_norm(&x, &[1.0; 4], 0.0, &mut out);
        let rms = (out.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-6);
    }

    #[test]
    fn rope_beyond_its_table_equals_the_table_bit_for_bit() {
        let big = Rope::new(64, 1e6, Rope::TABLE_POSITIONS + 100, false);
        let small = Rope { cos: Vec::new(), sin: Vec::new(), ..Rope::new(64, 1e6, 1 << 40, false) };
        assert_eq!(small.max_pos(), 1 << 40);
        for pos in [0, 1, 77, Rope::TABLE_POSITIONS - 1, Rope::TABLE_POSITIONS + 99] {
            let mut a: Vec<f32> = (0..128).map(|i| i as f32 * 0.01 - 0.3).collect();
            let mut b = a.clone();
            big.apply(&mut a, pos);
            small.apply(&mut b, pos);
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn rope_preserves_norm_and_is_identity_at_zero() {
        for interleaved in [true, false] {
            let rope = Rope::new(8, 10000.0, 16, interleaved);
            let mut x: Vec<f32> = (0..16).map(|i| i as f32 * 0.3 - 2.0).collect();
            let orig = x.clone();
            rope.apply(&mut x, 0);
            assert_eq!(x, orig);
            rope.apply(&mut x, 7);
            let n0: f32 = orig.iter().map(|v| v * v).sum();
            let n1: f32 = x.iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-3);
            assert_ne!(x, orig);
        }
    }

    #[test]
    fn rotate_half_is_interleaved_rope_on_permuted_rows() {
        // Rotate-half on a head equals interleaved rope after moving dimension i to 2i and
        // i + half to 2i + 1 (the permutation llama.cpp's converter applies to llama Q/K).
        let (hd, half) = (8, 4);
        let x: Vec<f32> = (0..2 * hd).map(|i| (i as f32 * 0.37).sin()).collect();
        let perm = |v: &[f32]| -> Vec<f32> {
            let mut out = vec![0f32; v.len()];
            for (h, head) in v.chunks_exact(hd).enumerate() {
                for i in 0..half {
                    out[h * hd + 2 * i] = head[i];
                    out[h * hd + 2 * i + 1] = head[i + half];
                }
            }
            out
        };
        let mut neox = x.clone();
        Rope::new(hd, 1e6, 32, false).apply(&mut neox, 29);
        let mut inter = perm(&x);
        Rope::new(hd, 1e6, 32, true).apply(&mut inter, 29);
        assert_eq!(perm(&neox), inter);
    }

    #[test]
    fn dot_matches_f64_on_odd_lengths() {
        for n in [0usize, 1, 7, 8, 9, 64, 203] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-4, "n = {n}");
        }
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x = [1.0f32, 2.0, 3.0, -100.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[2] > x[1] && x[1] > x[0]);
    }
}
