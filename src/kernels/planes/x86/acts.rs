//! The AVX-512 activation quantizers: the reference's exact operations (`../acts.rs`) in 16
//! lanes, so the same bytes.

use std::arch::x86_64::*;

use super::super::{Q8MAX, QMAX};

/// [`quantize_row`](super::super::acts) in 16 lanes: the same exact operations (multiply, add, clamp,
/// truncate), so the same bytes.
///
/// # Safety
/// AVX-512 F/BW present.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn quantize_row_avx512(
    xr: &[f32],
    group: usize,
    hr: &mut [i8],
    lr: &mut [i8],
    d: &mut [f32],
    dsum: &mut [f32],
) {
    let cols = xr.len();
    assert!(hr.len() >= cols && lr.len() >= cols);
    for g in 0..cols.div_ceil(group) {
        let (c0, c1) = (g * group, ((g + 1) * group).min(cols));
        let mask = |j: usize| -> __mmask16 { if c1 - j >= 16 { 0xffff } else { (1u16 << (c1 - j)) - 1 } };
        let mut m = _mm512_setzero_ps();
        let mut j = c0;
        while j < c1 {
            let v = unsafe { _mm512_maskz_loadu_ps(mask(j), xr.as_ptr().add(j)) };
            m = _mm512_max_ps(m, _mm512_abs_ps(v));
            j += 16;
        }
        let amax = _mm512_reduce_max_ps(m);
        let (dg, id) = if amax > 0.0 { (amax / QMAX, QMAX / amax) } else { (0.0, 0.0) };
        let idv = _mm512_set1_ps(id);
        let mut sum = _mm512_setzero_si512();
        let mut j = c0;
        while j < c1 {
            let k = mask(j);
            unsafe {
                let q = round16(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, xr.as_ptr().add(j)), idv), QMAX);
                _mm512_mask_cvtepi32_storeu_epi8(hr.as_mut_ptr().add(j), k, _mm512_srai_epi32::<7>(q));
                _mm512_mask_cvtepi32_storeu_epi8(
                    lr.as_mut_ptr().add(j),
                    k,
                    _mm512_and_si512(q, _mm512_set1_epi32(127)),
                );
                sum = _mm512_add_epi32(sum, q);
            }
            j += 16;
        }
        d[g] = dg;
        dsum[g] = dg * _mm512_reduce_add_epi32(sum) as f32;
    }
    hr[cols..].fill(0);
    lr[cols..].fill(0);
}

/// `round_to` (`../acts.rs`) in 16 lanes: the same add of ±0.5, clamp and truncation.
///
/// # Safety
/// AVX-512F present, enabled by its caller's `target_feature`.
#[inline(always)]
unsafe fn round16(y: __m512, max: f32) -> __m512i {
    unsafe {
        let half = _mm512_or_si512(
            _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32(i32::MIN)),
            _mm512_castps_si512(_mm512_set1_ps(0.5)),
        );
        let t = _mm512_add_ps(y, _mm512_castsi512_ps(half));
        _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-max)), _mm512_set1_ps(max)))
    }
}

/// `quantize_block` (`../acts.rs`) for a whole block of 32 in two vectors: the same exact operations,
/// so the same bytes.
///
/// # Safety
/// AVX-512 F/BW present.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn quantize_block_avx512(xb: &[f32; 32], q: &mut [i8; 32]) -> (f32, f32) {
    unsafe {
        let v = [_mm512_loadu_ps(xb.as_ptr()), _mm512_loadu_ps(xb.as_ptr().add(16))];
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        let (e, id) = if amax > 0.0 { (amax / Q8MAX, Q8MAX / amax) } else { (0.0, 0.0) };
        let idv = _mm512_set1_ps(id);
        let mut sum = _mm512_setzero_si512();
        for (h, x) in v.into_iter().enumerate() {
            let qi = round16(_mm512_mul_ps(x, idv), Q8MAX);
            _mm_storeu_si128(q.as_mut_ptr().add(16 * h) as *mut __m128i, _mm512_cvtepi32_epi8(qi));
            sum = _mm512_add_epi32(sum, qi);
        }
        (e, e * _mm512_reduce_add_epi32(sum) as f32)
    }
}
