//! Rows in lanes: two-level layers computed from their tile-interleaved planes
//! ([`QuadPlanes`](super::super::QuadPlanes)), where the GFNI transpose yields codes with one
//! row per `vpdpbusd` lane, so no reduction is needed (`docs/KERNELS.md`).

use std::arch::x86_64::*;

use super::gfni::{codes_crumb2, codes_gf};
use super::{MAX_SUB_CH, SubJob, azo16, levels512, sub_multipliers, sub_terms16};
use crate::kernels::SyncPtr;
use crate::kernels::planes::{Ctx, Levels, QuantActs, SUB, SubMeta, TILE, TileMeta};
use crate::quant::dtype::EVERY as ALL;

/// A full tile of a two-level layer from its tile-interleaved planes (`Ctx::quads`), for any
/// number of tokens: each group's codes come out of [`codes_gf`] (or [`codes_crumb2`] at two
/// planes) with one row per lane, so every token's sub-block sums are plain `vpdpbusd`
/// accumulations, with no transpose and no horizontal reduction. Up to [`QUADS_SMALL`] tokens
/// use the codes straight from registers ([`quads_tokens`]); larger batches build them once
/// per group ([`SubJob`]).
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI/VBMI, GFNI and F16C present; `ctx.quads` set; the tile is full; `out`
/// as for [`tile_avx512`].
pub unsafe fn tile_quads(ctx: &Ctx, sub: &SubMeta, tile: usize, acts: &QuantActs, n: usize, out: SyncPtr) {
    unsafe {
        match ctx.r {
            1 => tile_quads_r::<1>(ctx, sub, tile, acts, n, out),
            2 => tile_quads_r::<2>(ctx, sub, tile, acts, n, out),
            3 => tile_quads_r::<3>(ctx, sub, tile, acts, n, out),
            4 => tile_quads_r::<4>(ctx, sub, tile, acts, n, out),
            5 => tile_quads_r::<5>(ctx, sub, tile, acts, n, out),
            6 => tile_quads_r::<6>(ctx, sub, tile, acts, n, out),
            7 => tile_quads_r::<7>(ctx, sub, tile, acts, n, out),
            _ => tile_quads_r::<8>(ctx, sub, tile, acts, n, out),
        }
    }
}

/// [`tile_quads`] at `R` planes: one token of sub-blocks of 32 through [`quads_one`], up to
/// [`QUADS_SMALL`] tokens through [`quads_tokens`], larger batches through [`quads_batch`].
///
/// # Safety
/// As [`tile_quads`], with `R` = `ctx.r`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,f16c,avx2,fma,gfni")]
unsafe fn tile_quads_r<const R: usize>(
    ctx: &Ctx,
    sub: &SubMeta,
    tile: usize,
    acts: &QuantActs,
    n: usize,
    out: SyncPtr,
) {
    let (bytes, plane_len) = ctx.quads.expect("tile-interleaved planes");
    let planes: [*const u8; R] = std::array::from_fn(|p| unsafe { bytes.as_ptr().add(p * plane_len) });
    // A tile starts where its row-major original does; 64 columns are 16 words per plane.
    let at0 = tile * TILE * ctx.row_bytes;
    // One token of sub-blocks of 32 has a loop of its own.
    if n == 1 && sub.size == SUB {
        return unsafe { quads_one::<R>(ctx, sub, tile, &planes, at0, acts, out) };
    }
    // Up to four tokens use the codes straight from registers (their accumulators fill the 32
    // registers); more build each group's codes once and go through the batch loop.
    match n {
        1 => return unsafe { quads_tokens::<R, 1>(ctx, sub, tile, &planes, at0, acts, 0, out) },
        2 => return unsafe { quads_tokens::<R, 2>(ctx, sub, tile, &planes, at0, acts, 0, out) },
        3 => return unsafe { quads_tokens::<R, 3>(ctx, sub, tile, &planes, at0, acts, 0, out) },
        4 => return unsafe { quads_tokens::<R, 4>(ctx, sub, tile, &planes, at0, acts, 0, out) },
        _ => {}
    }
    unsafe { quads_batch::<R>(ctx, sub, tile, &planes, at0, acts, n, out) };
}

/// A batch against one full tile: each group's codes built once into a buffer, then every
/// token in blocks. Kept out of [`tile_quads_r`] so that decoding, which never needs the
/// 32 KiB code buffer, does not pay for probing its stack pages on every tile.
///
/// # Safety
/// As [`tile_quads_r`], whose `planes` and `at0` it is given.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,f16c,avx2,fma,gfni")]
unsafe fn quads_batch<const R: usize>(
    ctx: &Ctx,
    sub: &SubMeta,
    tile: usize,
    planes: &[*const u8; R],
    at0: usize,
    acts: &QuantActs,
    n: usize,
    out: SyncPtr,
) {
    let mut ct = [const { std::mem::MaybeUninit::<__m512i>::uninit() }; TILE * MAX_SUB_CH];
    for g in 0..ctx.gpr {
        let m = &ctx.meta[tile * ctx.gpr + g];
        let looks = Lookups::of(ctx, m);
        let chunks = ctx.chunks(g);
        for k in 0..chunks.len() {
            for h in 0..4 {
                let codes = unsafe { codes_gf::<R, 4>(planes, at0 + (chunks.start + k) * 128 + 32 * h) };
                for (j, c) in codes.into_iter().enumerate() {
                    ct[16 * k + 4 * h + j].write(unsafe { looks.apply::<R>(c) });
                }
            }
        }
        // SAFETY: the first `16 · chunks.len()` entries were written just above.
        let quads = unsafe { std::slice::from_raw_parts(ct.as_ptr() as *const __m512i, chunks.len() * 16) };
        let job =
            SubJob { ctx, sub, acts, quads, ch0: chunks.start, g, m, tile, out: unsafe { out.get().add(tile * TILE) } };
        unsafe { job.all_tokens(n) };
    }
}

/// The raw reads of the small-batch tile loops, bounds checked once per tile for tokens
/// `t0..t0 + nt`: activations (`q8`, and per block `e`, `eq`, per half block `eq16`) and the
/// tile's sub-block multipliers.
struct TileReads<'a> {
    q8: *const i8,
    e: *const f32,
    eq: *const f32,
    eq16: *const f32,
    sub: &'a SubMeta,
    /// The tile's first sub-block entry.
    base: usize,
    blocks: usize,
}

impl<'a> TileReads<'a> {
    #[inline(always)]
    fn new(ctx: &Ctx, sub: &'a SubMeta, tile: usize, acts: &QuantActs, t0: usize, nt: usize) -> TileReads<'a> {
        let blocks = acts.padded / SUB;
        // Every raw read of the loops stays inside these: sub-block `k < 2·⌈cols/64⌉`.
        let n = t0 + nt;
        assert!(acts.e.len() >= n * blocks && acts.eq.len() >= n * blocks && acts.q8.len() >= n * acts.padded);
        assert!(acts.eq16.len() >= 2 * n * blocks);
        assert!(sub.per_chunk() * ctx.cols.div_ceil(64) <= sub.spr && 2 * ctx.cols.div_ceil(64) <= blocks);
        // SAFETY (the offsets): inside the buffers, as just checked.
        unsafe {
            TileReads {
                q8: acts.q8.as_ptr().add(t0 * acts.padded),
                e: acts.e.as_ptr().add(t0 * blocks),
                eq: acts.eq.as_ptr().add(t0 * blocks),
                eq16: acts.eq16.as_ptr().add(2 * t0 * blocks),
                sub,
                base: tile * sub.spr,
                blocks,
            }
        }
    }

    /// Sub-block entry `k`'s scale and offset multipliers of the tile's 16 rows, as floats.
    ///
    /// # Safety
    /// AVX-512F and F16C present.
    #[inline(always)]
    unsafe fn multipliers(&self, k: usize) -> (__m512, __m512) {
        unsafe { sub_multipliers(self.sub, self.base + k) }
    }
}

/// One token (decoding) against one full tile of tile-interleaved planes: [`quads_tokens`]
/// for `NT = 1`, with four `vpdpbusd` chains and the code-free sums in the same loop.
///
/// # Safety
/// As [`tile_quads_r`] (its `target_feature` and contract), whose `planes` and `at0` it is given.
#[inline(always)]
unsafe fn quads_one<const R: usize>(
    ctx: &Ctx,
    sub: &SubMeta,
    tile: usize,
    planes: &[*const u8; R],
    at0: usize,
    acts: &QuantActs,
    out: SyncPtr,
) {
    unsafe {
        let rd = TileReads::new(ctx, sub, tile, acts, 0, 1);
        let (q8, e, eq) = (rd.q8, rd.e, rd.eq);
        let mut sum = _mm512_setzero_ps();
        for g in 0..ctx.gpr {
            let m = &ctx.meta[tile * ctx.gpr + g];
            let looks = Lookups::of(ctx, m);
            let mut fs = [_mm512_setzero_ps(); 3];
            let chunks = ctx.chunks(g);
            for k in 2 * chunks.start..2 * chunks.end {
                let mut dot = [_mm512_setzero_si512(); 4];
                if R == 2 {
                    let two = [planes[0], planes[1]];
                    for (j, c) in codes_crumb2(&two, at0 + 64 * k).into_iter().enumerate() {
                        let c = looks.apply::<R>(c);
                        let q = (q8.add(32 * k + 4 * j) as *const i32).read_unaligned();
                        dot[j % 4] = _mm512_dpbusd_epi32(dot[j % 4], c, _mm512_set1_epi32(q));
                    }
                } else {
                    for h in 0..2 {
                        let codes = codes_gf::<R, 4>(planes, at0 + 64 * k + 32 * h);
                        for (j, c) in codes.into_iter().enumerate() {
                            let c = looks.apply::<R>(c);
                            let q = (q8.add(32 * k + 16 * h + 4 * j) as *const i32).read_unaligned();
                            dot[j] = _mm512_dpbusd_epi32(dot[j], c, _mm512_set1_epi32(q));
                        }
                    }
                }
                let dot = _mm512_add_epi32(_mm512_add_epi32(dot[0], dot[1]), _mm512_add_epi32(dot[2], dot[3]));
                let (sc, mn) = rd.multipliers(k);
                let (ek, eqk) = (_mm512_set1_ps(*e.add(k)), _mm512_set1_ps(*eq.add(k)));
                fs[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sc, ek), fs[0]);
                fs[1] = _mm512_fmadd_ps(sc, eqk, fs[1]);
                fs[2] = _mm512_fmadd_ps(mn, eqk, fs[2]);
            }
            let (a, z, o) = azo16(ctx, m);
            sum = _mm512_add_ps(sum, sub_terms16(fs, a, z, o));
        }
        _mm512_storeu_ps(out.get().add(tile * TILE), sum);
    }
}

/// Most tokens [`quads_tokens`] takes (codes used straight from registers): its accumulators
/// for four tokens fill the 32 registers. Larger batches build each group's codes into a
/// buffer once and go through [`SubJob`]: from five tokens on, that was faster (1.5B, eight
/// sequences' decode pass: 111 → 93 ms; SmolLM2 at six: 17.2 → 13.6 ms), and at three or four
/// it was not (`examples/batch_cost`).
const QUADS_SMALL: usize = 4;

/// The table lookups a tile's group needs with rows in lanes: per datatype present that is not
/// the identity at `r`, its table and a byte mask of its rows (four bytes a row). Uniform INT
/// tiles, the common case, have none.
struct Lookups<'a> {
    n: usize,
    at: [(u64, &'a Levels); ALL.len()],
}

impl<'a> Lookups<'a> {
    #[inline(always)]
    fn of(ctx: &Ctx<'a>, m: &TileMeta) -> Self {
        let mut masks = [0u64; ALL.len()];
        for i in 0..TILE {
            let d = m.dtype[i] as usize;
            if !ctx.levels[d].identity {
                masks[d] |= 0xF << (4 * i);
            }
        }
        let mut l = Lookups { n: 0, at: [(0, ctx.levels[0]); ALL.len()] };
        for (d, &mask) in masks.iter().enumerate() {
            if mask != 0 {
                l.at[l.n] = (mask, ctx.levels[d]);
                l.n += 1;
            }
        }
        l
    }

    /// Codes to levels, each row through its datatype's table.
    ///
    /// # Safety
    /// AVX-512 F/BW/VBMI present, enabled by its caller's `target_feature`.
    #[inline(always)]
    unsafe fn apply<const R: usize>(&self, mut c: __m512i) -> __m512i {
        for &(mask, lv) in &self.at[..self.n] {
            c = unsafe { _mm512_mask_blend_epi8(mask, c, levels512::<R>(c, lv)) };
        }
        c
    }
}

/// `NT` ≤ [`QUADS_SMALL`] tokens (small batches and verification trees; one token
/// of sub-blocks of 32 goes through [`quads_one`]) against one full tile of tile-interleaved
/// planes: per sub-block, eight code vectors built once and used by every token's `vpdpbusd`,
/// then the same float steps as every path. Each token keeps two `vpdpbusd` chains, and the
/// code-free sums run in the same pass (the registers of four tokens fit).
///
/// # Safety
/// As [`tile_quads_r`] (its `target_feature` and contract), whose `planes` and `at0` it is given, for
/// tokens `t0..t0 + NT` of `out`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn quads_tokens<const R: usize, const NT: usize>(
    ctx: &Ctx,
    sub: &SubMeta,
    tile: usize,
    planes: &[*const u8; R],
    at0: usize,
    acts: &QuantActs,
    t0: usize,
    out: SyncPtr,
) {
    unsafe {
        let rd = TileReads::new(ctx, sub, tile, acts, t0, NT);
        let (q8, e, eq, eq16, blocks) = (rd.q8, rd.e, rd.eq, rd.eq16, rd.blocks);
        let halves = sub.size != SUB;
        // (At most four tokens: their accumulators fill the registers.)
        const { assert!(NT <= QUADS_SMALL) };
        let mut sums = [_mm512_setzero_ps(); NT];
        for g in 0..ctx.gpr {
            let m = &ctx.meta[tile * ctx.gpr + g];
            let looks = Lookups::of(ctx, m);
            let mut fs = [[_mm512_setzero_ps(); 3]; NT];
            let chunks = ctx.chunks(g);
            for k in 2 * chunks.start..2 * chunks.end {
                // Sub-block `k`: 32 columns, eight blocks of four, 64 bytes of each plane.
                let mut dot = [[_mm512_setzero_si512(); 2]; NT];
                let codes: [__m512i; 8] = if R == 2 {
                    codes_crumb2(&[planes[0], planes[1]], at0 + 64 * k)
                } else {
                    let (lo, hi) =
                        (codes_gf::<R, 4>(planes, at0 + 64 * k), codes_gf::<R, 4>(planes, at0 + 64 * k + 32));
                    [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]]
                };
                if halves {
                    // Sub-blocks of 16: each half of the 32 columns its own sum and float steps.
                    for h in 0..2 {
                        let mut dot = [[_mm512_setzero_si512(); 2]; NT];
                        for j in 0..4 {
                            let c = looks.apply::<R>(codes[4 * h + j]);
                            for t in 0..NT {
                                let q =
                                    (q8.add(t * acts.padded + 32 * k + 16 * h + 4 * j) as *const i32).read_unaligned();
                                dot[t][j % 2] = _mm512_dpbusd_epi32(dot[t][j % 2], c, _mm512_set1_epi32(q));
                            }
                        }
                        let (sc, mn) = rd.multipliers(2 * k + h);
                        for t in 0..NT {
                            let dot = _mm512_add_epi32(dot[t][0], dot[t][1]);
                            let ek = _mm512_set1_ps(*e.add(t * blocks + k));
                            let eqk = _mm512_set1_ps(*eq16.add(2 * t * blocks + 2 * k + h));
                            fs[t][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sc, ek), fs[t][0]);
                            fs[t][1] = _mm512_fmadd_ps(sc, eqk, fs[t][1]);
                            fs[t][2] = _mm512_fmadd_ps(mn, eqk, fs[t][2]);
                        }
                    }
                    continue;
                }
                for (j, c) in codes.into_iter().enumerate() {
                    let c = looks.apply::<R>(c);
                    let chain = j % 2;
                    for t in 0..NT {
                        let q = (q8.add(t * acts.padded + 32 * k + 4 * j) as *const i32).read_unaligned();
                        dot[t][chain] = _mm512_dpbusd_epi32(dot[t][chain], c, _mm512_set1_epi32(q));
                    }
                }
                let (sc, mn) = rd.multipliers(k);
                for t in 0..NT {
                    let dot = _mm512_add_epi32(dot[t][0], dot[t][1]);
                    let ek = _mm512_set1_ps(*e.add(t * blocks + k));
                    fs[t][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sc, ek), fs[t][0]);
                }
                for t in 0..NT {
                    let eqk = _mm512_set1_ps(*eq.add(t * blocks + k));
                    fs[t][1] = _mm512_fmadd_ps(sc, eqk, fs[t][1]);
                    fs[t][2] = _mm512_fmadd_ps(mn, eqk, fs[t][2]);
                }
            }
            let (a, z, o) = azo16(ctx, m);
            for t in 0..NT {
                sums[t] = _mm512_add_ps(sums[t], sub_terms16(fs[t], a, z, o));
            }
        }
        for (t, s) in sums.iter().enumerate() {
            _mm512_storeu_ps(out.get().add((t0 + t) * ctx.rows + tile * TILE), *s);
        }
    }
}
