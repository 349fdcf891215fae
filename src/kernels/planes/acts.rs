//! Activation quantization: what the bit-plane kernel multiplies the weights' levels with,
//! built once per matmul for every layer that reads the same input. The scalar functions here
//! are the reference; the AVX-512 versions in `x86/acts.rs` give the same bytes.

use super::{Isa, SUB};
use crate::quant::bitplane::row_bytes;

/// Activations of `n` tokens, quantized once per matmul in the form its layers need.
///
/// - **One-level layers**: 15 bits per weight group, split into two int8 halves,
///   `q = 128·hi + lo` (`hi` signed, `lo` in 0..128), so that `vpdpbusd` (u8 × s8) takes both.
///   With a single step per group of 128 or more columns, plain int8 cost about 1.7% perplexity
///   on SmolLM2; two products per weight keep the result within 2^-14 of the f32 product.
/// - **Two-level layers** ([`QuantActs::quantize_blocks`]): int8 with one step per 32 columns,
///   as llama.cpp's `Q8` activations. The weights already carry a scale per 32, so the step
///   costs one multiply per sub-block, and each weight needs one `vpdpbusd` instead of two.
#[derive(Default)]
pub struct QuantActs {
    /// `n × padded_cols`, zero past `cols`.
    pub hi: Vec<i8>,
    pub lo: Vec<i8>,
    /// `n × groups`: the group's step `d` and `d·Σq`.
    pub d: Vec<f32>,
    pub dsum: Vec<f32>,
    /// Two-level layers: `n × padded` int8 activations, zero past `cols`.
    pub q8: Vec<i8>,
    /// `n × padded / 32`: each block's step `e` and `e·Σq`.
    pub e: Vec<f32>,
    pub eq: Vec<f32>,
    /// `n × padded / 16`: `e·Σq` of each half block, for layers with sub-blocks of 16.
    pub eq16: Vec<f32>,
    pub padded: usize,
    pub groups: usize,
}

/// Largest magnitude of a quantized activation (15 bits).
pub const QMAX: f32 = 16383.0;
/// Largest magnitude of an int8 activation of a two-level layer.
pub const Q8MAX: f32 = 127.0;

impl QuantActs {
    /// Quantizes `x` (`n × cols`) with one scale per `group` columns: `q = round(x·QMAX/amax)`.
    pub fn quantize(&mut self, x: &[f32], n: usize, cols: usize, group: usize) {
        self.quantize_with(x, n, cols, group, Isa::detect());
    }

    /// [`QuantActs::quantize`] on the given path (every path gives the same bytes).
    pub fn quantize_with(&mut self, x: &[f32], n: usize, cols: usize, group: usize, isa: Isa) {
        let padded = row_bytes(cols) * 8;
        let groups = cols.div_ceil(group);
        self.padded = padded;
        self.groups = groups;
        // Grows once to the largest batch; never shrinks, so decoding does not allocate.
        if self.hi.len() < n * padded {
            self.hi.resize(n * padded, 0);
            self.lo.resize(n * padded, 0);
        }
        if self.d.len() < n * groups {
            self.d.resize(n * groups, 0.0);
            self.dsum.resize(n * groups, 0.0);
        }
        for t in 0..n {
            let xr = &x[t * cols..(t + 1) * cols];
            let hr = &mut self.hi[t * padded..(t + 1) * padded];
            let lr = &mut self.lo[t * padded..(t + 1) * padded];
            let d = &mut self.d[t * groups..(t + 1) * groups];
            let dsum = &mut self.dsum[t * groups..(t + 1) * groups];
            #[cfg(target_arch = "x86_64")]
            if matches!(isa, Isa::Avx512 | Isa::Avx512Gfni) {
                // SAFETY: the AVX-512 path is only chosen where the CPU has it.
                unsafe { super::x86::quantize_row_avx512(xr, group, hr, lr, d, dsum) };
                continue;
            }
            let _ = isa;
            quantize_row(xr, group, hr, lr, d, dsum);
        }
    }

    /// Quantizes `x` (`n × cols`) to int8 with one step per 32 columns,
    /// `q = round(x·127/amax)`: what two-level layers read.
    pub fn quantize_blocks(&mut self, x: &[f32], n: usize, cols: usize) {
        self.quantize_blocks_with(x, n, cols, Isa::detect());
    }

    /// [`QuantActs::quantize_blocks`] on the given path (every path gives the same bytes).
    pub fn quantize_blocks_with(&mut self, x: &[f32], n: usize, cols: usize, isa: Isa) {
        let padded = row_bytes(cols) * 8;
        let blocks = padded / SUB;
        self.padded = padded;
        // Grows once to the largest batch, as `quantize_with` does.
        if self.q8.len() < n * padded {
            self.q8.resize(n * padded, 0);
        }
        if self.e.len() < n * blocks {
            self.e.resize(n * blocks, 0.0);
            self.eq.resize(n * blocks, 0.0);
            self.eq16.resize(2 * n * blocks, 0.0);
        }
        // Tokens are independent; a prefill's worth is spread over the team (each task writes
        // only its own tokens' rows, so the bytes do not depend on the split).
        let (q8, e, eq) = (self.q8.as_mut_ptr() as usize, self.e.as_mut_ptr() as usize, self.eq.as_mut_ptr() as usize);
        let eq16 = self.eq16.as_mut_ptr() as usize;
        let one = |t: usize| {
            // SAFETY: token `t`'s rows of the four buffers (sized above) are written by this
            // call alone.
            let (q, e, eq, eq16) = unsafe {
                (
                    std::slice::from_raw_parts_mut((q8 as *mut i8).add(t * padded), padded),
                    std::slice::from_raw_parts_mut((e as *mut f32).add(t * blocks), blocks),
                    std::slice::from_raw_parts_mut((eq as *mut f32).add(t * blocks), blocks),
                    std::slice::from_raw_parts_mut((eq16 as *mut f32).add(2 * t * blocks), 2 * blocks),
                )
            };
            quantize_token(&x[t * cols..(t + 1) * cols], q, e, eq, isa);
            // Half-block sums from the bytes every path wrote alike.
            for (h, (qh, s)) in q.chunks_exact(SUB / 2).zip(eq16.iter_mut()).enumerate() {
                *s = e[h / 2] * qh.iter().map(|&v| v as i32).sum::<i32>() as f32;
            }
        };
        const PER_TASK: usize = 16;
        if n >= 2 * PER_TASK {
            crate::kernels::team::parallel_for(n.div_ceil(PER_TASK), |c| {
                (c * PER_TASK..n.min((c + 1) * PER_TASK)).for_each(one)
            });
        } else {
            (0..n).for_each(one);
        }
    }
}

/// One token's int8 blocks of 32 (`q`, zero past the row) with their steps `e` and `e·Σq`
/// (zero for blocks past the row).
fn quantize_token(x: &[f32], q: &mut [i8], e: &mut [f32], eq: &mut [f32], isa: Isa) {
    let cols = x.len();
    for (b, xb) in x.chunks(SUB).enumerate() {
        let qb = &mut q[b * SUB..b * SUB + xb.len()];
        #[cfg(target_arch = "x86_64")]
        if matches!(isa, Isa::Avx512 | Isa::Avx512Gfni) && xb.len() == SUB {
            // SAFETY: the AVX-512 path is only chosen where the CPU has it.
            (e[b], eq[b]) =
                unsafe { super::x86::quantize_block_avx512(xb.try_into().unwrap(), qb.try_into().unwrap()) };
            continue;
        }
        let _ = isa;
        (e[b], eq[b]) = quantize_block(xb, qb);
    }
    q[cols..].fill(0);
    let full = cols.div_ceil(SUB);
    e[full..].fill(0.0);
    eq[full..].fill(0.0);
}

/// `y` rounded half away from zero and clamped to `±max`, without a libm call (the clamped value
/// is below 2^23, so the cast is exact): the rounding of both activation quantizers.
#[inline(always)]
pub(super) fn round_to(y: f32, max: f32) -> i32 {
    (y + 0.5f32.copysign(y)).clamp(-max, max) as i32
}

/// One block of at most 32 activations to int8 (round half away from zero); returns the step
/// and the step times `Σq`. Plain loops the compiler vectorizes; every path reads these bytes.
pub(super) fn quantize_block(xb: &[f32], q: &mut [i8]) -> (f32, f32) {
    let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
    let (e, id) = if amax > 0.0 { (amax / Q8MAX, Q8MAX / amax) } else { (0.0, 0.0) };
    let mut sum = 0i32;
    for (x, q) in xb.iter().zip(q.iter_mut()) {
        let v = round_to(x * id, Q8MAX);
        *q = v as i8;
        sum += v;
    }
    (e, e * sum as f32)
}

/// One token's activations: the reference for [`QuantActs::quantize`].
pub(super) fn quantize_row(xr: &[f32], group: usize, hr: &mut [i8], lr: &mut [i8], d: &mut [f32], dsum: &mut [f32]) {
    let cols = xr.len();
    for g in 0..cols.div_ceil(group) {
        let cols_g = g * group..((g + 1) * group).min(cols);
        let amax = xr[cols_g.clone()].iter().fold(0f32, |a, v| a.max(v.abs()));
        let (dg, id) = if amax > 0.0 { (amax / QMAX, QMAX / amax) } else { (0.0, 0.0) };
        let mut sum = 0i32;
        for j in cols_g {
            let q = round_to(xr[j] * id, QMAX);
            hr[j] = (q >> 7) as i8;
            lr[j] = (q & 127) as i8;
            sum += q;
        }
        d[g] = dg;
        dsum[g] = dg * sum as f32;
    }
    hr[cols..].fill(0);
    lr[cols..].fill(0);
}
