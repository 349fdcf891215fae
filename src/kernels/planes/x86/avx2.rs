//! The AVX2 paths of the bit-plane kernel (CPUs without AVX-512): the scheme of the parent
//! module with 256-bit registers, plane bits expanded by byte compares and levels looked up
//! with `vpshufb`. Each computes exactly what the scalar reference computes.

use std::arch::x86_64::*;

use super::super::{Ctx, QuantActs, SUB, SubMeta, SyncPtr, TILE, TileMeta};
use super::{MAX_CH, MAX_SUB_CH};

/// Expands 32 plane bits into 32 bytes of 0xff / 0x00.
///
/// # Safety
/// AVX2 present, enabled by its caller's `target_feature`.
#[inline(always)]
unsafe fn bits_to_bytes(bits: u32) -> __m256i {
    unsafe {
        let spread = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        );
        let v = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), spread);
        let sel = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        _mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel)
    }
}

/// Codes → levels with 16-entry `vpshufb` tables, one per value of the code's high nibble.
///
/// # Safety
/// AVX2 present, enabled by its caller's `target_feature`; `r` ≤ 8, so the reads stay inside `table`.
#[inline(always)]
unsafe fn lookup_avx2(c: __m256i, table: &[u8; 256], r: usize) -> __m256i {
    unsafe {
        let lo = _mm256_and_si256(c, _mm256_set1_epi8(0x0f));
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(c), _mm256_set1_epi8(0x0f));
        let mut res = _mm256_setzero_si256();
        for j in 0..(1usize << r.saturating_sub(4)) {
            let t = _mm256_broadcastsi128_si256(_mm_loadu_si128(table.as_ptr().add(16 * j) as *const __m128i));
            let hit = _mm256_cmpeq_epi8(hi, _mm256_set1_epi8(j as i8));
            res = _mm256_or_si256(res, _mm256_and_si256(hit, _mm256_shuffle_epi8(t, lo)));
        }
        res
    }
}

/// Lane `j` of the result is the sum of the 8 lanes of `acc[j]`.
///
/// # Safety
/// AVX2 present.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn reduce4_avx2(acc: &[__m256i; 4]) -> __m128i {
    let h01 = _mm256_hadd_epi32(acc[0], acc[1]);
    let h23 = _mm256_hadd_epi32(acc[2], acc[3]);
    let h = _mm256_hadd_epi32(h01, h23);
    _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h))
}

/// Levels of row `i` of the tile over `chunks`, one 32-byte register per 32 columns.
///
/// # Safety
/// AVX2 present.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn row_codes_avx2(
    ctx: &Ctx,
    m: &TileMeta,
    tile: usize,
    i: usize,
    chunks: std::ops::Range<usize>,
    out: &mut [__m256i],
) {
    let r = ctx.r as usize;
    let row = tile * TILE + i;
    let lv = ctx.levels[m.dtype[i] as usize];
    for (k, ch) in chunks.enumerate() {
        for h in 0..2 {
            let mut c = _mm256_setzero_si256();
            for p in 0..r {
                let bits = (ctx.word(p, row, ch) >> (32 * h)) as u32;
                let bv = _mm256_set1_epi8((1u32 << (r - 1 - p)) as i8);
                c = _mm256_or_si256(c, _mm256_and_si256(unsafe { bits_to_bytes(bits) }, bv));
            }
            if !lv.identity {
                c = unsafe { lookup_avx2(c, &lv.table, r) };
            }
            out[2 * k + h] = c;
        }
    }
}

/// Adds four rows' products with the 32 activations at `at` to `acc[0]` (high bytes) and
/// `acc[1]` (low bytes), widened to 16 bits (`vpmaddubsw` would saturate on 255 × 127).
///
/// # Safety
/// AVX2 present; `acts.hi` and `acts.lo` each hold 32 bytes from `at`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn madd4_avx2(acc: &mut [[__m256i; 4]; 2], codes: [__m256i; 4], acts: &QuantActs, at: usize) {
    for (half, src) in [&acts.hi, &acts.lo].into_iter().enumerate() {
        unsafe { madd4_one_avx2(&mut acc[half], codes, src, at) };
    }
}

/// Adds four rows' products with the 32 activation bytes of `src` at `at` to `acc`.
///
/// # Safety
/// AVX2 present; `src` holds 32 bytes from `at`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn madd4_one_avx2(acc: &mut [__m256i; 4], codes: [__m256i; 4], src: &[i8], at: usize) {
    let q = unsafe { _mm256_loadu_si256(src.as_ptr().add(at) as *const __m256i) };
    let q0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(q));
    let q1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(q));
    for (a, &c) in acc.iter_mut().zip(&codes) {
        let c0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(c));
        let c1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256::<1>(c));
        *a = _mm256_add_epi32(*a, _mm256_madd_epi16(c0, q0));
        *a = _mm256_add_epi32(*a, _mm256_madd_epi16(c1, q1));
    }
}

/// # Safety
/// AVX2 and F16C present; the tile's rows exist and `out` is exclusive to them.
#[target_feature(enable = "avx2,f16c,fma")]
pub unsafe fn tile_avx2(ctx: &Ctx, tile: usize, acts: &QuantActs, n: usize, out: SyncPtr) {
    // Four rows at a time; two 32-byte halves per 64-column chunk.
    let mut codes = [[_mm256_setzero_si256(); 2 * MAX_CH]; 4];
    for g in 0..ctx.gpr {
        let m = &ctx.meta[tile * ctx.gpr + g];
        let chunks = ctx.chunks(g);
        let nch = chunks.len();
        let mut ab = [[0f32; TILE]; 2];
        for i in 0..TILE {
            (ab[0][i], ab[1][i]) = ctx.ab(m, i);
        }
        for sub in 0..TILE / 4 {
            for (j, row_codes) in codes.iter_mut().enumerate() {
                unsafe { row_codes_avx2(ctx, m, tile, 4 * sub + j, chunks.clone(), row_codes) };
            }
            let (a, b) =
                unsafe { (_mm_loadu_ps(ab[0].as_ptr().add(4 * sub)), _mm_loadu_ps(ab[1].as_ptr().add(4 * sub))) };
            for t in 0..n {
                let at = t * acts.padded + chunks.start * 64;
                // [half][row]: sums against the high and the low activation bytes.
                let mut acc = [[_mm256_setzero_si256(); 4]; 2];
                for k in 0..2 * nch {
                    unsafe {
                        madd4_avx2(&mut acc, [codes[0][k], codes[1][k], codes[2][k], codes[3][k]], acts, at + k * 32)
                    };
                }
                let (dh, dl) = unsafe { (reduce4_avx2(&acc[0]), reduce4_avx2(&acc[1])) };
                let k = t * acts.groups + g;
                unsafe {
                    let dot = _mm_cvtepi32_ps(_mm_add_epi32(_mm_slli_epi32::<7>(dh), dl));
                    let ad = _mm_mul_ps(a, _mm_set1_ps(acts.d[k]));
                    let v = _mm_add_ps(_mm_mul_ps(dot, ad), _mm_mul_ps(b, _mm_set1_ps(acts.dsum[k])));
                    let p = out.get().add(t * ctx.rows + tile * TILE + 4 * sub);
                    let prev = if g == 0 { _mm_setzero_ps() } else { _mm_loadu_ps(p) };
                    _mm_storeu_ps(p, _mm_add_ps(prev, v));
                }
            }
        }
    }
}

/// Two-level layers on AVX2: [`tile_avx2`]'s scheme with one exact sum per (row, sub-block of
/// 32), scaled in float in sub-block order as [`Ctx::tile_sub_scalar`](super::Ctx) does.
///
/// # Safety
/// As [`tile_avx2`].
#[target_feature(enable = "avx2,f16c,fma")]
pub unsafe fn tile_sub_avx2(ctx: &Ctx, sub: &SubMeta, tile: usize, acts: &QuantActs, n: usize, out: SyncPtr) {
    let blocks = acts.padded / SUB;
    // Four rows at a time; one 32-byte register per sub-block.
    let mut codes = [[_mm256_setzero_si256(); 2 * MAX_SUB_CH]; 4];
    for g in 0..ctx.gpr {
        let m = &ctx.meta[tile * ctx.gpr + g];
        let chunks = ctx.chunks(g);
        let nsub = 2 * chunks.len();
        let mut azo = [[0f32; TILE]; 3];
        for i in 0..TILE {
            (azo[0][i], azo[1][i], azo[2][i]) = ctx.azo(m, i);
        }
        for quad in 0..TILE / 4 {
            for (j, row_codes) in codes.iter_mut().enumerate() {
                unsafe { row_codes_avx2(ctx, m, tile, 4 * quad + j, chunks.clone(), row_codes) };
            }
            let (a, z, o) = unsafe {
                (
                    _mm_loadu_ps(azo[0].as_ptr().add(4 * quad)),
                    _mm_loadu_ps(azo[1].as_ptr().add(4 * quad)),
                    _mm_loadu_ps(azo[2].as_ptr().add(4 * quad)),
                )
            };
            for t in 0..n {
                let at = t * acts.padded + chunks.start * 64;
                let (mut f, mut t1, mut t2) = (_mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps());
                for k in 0..nsub {
                    let mut acc = [_mm256_setzero_si256(); 4];
                    unsafe {
                        let codes = [codes[0][k], codes[1][k], codes[2][k], codes[3][k]];
                        madd4_one_avx2(&mut acc, codes, &acts.q8, at + k * 32)
                    };
                    let dot = unsafe { reduce4_avx2(&acc) };
                    let sk = 2 * chunks.start + k;
                    let e = tile * sub.spr + sk;
                    unsafe {
                        let sc = _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(
                            (sub.scale[e].as_ptr().add(4 * quad) as *const i32).read_unaligned(),
                        )));
                        let mn = _mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(
                            (sub.offset[e].as_ptr().add(4 * quad) as *const i32).read_unaligned(),
                        )));
                        // `Ctx::sub_step`, lane-wise.
                        let b = t * blocks + sk;
                        let eq = _mm_set1_ps(acts.eq[b]);
                        f = _mm_fmadd_ps(_mm_cvtepi32_ps(dot), _mm_mul_ps(sc, _mm_set1_ps(acts.e[b])), f);
                        t1 = _mm_fmadd_ps(sc, eq, t1);
                        t2 = _mm_fmadd_ps(mn, eq, t2);
                    }
                }
                unsafe {
                    // `Ctx::sub_term`, lane-wise.
                    let x = _mm_sub_ps(f, _mm_mul_ps(z, t1));
                    let v = _mm_add_ps(_mm_mul_ps(x, a), _mm_mul_ps(o, t2));
                    let p = out.get().add(t * ctx.rows + tile * TILE + 4 * quad);
                    // The first group starts from zero, as the reference's accumulator does.
                    let prev = if g == 0 { _mm_setzero_ps() } else { _mm_loadu_ps(p) };
                    _mm_storeu_ps(p, _mm_add_ps(prev, v));
                }
            }
        }
    }
}
