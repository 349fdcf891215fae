//! The x86 paths of the bit-plane kernel: AVX-512 (VNNI, VBMI) here, the GFNI code builder in
//! `gfni`, AVX2 in `avx2`. Each computes exactly what [`Ctx::tile_scalar`](super::Ctx)
//! computes; see the parent module for the scheme.

use std::arch::x86_64::*;

use super::{Ctx, Levels, QuantActs, SUB, SubKind, SubMeta, SyncPtr, TILE, TileMeta};

mod acts;
mod avx2;
mod gfni;
mod quads;
pub use acts::{quantize_block_avx512, quantize_row_avx512};
pub use avx2::{tile_avx2, tile_sub_avx2};
use gfni::codes_gf;

use crate::kernels::cpu::x86::reduce16_halves;
pub use quads::tile_quads;

/// Runs `$job.tokens::<NT>(t0)` over tokens `0..$n` in blocks of up to [`BLOCK`]: the token
/// loop of both batch jobs ([`Job`], [`SubJob`]), whose `tokens` differ.
macro_rules! by_blocks {
    ($job:expr, $n:expr) => {{
        let (job, n) = ($job, $n);
        let mut t0 = 0;
        while t0 < n {
            let nt = (n - t0).min(BLOCK);
            match nt {
                1 => job.tokens::<1>(t0),
                2 => job.tokens::<2>(t0),
                3 => job.tokens::<3>(t0),
                4 => job.tokens::<4>(t0),
                5 => job.tokens::<5>(t0),
                6 => job.tokens::<6>(t0),
                7 => job.tokens::<7>(t0),
                _ => job.tokens::<BLOCK>(t0),
            }
            t0 += nt;
        }
    }};
}

/// Largest number of 64-column chunks in a group.
pub(super) const MAX_CH: usize = super::MAX_GROUP / 64;

/// # Safety
/// AVX-512 F/BW/VL/VNNI/VBMI and F16C present; the tile's rows exist and `out` is exclusive to them.
pub unsafe fn tile_avx512(ctx: &Ctx, tile: usize, acts: &QuantActs, n: usize, out: SyncPtr) {
    // One instantiation per plane count, so the plane loop unrolls.
    unsafe {
        match ctx.r {
            1 => tile512::<1>(ctx, tile, acts, n, out),
            2 => tile512::<2>(ctx, tile, acts, n, out),
            3 => tile512::<3>(ctx, tile, acts, n, out),
            4 => tile512::<4>(ctx, tile, acts, n, out),
            5 => tile512::<5>(ctx, tile, acts, n, out),
            6 => tile512::<6>(ctx, tile, acts, n, out),
            7 => tile512::<7>(ctx, tile, acts, n, out),
            _ => tile512::<8>(ctx, tile, acts, n, out),
        }
    }
}

/// Codes of 64 weights rebuilt from `R` plane words, mapped to levels when `lookup`.
///
/// # Safety
/// AVX-512 F/BW/VBMI present; each of the `R` plane pointers is readable for 8 bytes from `off`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn codes512<const R: usize>(planes: &[*const u8; R], off: usize, lv: &Levels, lookup: bool) -> __m512i {
    unsafe {
        let mut c = _mm512_setzero_si512();
        for (p, b) in planes.iter().enumerate() {
            let bv = _mm512_set1_epi8((1u32 << (R - 1 - p)) as i8);
            if p == 0 {
                // The first plane sets bytes rather than adding to zeros: one instruction less.
                c = _mm512_maskz_mov_epi8((b.add(off) as *const u64).read_unaligned(), bv);
                continue;
            }
            // One masked byte add per plane. Written out because LLVM otherwise turns
            // `_mm512_mask_add_epi8` into an OR plus a masked move, a third more work.
            std::arch::asm!(
                "kmovq {k}, {bits}",
                "vpaddb {c}{{{k}}}, {c}, {bv}",
                k = out(kreg) _,
                bits = in(reg) (b.add(off) as *const u64).read_unaligned(),
                c = inout(zmm_reg) c,
                bv = in(zmm_reg) bv,
                options(pure, nomem, nostack),
            );
        }
        if !lookup {
            return c;
        }
        levels512::<R>(c, lv)
    }
}

/// Codes mapped to their levels through the datatype's table (`vpermb` / `vpermi2b`).
///
/// # Safety
/// AVX-512 F/BW/VBMI present.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn levels512<const R: usize>(c: __m512i, lv: &Levels) -> __m512i {
    unsafe {
        let tp = lv.table.as_ptr() as *const __m512i;
        // `Levels` is 64-byte aligned and 256 bytes long.
        match R {
            1..=6 => _mm512_permutexvar_epi8(c, _mm512_load_si512(tp)),
            7 => _mm512_permutex2var_epi8(_mm512_load_si512(tp), c, _mm512_load_si512(tp.add(1))),
            _ => {
                let lo = _mm512_permutex2var_epi8(_mm512_load_si512(tp), c, _mm512_load_si512(tp.add(1)));
                let hi = _mm512_permutex2var_epi8(_mm512_load_si512(tp.add(2)), c, _mm512_load_si512(tp.add(3)));
                _mm512_mask_blend_epi8(_mm512_movepi8_mask(c), lo, hi)
            }
        }
    }
}

/// `128·hi + lo`, lane-wise: the two halves of the activations recombined before reducing.
///
/// # Safety
/// AVX-512F present, enabled by its caller's `target_feature`.
#[inline(always)]
unsafe fn combine(hi: __m512i, lo: __m512i) -> __m512i {
    unsafe { _mm512_add_epi32(_mm512_slli_epi32::<7>(hi), lo) }
}

/// Lane `i` of the result is the sum of the 16 lanes of `acc[i]`. (No closures here:
/// they would be compiled without the caller's target features.)
///
/// # Safety
/// AVX-512F present, enabled by its caller's `target_feature`.
#[inline(always)]
unsafe fn reduce16(acc: &[__m512i; TILE]) -> __m512i {
    unsafe {
        let (a, b) = reduce16_halves(acc);
        _mm512_add_epi32(a, b)
    }
}

/// `A` and `B` of the tile's 16 rows, lane-wise the same operations as [`Ctx::ab`].
///
/// # Safety
/// AVX-512F present, enabled by its caller's `target_feature`.
#[inline(always)]
unsafe fn ab16(ctx: &Ctx, m: &TileMeta) -> (__m512, __m512) {
    unsafe {
        let s = _mm512_cvtph_ps(_mm256_loadu_si256(m.scale.as_ptr() as *const __m256i));
        let o = _mm512_cvtph_ps(_mm256_loadu_si256(m.offset.as_ptr() as *const __m256i));
        let d = _mm512_cvtepu8_epi32(_mm_loadu_si128(m.dtype.as_ptr() as *const __m128i));
        let mu = _mm512_permutexvar_ps(d, _mm512_loadu_ps(ctx.mu.as_ptr()));
        let z = _mm512_permutexvar_ps(d, _mm512_loadu_ps(ctx.z.as_ptr()));
        let a = _mm512_mul_ps(s, mu);
        (a, _mm512_sub_ps(o, _mm512_mul_ps(a, z)))
    }
}

/// [`Ctx::term`] for 16 rows.
///
/// # Safety
/// AVX-512F present, enabled by its caller's `target_feature`.
#[inline(always)]
unsafe fn terms16(dot: __m512i, a: __m512, b: __m512, d: f32, dsum: f32) -> __m512 {
    unsafe {
        let ad = _mm512_mul_ps(a, _mm512_set1_ps(d));
        _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), ad), _mm512_mul_ps(b, _mm512_set1_ps(dsum)))
    }
}

/// [`tile_avx512`] at `R` planes: small batches row by row, one token fused, larger batches transposed.
///
/// # Safety
/// As [`tile_avx512`], with `R` = `ctx.r`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,f16c,avx2,fma")]
unsafe fn tile512<const R: usize>(ctx: &Ctx, tile: usize, acts: &QuantActs, n: usize, out: SyncPtr) {
    // Start of each plane, and of each row within a plane (bounds checked at construction).
    let planes: [*const u8; R] = std::array::from_fn(|p| unsafe { ctx.bytes.as_ptr().add(ctx.planes[p]) });
    let row0 = tile * TILE * ctx.row_bytes;
    let rb = ctx.row_bytes;
    if n <= SMALL_BATCH && ctx.group <= 128 {
        // Decoding, and the few tokens of a speculative verification: build each row's codes
        // once and use them for every token straight away, with the activations of up to four
        // tokens in registers; no transposes. The arithmetic per token is that of the batch
        // path below, so results do not depend on which path ran.
        let mut t0 = 0;
        while t0 < n {
            unsafe {
                match n - t0 {
                    1 => gemv_tokens::<R, 1>(ctx, tile, &planes, row0, acts, t0, out),
                    2 => gemv_tokens::<R, 2>(ctx, tile, &planes, row0, acts, t0, out),
                    3 => gemv_tokens::<R, 3>(ctx, tile, &planes, row0, acts, t0, out),
                    _ => gemv_tokens::<R, 4>(ctx, tile, &planes, row0, acts, t0, out),
                }
            }
            t0 += 4;
        }
        return;
    }
    if n == 1 {
        // Decoding with groups over two chunks: fuse code building and the dot product,
        // and keep the 16 row sums in a register across groups.
        let mut sum = _mm512_setzero_ps();
        for g in 0..ctx.gpr {
            let m = &ctx.meta[tile * ctx.gpr + g];
            let chunks = ctx.chunks(g);
            let mut acc = [_mm512_setzero_si512(); TILE];
            // Row by row, so each row's sums stay in registers across its chunks.
            for i in 0..TILE {
                let lv = ctx.levels[m.dtype[i] as usize];
                let lookup = !lv.identity;
                let (mut sh, mut sl) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for ch in chunks.clone() {
                    let (qh, ql) = unsafe {
                        (
                            _mm512_loadu_si512(acts.hi.as_ptr().add(ch * 64) as *const __m512i),
                            _mm512_loadu_si512(acts.lo.as_ptr().add(ch * 64) as *const __m512i),
                        )
                    };
                    let c = unsafe { codes512::<R>(&planes, row0 + i * rb + ch * 8, lv, lookup) };
                    sh = _mm512_dpbusd_epi32(sh, c, qh);
                    sl = _mm512_dpbusd_epi32(sl, c, ql);
                }
                acc[i] = unsafe { combine(sh, sl) };
            }
            unsafe {
                let (a, b) = ab16(ctx, m);
                let t = terms16(reduce16(&acc), a, b, acts.d[g], acts.dsum[g]);
                sum = _mm512_add_ps(sum, t);
            }
        }
        unsafe { _mm512_storeu_ps(out.get().add(tile * TILE), sum) };
        return;
    }
    // A batch: rebuild each group's codes once, transpose them so that a lane holds one row
    // (four columns per 32-bit lane), and then every token's dot products accumulate in the
    // lanes directly: one `vpdpbusd` with a broadcast of four activation bytes per four
    // columns, and no horizontal reduction per (token, group).
    let mut ct = [_mm512_setzero_si512(); TILE * MAX_CH];
    for g in 0..ctx.gpr {
        let m = &ctx.meta[tile * ctx.gpr + g];
        let chunks = ctx.chunks(g);
        for (k, ch) in chunks.clone().enumerate() {
            let t = unsafe { chunk_codes_transposed::<R>(ctx, m, &planes, row0, ch) };
            ct[k * TILE..(k + 1) * TILE].copy_from_slice(&t);
        }
        let (a, b) = unsafe { ab16(ctx, m) };
        let quads = &ct[..chunks.len() * TILE];
        let job =
            Job { ctx, acts, quads, col0: chunks.start * 64, g, a, b, out: unsafe { out.get().add(tile * TILE) } };
        unsafe { by_blocks!(job, n) };
    }
}

/// The levels of chunk `ch` of the tile's 16 rows, transposed so that lane `i` of entry `j`
/// holds row `i`'s levels at columns `4j .. 4j + 4` of the chunk (the batch paths' layout).
///
/// # Safety
/// AVX-512 F/BW/VBMI present, enabled by its caller's `target_feature`; the `R` planes hold chunk `ch` of
/// the 16 rows from byte `row0` (as [`tile512`] sets `planes` and `row0`).
#[inline(always)]
unsafe fn chunk_codes_transposed<const R: usize>(
    ctx: &Ctx,
    m: &TileMeta,
    planes: &[*const u8; R],
    row0: usize,
    ch: usize,
) -> [__m512i; TILE] {
    unsafe {
        let mut rows = [_mm512_setzero_si512(); TILE];
        for (i, row) in rows.iter_mut().enumerate() {
            let lv = ctx.levels[m.dtype[i] as usize];
            *row = codes512::<R>(planes, row0 + i * ctx.row_bytes + ch * 8, lv, !lv.identity);
        }
        transpose16(&rows)
    }
}

/// Most tokens that take the row-major path ([`gemv_tokens`]) instead of the transposed batch
/// path: up to here, rebuilding codes is cheaper than transposing them.
const SMALL_BATCH: usize = 4;

/// Tokens `t0..t0 + NT` (`NT` ≤ 4) against one tile, groups of at most two chunks: every
/// group's sums for each token, then the same float steps as every other path.
///
/// # Safety
/// As [`tile512`] (its `target_feature` and contract), whose `planes` and `row0` it is given, for tokens
/// `t0..t0 + NT` of `acts` and `out`.
#[inline(always)]
unsafe fn gemv_tokens<const R: usize, const NT: usize>(
    ctx: &Ctx,
    tile: usize,
    planes: &[*const u8; R],
    row0: usize,
    acts: &QuantActs,
    t0: usize,
    out: SyncPtr,
) {
    unsafe {
        let mut sums = [_mm512_setzero_ps(); NT];
        for g in 0..ctx.gpr {
            let m = &ctx.meta[tile * ctx.gpr + g];
            let chunks = ctx.chunks(g);
            let acc = if chunks.len() == 2 {
                gemv_group::<R, 2, NT>(ctx, m, planes, row0, acts, chunks.start, t0)
            } else {
                gemv_group::<R, 1, NT>(ctx, m, planes, row0, acts, chunks.start, t0)
            };
            let (a, b) = ab16(ctx, m);
            for t in 0..NT {
                let k = (t0 + t) * acts.groups + g;
                sums[t] = _mm512_add_ps(sums[t], terms16(reduce16(&acc[t]), a, b, acts.d[k], acts.dsum[k]));
            }
        }
        for (t, s) in sums.iter().enumerate() {
            _mm512_storeu_ps(out.get().add((t0 + t) * ctx.rows + tile * TILE), *s);
        }
    }
}

/// One group of `CH` whole chunks of the tile's 16 rows for `NT` tokens: per token, each row's
/// combined integer dot product, lane-partial (16 lanes to be summed by [`reduce16`]).
///
/// # Safety
/// AVX-512 F/BW/VNNI/VBMI present, enabled by its caller's `target_feature`; the `R` planes hold chunks
/// `ch0..ch0 + CH` of the 16 rows from byte `row0`, and `acts` holds them for tokens `t0..t0 + NT`.
#[inline(always)]
unsafe fn gemv_group<const R: usize, const CH: usize, const NT: usize>(
    ctx: &Ctx,
    m: &TileMeta,
    planes: &[*const u8; R],
    row0: usize,
    acts: &QuantActs,
    ch0: usize,
    t0: usize,
) -> [[__m512i; TILE]; NT] {
    unsafe {
        let at = |t: usize, k: usize| (t0 + t) * acts.padded + (ch0 + k) * 64;
        let qh: [[__m512i; CH]; NT] = std::array::from_fn(|t| {
            std::array::from_fn(|k| _mm512_loadu_si512(acts.hi.as_ptr().add(at(t, k)) as *const __m512i))
        });
        let ql: [[__m512i; CH]; NT] = std::array::from_fn(|t| {
            std::array::from_fn(|k| _mm512_loadu_si512(acts.lo.as_ptr().add(at(t, k)) as *const __m512i))
        });
        let mut acc = [[_mm512_setzero_si512(); TILE]; NT];
        let rb = ctx.row_bytes;
        for i in 0..TILE {
            // Datatype ids were validated when the layer was built.
            let lv = *ctx.levels.get_unchecked(*m.dtype.get_unchecked(i) as usize);
            let lookup = !lv.identity;
            let off = row0 + i * rb + ch0 * 8;
            let c: [__m512i; CH] = std::array::from_fn(|k| codes512::<R>(planes, off + k * 8, lv, lookup));
            for t in 0..NT {
                let mut sh = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[0], qh[t][0]);
                let mut sl = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[0], ql[t][0]);
                for k in 1..CH {
                    sh = _mm512_dpbusd_epi32(sh, c[k], qh[t][k]);
                    sl = _mm512_dpbusd_epi32(sl, c[k], ql[t][k]);
                }
                acc[t][i] = combine(sh, sl);
            }
        }
        acc
    }
}

/// Two-level layers (sub-block scales of 32): each chunk's 16 rows reduced to two sub-block
/// sums per row, scaled in float in sub-block order; the arithmetic of
/// [`Ctx::tile_sub_scalar`](super::Ctx) lane-wise over rows. Tokens go four at a time, codes
/// rebuilt for each four.
///
/// # Safety
/// As [`tile_avx512`].
pub unsafe fn tile_sub_avx512(
    ctx: &Ctx,
    sub: &SubMeta,
    tile: usize,
    acts: &QuantActs,
    n: usize,
    out: SyncPtr,
    gfni: bool,
) {
    unsafe {
        macro_rules! go {
            ($r:literal) => {
                if gfni {
                    tile_sub512_gf::<$r>(ctx, sub, tile, acts, n, out)
                } else {
                    tile_sub512::<$r>(ctx, sub, tile, acts, n, out)
                }
            };
        }
        match ctx.r {
            1 => go!(1),
            2 => go!(2),
            3 => go!(3),
            4 => go!(4),
            5 => go!(5),
            6 => go!(6),
            7 => go!(7),
            _ => go!(8),
        }
    }
}

/// [`tile_sub_avx512`] at `R` planes, codes built by [`codes512`].
///
/// # Safety
/// As [`tile_avx512`], with `R` = `ctx.r`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,f16c,avx2,fma")]
unsafe fn tile_sub512<const R: usize>(ctx: &Ctx, sub: &SubMeta, tile: usize, acts: &QuantActs, n: usize, out: SyncPtr) {
    unsafe { tile_sub_body::<R, false>(ctx, sub, tile, acts, n, out) }
}

/// [`tile_sub512`] with the codes of the decode loop built by [`codes_gf`].
///
/// # Safety
/// As [`tile_sub512`], and GFNI present.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,f16c,avx2,fma,gfni")]
unsafe fn tile_sub512_gf<const R: usize>(
    ctx: &Ctx,
    sub: &SubMeta,
    tile: usize,
    acts: &QuantActs,
    n: usize,
    out: SyncPtr,
) {
    unsafe { tile_sub_body::<R, true>(ctx, sub, tile, acts, n, out) }
}

/// The body of [`tile_sub512`] and [`tile_sub512_gf`]: batches through [`SubJob`], up to
/// [`SMALL_BATCH`] tokens through [`sub_tokens`].
///
/// # Safety
/// As [`tile_sub512`], or [`tile_sub512_gf`] when `GF`: it is inlined into them and needs their `target_feature`.
#[inline(always)]
unsafe fn tile_sub_body<const R: usize, const GF: bool>(
    ctx: &Ctx,
    sub: &SubMeta,
    tile: usize,
    acts: &QuantActs,
    n: usize,
    out: SyncPtr,
) {
    let planes: [*const u8; R] = std::array::from_fn(|p| unsafe { ctx.bytes.as_ptr().add(ctx.planes[p]) });
    let row0 = tile * TILE * ctx.row_bytes;
    if n > SMALL_BATCH {
        // A batch: each group's codes built and transposed once (rows in lanes), then every
        // token's sub-block sums come out per row with no horizontal reduction.
        // Uninitialized: a group fills only its own chunks' entries, and reads only those.
        let mut ct = [const { std::mem::MaybeUninit::<__m512i>::uninit() }; TILE * MAX_SUB_CH];
        for g in 0..ctx.gpr {
            let m = &ctx.meta[tile * ctx.gpr + g];
            let chunks = ctx.chunks(g);
            for (k, ch) in chunks.clone().enumerate() {
                let t = unsafe { chunk_codes_transposed::<R>(ctx, m, &planes, row0, ch) };
                for (dst, v) in ct[k * TILE..(k + 1) * TILE].iter_mut().zip(t) {
                    dst.write(v);
                }
            }
            // SAFETY: the first `chunks.len() · TILE` entries were written just above.
            let quads = unsafe { std::slice::from_raw_parts(ct.as_ptr() as *const __m512i, chunks.len() * TILE) };
            let job = SubJob {
                ctx,
                sub,
                acts,
                quads,
                ch0: chunks.start,
                g,
                m,
                tile,
                out: unsafe { out.get().add(tile * TILE) },
            };
            unsafe { job.all_tokens(n) };
        }
        return;
    }
    let mut t0 = 0;
    while t0 < n {
        unsafe {
            match n - t0 {
                1 => sub_tokens::<R, 1, GF>(ctx, sub, tile, &planes, row0, acts, t0, out),
                2 => sub_tokens::<R, 2, GF>(ctx, sub, tile, &planes, row0, acts, t0, out),
                3 => sub_tokens::<R, 3, GF>(ctx, sub, tile, &planes, row0, acts, t0, out),
                _ => sub_tokens::<R, 4, GF>(ctx, sub, tile, &planes, row0, acts, t0, out),
            }
        }
        t0 += 4;
    }
}

/// Most 64-column chunks in a two-level group.
pub(super) const MAX_SUB_CH: usize = super::MAX_SUB_GROUP / 64;

/// One group of a two-level layer for a batch, codes transposed (see [`Job`]).
struct SubJob<'a> {
    ctx: &'a Ctx<'a>,
    sub: &'a SubMeta,
    acts: &'a QuantActs,
    /// `quads[j]`, lane `i`: the levels of row `i` at columns `64·ch0 + 4j .. + 4`.
    quads: &'a [__m512i],
    ch0: usize,
    g: usize,
    m: &'a TileMeta,
    tile: usize,
    /// The tile's first row of token 0's output.
    out: *mut f32,
}

impl SubJob<'_> {
    /// Every token, in blocks of up to [`BLOCK`].
    ///
    /// # Safety
    /// As [`SubJob::tokens`], for tokens `0..n`.
    #[inline(always)]
    unsafe fn all_tokens(&self, n: usize) {
        unsafe { by_blocks!(self, n) }
    }

    /// Tokens `t0..t0 + NT`: per sub-block (32 or 16 columns), its eight or four `vpdpbusd`
    /// per token give each row's exact sum, scaled into `F` in sub-block order; then the
    /// code-free sums and [`Ctx::sub_term`] lane-wise. Only the `NT` sums and `NT` accumulators
    /// live through the loop (with eight tokens, 16 of the 32 registers), and every activation
    /// is a broadcast operand of its `vpdpbusd`.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL/VNNI, F16C and FMA present; `out` holds tokens `t0..t0 + NT` of the tile's 16 rows,
    /// written by this job alone.
    #[inline(never)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn tokens<const NT: usize>(&self, t0: usize) {
        let acts = self.acts;
        let blocks = acts.padded / SUB;
        let size = self.sub.size;
        let pc = self.sub.per_chunk();
        let k0 = self.ch0 * pc;
        let entry0 = self.tile * self.sub.spr + k0;
        let subs = self.quads.len() / (size / 4);
        // Every read below stays inside the activations: tokens `t0..t0 + NT`, columns of the
        // group's chunks, and their blocks.
        assert!(acts.q8.len() >= (t0 + NT) * acts.padded && (self.ch0 * 64 + subs * size) <= acts.padded);
        assert!(acts.e.len() >= (t0 + NT) * blocks);
        let q8: [*const i8; NT] =
            std::array::from_fn(|t| unsafe { acts.q8.as_ptr().add((t0 + t) * acts.padded + self.ch0 * 64) });
        let e: [*const f32; NT] = std::array::from_fn(|t| unsafe { acts.e.as_ptr().add((t0 + t) * blocks) });
        let mut f0 = [_mm512_setzero_ps(); NT];
        for (s, quads) in self.quads.chunks_exact(size / 4).enumerate() {
            let mut dot = [_mm512_setzero_si512(); NT];
            for (j, &c) in quads.iter().enumerate() {
                for t in 0..NT {
                    unsafe {
                        let q = (q8[t].add(s * size + 4 * j) as *const i32).read_unaligned();
                        dot[t] = _mm512_dpbusd_epi32(dot[t], c, _mm512_set1_epi32(q));
                    }
                }
            }
            // The activation block holding sub-block `k0 + s`.
            let b = (k0 + s) * size / SUB;
            unsafe {
                let sc = sub_multipliers(self.sub, entry0 + s).0;
                for t in 0..NT {
                    let se = _mm512_mul_ps(sc, _mm512_set1_ps(*e[t].add(b)));
                    f0[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[t]), se, f0[t]);
                }
            }
        }
        let mut fs = [[_mm512_setzero_ps(); 3]; NT];
        for t in 0..NT {
            fs[t][0] = f0[t];
        }
        unsafe { code_free_sums(self.sub, self.tile, k0..k0 + subs, acts, t0, &mut fs) };
        unsafe {
            let (a, z, o) = azo16(self.ctx, self.m);
            for t in 0..NT {
                let term = sub_terms16(fs[t], a, z, o);
                let p = self.out.add((t0 + t) * self.ctx.rows);
                // The first group starts from zero, as the reference's accumulator does.
                let prev = if self.g == 0 { _mm512_setzero_ps() } else { _mm512_loadu_ps(p) };
                _mm512_storeu_ps(p, _mm512_add_ps(prev, term));
            }
        }
    }
}

/// `(A, z, O)` of the tile's 16 rows, lane-wise as [`Ctx::azo`](super::Ctx).
///
/// # Safety
/// AVX-512F present, enabled by its caller's `target_feature`.
#[inline(always)]
unsafe fn azo16(ctx: &Ctx, m: &TileMeta) -> (__m512, __m512, __m512) {
    unsafe {
        let s = _mm512_cvtph_ps(_mm256_loadu_si256(m.scale.as_ptr() as *const __m256i));
        let o = _mm512_cvtph_ps(_mm256_loadu_si256(m.offset.as_ptr() as *const __m256i));
        let dt = _mm512_cvtepu8_epi32(_mm_loadu_si128(m.dtype.as_ptr() as *const __m128i));
        let a = _mm512_mul_ps(s, _mm512_permutexvar_ps(dt, _mm512_loadu_ps(ctx.mu.as_ptr())));
        (a, _mm512_permutexvar_ps(dt, _mm512_loadu_ps(ctx.z.as_ptr())), o)
    }
}

/// Sub-block entry `e`'s scale and offset multipliers of the tile's 16 rows, as floats
/// (`SubMeta::multipliers` lane-wise).
///
/// # Safety
/// AVX-512F and F16C present (the entry itself is bounds-checked).
#[inline(always)]
pub(super) unsafe fn sub_multipliers(sub: &SubMeta, e: usize) -> (__m512, __m512) {
    unsafe {
        if sub.kind == SubKind::Half {
            let sc = _mm512_cvtph_ps(_mm256_loadu_si256(sub.half_scale[e].as_ptr() as *const __m256i));
            let mn = _mm512_cvtph_ps(_mm256_loadu_si256(sub.half_offset[e].as_ptr() as *const __m256i));
            return (sc, mn);
        }
        let raw = _mm_loadu_si128(sub.scale[e].as_ptr() as *const __m128i);
        let sc = if sub.kind == SubKind::Signed { _mm512_cvtepi8_epi32(raw) } else { _mm512_cvtepu8_epi32(raw) };
        let mn = _mm512_cvtepi8_epi32(_mm_loadu_si128(sub.offset[e].as_ptr() as *const __m128i));
        (_mm512_cvtepi32_ps(sc), _mm512_cvtepi32_ps(mn))
    }
}

/// Lane `i` of result `q` is the sum of lanes `4q .. 4q + 4` of `acc[i]` (columns `16q ..
/// 16q + 16` of the chunk): the four sub-block sums of sub-blocks of 16.
///
/// # Safety
/// AVX-512F present.
#[inline(always)]
unsafe fn reduce16_quarters(acc: &[__m512i; TILE]) -> [__m512i; 4] {
    unsafe {
        let t = transpose16(acc);
        std::array::from_fn(|q| {
            _mm512_add_epi32(_mm512_add_epi32(t[4 * q], t[4 * q + 1]), _mm512_add_epi32(t[4 * q + 2], t[4 * q + 3]))
        })
    }
}

/// [`Ctx::sub_step`](super::Ctx), lane-wise over 16 rows.
///
/// # Safety
/// AVX-512F present, enabled by its caller's `target_feature`.
#[inline(always)]
unsafe fn sub_step16(acc: &mut [__m512; 3], dot: __m512i, sc: __m512, mn: __m512, e: f32, eq: f32) {
    unsafe {
        let eq = _mm512_set1_ps(eq);
        acc[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sc, _mm512_set1_ps(e)), acc[0]);
        acc[1] = _mm512_fmadd_ps(sc, eq, acc[1]);
        acc[2] = _mm512_fmadd_ps(mn, eq, acc[2]);
    }
}

/// [`Ctx::sub_term`](super::Ctx), lane-wise over 16 rows.
///
/// # Safety
/// AVX-512F present, enabled by its caller's `target_feature`.
#[inline(always)]
unsafe fn sub_terms16(acc: [__m512; 3], a: __m512, z: __m512, o: __m512) -> __m512 {
    unsafe {
        let x = _mm512_sub_ps(acc[0], _mm512_mul_ps(z, acc[1]));
        _mm512_add_ps(_mm512_mul_ps(x, a), _mm512_mul_ps(o, acc[2]))
    }
}

/// The two sums of [`sub_step16`] that do not involve the weights' codes, `Σ sc·eq` and
/// `Σ mn·eq` over sub-blocks `ks` of the tile (of 32 or 16 columns), for tokens `t0..t0 + NT`:
/// the same operations in the same sub-block order, run after a dot loop so that its
/// registers are not spilled.
///
/// # Safety
/// AVX-512F and F16C present, enabled by its caller's `target_feature` (every read is bounds-checked).
#[inline(always)]
unsafe fn code_free_sums<const NT: usize>(
    sub: &SubMeta,
    tile: usize,
    ks: std::ops::Range<usize>,
    acts: &QuantActs,
    t0: usize,
    fs: &mut [[__m512; 3]; NT],
) {
    let blocks = acts.padded / SUB;
    for k in ks {
        unsafe {
            let (sc, mn) = sub_multipliers(sub, tile * sub.spr + k);
            for t in 0..NT {
                let eq =
                    if sub.size == SUB { acts.eq[(t0 + t) * blocks + k] } else { acts.eq16[2 * (t0 + t) * blocks + k] };
                let eq = _mm512_set1_ps(eq);
                fs[t][1] = _mm512_fmadd_ps(sc, eq, fs[t][1]);
                fs[t][2] = _mm512_fmadd_ps(mn, eq, fs[t][2]);
            }
        }
    }
}

/// Most 64-column chunks one pass over a tile's rows covers in [`sub_tokens`]: its sums wait
/// on the stack (`SPAN · NT` vectors per row) until the pass ends.
const SPAN: usize = 8;

/// Tokens `t0..t0 + NT` of a two-level layer against one tile. Each row's chunks of a span
/// are built in one run (plane words read in order, row overheads paid once per span), then
/// each chunk's 16 rows are reduced to two sub-block sums per row.
///
/// # Safety
/// As [`tile_sub_body`] (its `target_feature` and contract), whose `planes` and `row0` it is given, for
/// tokens `t0..t0 + NT` of `acts` and `out`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn sub_tokens<const R: usize, const NT: usize, const GF: bool>(
    ctx: &Ctx,
    sub: &SubMeta,
    tile: usize,
    planes: &[*const u8; R],
    row0: usize,
    acts: &QuantActs,
    t0: usize,
    out: SyncPtr,
) {
    unsafe {
        let blocks = acts.padded / SUB;
        let mut sums = [_mm512_setzero_ps(); NT];
        // `buf[k][t][i]`: row `i`'s lane-partial sums of the span's chunk `k` for token `t`.
        let mut buf = [[[const { std::mem::MaybeUninit::<__m512i>::uninit() }; TILE]; NT]; SPAN];
        for g in 0..ctx.gpr {
            let m = &ctx.meta[tile * ctx.gpr + g];
            let mut fs = [[_mm512_setzero_ps(); 3]; NT];
            let chunks = ctx.chunks(g);
            let spans = chunks.len().div_ceil(SPAN);
            for sp in 0..spans {
                // Spans of near-equal length: a group of 9 chunks goes 4 + 5, not 8 + 1.
                let c0 = chunks.start + sp * chunks.len() / spans;
                let c1 = chunks.start + (sp + 1) * chunks.len() / spans;
                for i in 0..TILE {
                    // Datatype ids were validated when the layer was built.
                    let lv = *ctx.levels.get_unchecked(*m.dtype.get_unchecked(i) as usize);
                    let off = row0 + i * ctx.row_bytes + c0 * 8;
                    if lv.identity {
                        sub_row::<R, NT, false, GF>(planes, off, lv, acts, t0, c0..c1, &mut buf, i);
                    } else {
                        sub_row::<R, NT, true, GF>(planes, off, lv, acts, t0, c0..c1, &mut buf, i);
                    }
                }
                for ch in c0..c1 {
                    if sub.size != SUB {
                        // Sub-blocks of 16: four per chunk, two per activation block.
                        let k = tile * sub.spr + 4 * ch;
                        let ms: [(__m512, __m512); 4] = std::array::from_fn(|j| sub_multipliers(sub, k + j));
                        for t in 0..NT {
                            // SAFETY: as below.
                            let acc = &*(buf[ch - c0][t].as_ptr() as *const [__m512i; TILE]);
                            let ds = reduce16_quarters(acc);
                            let b = (t0 + t) * blocks + 2 * ch;
                            let h = 2 * (t0 + t) * blocks + 4 * ch;
                            for (j, (d, (sc, mn))) in ds.into_iter().zip(ms).enumerate() {
                                sub_step16(&mut fs[t], d, sc, mn, acts.e[b + j / 2], acts.eq16[h + j]);
                            }
                        }
                        continue;
                    }
                    let k = tile * sub.spr + 2 * ch;
                    let (sc0, mn0) = sub_multipliers(sub, k);
                    let (sc1, mn1) = sub_multipliers(sub, k + 1);
                    for t in 0..NT {
                        // SAFETY: `sub_row` wrote every row of chunks c0..c1 for every token.
                        let acc = &*(buf[ch - c0][t].as_ptr() as *const [__m512i; TILE]);
                        let (d0, d1) = reduce16_halves(acc);
                        let b = (t0 + t) * blocks + 2 * ch;
                        sub_step16(&mut fs[t], d0, sc0, mn0, acts.e[b], acts.eq[b]);
                        sub_step16(&mut fs[t], d1, sc1, mn1, acts.e[b + 1], acts.eq[b + 1]);
                    }
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

/// Row `i`'s chunks `span` for tokens `t0..t0 + NT`: codes built once per chunk, and per token
/// `Σ level·q` lane-partial into `buf[chunk − span.start][t][i]`.
///
/// # Safety
/// AVX-512 F/BW/VNNI/VBMI (and VL, GFNI when `GF`) present, enabled by its caller's `target_feature`; the
/// `R` planes hold `8·span.len()` bytes from `off`, and `acts.q8` chunks `span` of tokens `t0..t0 + NT`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn sub_row<const R: usize, const NT: usize, const LOOKUP: bool, const GF: bool>(
    planes: &[*const u8; R],
    off: usize,
    lv: &Levels,
    acts: &QuantActs,
    t0: usize,
    span: std::ops::Range<usize>,
    buf: &mut [[[std::mem::MaybeUninit<__m512i>; TILE]; NT]; SPAN],
    i: usize,
) {
    unsafe {
        if GF {
            // Runs of up to four chunks, each run's codes built together.
            let mut k = 0;
            while k < span.len() {
                let ch = span.start + k;
                match span.len() - k {
                    1 => sub_run::<R, NT, LOOKUP, 1>(planes, off, lv, acts, t0, ch, k, buf, i),
                    2 => sub_run::<R, NT, LOOKUP, 2>(planes, off, lv, acts, t0, ch, k, buf, i),
                    3 => sub_run::<R, NT, LOOKUP, 3>(planes, off, lv, acts, t0, ch, k, buf, i),
                    _ => sub_run::<R, NT, LOOKUP, 4>(planes, off, lv, acts, t0, ch, k, buf, i),
                }
                k += 4;
            }
            return;
        }
        for (k, ch) in span.enumerate() {
            let c = codes512::<R>(planes, off + k * 8, lv, LOOKUP);
            chunk_dots::<NT>(c, acts, t0, ch, &mut buf[k], i);
        }
    }
}

/// Row `i`'s lane-partial `Σ level·q` of chunk `ch` (levels `c`) for tokens `t0..t0 + NT`,
/// into `slot[t][i]`.
///
/// # Safety
/// AVX-512 F/VNNI present, enabled by its caller's `target_feature`; `acts.q8` holds chunk `ch` of tokens
/// `t0..t0 + NT`.
#[inline(always)]
unsafe fn chunk_dots<const NT: usize>(
    c: __m512i,
    acts: &QuantActs,
    t0: usize,
    ch: usize,
    slot: &mut [[std::mem::MaybeUninit<__m512i>; TILE]; NT],
    i: usize,
) {
    unsafe {
        let q8 = acts.q8.as_ptr();
        for (t, s) in slot.iter_mut().enumerate() {
            let q = _mm512_loadu_si512(q8.add((t0 + t) * acts.padded + ch * 64) as *const __m512i);
            s[i].write(_mm512_dpbusd_epi32(_mm512_setzero_si512(), c, q));
        }
    }
}

/// [`sub_row`]'s `NC` chunks from chunk `ch` (entry `k` of the span) with [`codes_gf`].
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI/VBMI and GFNI present, enabled by its caller's `target_feature`; `NC` ≤ 4, the `R`
/// planes hold `8·NC` bytes from `off + 8k`, and `acts.q8` chunks `ch..ch + NC` of tokens `t0..t0 + NT`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn sub_run<const R: usize, const NT: usize, const LOOKUP: bool, const NC: usize>(
    planes: &[*const u8; R],
    off: usize,
    lv: &Levels,
    acts: &QuantActs,
    t0: usize,
    ch: usize,
    k: usize,
    buf: &mut [[[std::mem::MaybeUninit<__m512i>; TILE]; NT]; SPAN],
    i: usize,
) {
    unsafe {
        let codes = codes_gf::<R, NC>(planes, off + k * 8);
        for (j, &c) in codes.iter().enumerate() {
            let c = if LOOKUP { levels512::<R>(c, lv) } else { c };
            chunk_dots::<NT>(c, acts, t0, ch + j, &mut buf[k + j], i);
        }
    }
}

/// Tokens whose dot products run together in the batch path: two accumulators each.
const BLOCK: usize = 8;

/// Lane `i` of result `j` is lane `j` of `v[i]`: a 16 × 16 transpose of 32-bit elements.
///
/// # Safety
/// AVX-512F present, enabled by its caller's `target_feature`.
#[inline(always)]
unsafe fn transpose16(v: &[__m512i; TILE]) -> [__m512i; TILE] {
    unsafe {
        // a[2p], a[2p+1]: rows 2p, 2p+1 interleaved (low and high pairs of each 128-bit lane).
        let mut a = [_mm512_setzero_si512(); TILE];
        for p in 0..TILE / 2 {
            a[2 * p] = _mm512_unpacklo_epi32(v[2 * p], v[2 * p + 1]);
            a[2 * p + 1] = _mm512_unpackhi_epi32(v[2 * p], v[2 * p + 1]);
        }
        // b[4q+c], 128-bit lane L: rows 4q..4q+3 at element 4L+c.
        let mut b = [_mm512_setzero_si512(); TILE];
        for q in 0..TILE / 4 {
            b[4 * q] = _mm512_unpacklo_epi64(a[4 * q], a[4 * q + 2]);
            b[4 * q + 1] = _mm512_unpackhi_epi64(a[4 * q], a[4 * q + 2]);
            b[4 * q + 2] = _mm512_unpacklo_epi64(a[4 * q + 1], a[4 * q + 3]);
            b[4 * q + 3] = _mm512_unpackhi_epi64(a[4 * q + 1], a[4 * q + 3]);
        }
        // A 4 × 4 transpose of 128-bit blocks for each c.
        let mut out = [_mm512_setzero_si512(); TILE];
        for c in 0..4 {
            let y0 = _mm512_shuffle_i32x4::<0b01_00_01_00>(b[c], b[4 + c]);
            let y1 = _mm512_shuffle_i32x4::<0b11_10_11_10>(b[c], b[4 + c]);
            let y2 = _mm512_shuffle_i32x4::<0b01_00_01_00>(b[8 + c], b[12 + c]);
            let y3 = _mm512_shuffle_i32x4::<0b11_10_11_10>(b[8 + c], b[12 + c]);
            out[c] = _mm512_shuffle_i32x4::<0b10_00_10_00>(y0, y2);
            out[4 + c] = _mm512_shuffle_i32x4::<0b11_01_11_01>(y0, y2);
            out[8 + c] = _mm512_shuffle_i32x4::<0b10_00_10_00>(y1, y3);
            out[12 + c] = _mm512_shuffle_i32x4::<0b11_01_11_01>(y1, y3);
        }
        out
    }
}

/// One group of one tile in the batch path: its transposed codes and where its sums go.
struct Job<'a> {
    ctx: &'a Ctx<'a>,
    acts: &'a QuantActs,
    /// `quads[j]`, lane `i`: the levels of row `i` at columns `col0 + 4j .. col0 + 4j + 4`.
    quads: &'a [__m512i],
    col0: usize,
    g: usize,
    a: __m512,
    b: __m512,
    /// The tile's first row of token 0's output.
    out: *mut f32,
}

impl Job<'_> {
    /// Tokens `t0..t0 + NT`: their group dot products, and the group's term added to each.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL/VNNI and FMA present; `acts` holds columns `col0..col0 + 4·quads.len()` of tokens
    /// `t0..t0 + NT`, and `out` those tokens' 16 rows of the tile, written by this job alone.
    #[inline(never)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    unsafe fn tokens<const NT: usize>(&self, t0: usize) {
        let acts = self.acts;
        let (hi, lo) = (acts.hi.as_ptr(), acts.lo.as_ptr());
        let base: [usize; NT] = std::array::from_fn(|t| (t0 + t) * acts.padded + self.col0);
        let mut sh = [_mm512_setzero_si512(); NT];
        let mut sl = [_mm512_setzero_si512(); NT];
        for (j, &c) in self.quads.iter().enumerate() {
            for t in 0..NT {
                unsafe {
                    let qh = (hi.add(base[t] + 4 * j) as *const i32).read_unaligned();
                    let ql = (lo.add(base[t] + 4 * j) as *const i32).read_unaligned();
                    sh[t] = _mm512_dpbusd_epi32(sh[t], c, _mm512_set1_epi32(qh));
                    sl[t] = _mm512_dpbusd_epi32(sl[t], c, _mm512_set1_epi32(ql));
                }
            }
        }
        for t in 0..NT {
            let k = (t0 + t) * acts.groups + self.g;
            unsafe {
                let v = terms16(combine(sh[t], sl[t]), self.a, self.b, acts.d[k], acts.dsum[k]);
                let p = self.out.add((t0 + t) * self.ctx.rows);
                // The first group starts from zero, as the reference's accumulator does.
                let prev = if self.g == 0 { _mm512_setzero_ps() } else { _mm512_loadu_ps(p) };
                _mm512_storeu_ps(p, _mm512_add_ps(prev, v));
            }
        }
    }
}
