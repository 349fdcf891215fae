//! Attention of query heads over the cached keys and values of their KV head.
//!
//! The arithmetic of one query is fixed, element by element, so that every path (scalar,
//! AVX2 build of the scalar code, AVX-512) and every grouping of queries gives the same bits:
//! - a score is `dot(q, k)·scale`, the dot taken in 16 lanes (lane `l` a fused multiply-add
//!   chain over dimensions `l, l + 16, …`, missing dimensions counting as zero) and the lanes
//!   summed by the tree of [`tree16`];
//! - weights are `e_i = exp(s_i − max)` with the polynomial [`exp_ref`], summed in 16 lanes
//!   (entry `i` into lane `i mod 16`, in order) and the lanes by [`tree16`];
//! - the output is `(Σ_i e_i·v_i)·(1/Σ)`, each dimension a fused multiply-add chain in entry
//!   order.
//!
//! A query's entries are positions `0..prefix` and then its `extra` cache slots; since nothing
//! depends on which query is next to which, a tree node whose ancestors sit at listed slots
//! gets the bits plain decoding computes with them at consecutive positions.

use crate::kernels::cpu::{self, exp_ref};

pub mod blocks;
pub mod formats;

/// What a KV cache stores per element: `f32`, or `f16` (llama.cpp's default), which halves the
/// bytes attention reads from memory for every decoded token. Widening `f16` to `f32` is exact,
/// so both go through the same `f32` arithmetic and every path still agrees bit for bit.
pub trait KvElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// `dst[i] = src[i]` rounded to this type (to nearest, ties to even).
    fn store(dst: &mut [Self], src: &[f32]);
    /// `dst[i] = src[i]` widened (exactly), a row at a time, so the portable paths convert
    /// whole rows with the CPU's converter rather than element by element.
    fn widen(src: &[Self], dst: &mut [f32]);
    /// The 16 elements at `p`, widened.
    ///
    /// # Safety
    /// AVX-512F present; 16 elements readable at `p`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl KvElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn store(dst: &mut [f32], src: &[f32]) {
        dst.copy_from_slice(src);
    }
    fn widen(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    /// # Safety
    /// As [`KvElem::load16`].
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl KvElem for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn store(dst: &mut [half::f16], src: &[f32]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
    fn widen(src: &[half::f16], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst);
    }
    /// # Safety
    /// As [`KvElem::load16`] (F16C, which AVX-512 CPUs have, converts).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const half::f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
}

/// Where one KV head's vectors sit in a `positions × kv_dim` cache of `T`.
pub struct HeadView<'a, T = f32> {
    pub keys: &'a [T],
    pub values: &'a [T],
    /// Elements between consecutive positions (`kv_dim`).
    pub stride: usize,
    /// Offset of this head inside a position (`kv_head · head_dim`).
    pub offset: usize,
}

impl<'a, T> HeadView<'a, T> {
    /// The same head from position `from` on (position `from` becomes 0): the window of a
    /// sliding-window layer.
    pub fn skip(self, from: usize) -> Self {
        HeadView { keys: &self.keys[from * self.stride..], values: &self.values[from * self.stride..], ..self }
    }
}

impl<T> Clone for HeadView<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for HeadView<'_, T> {}

/// One query of a group sharing a KV head: it attends to positions `0..prefix` and then the
/// cache slots `extra` (increasing), and writes `out` (`q.len()` values).
#[derive(Default)]
pub struct Query<'a> {
    pub q: &'a [f32],
    pub prefix: usize,
    pub extra: &'a [u32],
    pub out: &'a mut [f32],
}

impl Query<'_> {
    fn len(&self) -> usize {
        self.prefix + self.extra.len()
    }
    /// Cache position of entry `i`.
    #[inline(always)]
    fn pos(&self, i: usize) -> usize {
        if i < self.prefix { i } else { self.extra[i - self.prefix] as usize }
    }
}

/// `out = softmax(q·Kᵀ·scale) · V` over the first `len` positions, `scores` as scratch.
pub fn attend<T: KvElem>(q: &[f32], kv: HeadView<T>, len: usize, scale: f32, scores: &mut [f32], out: &mut [f32]) {
    attend_slots(q, kv, len, &[], scale, scores, out)
}

/// Attention over positions `0..prefix` followed by the cache slots `extra` (increasing): a
/// node of a draft tree sees the committed sequence and then its own ancestors.
pub fn attend_slots<T: KvElem>(
    q: &[f32],
    kv: HeadView<T>,
    prefix: usize,
    extra: &[u32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend_group(kv, scale, &mut [Query { q, prefix, extra, out }], scores)
}

/// Attention of several queries over one KV head (the query heads of a GQA group, several
/// tokens): each gets exactly what it would get alone, while the values are read once for up
/// to four queries. `scores` holds at least the sum of the queries' lengths.
pub fn attend_group<T: KvElem>(kv: HeadView<T>, scale: f32, qs: &mut [Query], scores: &mut [f32]) {
    check(kv, qs, scores);
    #[cfg(target_arch = "x86_64")]
    {
        let hd = qs.first().map_or(0, |q| q.q.len());
        if matches!(hd, 16 | 32 | 64 | 128 | 256) && cpu::avx512() {
            // SAFETY: AVX-512F was detected; shapes checked above.
            return unsafe { x86::group_avx512(kv, scale, qs, scores) };
        }
        if cpu::avx2() {
            // SAFETY: AVX2 and FMA were detected.
            return unsafe { group_avx2(kv, scale, qs, scores) };
        }
    }
    group_ref(kv, scale, qs, scores)
}

/// Bounds every path relies on (the SIMD paths read without further checks).
fn check<T>(kv: HeadView<T>, qs: &[Query], scores: &[f32]) {
    let hd = qs.first().map_or(0, |q| q.q.len());
    let mut total = 0;
    for q in qs.iter() {
        assert!(q.q.len() == hd && q.out.len() == hd, "queries of one group share the head size");
        // Positions and slots both increase, so the last entry of each part is the largest.
        let last = q.extra.last().map(|&e| e as usize).max(q.prefix.checked_sub(1));
        if let Some(p) = last {
            let end = p * kv.stride + kv.offset + hd;
            assert!(end <= kv.keys.len() && end <= kv.values.len(), "position {p} is outside the cache");
        }
        assert!(q.len() > 0, "a query attends to at least one position");
        total += q.len();
    }
    assert!(scores.len() >= total, "scores scratch too short");
}

/// Lanes `a[0..16]` summed as `((a_l + a_{l+8}) + (…+4)) + (…+2)`, then lanes 0 and 1.
#[inline(always)]
pub fn tree16(a: &[f32; 16]) -> f32 {
    let t8: [f32; 8] = std::array::from_fn(|l| a[l] + a[l + 8]);
    let t4: [f32; 4] = std::array::from_fn(|l| t8[l] + t8[l + 4]);
    let t2: [f32; 2] = std::array::from_fn(|l| t4[l] + t4[l + 2]);
    t2[0] + t2[1]
}

/// The reference dot product of attention scores (see the module docs).
#[inline(always)]
pub fn dot_ref<T: KvElem>(q: &[f32], k: &[T]) -> f32 {
    let mut acc = [0f32; 16];
    for c in 0..q.len().div_ceil(16) {
        for (l, a) in acc.iter_mut().enumerate() {
            let j = 16 * c + l;
            let (x, y) = if j < q.len() { (q[j], k[j].to_f32()) } else { (0.0, 0.0) };
            *a = x.mul_add(y, *a);
        }
    }
    tree16(&acc)
}

/// The reference compiled for AVX2 and FMA (the same operations, so the same bits).
///
/// # Safety
/// AVX2 and FMA present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn group_avx2<T: KvElem>(kv: HeadView<T>, scale: f32, qs: &mut [Query], scores: &mut [f32]) {
    group_ref(kv, scale, qs, scores)
}

/// The reference's weights: `sc` turned into `exp(s − max)` in place, summed in 16 lanes (entry
/// `i` into lane `i mod 16`, in order) and the lanes by [`tree16`]; returns `1/Σ`.
pub(crate) fn softmax_ref(sc: &mut [f32]) -> f32 {
    let max = sc.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut sums = [0f32; 16];
    for (i, s) in sc.iter_mut().enumerate() {
        *s = exp_ref(*s - max);
        sums[i % 16] += *s;
    }
    1.0 / tree16(&sums)
}

/// Largest head whose rows the reference widens on the stack (larger ones go element by
/// element, with the same bits).
const WIDE_MAX: usize = 256;

/// The reference: every query on its own, entry by entry.
#[inline(always)]
fn group_ref<T: KvElem>(kv: HeadView<T>, scale: f32, qs: &mut [Query], scores: &mut [f32]) {
    let mut off = 0;
    let mut row = [0f32; WIDE_MAX];
    for q in qs.iter_mut() {
        let hd = q.q.len();
        let len = q.len();
        let at = |p: usize| p * kv.stride + kv.offset..p * kv.stride + kv.offset + hd;
        let sc = &mut scores[off..off + len];
        off += len;
        for (i, s) in sc.iter_mut().enumerate() {
            let k = &kv.keys[at(q.pos(i))];
            *s = if hd <= WIDE_MAX {
                T::widen(k, &mut row[..hd]);
                dot_ref(q.q, &row[..hd])
            } else {
                dot_ref(q.q, k)
            } * scale;
        }
        let inv = softmax_ref(sc);
        q.out.fill(0.0);
        for (i, &e) in sc.iter().enumerate() {
            let vals = &kv.values[at(q.pos(i))];
            if hd <= WIDE_MAX {
                T::widen(vals, &mut row[..hd]);
                for (o, &v) in q.out.iter_mut().zip(&row[..hd]) {
                    *o = e.mul_add(v, *o);
                }
            } else {
                for (o, &v) in q.out.iter_mut().zip(vals) {
                    *o = e.mul_add(v.to_f32(), *o);
                }
            }
        }
        q.out.iter_mut().for_each(|o| *o *= inv);
    }
}

#[cfg(target_arch = "x86_64")]
// Index loops walk the chunks of a head in several arrays in step.
#[allow(clippy::needless_range_loop)]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::{HeadView, KvElem, Query};
    use crate::kernels::cpu::x86::exp16;

    /// # Safety
    /// AVX-512F and FMA present; `check` passed; head size 16, 32, 64, 128 or 256 (Gemma 3's).
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn group_avx512<T: KvElem>(kv: HeadView<T>, scale: f32, qs: &mut [Query], scores: &mut [f32]) {
        unsafe {
            match qs[0].q.len() {
                16 => blocked::<T, 1>(kv, scale, qs, scores),
                32 => blocked::<T, 2>(kv, scale, qs, scores),
                64 => blocked::<T, 4>(kv, scale, qs, scores),
                128 => blocked::<T, 8>(kv, scale, qs, scores),
                _ => blocked::<T, 16>(kv, scale, qs, scores),
            }
        }
    }

    /// Most queries [`blocked`] takes in one pass.
    const BLOCK_QUERIES: usize = 32;

    /// Queries over one KV head, `NC` chunks of 16 dimensions per head (a GQA group's heads,
    /// times several tokens in prefill and verification): their scores over the shared positions are taken 16 positions at a
    /// time for every query in turn, so those keys are read from L1 by all of them rather than
    /// streamed from L2 once per query. Each score is still computed on its own, so the bits
    /// are those of the reference.
    ///
    /// # Safety
    /// AVX-512F and FMA present (the caller's `target_feature`); `check` passed; `NC` chunks of
    /// 16 are the head size.
    #[inline(always)]
    unsafe fn blocked<T: KvElem, const NC: usize>(kv: HeadView<T>, scale: f32, qs: &mut [Query], scores: &mut [f32]) {
        unsafe {
            // Queries whose values are summed together ([`values`] takes up to four).
            let per = (16 / NC).min(4);
            let mut base = 0;
            for block in qs.chunks_mut(BLOCK_QUERIES) {
                let m = block.len();
                let mut offs = [0usize; BLOCK_QUERIES + 1];
                for (k, q) in block.iter().enumerate() {
                    offs[k + 1] = offs[k] + q.len();
                }
                let sc = &mut scores[base..base + offs[m]];
                let mut vmax = [_mm512_set1_ps(f32::NEG_INFINITY); BLOCK_QUERIES];
                let shared = block.iter().map(|q| q.prefix).max().unwrap_or(0);
                // Sixteen keys widened once for every query that takes all of them, when they
                // are not `f32` already: widening is exact, so the scores keep their bits.
                let mut wide = [[_mm512_setzero_ps(); NC]; 16];
                let mut p0 = 0;
                while p0 < shared {
                    let takers = block.iter().filter(|q| q.prefix >= p0 + 16).count();
                    let widened = std::mem::size_of::<T>() != 4 && takers > 1;
                    if widened {
                        let k0 = kv.keys.as_ptr().add(p0 * kv.stride + kv.offset);
                        for j in 0..16 {
                            for c in 0..NC {
                                wide[j][c] = T::load16(k0.add(j * kv.stride + 16 * c));
                            }
                        }
                    }
                    for (k, q) in block.iter().enumerate() {
                        if q.prefix > p0 {
                            let qv = load_query::<NC>(q);
                            let nb = (q.prefix - p0).min(16);
                            let out = &mut sc[offs[k]..offs[k + 1]];
                            if widened && nb == 16 {
                                let dots = dots16::<f32, NC>(&qv, wide.as_ptr() as *const f32, 16 * NC);
                                store_scores(dots, scale, p0, 16, out, &mut vmax[k]);
                            } else {
                                score_chunk::<T, NC>(kv, scale, &qv, q, p0, nb, out, &mut vmax[k]);
                            }
                        }
                    }
                    p0 += 16;
                }
                let mut invs = [0f32; BLOCK_QUERIES];
                for (k, q) in block.iter().enumerate() {
                    let (len, qv) = (q.len(), load_query::<NC>(q));
                    let own = &mut sc[offs[k]..offs[k + 1]];
                    // The query's own entries past its prefix (tree nodes' ancestors).
                    let mut i0 = q.prefix;
                    while i0 < len {
                        score_chunk::<T, NC>(kv, scale, &qv, q, i0, (len - i0).min(16), own, &mut vmax[k]);
                        i0 += 16;
                    }
                    invs[k] = softmax(own, vmax[k]);
                }
                for (i, part) in block.chunks_mut(per).enumerate() {
                    let (a, b) = (offs[i * per], offs[(i * per + part.len()).min(m)]);
                    let inv4: [f32; 4] = std::array::from_fn(|j| invs.get(i * per + j).copied().unwrap_or(0.0));
                    values::<T, NC>(kv, part, &sc[a..b], &inv4);
                }
                base += offs[m];
            }
        }
    }

    /// Key pointer of entry `i`.
    ///
    /// # Safety
    /// `i < q.len()` and the position is inside `base` (`check` passed).
    #[inline(always)]
    unsafe fn row<T>(base: &[T], kv: HeadView<T>, q: &Query, i: usize) -> *const T {
        unsafe { base.as_ptr().add(q.pos(i) * kv.stride + kv.offset) }
    }

    /// The query's `16·NC` values in `NC` vectors.
    ///
    /// # Safety
    /// AVX-512F present; `q.q` holds at least `16·NC` values.
    #[inline(always)]
    unsafe fn load_query<const NC: usize>(q: &Query) -> [__m512; NC] {
        unsafe { std::array::from_fn(|c| _mm512_loadu_ps(q.q.as_ptr().add(16 * c))) }
    }

    /// Scores of the query's entries `i0 .. i0 + nb` (`nb ≤ 16`) into `sc`, their maximum
    /// folded into `vmax`. Each score is its own chain and its own lane of the reduction, so
    /// how entries are cut into chunks does not change any bit.
    ///
    /// # Safety
    /// AVX-512F and FMA present; `check` passed; `i0 + nb ≤ q.len()` and `sc` holds them.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn score_chunk<T: KvElem, const NC: usize>(
        kv: HeadView<T>,
        scale: f32,
        qv: &[__m512; NC],
        q: &Query,
        i0: usize,
        nb: usize,
        sc: &mut [f32],
        vmax: &mut __m512,
    ) {
        unsafe {
            let dots = if nb == 16 && i0 + 16 <= q.prefix {
                dots16::<T, NC>(qv, kv.keys.as_ptr().add(i0 * kv.stride + kv.offset), kv.stride)
            } else {
                let mut acc = [_mm512_setzero_ps(); 16];
                for (j, a) in acc.iter_mut().enumerate().take(nb) {
                    let k = row(kv.keys, kv, q, i0 + j);
                    for c in 0..NC {
                        *a = _mm512_fmadd_ps(qv[c], T::load16(k.add(16 * c)), *a);
                    }
                }
                reduce16(&acc)
            };
            store_scores(dots, scale, i0, nb, sc, vmax);
        }
    }

    /// Entries `i0 .. i0 + nb` of `sc` set to `dots·scale`, their maximum folded into `vmax`.
    ///
    /// # Safety
    /// AVX-512F present; `1 ≤ nb ≤ 16` and `i0 + nb ≤ sc.len()`.
    #[inline(always)]
    unsafe fn store_scores(dots: __m512, scale: f32, i0: usize, nb: usize, sc: &mut [f32], vmax: &mut __m512) {
        unsafe {
            let s = _mm512_mul_ps(dots, _mm512_set1_ps(scale));
            let mask = if nb == 16 { 0xffff } else { (1u16 << nb) - 1 };
            _mm512_mask_storeu_ps(sc.as_mut_ptr().add(i0), mask, s);
            *vmax = _mm512_mask_max_ps(*vmax, mask, *vmax, s);
        }
    }

    /// The dot products of 16 consecutive keys (`k0`, one `stride` apart) with the query,
    /// unrolled so that the sums stay in registers.
    ///
    /// # Safety
    /// AVX-512F and FMA present; 16 keys of `16·NC` elements readable at `k0 + j·stride`.
    #[inline(always)]
    pub(super) unsafe fn dots16<T: KvElem, const NC: usize>(qv: &[__m512; NC], k0: *const T, stride: usize) -> __m512 {
        unsafe {
            let mut acc = [_mm512_setzero_ps(); 16];
            for j in 0..16 {
                let k = k0.add(j * stride);
                for c in 0..NC {
                    acc[j] = _mm512_fmadd_ps(qv[c], T::load16(k.add(16 * c)), acc[j]);
                }
            }
            reduce16(&acc)
        }
    }

    /// The query's scores `sc`, whose maximum is in `vmax`, turned into `exp(s − max)` in
    /// place; returns `1/Σ`.
    ///
    /// # Safety
    /// AVX-512F and FMA present.
    #[inline(always)]
    pub(super) unsafe fn softmax(sc: &mut [f32], vmax: __m512) -> f32 {
        unsafe {
            let len = sc.len();
            let max = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
            let mut sums = _mm512_setzero_ps();
            let mut i0 = 0;
            while i0 < len {
                let nb = (len - i0).min(16);
                let mask = if nb == 16 { 0xffff } else { (1u16 << nb) - 1 };
                let x = _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, sc.as_ptr().add(i0)), max);
                let e = exp16(x);
                _mm512_mask_storeu_ps(sc.as_mut_ptr().add(i0), mask, e);
                sums = _mm512_mask_add_ps(sums, mask, sums, e);
                i0 += 16;
            }
            1.0 / tree16v(sums)
        }
    }

    /// `Σ_i e_i·v_i · inv` for each query of `part` (weights in `sc`, query after query): the
    /// entries all of them share first, reading each value row once, then each one's own.
    ///
    /// # Safety
    /// AVX-512F and FMA present; `check` passed; at most four queries, whose weights `sc` holds
    /// query after query; each `out` holds `16·NC` values.
    #[inline(always)]
    unsafe fn values<T: KvElem, const NC: usize>(kv: HeadView<T>, part: &mut [Query], sc: &[f32], invs: &[f32; 4]) {
        unsafe {
            let m = part.len();
            let shared = part.iter().map(|q| q.prefix).min().unwrap_or(0);
            let mut starts = [0usize; 4];
            let mut s = 0;
            for (k, q) in part.iter().enumerate() {
                starts[k] = s;
                s += q.len();
            }
            let mut acc = [[_mm512_setzero_ps(); NC]; 4];
            for p in 0..shared {
                let v = kv.values.as_ptr().add(p * kv.stride + kv.offset);
                let vv: [__m512; NC] = std::array::from_fn(|c| T::load16(v.add(16 * c)));
                // `m` is at most 4: unrolled for each count so the sums stay in registers.
                macro_rules! step {
                    ($k:expr) => {{
                        let e = _mm512_set1_ps(*sc.get_unchecked(starts[$k] + p));
                        for c in 0..NC {
                            acc[$k][c] = _mm512_fmadd_ps(e, vv[c], acc[$k][c]);
                        }
                    }};
                }
                step!(0);
                if m > 1 {
                    step!(1);
                }
                if m > 2 {
                    step!(2);
                }
                if m > 3 {
                    step!(3);
                }
            }
            for (k, q) in part.iter_mut().enumerate() {
                let mut a = acc[k];
                for i in shared..q.len() {
                    let v = row(kv.values, kv, q, i);
                    let e = _mm512_set1_ps(sc[starts[k] + i]);
                    for c in 0..NC {
                        a[c] = _mm512_fmadd_ps(e, T::load16(v.add(16 * c)), a[c]);
                    }
                }
                let inv = _mm512_set1_ps(invs[k]);
                for c in 0..NC {
                    _mm512_storeu_ps(q.out.as_mut_ptr().add(16 * c), _mm512_mul_ps(a[c], inv));
                }
            }
        }
    }

    /// [`super::tree16`] of one vector.
    ///
    /// # Safety
    /// AVX-512F present.
    #[inline(always)]
    unsafe fn tree16v(a: __m512) -> f32 {
        unsafe {
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)));
            let t8 = _mm256_add_ps(_mm512_castps512_ps256(a), hi);
            let t4 = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps::<1>(t8));
            let t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
            _mm_cvtss_f32(_mm_add_ss(t2, _mm_movehdup_ps(t2)))
        }
    }

    /// Lane `j` of the result is [`super::tree16`] of `a[j]`. (Loops, not closures: those would
    /// be compiled without the caller's target features.)
    ///
    /// # Safety
    /// AVX-512F present.
    #[inline(always)]
    unsafe fn reduce16(a: &[__m512; 16]) -> __m512 {
        unsafe {
            // x[i], i < 8: lanes 0..8 hold t8 of a[i], lanes 8..16 t8 of a[i + 8].
            let mut x = [_mm512_setzero_ps(); 8];
            for i in 0..8 {
                x[i] = _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0b01_00_01_00>(a[i], a[i + 8]),
                    _mm512_shuffle_f32x4::<0b11_10_11_10>(a[i], a[i + 8]),
                );
            }
            // y[i], i < 4: 128-bit blocks hold t4 of a[i], a[i + 8], a[i + 4], a[i + 12].
            let mut y = [_mm512_setzero_ps(); 4];
            for i in 0..4 {
                y[i] = _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0b10_00_10_00>(x[i], x[i + 4]),
                    _mm512_shuffle_f32x4::<0b11_01_11_01>(x[i], x[i + 4]),
                );
            }
            // z[i], i < 2: each block holds t2 of y[i]'s block in lanes 0, 1, of y[i + 2]'s in 2, 3.
            let mut z = [_mm512_setzero_ps(); 2];
            for i in 0..2 {
                z[i] = _mm512_add_ps(
                    _mm512_shuffle_ps::<0b01_00_01_00>(y[i], y[i + 2]),
                    _mm512_shuffle_ps::<0b11_10_11_10>(y[i], y[i + 2]),
                );
            }
            // Block b, lanes 0..4: the sums of y[0], y[2], y[1], y[3] at block b.
            let w = _mm512_add_ps(
                _mm512_shuffle_ps::<0b10_00_10_00>(z[0], z[1]),
                _mm512_shuffle_ps::<0b11_01_11_01>(z[0], z[1]),
            );
            // Lane 4b + c of w sums a[IDX[4b + c]]; put each where it belongs.
            const IDX: [usize; 16] = [0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15];
            const INV: [i32; 16] = {
                let mut inv = [0i32; 16];
                let mut j = 0;
                while j < 16 {
                    inv[IDX[j]] = j as i32;
                    j += 1;
                }
                inv
            };
            _mm512_permutexvar_ps(_mm512_loadu_si512(INV.as_ptr() as *const __m512i), w)
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn rand_vec(rng: &mut StdRng, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-amp..amp)).collect()
    }

    #[test]
    fn matches_naive_f64_attention() {
        let (hd, stride, offset, len) = (16, 48, 16, 13);
        let keys: Vec<f32> = (0..len * stride).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
        let values: Vec<f32> = (0..len * stride).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.2).collect();
        let q: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.3).sin()).collect();
        let mut scores = vec![0f32; len];
        let mut out = vec![0f32; hd];
        let kv = HeadView { keys: &keys, values: &values, stride, offset };
        attend(&q, kv, len, 0.25, &mut scores, &mut out);
        let s: Vec<f64> = (0..len)
            .map(|p| (0..hd).map(|d| q[d] as f64 * keys[p * stride + offset + d] as f64).sum::<f64>() * 0.25)
            .collect();
        let m = s.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
        for d in 0..hd {
            let want: f64 = (0..len).map(|p| (s[p] - m).exp() / z * values[p * stride + offset + d] as f64).sum();
            assert!((out[d] as f64 - want).abs() < 1e-5, "dim {d}: {} vs {want}", out[d]);
        }
        // The same positions listed as extra slots give the same bits.
        let slots: Vec<u32> = (5..len as u32).collect();
        let mut via_slots = vec![0f32; hd];
        attend_slots(&q, kv, 5, &slots, 0.25, &mut scores, &mut via_slots);
        assert_eq!(out, via_slots);
    }

    /// Every path, and every grouping of queries, gives the reference's bits; also on odd
    /// lengths, odd head sizes (which take the fallback) and tree-style slot lists.
    #[test]
    fn every_path_and_grouping_equals_the_reference_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(17);
        let shapes =
            [(64, 3, 70), (128, 2, 41), (40, 1, 23), (64, 1, 1), (16, 2, 33), (64, 2, 300), (256, 1, 90), (32, 4, 77)];
        for (i, &(hd, kv_heads, cap)) in shapes.iter().cycle().take(70).enumerate() {
            let stride = hd * kv_heads;
            let keys = rand_vec(&mut rng, cap * stride, 1.0);
            let values = rand_vec(&mut rng, cap * stride, 1.0);
            // Half the shapes over an f16 cache, half over an f32 one.
            if i % 2 == 0 {
                let half = |x: &[f32]| x.iter().map(|&v| half::f16::from_f32(v)).collect::<Vec<_>>();
                paths_agree(&mut rng, hd, kv_heads, cap, &half(&keys), &half(&values));
            } else {
                paths_agree(&mut rng, hd, kv_heads, cap, &keys, &values);
            }
        }
    }

    fn paths_agree<T: KvElem>(rng: &mut StdRng, hd: usize, kv_heads: usize, cap: usize, keys: &[T], values: &[T]) {
        let stride = hd * kv_heads;
        {
            for kvh in 0..kv_heads {
                let kv = HeadView { keys, values, stride, offset: kvh * hd };
                let scale = 1.0 / (hd as f32).sqrt() * rng.random_range(0.5..6.0);
                // Causal tails of different lengths, and tree nodes: up to seven queries, or
                // as many as a prefill block takes and more (several blocks of the kernel).
                let m = if rng.random_bool(0.25) { rng.random_range(8..70usize) } else { rng.random_range(1..8usize) };
                let qv: Vec<Vec<f32>> = (0..m).map(|_| rand_vec(rng, hd, 2.0)).collect();
                let mut specs: Vec<(usize, Vec<u32>)> = Vec::new();
                for _ in 0..m {
                    let prefix = rng.random_range(0..cap);
                    let mut extra: Vec<u32> = (prefix as u32..cap as u32).filter(|_| rng.random_bool(0.4)).collect();
                    if prefix == 0 && extra.is_empty() {
                        extra.push(rng.random_range(0..cap as u32));
                    }
                    specs.push((prefix, extra));
                }
                let total: usize = specs.iter().map(|(p, e)| p + e.len()).sum();
                // Reference, query by query.
                let mut want = vec![vec![0f32; hd]; m];
                for (k, (p, e)) in specs.iter().enumerate() {
                    let mut sc = vec![0f32; p + e.len()];
                    group_ref(kv, scale, &mut [Query { q: &qv[k], prefix: *p, extra: e, out: &mut want[k] }], &mut sc);
                }
                // Dispatched path: alone, and all together.
                let mut sc = vec![0f32; total];
                for (k, (p, e)) in specs.iter().enumerate() {
                    let mut out = vec![0f32; hd];
                    attend_slots(&qv[k], kv, *p, e, scale, &mut sc, &mut out);
                    assert_eq!(bits(&out), bits(&want[k]), "hd {hd} alone, query {k}");
                }
                // All queries in one call of `run`, compared with the reference.
                let mut grouped = |what: &str, run: &mut dyn FnMut(&mut [Query], &mut [f32])| {
                    let mut outs = vec![vec![0f32; hd]; m];
                    let mut qs: Vec<Query> = outs
                        .iter_mut()
                        .zip(&specs)
                        .zip(&qv)
                        .map(|((out, (p, e)), q)| Query { q, prefix: *p, extra: e, out })
                        .collect();
                    run(&mut qs, &mut sc);
                    drop(qs);
                    for k in 0..m {
                        assert_eq!(bits(&outs[k]), bits(&want[k]), "hd {hd} {what}, query {k} of {m}");
                    }
                };
                grouped("grouped", &mut |qs, sc| attend_group(kv, scale, qs, sc));
                #[cfg(target_arch = "x86_64")]
                if cpu::avx2() {
                    // SAFETY: the features the AVX2 build needs were just detected.
                    grouped("avx2 build", &mut |qs, sc| unsafe { group_avx2(kv, scale, qs, sc) });
                }
            }
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }
}
