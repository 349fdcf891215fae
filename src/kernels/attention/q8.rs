//! Attention over a q8_0 cache (llama.cpp's `--cache-type-k/-v q8_0`): every 32 values of a
//! cached key or value row are 32 int8 codes and one f16 step `d`, 8.5 bits a value, so a long
//! context reads about half the bytes of the f16 cache.
//!
//! Nothing is widened ahead of time. Scores are integer dot products: each query is quantized
//! to int8 per 32 dimensions once, and `Σ q·k` of a block is exact (`vpdpbusd` on AVX-512 VNNI,
//! 16 positions at a time); the float part is fixed per entry:
//! - score = `(Σ_b isum_b · (dq_b·dk_b)) · scale`, one fused multiply-add per block `b` in
//!   order from zero, `isum_b` the exact integer sum, `dq_b` the query's step (f32) and `dk_b`
//!   the key's (f16, widened);
//! - weights and their sum as for every cache ([`super`]);
//! - the output is `(Σ_i e_i·(dv_i·v_i))·(1/Σ)`, the value widened as `dv·code` (one multiply)
//!   and each dimension a fused multiply-add chain in entry order.
//!
//! So the scalar reference and the AVX-512 path agree bit for bit, and nothing depends on the
//! other queries of a pass. Keys are quantized once, when their token is stored, from that
//! token's row alone: batch invariance and speculative rollback hold as for f16.

use half::f16;

use super::{Query, softmax_ref};
use crate::kernels::cpu;

/// Values per q8_0 block.
pub const BLOCK: usize = 32;

/// `x` (a multiple of [`BLOCK`] long) as q8_0 blocks, as llama.cpp's `quantize_row_q8_0_ref`:
/// per block `d = amax/127`, codes `round(x·(1/d))` (halves away from zero), `d` kept as f16.
pub fn quantize_row(x: &[f32], codes: &mut [i8], steps: &mut [f16]) {
    for ((xb, cb), d) in x.chunks_exact(BLOCK).zip(codes.chunks_exact_mut(BLOCK)).zip(steps) {
        let (dd, id) = step(xb);
        for (c, &v) in cb.iter_mut().zip(xb) {
            *c = (v * id).round() as i8;
        }
        *d = f16::from_f32(dd);
    }
}

/// A block's step `amax/127` and its inverse (zero for an all-zero block).
#[inline(always)]
fn step(xb: &[f32]) -> (f32, f32) {
    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    (d, if d != 0.0 { 1.0 / d } else { 0.0 })
}

/// One KV head's keys and values in a layer's q8_0 cache.
///
/// Key codes are stored offset by 128 (`code ^ 0x80`, as `u8`) for `vpdpbusd`'s unsigned
/// operand; key steps per head and block in position order (`key_steps[(head_block) · cap +
/// pos]`), so 16 consecutive positions' steps are one load; value codes and steps per position.
#[derive(Clone, Copy)]
pub struct Q8View<'a> {
    /// `positions × stride` key codes, offset by 128.
    pub key_codes: &'a [u8],
    /// The head's `head_dim / 32` step rows of `cap` positions each, one after another.
    pub key_steps: &'a [f16],
    pub value_codes: &'a [i8],
    /// `positions × stride / 32` value steps.
    pub value_steps: &'a [f16],
    /// Values between consecutive positions (`kv_dim`).
    pub stride: usize,
    /// Offset of this head inside a position (`kv_head · head_dim`).
    pub offset: usize,
    /// Positions per key step row.
    pub cap: usize,
}

impl Q8View<'_> {
    /// Key code `j` of position `p`.
    #[inline(always)]
    fn key(&self, p: usize, j: usize) -> i32 {
        (self.key_codes[p * self.stride + self.offset + j] ^ 0x80) as i8 as i32
    }
    #[inline(always)]
    fn key_step(&self, p: usize, b: usize) -> f32 {
        self.key_steps[b * self.cap + p].to_f32()
    }
    /// Value `j` of position `p`, widened: `dv·code`.
    #[inline(always)]
    fn value(&self, p: usize, j: usize) -> f32 {
        let at = p * self.stride + self.offset + j;
        self.value_steps[at / BLOCK].to_f32() * self.value_codes[at] as f32
    }
}

/// A query quantized for the integer dot products: codes and steps per block of 32, and each
/// block's code sum (the correction for the keys' +128 offset).
struct QuantQuery {
    codes: [i8; MAX_HEAD],
    steps: [f32; MAX_HEAD / BLOCK],
    sums: [i32; MAX_HEAD / BLOCK],
}

/// Largest head size this path takes.
pub const MAX_HEAD: usize = 256;

impl QuantQuery {
    fn new(q: &[f32]) -> QuantQuery {
        let mut qq = QuantQuery { codes: [0; MAX_HEAD], steps: [0.0; MAX_HEAD / BLOCK], sums: [0; MAX_HEAD / BLOCK] };
        for (b, xb) in q.chunks_exact(BLOCK).enumerate() {
            let (d, id) = step(xb);
            qq.steps[b] = d;
            for (j, &v) in xb.iter().enumerate() {
                let c = (v * id).round() as i8;
                qq.codes[b * BLOCK + j] = c;
                qq.sums[b] += c as i32;
            }
        }
        qq
    }
}

/// The reference score of one position (see the module docs).
#[inline(always)]
fn score_ref(kv: &Q8View, qq: &QuantQuery, hd: usize, p: usize, scale: f32) -> f32 {
    let mut acc = 0f32;
    for b in 0..hd / BLOCK {
        let mut isum = 0i32;
        for j in b * BLOCK..(b + 1) * BLOCK {
            isum += qq.codes[j] as i32 * kv.key(p, j);
        }
        acc = (isum as f32).mul_add(qq.steps[b] * kv.key_step(p, b), acc);
    }
    acc * scale
}

/// Attention of several queries over one KV head of a q8_0 cache; each gets exactly what it
/// would get alone. `scores` holds at least the sum of the queries' lengths.
///
/// # Panics
/// If a head size is not a multiple of 32 (at most [`MAX_HEAD`]), or an entry lies outside
/// the cache.
pub fn attend_group_q8(kv: Q8View, scale: f32, qs: &mut [Query], scores: &mut [f32]) {
    check(kv, qs, scores);
    #[cfg(target_arch = "x86_64")]
    {
        let hd = qs.first().map_or(0, |q| q.q.len());
        if (hd == 64 || hd == 128) && cpu::avx512() {
            // SAFETY: AVX-512 (F/BW/VL/VNNI) and FMA were detected; shapes checked above.
            return unsafe { x86::group_avx512(kv, scale, qs, scores) };
        }
    }
    group_ref(kv, scale, qs, scores)
}

/// Bounds every path relies on.
fn check(kv: Q8View, qs: &[Query], scores: &[f32]) {
    let hd = qs.first().map_or(0, |q| q.q.len());
    assert!(hd.is_multiple_of(BLOCK) && hd <= MAX_HEAD, "a q8_0 cache needs a head size that is a multiple of 32");
    assert!(kv.offset.is_multiple_of(BLOCK) && kv.stride.is_multiple_of(BLOCK));
    let mut total = 0;
    for q in qs.iter() {
        assert!(q.q.len() == hd && q.out.len() == hd, "queries of one group share the head size");
        let last = q.extra.last().map(|&e| e as usize).max(q.prefix.checked_sub(1));
        if let Some(p) = last {
            assert!(p < kv.cap, "position {p} is outside the cache");
            let end = p * kv.stride + kv.offset + hd;
            assert!(end <= kv.key_codes.len() && end <= kv.value_codes.len(), "position {p} is outside the cache");
            assert!(end.div_ceil(BLOCK) <= kv.value_steps.len());
            assert!((hd / BLOCK) * kv.cap <= kv.key_steps.len());
        }
        assert!(q.len() > 0, "a query attends to at least one position");
        total += q.len();
    }
    assert!(scores.len() >= total, "scores scratch too short");
}

/// The reference: every query on its own, entry by entry.
fn group_ref(kv: Q8View, scale: f32, qs: &mut [Query], scores: &mut [f32]) {
    let mut off = 0;
    for q in qs.iter_mut() {
        let hd = q.q.len();
        let qq = QuantQuery::new(q.q);
        let len = q.len();
        let sc = &mut scores[off..off + len];
        off += len;
        for (i, s) in sc.iter_mut().enumerate() {
            *s = score_ref(&kv, &qq, hd, q.pos(i), scale);
        }
        let inv = softmax_ref(sc);
        q.out.fill(0.0);
        for (i, &e) in sc.iter().enumerate() {
            let p = q.pos(i);
            for (j, o) in q.out.iter_mut().enumerate() {
                *o = e.mul_add(kv.value(p, j), *o);
            }
        }
        q.out.iter_mut().for_each(|o| *o *= inv);
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::x86::softmax;
    use super::{BLOCK, Q8View, QuantQuery, score_ref};
    use crate::kernels::attention::Query;
    use crate::kernels::cpu::x86::reduce16_halves;

    /// # Safety
    /// AVX-512 F/BW/VL/VNNI, F16C and FMA present; `check` passed; head size 64 or 128.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
    pub(super) unsafe fn group_avx512(kv: Q8View, scale: f32, qs: &mut [Query], scores: &mut [f32]) {
        unsafe {
            match qs[0].q.len() {
                64 => group::<1>(kv, scale, qs, scores),
                _ => group::<2>(kv, scale, qs, scores),
            }
        }
    }

    /// `NC` vectors of 64 codes per head (64 or 128 dimensions).
    ///
    /// # Safety
    /// As [`group_avx512`], whose `target_feature` it inherits.
    #[inline(always)]
    unsafe fn group<const NC: usize>(kv: Q8View, scale: f32, qs: &mut [Query], scores: &mut [f32]) {
        unsafe {
            let hd = 64 * NC;
            let mut off = 0;
            for part in qs.chunks_mut(4) {
                let m = part.len();
                let mut starts = [0usize; 4];
                let mut invs = [0f32; 4];
                for (k, q) in part.iter().enumerate() {
                    starts[k] = off;
                    let len = q.len();
                    let sc = &mut scores[off..off + len];
                    off += len;
                    let qq = QuantQuery::new(q.q);
                    let mut p0 = 0;
                    while p0 + 16 <= q.prefix {
                        let s = scores16::<NC>(&kv, &qq, p0, scale);
                        _mm512_storeu_ps(sc.as_mut_ptr().add(p0), s);
                        p0 += 16;
                    }
                    for i in p0..len {
                        sc[i] = score_ref(&kv, &qq, hd, q.pos(i), scale);
                    }
                    let max = sc.iter().fold(f32::NEG_INFINITY, |a, &s| a.max(s));
                    invs[k] = softmax(sc, _mm512_set1_ps(max));
                }
                values::<NC>(&kv, part, m, scores, &starts, &invs);
            }
        }
    }

    /// Scores of positions `p0 .. p0 + 16`, one per lane: `NC·64` codes a row, one `vpdpbusd`
    /// per 64, reduced to the sums of each block of 32, then the float steps of the reference.
    ///
    /// # Safety
    /// As [`group`]; the 16 positions are inside the cache.
    #[inline(always)]
    unsafe fn scores16<const NC: usize>(kv: &Q8View, qq: &QuantQuery, p0: usize, scale: f32) -> __m512 {
        unsafe {
            let mut qv = [_mm512_setzero_si512(); NC];
            for c in 0..NC {
                qv[c] = _mm512_loadu_si512(qq.codes.as_ptr().add(64 * c) as *const _);
            }
            let mut acc = _mm512_setzero_ps();
            let k0 = kv.key_codes.as_ptr().add(p0 * kv.stride + kv.offset);
            for c in 0..NC {
                let mut dots = [_mm512_setzero_si512(); 16];
                for j in 0..16 {
                    let k = _mm512_loadu_si512(k0.add(j * kv.stride + 64 * c) as *const _);
                    dots[j] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), k, qv[c]);
                }
                let halves = reduce16_halves(&dots);
                for (h, raw) in [halves.0, halves.1].into_iter().enumerate() {
                    let b = 2 * c + h;
                    // Σ (k + 128)·q − 128·Σq: the exact Σ k·q.
                    let isum = _mm512_sub_epi32(raw, _mm512_set1_epi32(128 * qq.sums[b]));
                    let dk =
                        _mm512_cvtph_ps(_mm256_loadu_si256(kv.key_steps.as_ptr().add(b * kv.cap + p0) as *const _));
                    let s = _mm512_mul_ps(_mm512_set1_ps(qq.steps[b]), dk);
                    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), s, acc);
                }
            }
            _mm512_mul_ps(acc, _mm512_set1_ps(scale))
        }
    }

    /// `Σ_i e_i·v_i · inv` for the (at most four) queries of `part`, weights in `sc` at
    /// `starts`: the entries they share first, each value row widened once, then each one's own.
    ///
    /// # Safety
    /// As [`group`]; the weights were written by it.
    #[inline(always)]
    unsafe fn values<const NC: usize>(
        kv: &Q8View,
        part: &mut [Query],
        m: usize,
        sc: &[f32],
        starts: &[usize; 4],
        invs: &[f32; 4],
    ) {
        unsafe {
            let shared = part.iter().map(|q| q.prefix).min().unwrap_or(0);
            let mut acc = [[[_mm512_setzero_ps(); 4]; NC]; 4];
            for p in 0..shared {
                let v = row::<NC>(kv, p);
                for k in 0..m {
                    let e = _mm512_set1_ps(*sc.get_unchecked(starts[k] + p));
                    for c in 0..NC {
                        for u in 0..4 {
                            acc[k][c][u] = _mm512_fmadd_ps(e, v[c][u], acc[k][c][u]);
                        }
                    }
                }
            }
            for (k, q) in part.iter_mut().enumerate() {
                let mut a = acc[k];
                for i in shared..q.len() {
                    let v = row::<NC>(kv, q.pos(i));
                    let e = _mm512_set1_ps(sc[starts[k] + i]);
                    for c in 0..NC {
                        for u in 0..4 {
                            a[c][u] = _mm512_fmadd_ps(e, v[c][u], a[c][u]);
                        }
                    }
                }
                let inv = _mm512_set1_ps(invs[k]);
                for c in 0..NC {
                    for u in 0..4 {
                        _mm512_storeu_ps(q.out.as_mut_ptr().add(64 * c + 16 * u), _mm512_mul_ps(a[c][u], inv));
                    }
                }
            }
        }
    }

    /// Position `p`'s value row widened: `dv·code`, 16 values a vector.
    ///
    /// # Safety
    /// As [`group`]; `p` is inside the cache.
    #[inline(always)]
    unsafe fn row<const NC: usize>(kv: &Q8View, p: usize) -> [[__m512; 4]; NC] {
        unsafe {
            let at = p * kv.stride + kv.offset;
            // The row's (two or four) steps widened at once.
            let sp = kv.value_steps.as_ptr().add(at / BLOCK);
            let raw = if NC == 1 {
                _mm_cvtsi32_si128((sp as *const i32).read_unaligned())
            } else {
                _mm_loadl_epi64(sp as *const __m128i)
            };
            let steps = _mm_cvtph_ps(raw);
            let mut out = [[_mm512_setzero_ps(); 4]; NC];
            for c in 0..NC {
                for u in 0..4 {
                    let codes = _mm512_cvtepi8_epi32(_mm_loadu_si128(
                        kv.value_codes.as_ptr().add(at + 64 * c + 16 * u) as *const _,
                    ));
                    let d = _mm512_broadcastss_ps(lane(steps, 2 * c + u / 2));
                    out[c][u] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(codes));
                }
            }
            out
        }
    }

    /// Lane `i` (0–3) of `v` in lane 0.
    ///
    /// # Safety
    /// SSE present.
    #[inline(always)]
    unsafe fn lane(v: __m128, i: usize) -> __m128 {
        unsafe {
            match i {
                0 => v,
                1 => _mm_shuffle_ps::<0b01_01_01_01>(v, v),
                2 => _mm_shuffle_ps::<0b10_10_10_10>(v, v),
                _ => _mm_shuffle_ps::<0b11_11_11_11>(v, v),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// A cache of `cap` positions × `kv_heads` heads filled from random rows.
    struct Cache {
        kc: Vec<u8>,
        ks: Vec<f16>,
        vc: Vec<i8>,
        vs: Vec<f16>,
        hd: usize,
        kv_dim: usize,
        cap: usize,
    }

    impl Cache {
        fn new(rng: &mut StdRng, hd: usize, kv_heads: usize, cap: usize) -> Cache {
            let kv_dim = hd * kv_heads;
            let mut c = Cache {
                kc: vec![0; cap * kv_dim],
                ks: vec![f16::ZERO; cap * kv_dim / BLOCK],
                vc: vec![0; cap * kv_dim],
                vs: vec![f16::ZERO; cap * kv_dim / BLOCK],
                hd,
                kv_dim,
                cap,
            };
            let mut codes = vec![0i8; kv_dim];
            let mut steps = vec![f16::ZERO; kv_dim / BLOCK];
            for p in 0..cap {
                let k: Vec<f32> = (0..kv_dim).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                quantize_row(&k, &mut codes, &mut steps);
                for (dst, &c) in c.kc[p * kv_dim..(p + 1) * kv_dim].iter_mut().zip(&codes) {
                    *dst = c as u8 ^ 0x80;
                }
                for (b, &d) in steps.iter().enumerate() {
                    c.ks[b * cap + p] = d;
                }
                let v: Vec<f32> = (0..kv_dim).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                quantize_row(
                    &v,
                    &mut c.vc[p * kv_dim..(p + 1) * kv_dim],
                    &mut c.vs[p * kv_dim / BLOCK..(p + 1) * kv_dim / BLOCK],
                );
            }
            c
        }

        fn view(&self, head: usize) -> Q8View<'_> {
            let bpr = self.hd / BLOCK;
            Q8View {
                key_codes: &self.kc,
                key_steps: &self.ks[head * bpr * self.cap..],
                value_codes: &self.vc,
                value_steps: &self.vs,
                stride: self.kv_dim,
                offset: head * self.hd,
                cap: self.cap,
            }
        }
    }

    #[test]
    fn quantize_row_matches_llama_cpp_rule() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) / 7.0).collect();
        let mut codes = vec![0i8; 64];
        let mut steps = vec![f16::ZERO; 2];
        quantize_row(&x, &mut codes, &mut steps);
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
        quantize_row(&zeros, &mut codes[..32], &mut steps[..1]);
        assert!(codes[..32].iter().all(|&c| c == 0) && steps[0] == f16::ZERO);
    }

    /// Every path and grouping gives the reference's bits, on odd lengths, several heads and
    /// tree-style slot lists; and the result stays near attention over the exact rows.
    #[test]
    #[allow(clippy::needless_range_loop)]
    fn every_path_equals_the_reference_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(5);
        for &(hd, kv_heads, cap) in &[(64, 3, 70), (128, 2, 41), (64, 1, 1), (96, 1, 33), (128, 1, 300), (64, 2, 17)] {
            let cache = Cache::new(&mut rng, hd, kv_heads, cap);
            for head in 0..kv_heads {
                let kv = cache.view(head);
                let n = rng.random_range(1..7);
                let qv: Vec<Vec<f32>> =
                    (0..n).map(|_| (0..hd).map(|_| rng.random_range(-1.5f32..1.5)).collect()).collect();
                let lens: Vec<(usize, Vec<u32>)> = (0..n)
                    .map(|_| {
                        let prefix = rng.random_range(0..=cap.min(cap - 1).max(1));
                        let extra: Vec<u32> = (prefix as u32..cap as u32).filter(|_| rng.random_bool(0.3)).collect();
                        if prefix == 0 && extra.is_empty() { (1, extra) } else { (prefix, extra) }
                    })
                    .collect();
                let total: usize = lens.iter().map(|(p, e)| p + e.len()).sum();
                let mut scores = vec![0f32; total];
                let run = |group: bool, simd: bool, scores: &mut [f32]| -> Vec<Vec<f32>> {
                    let mut outs = vec![vec![0f32; hd]; n];
                    let mut qs: Vec<Query> = qv
                        .iter()
                        .zip(&lens)
                        .zip(outs.iter_mut())
                        .map(|((q, (p, e)), out)| Query { q, prefix: *p, extra: e, out })
                        .collect();
                    if group {
                        if simd {
                            attend_group_q8(kv, 0.125, &mut qs, scores)
                        } else {
                            group_ref(kv, 0.125, &mut qs, scores)
                        }
                    } else {
                        for q in qs.iter_mut() {
                            let one = std::slice::from_mut(q);
                            if simd {
                                attend_group_q8(kv, 0.125, one, scores)
                            } else {
                                group_ref(kv, 0.125, one, scores)
                            }
                        }
                    }
                    outs
                };
                let want = run(true, false, &mut scores);
                for (group, simd) in [(true, true), (false, true), (false, false)] {
                    let got = run(group, simd, &mut scores);
                    for (a, b) in want.iter().zip(&got) {
                        assert!(
                            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                            "hd {hd} group {group} simd {simd}"
                        );
                    }
                }
                // Near the f64 attention over the dequantized rows (the query's int8 rounding
                // is the only difference).
                for (qi, q) in qv.iter().enumerate() {
                    let (p, e) = &lens[qi];
                    let pos: Vec<usize> = (0..*p).chain(e.iter().map(|&x| x as usize)).collect();
                    let s: Vec<f64> = pos
                        .iter()
                        .map(|&ps| {
                            (0..hd)
                                .map(|j| q[j] as f64 * kv.key(ps, j) as f64 * kv.key_step(ps, j / BLOCK) as f64)
                                .sum::<f64>()
                                * 0.125
                        })
                        .collect();
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                    let z: f64 = w.iter().sum();
                    for j in 0..hd {
                        let exact: f64 =
                            pos.iter().zip(&w).map(|(&ps, wi)| wi * kv.value(ps, j) as f64).sum::<f64>() / z;
                        assert!(
                            (want[qi][j] as f64 - exact).abs() < 2e-2,
                            "hd {hd} q{qi} dim {j}: {} vs {exact}",
                            want[qi][j]
                        );
                    }
                }
            }
        }
    }
}
