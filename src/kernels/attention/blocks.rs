//! Attention over a cache whose keys and values are stored in block formats
//! ([`super::formats`]), each side its own: keys f16, q8_0, q4_0 or rotated q4_0; values the
//! same. Nothing is widened ahead of time.
//!
//! Scores on integer keys are integer dot products: each query is quantized to int8 per 32
//! dimensions once (rotated first when the keys are), and `Σ q·k` of a block is exact
//! (`vpdpbusd` on AVX-512 VNNI, 16 positions at a time; the keys' codes are unsigned, so the
//! sum is corrected by the query's code sum times their offset, 128 or 8). The float part is
//! fixed per entry:
//! - integer keys: score = `(Σ_b isum_b · (dq_b·dk_b)) · scale`, one fused multiply-add per
//!   block `b` in order from zero (`dq_b` the query's step, `dk_b` the key's, widened);
//! - f16 keys: score = `dot(q, k)·scale` as for an f16 cache ([`super`]);
//! - weights and their sum as for every cache ([`super::softmax_ref`]);
//! - the output is `(Σ_i e_i·v_i)·(1/Σ)`, each dimension a fused multiply-add chain in entry
//!   order, the value widened as `dv·code` (one multiply; `code − 8` for q4_0) or exactly from
//!   f16; rotated values are rotated back afterwards ([`formats::unrotate`]).
//!
//! So the scalar reference, its AVX2 build and the AVX-512 path agree bit for bit, and no query
//! depends on the others of a pass.

use half::f16;

use super::formats::{self, BLOCK, step_q8};
use super::{Query, dot_ref, softmax_ref};
use crate::kernels::cpu;

/// Largest head size this path takes.
pub const MAX_HEAD: usize = 256;

/// A query prepared for a key format: its values (rotated when the keys are) and, for integer
/// keys, its int8 codes, steps and code sums per block of 32.
pub struct Prepared {
    f: [f32; MAX_HEAD],
    codes: [i8; MAX_HEAD],
    steps: [f32; MAX_HEAD / BLOCK],
    sums: [i32; MAX_HEAD / BLOCK],
}

impl Prepared {
    fn new(q: &[f32], rotated: bool, integer: bool) -> Prepared {
        let hd = q.len();
        let mut p = Prepared {
            f: [0.0; MAX_HEAD],
            codes: [0; MAX_HEAD],
            steps: [0.0; MAX_HEAD / BLOCK],
            sums: [0; MAX_HEAD / BLOCK],
        };
        p.f[..hd].copy_from_slice(q);
        if rotated {
            formats::rotate(&mut p.f[..hd]);
        }
        if integer {
            for (b, xb) in p.f[..hd].chunks_exact(BLOCK).enumerate() {
                let (d, id) = step_q8(xb);
                p.steps[b] = d;
                for (j, &v) in xb.iter().enumerate() {
                    let c = (v * id).round() as i8;
                    p.codes[b * BLOCK + j] = c;
                    p.sums[b] += c as i32;
                }
            }
        }
        p
    }
}

/// How keys of one KV head are stored: what a score reads.
pub trait Keys: Copy + Sync {
    /// Whether queries are rotated before scoring.
    fn rotated(&self) -> bool;
    /// Whether scores are integer dot products (the query is quantized).
    const INTEGER: bool;
    /// Largest cache position plus one that the view holds.
    fn positions(&self) -> usize;
    /// The reference score of position `p`.
    fn score_ref(&self, q: &Prepared, hd: usize, p: usize, scale: f32) -> f32;
    /// The scores of positions `p0 .. p0 + 16`, one per lane, with the reference's bits.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL/VNNI, F16C and FMA present; head size `64·NC`; the 16 positions inside
    /// the view.
    #[cfg(target_arch = "x86_64")]
    unsafe fn scores16<const NC: usize>(&self, q: &Prepared, p0: usize, scale: f32) -> std::arch::x86_64::__m512;
}

/// How values of one KV head are stored: what the weighted sum reads.
pub trait Values: Copy + Sync {
    /// Whether the stored rows are rotated (the sum is rotated back).
    fn rotated(&self) -> bool;
    fn positions(&self) -> usize;
    /// Position `p`'s row widened into `out` (the head size).
    fn widen_ref(&self, p: usize, out: &mut [f32]);
    /// Position `p`'s row widened, 16 values a vector, with the reference's bits.
    ///
    /// # Safety
    /// As [`Keys::scores16`]; `p` inside the view.
    #[cfg(target_arch = "x86_64")]
    unsafe fn row16<const NC: usize>(&self, p: usize) -> [[std::arch::x86_64::__m512; 4]; NC];
}

/// f16 keys or values: `positions × stride` elements, this head's at `offset`.
#[derive(Clone, Copy)]
pub struct F16Rows<'a> {
    pub data: &'a [f16],
    pub stride: usize,
    pub offset: usize,
}

/// q8_0 keys: codes offset by 128 (`code ^ 0x80`, for `vpdpbusd`'s unsigned operand), and the
/// head's steps per block in position order (`steps[block · cap + p]`, 16 positions one load).
#[derive(Clone, Copy)]
pub struct Q8Keys<'a> {
    pub codes: &'a [u8],
    pub steps: &'a [f16],
    pub stride: usize,
    pub offset: usize,
    pub cap: usize,
}

/// q4_0 keys: packed codes (`stride / 2` bytes a position, this head's at `offset / 2`), steps
/// as for [`Q8Keys`]; `rotated` for the rotated format.
#[derive(Clone, Copy)]
pub struct Q4Keys<'a> {
    pub codes: &'a [u8],
    pub steps: &'a [f16],
    pub stride: usize,
    pub offset: usize,
    pub cap: usize,
    pub rotated: bool,
}

/// q8_0 values: int8 codes, steps per position (`stride / 32` a position).
#[derive(Clone, Copy)]
pub struct Q8Values<'a> {
    pub codes: &'a [i8],
    pub steps: &'a [f16],
    pub stride: usize,
    pub offset: usize,
}

/// q4_0 values: packed codes, steps per position; `rotated` for the rotated format.
#[derive(Clone, Copy)]
pub struct Q4Values<'a> {
    pub codes: &'a [u8],
    pub steps: &'a [f16],
    pub stride: usize,
    pub offset: usize,
    pub rotated: bool,
}

impl Keys for F16Rows<'_> {
    const INTEGER: bool = false;
    fn rotated(&self) -> bool {
        false
    }
    fn positions(&self) -> usize {
        self.data.len() / self.stride
    }
    fn score_ref(&self, q: &Prepared, hd: usize, p: usize, scale: f32) -> f32 {
        let at = p * self.stride + self.offset;
        let mut row = [0f32; MAX_HEAD];
        super::KvElem::widen(&self.data[at..at + hd], &mut row[..hd]);
        dot_ref(&q.f[..hd], &row[..hd]) * scale
    }
    /// # Safety
    /// As [`Keys::scores16`].
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn scores16<const NC: usize>(&self, q: &Prepared, p0: usize, scale: f32) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        unsafe {
            let k0 = self.data.as_ptr().add(p0 * self.stride + self.offset);
            let dots = if NC == 1 {
                let mut qv = [_mm512_setzero_ps(); 4];
                for (c, v) in qv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(q.f.as_ptr().add(16 * c));
                }
                super::x86::dots16::<f16, 4>(&qv, k0, self.stride)
            } else {
                let mut qv = [_mm512_setzero_ps(); 8];
                for (c, v) in qv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(q.f.as_ptr().add(16 * c));
                }
                super::x86::dots16::<f16, 8>(&qv, k0, self.stride)
            };
            _mm512_mul_ps(dots, _mm512_set1_ps(scale))
        }
    }
}

#[allow(clippy::needless_range_loop)]
impl Values for F16Rows<'_> {
    fn rotated(&self) -> bool {
        false
    }
    fn positions(&self) -> usize {
        self.data.len() / self.stride
    }
    fn widen_ref(&self, p: usize, out: &mut [f32]) {
        let at = p * self.stride + self.offset;
        super::KvElem::widen(&self.data[at..at + out.len()], out);
    }
    /// # Safety
    /// As [`Values::row16`].
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn row16<const NC: usize>(&self, p: usize) -> [[std::arch::x86_64::__m512; 4]; NC] {
        use std::arch::x86_64::*;
        unsafe {
            let v = self.data.as_ptr().add(p * self.stride + self.offset);
            let mut out = [[_mm512_setzero_ps(); 4]; NC];
            for c in 0..NC {
                for u in 0..4 {
                    out[c][u] = _mm512_cvtph_ps(_mm256_loadu_si256(v.add(64 * c + 16 * u) as *const __m256i));
                }
            }
            out
        }
    }
}

#[allow(clippy::needless_range_loop)]
impl Keys for Q8Keys<'_> {
    const INTEGER: bool = true;
    fn rotated(&self) -> bool {
        false
    }
    fn positions(&self) -> usize {
        (self.codes.len() / self.stride).min(self.cap)
    }
    fn score_ref(&self, q: &Prepared, hd: usize, p: usize, scale: f32) -> f32 {
        let row = &self.codes[p * self.stride + self.offset..];
        let mut acc = 0f32;
        for b in 0..hd / BLOCK {
            let mut isum = 0i32;
            for j in b * BLOCK..(b + 1) * BLOCK {
                isum += q.codes[j] as i32 * (row[j] ^ 0x80) as i8 as i32;
            }
            acc = (isum as f32).mul_add(q.steps[b] * self.steps[b * self.cap + p].to_f32(), acc);
        }
        acc * scale
    }
    /// # Safety
    /// As [`Keys::scores16`].
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn scores16<const NC: usize>(&self, q: &Prepared, p0: usize, scale: f32) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        unsafe {
            let k0 = self.codes.as_ptr().add(p0 * self.stride + self.offset);
            let mut acc = _mm512_setzero_ps();
            for c in 0..NC {
                let qv = _mm512_loadu_si512(q.codes.as_ptr().add(64 * c) as *const _);
                let mut dots = [_mm512_setzero_si512(); 16];
                for (j, d) in dots.iter_mut().enumerate() {
                    let k = _mm512_loadu_si512(k0.add(j * self.stride + 64 * c) as *const _);
                    *d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), k, qv);
                }
                acc = x86::blocks_fma(&dots, q, 2 * c, 128, self.steps.as_ptr(), self.cap, p0, acc);
            }
            _mm512_mul_ps(acc, _mm512_set1_ps(scale))
        }
    }
}

impl Keys for Q4Keys<'_> {
    const INTEGER: bool = true;
    fn rotated(&self) -> bool {
        self.rotated
    }
    fn positions(&self) -> usize {
        (2 * self.codes.len() / self.stride).min(self.cap)
    }
    fn score_ref(&self, q: &Prepared, hd: usize, p: usize, scale: f32) -> f32 {
        let row = &self.codes[(p * self.stride + self.offset) / 2..];
        let mut acc = 0f32;
        for b in 0..hd / BLOCK {
            let mut isum = 0i32;
            for j in b * BLOCK..(b + 1) * BLOCK {
                isum += q.codes[j] as i32 * (formats::q4_code(row, j) as i32 - 8);
            }
            acc = (isum as f32).mul_add(q.steps[b] * self.steps[b * self.cap + p].to_f32(), acc);
        }
        acc * scale
    }
    /// # Safety
    /// As [`Keys::scores16`].
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn scores16<const NC: usize>(&self, q: &Prepared, p0: usize, scale: f32) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        unsafe {
            let k0 = self.codes.as_ptr().add((p0 * self.stride + self.offset) / 2);
            let nib = _mm256_set1_epi8(0x0f);
            let mut acc = _mm512_setzero_ps();
            for c in 0..NC {
                let qv = _mm512_loadu_si512(q.codes.as_ptr().add(64 * c) as *const _);
                let mut dots = [_mm512_setzero_si512(); 16];
                for (j, d) in dots.iter_mut().enumerate() {
                    // 32 bytes: values 0..32 of the chunk in the low nibbles, 32..64 in the high.
                    let b = _mm256_loadu_si256(k0.add(j * self.stride / 2 + 32 * c) as *const _);
                    let lo = _mm256_and_si256(b, nib);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(b), nib);
                    let k = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                    *d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), k, qv);
                }
                acc = x86::blocks_fma(&dots, q, 2 * c, 8, self.steps.as_ptr(), self.cap, p0, acc);
            }
            _mm512_mul_ps(acc, _mm512_set1_ps(scale))
        }
    }
}

#[allow(clippy::needless_range_loop)]
impl Values for Q8Values<'_> {
    fn rotated(&self) -> bool {
        false
    }
    fn positions(&self) -> usize {
        self.codes.len() / self.stride
    }
    fn widen_ref(&self, p: usize, out: &mut [f32]) {
        let at = p * self.stride + self.offset;
        for (j, o) in out.iter_mut().enumerate() {
            *o = self.steps[(at + j) / BLOCK].to_f32() * self.codes[at + j] as f32;
        }
    }
    /// # Safety
    /// As [`Values::row16`].
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn row16<const NC: usize>(&self, p: usize) -> [[std::arch::x86_64::__m512; 4]; NC] {
        use std::arch::x86_64::*;
        unsafe {
            let at = p * self.stride + self.offset;
            let steps = x86::steps4::<NC>(self.steps.as_ptr().add(at / BLOCK));
            let mut out = [[_mm512_setzero_ps(); 4]; NC];
            for c in 0..NC {
                for u in 0..4 {
                    let codes = _mm512_cvtepi8_epi32(_mm_loadu_si128(
                        self.codes.as_ptr().add(at + 64 * c + 16 * u) as *const __m128i
                    ));
                    out[c][u] = _mm512_mul_ps(x86::lane(steps, 2 * c + u / 2), _mm512_cvtepi32_ps(codes));
                }
            }
            out
        }
    }
}

#[allow(clippy::needless_range_loop)]
impl Values for Q4Values<'_> {
    fn rotated(&self) -> bool {
        self.rotated
    }
    fn positions(&self) -> usize {
        2 * self.codes.len() / self.stride
    }
    fn widen_ref(&self, p: usize, out: &mut [f32]) {
        let at = p * self.stride + self.offset;
        let row = &self.codes[at / 2..];
        for (j, o) in out.iter_mut().enumerate() {
            *o = self.steps[(at + j) / BLOCK].to_f32() * (formats::q4_code(row, j) as i32 - 8) as f32;
        }
    }
    /// # Safety
    /// As [`Values::row16`].
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn row16<const NC: usize>(&self, p: usize) -> [[std::arch::x86_64::__m512; 4]; NC] {
        use std::arch::x86_64::*;
        unsafe {
            let at = p * self.stride + self.offset;
            let steps = x86::steps4::<NC>(self.steps.as_ptr().add(at / BLOCK));
            let (nib, eight) = (_mm512_set1_epi32(0x0f), _mm512_set1_epi32(8));
            let mut out = [[_mm512_setzero_ps(); 4]; NC];
            for c in 0..NC {
                let b = self.codes.as_ptr().add(at / 2 + 32 * c);
                // Bytes 0..16 hold values 0..16 and 32..48; bytes 16..32 values 16..32 and 48..64.
                let w0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(b as *const __m128i));
                let w1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(b.add(16) as *const __m128i));
                let codes = [
                    _mm512_and_si512(w0, nib),
                    _mm512_and_si512(w1, nib),
                    _mm512_srli_epi32::<4>(w0),
                    _mm512_srli_epi32::<4>(w1),
                ];
                for u in 0..4 {
                    let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(codes[u], eight));
                    out[c][u] = _mm512_mul_ps(x86::lane(steps, 2 * c + u / 2), v);
                }
            }
            out
        }
    }
}

/// The keys of one KV head, in whichever format the cache stores them.
#[derive(Clone, Copy)]
pub enum KeyView<'a> {
    F16(F16Rows<'a>),
    Q8(Q8Keys<'a>),
    Q4(Q4Keys<'a>),
}

/// The values of one KV head, in whichever format the cache stores them.
#[derive(Clone, Copy)]
pub enum ValueView<'a> {
    F16(F16Rows<'a>),
    Q8(Q8Values<'a>),
    Q4(Q4Values<'a>),
}

impl<'a> KeyView<'a> {
    /// The same keys from position `from` on (position `from` becomes 0): the window of a
    /// sliding-window layer.
    pub fn skip(self, from: usize) -> Self {
        match self {
            KeyView::F16(k) => KeyView::F16(F16Rows { data: &k.data[from * k.stride..], ..k }),
            KeyView::Q8(k) => KeyView::Q8(Q8Keys { codes: &k.codes[from * k.stride..], steps: &k.steps[from..], ..k }),
            KeyView::Q4(k) => {
                KeyView::Q4(Q4Keys { codes: &k.codes[from * k.stride / 2..], steps: &k.steps[from..], ..k })
            }
        }
    }
}

impl<'a> ValueView<'a> {
    /// The same values from position `from` on, as [`KeyView::skip`].
    pub fn skip(self, from: usize) -> Self {
        let steps = |v: usize| from * v / BLOCK;
        match self {
            ValueView::F16(v) => ValueView::F16(F16Rows { data: &v.data[from * v.stride..], ..v }),
            ValueView::Q8(v) => {
                ValueView::Q8(Q8Values { codes: &v.codes[from * v.stride..], steps: &v.steps[steps(v.stride)..], ..v })
            }
            ValueView::Q4(v) => ValueView::Q4(Q4Values {
                codes: &v.codes[from * v.stride / 2..],
                steps: &v.steps[steps(v.stride)..],
                ..v
            }),
        }
    }
}

/// Attention of several queries over one KV head of a block-format cache; each gets exactly
/// what it would get alone. `scores` holds at least the sum of the queries' lengths.
///
/// # Panics
/// If a head size is not a multiple of 32 (of 64 for q4_0, a power of two when rotated), is
/// over [`MAX_HEAD`], or an entry lies outside the cache.
pub fn attend_group_blocks(keys: KeyView, values: ValueView, scale: f32, qs: &mut [Query], scores: &mut [f32]) {
    fn with_values<K: Keys>(k: K, values: ValueView, scale: f32, qs: &mut [Query], scores: &mut [f32]) {
        match values {
            ValueView::F16(v) => dispatch(k, v, scale, qs, scores),
            ValueView::Q8(v) => dispatch(k, v, scale, qs, scores),
            ValueView::Q4(v) => dispatch(k, v, scale, qs, scores),
        }
    }
    match keys {
        KeyView::F16(k) => with_values(k, values, scale, qs, scores),
        KeyView::Q8(k) => with_values(k, values, scale, qs, scores),
        KeyView::Q4(k) => with_values(k, values, scale, qs, scores),
    }
}

/// The path this CPU runs for keys `K` and values `V`.
pub fn dispatch<K: Keys, V: Values>(k: K, v: V, scale: f32, qs: &mut [Query], scores: &mut [f32]) {
    check(&k, &v, qs, scores);
    #[cfg(target_arch = "x86_64")]
    {
        let hd = qs.first().map_or(0, |q| q.q.len());
        if (hd == 64 || hd == 128) && cpu::avx512() {
            // SAFETY: AVX-512 (F/BW/VL/VNNI), F16C and FMA were detected; shapes checked above.
            return unsafe { x86::group_avx512(k, v, scale, qs, scores) };
        }
        if cpu::avx2() {
            // SAFETY: AVX2, FMA and F16C were detected.
            return unsafe { group_avx2(k, v, scale, qs, scores) };
        }
    }
    group_ref(k, v, scale, qs, scores)
}

/// Bounds every path relies on.
fn check<K: Keys, V: Values>(k: &K, v: &V, qs: &[Query], scores: &[f32]) {
    let hd = qs.first().map_or(0, |q| q.q.len());
    assert!(hd.is_multiple_of(BLOCK) && hd <= MAX_HEAD, "a block cache needs a head size that is a multiple of 32");
    assert!(!(k.rotated() || v.rotated()) || formats::rotatable(hd), "a rotated cache needs a power-of-two head");
    let positions = k.positions().min(v.positions());
    let mut total = 0;
    for q in qs.iter() {
        assert!(q.q.len() == hd && q.out.len() == hd, "queries of one group share the head size");
        let last = q.extra.last().map(|&e| e as usize).max(q.prefix.checked_sub(1));
        if let Some(p) = last {
            assert!(p < positions, "position {p} is outside the cache");
        }
        assert!(q.len() > 0, "a query attends to at least one position");
        total += q.len();
    }
    assert!(scores.len() >= total, "scores scratch too short");
}

/// The reference: every query on its own, entry by entry.
fn group_ref<K: Keys, V: Values>(k: K, v: V, scale: f32, qs: &mut [Query], scores: &mut [f32]) {
    let mut off = 0;
    let mut row = [0f32; MAX_HEAD];
    for q in qs.iter_mut() {
        let hd = q.q.len();
        let pq = Prepared::new(q.q, k.rotated(), K::INTEGER);
        let len = q.len();
        let sc = &mut scores[off..off + len];
        off += len;
        for (i, s) in sc.iter_mut().enumerate() {
            *s = k.score_ref(&pq, hd, q.pos(i), scale);
        }
        let inv = softmax_ref(sc);
        q.out.fill(0.0);
        for (i, &e) in sc.iter().enumerate() {
            v.widen_ref(q.pos(i), &mut row[..hd]);
            for (o, &x) in q.out.iter_mut().zip(&row[..hd]) {
                *o = e.mul_add(x, *o);
            }
        }
        q.out.iter_mut().for_each(|o| *o *= inv);
        if v.rotated() {
            formats::unrotate(q.out);
        }
    }
}

/// The reference compiled for AVX2 and FMA (the same operations, so the same bits).
///
/// # Safety
/// AVX2, FMA and F16C present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_avx2<K: Keys, V: Values>(k: K, v: V, scale: f32, qs: &mut [Query], scores: &mut [f32]) {
    group_ref(k, v, scale, qs, scores)
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::x86::softmax;
    use super::{Keys, Prepared, Values};
    use crate::kernels::attention::Query;
    use crate::kernels::cpu::x86::reduce16_halves;

    /// Most queries whose scores are taken together over each 16 positions.
    const SCORE_QUERIES: usize = 32;

    /// # Safety
    /// AVX-512 F/BW/VL/VNNI, F16C and FMA present; `check` passed; head size 64 or 128.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
    pub(super) unsafe fn group_avx512<K: Keys, V: Values>(k: K, v: V, scale: f32, qs: &mut [Query], sc: &mut [f32]) {
        unsafe {
            match qs[0].q.len() {
                64 => group::<K, V, 1>(k, v, scale, qs, sc),
                _ => group::<K, V, 2>(k, v, scale, qs, sc),
            }
        }
    }

    /// `NC` chunks of 64 dimensions per head. Scores of up to [`SCORE_QUERIES`] queries are
    /// taken 16 shared positions at a time, query after query, so each key block is read from
    /// memory once for all of them (a prefill task's tokens and a GQA group's heads); then
    /// each query's own entries, its weights, and the values four queries at a time.
    ///
    /// # Safety
    /// As [`group_avx512`], whose `target_feature` it inherits.
    #[inline(always)]
    unsafe fn group<K: Keys, V: Values, const NC: usize>(k: K, v: V, scale: f32, qs: &mut [Query], sc: &mut [f32]) {
        unsafe {
            let hd = 64 * NC;
            let mut base = 0;
            for block in qs.chunks_mut(SCORE_QUERIES) {
                let m = block.len();
                let mut offs = [0usize; SCORE_QUERIES + 1];
                for (i, q) in block.iter().enumerate() {
                    offs[i + 1] = offs[i] + q.len();
                }
                let sc = &mut sc[base..base + offs[m]];
                base += offs[m];
                // Prepared queries on the stack, only the block's (no allocation per task).
                let mut prep = [const { std::mem::MaybeUninit::<Prepared>::uninit() }; SCORE_QUERIES];
                for (i, q) in block.iter().enumerate() {
                    prep[i].write(Prepared::new(q.q, k.rotated(), K::INTEGER));
                }
                // SAFETY: the first `m` entries were just written (`Prepared` has no drop).
                let prepared = std::slice::from_raw_parts(prep.as_ptr() as *const Prepared, m);
                // Whole blocks of 16 positions of each query's prefix, positions outermost.
                let shared = block.iter().map(|q| q.prefix / 16 * 16).max().unwrap_or(0);
                let mut p0 = 0;
                while p0 < shared {
                    for (i, q) in block.iter().enumerate() {
                        if p0 + 16 <= q.prefix {
                            let s = k.scores16::<NC>(&prepared[i], p0, scale);
                            _mm512_storeu_ps(sc.as_mut_ptr().add(offs[i] + p0), s);
                        }
                    }
                    p0 += 16;
                }
                let mut invs = [0f32; SCORE_QUERIES];
                for (i, q) in block.iter().enumerate() {
                    let own = &mut sc[offs[i]..offs[i + 1]];
                    for j in q.prefix / 16 * 16..q.len() {
                        own[j] = k.score_ref(&prepared[i], hd, q.pos(j), scale);
                    }
                    let max = own.iter().fold(f32::NEG_INFINITY, |a, &s| a.max(s));
                    invs[i] = softmax(own, _mm512_set1_ps(max));
                }
                for (i, part) in block.chunks_mut(4).enumerate() {
                    let starts: [usize; 4] = std::array::from_fn(|j| offs[(4 * i + j).min(m)]);
                    let inv4: [f32; 4] = std::array::from_fn(|j| invs[(4 * i + j).min(SCORE_QUERIES - 1)]);
                    values::<V, NC>(&v, part, sc, &starts, &inv4);
                }
                if v.rotated() {
                    block.iter_mut().for_each(|q| crate::kernels::attention::formats::unrotate(q.out));
                }
            }
        }
    }

    /// `Σ_i e_i·v_i · inv` for the (at most four) queries of `part`, weights in `sc` at
    /// `starts`: the entries they share first, each value row widened once, then each one's own.
    ///
    /// # Safety
    /// As [`group`]; the weights were written by it.
    #[inline(always)]
    unsafe fn values<V: Values, const NC: usize>(
        v: &V,
        part: &mut [Query],
        sc: &[f32],
        starts: &[usize; 4],
        invs: &[f32; 4],
    ) {
        unsafe {
            let m = part.len();
            let shared = part.iter().map(|q| q.prefix).min().unwrap_or(0);
            let mut acc = [[[_mm512_setzero_ps(); 4]; NC]; 4];
            for p in 0..shared {
                let row = v.row16::<NC>(p);
                for k in 0..m {
                    let e = _mm512_set1_ps(*sc.get_unchecked(starts[k] + p));
                    for c in 0..NC {
                        for u in 0..4 {
                            acc[k][c][u] = _mm512_fmadd_ps(e, row[c][u], acc[k][c][u]);
                        }
                    }
                }
            }
            for (k, q) in part.iter_mut().enumerate() {
                let mut a = acc[k];
                for i in shared..q.len() {
                    let row = v.row16::<NC>(q.pos(i));
                    let e = _mm512_set1_ps(sc[starts[k] + i]);
                    for c in 0..NC {
                        for u in 0..4 {
                            a[c][u] = _mm512_fmadd_ps(e, row[c][u], a[c][u]);
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

    /// The float part of the integer keys' scores for blocks `b0`, `b0 + 1` (one chunk of 64):
    /// `dots[j]` holds position `p0 + j`'s `Σ code·q` in four-byte partial sums (codes offset by
    /// `bias`); returns `acc` after the reference's fused multiply-add of each block.
    ///
    /// # Safety
    /// AVX-512 F/BW, F16C and FMA present; steps of blocks `b0`, `b0 + 1` for positions
    /// `p0 .. p0 + 16` readable at `steps + b·cap + p0`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(super) unsafe fn blocks_fma(
        dots: &[__m512i; 16],
        q: &Prepared,
        b0: usize,
        bias: i32,
        steps: *const half::f16,
        cap: usize,
        p0: usize,
        mut acc: __m512,
    ) -> __m512 {
        unsafe {
            let halves = reduce16_halves(dots);
            for (h, raw) in [halves.0, halves.1].into_iter().enumerate() {
                let b = b0 + h;
                // Σ (k + bias)·q − bias·Σq: the exact Σ k·q.
                let isum = _mm512_sub_epi32(raw, _mm512_set1_epi32(bias * q.sums[b]));
                let dk = _mm512_cvtph_ps(_mm256_loadu_si256(steps.add(b * cap + p0) as *const __m256i));
                let s = _mm512_mul_ps(_mm512_set1_ps(q.steps[b]), dk);
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), s, acc);
            }
            acc
        }
    }

    /// The (two or four) f16 steps of a row at `sp`, widened.
    ///
    /// # Safety
    /// F16C present; `2·NC` steps readable at `sp`.
    #[inline(always)]
    pub(super) unsafe fn steps4<const NC: usize>(sp: *const half::f16) -> __m128 {
        unsafe {
            let raw = if NC == 1 {
                _mm_cvtsi32_si128((sp as *const i32).read_unaligned())
            } else {
                _mm_loadl_epi64(sp as *const __m128i)
            };
            _mm_cvtph_ps(raw)
        }
    }

    /// Lane `i` (0–3) of `v` in every lane.
    ///
    /// # Safety
    /// AVX-512F present.
    #[inline(always)]
    pub(super) unsafe fn lane(v: __m128, i: usize) -> __m512 {
        unsafe {
            let l = match i {
                0 => v,
                1 => _mm_shuffle_ps::<0b01_01_01_01>(v, v),
                2 => _mm_shuffle_ps::<0b10_10_10_10>(v, v),
                _ => _mm_shuffle_ps::<0b11_11_11_11>(v, v),
            };
            _mm512_broadcastss_ps(l)
        }
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::formats::{quantize_q4, quantize_q8, rotate};
    use super::*;

    /// One layer's cache of `cap` positions × `kv_heads` heads, every side in every format,
    /// filled from the same random rows (rotated per head for the rotated formats).
    struct Cache {
        hd: usize,
        kv_dim: usize,
        cap: usize,
        f16k: Vec<f16>,
        f16v: Vec<f16>,
        q8k: (Vec<u8>, Vec<f16>),
        q8v: (Vec<i8>, Vec<f16>),
        q4k: [(Vec<u8>, Vec<f16>); 2],
        q4v: [(Vec<u8>, Vec<f16>); 2],
        exact_k: Vec<f32>,
        exact_v: Vec<f32>,
    }

    impl Cache {
        fn new(rng: &mut StdRng, hd: usize, kv_heads: usize, cap: usize) -> Cache {
            let kv_dim = hd * kv_heads;
            let n = cap * kv_dim;
            let exact_k: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let exact_v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let nb = kv_dim / BLOCK;
            let mut c = Cache {
                hd,
                kv_dim,
                cap,
                f16k: exact_k.iter().map(|&x| f16::from_f32(x)).collect(),
                f16v: exact_v.iter().map(|&x| f16::from_f32(x)).collect(),
                q8k: (vec![0; n], vec![f16::ZERO; n / BLOCK]),
                q8v: (vec![0; n], vec![f16::ZERO; n / BLOCK]),
                q4k: std::array::from_fn(|_| (vec![0; n / 2], vec![f16::ZERO; n / BLOCK])),
                q4v: std::array::from_fn(|_| (vec![0; n / 2], vec![f16::ZERO; n / BLOCK])),
                exact_k,
                exact_v,
            };
            let mut codes = vec![0i8; kv_dim];
            let mut steps = vec![f16::ZERO; nb];
            for p in 0..cap {
                let (k, v) = (&c.exact_k[p * kv_dim..(p + 1) * kv_dim], &c.exact_v[p * kv_dim..(p + 1) * kv_dim]);
                quantize_q8(k, &mut codes, &mut steps);
                for (d, &x) in c.q8k.0[p * kv_dim..].iter_mut().zip(&codes) {
                    *d = x as u8 ^ 0x80;
                }
                for b in 0..nb {
                    c.q8k.1[b * cap + p] = steps[b];
                }
                quantize_q8(v, &mut c.q8v.0[p * kv_dim..(p + 1) * kv_dim], &mut c.q8v.1[p * nb..(p + 1) * nb]);
                for r in 0..2 {
                    let (mut kr, mut vr) = (k.to_vec(), v.to_vec());
                    if r == 1 {
                        kr.chunks_exact_mut(hd).for_each(rotate);
                        vr.chunks_exact_mut(hd).for_each(rotate);
                    }
                    let mut kc = vec![0u8; kv_dim / 2];
                    quantize_q4(&kr, &mut kc, &mut steps);
                    c.q4k[r].0[p * kv_dim / 2..(p + 1) * kv_dim / 2].copy_from_slice(&kc);
                    for b in 0..nb {
                        c.q4k[r].1[b * cap + p] = steps[b];
                    }
                    let (vc, vs) = &mut c.q4v[r];
                    quantize_q4(&vr, &mut vc[p * kv_dim / 2..(p + 1) * kv_dim / 2], &mut vs[p * nb..(p + 1) * nb]);
                }
            }
            c
        }

        fn keys(&self, head: usize, fmt: usize) -> KeyView<'_> {
            let (stride, offset, cap, bpr) = (self.kv_dim, head * self.hd, self.cap, self.hd / BLOCK);
            match fmt {
                0 => KeyView::F16(F16Rows { data: &self.f16k, stride, offset }),
                1 => KeyView::Q8(Q8Keys {
                    codes: &self.q8k.0,
                    steps: &self.q8k.1[head * bpr * cap..],
                    stride,
                    offset,
                    cap,
                }),
                r => {
                    let (c, s) = &self.q4k[r - 2];
                    KeyView::Q4(Q4Keys {
                        codes: c,
                        steps: &s[head * bpr * cap..],
                        stride,
                        offset,
                        cap,
                        rotated: r == 3,
                    })
                }
            }
        }

        fn values(&self, head: usize, fmt: usize) -> ValueView<'_> {
            let (stride, offset) = (self.kv_dim, head * self.hd);
            match fmt {
                0 => ValueView::F16(F16Rows { data: &self.f16v, stride, offset }),
                1 => ValueView::Q8(Q8Values { codes: &self.q8v.0, steps: &self.q8v.1, stride, offset }),
                r => {
                    let (c, s) = &self.q4v[r - 2];
                    ValueView::Q4(Q4Values { codes: c, steps: s, stride, offset, rotated: r == 3 })
                }
            }
        }
    }

    fn reference(keys: KeyView, values: ValueView, scale: f32, qs: &mut [Query], scores: &mut [f32]) {
        fn with_values<K: Keys>(k: K, values: ValueView, scale: f32, qs: &mut [Query], sc: &mut [f32]) {
            match values {
                ValueView::F16(v) => group_ref(k, v, scale, qs, sc),
                ValueView::Q8(v) => group_ref(k, v, scale, qs, sc),
                ValueView::Q4(v) => group_ref(k, v, scale, qs, sc),
            }
        }
        match keys {
            KeyView::F16(k) => with_values(k, values, scale, qs, scores),
            KeyView::Q8(k) => with_values(k, values, scale, qs, scores),
            KeyView::Q4(k) => with_values(k, values, scale, qs, scores),
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn avx2_build(keys: KeyView, values: ValueView, scale: f32, qs: &mut [Query], scores: &mut [f32]) {
        fn with_values<K: Keys>(k: K, values: ValueView, scale: f32, qs: &mut [Query], sc: &mut [f32]) {
            // SAFETY: the caller checked AVX2, FMA and F16C.
            unsafe {
                match values {
                    ValueView::F16(v) => group_avx2(k, v, scale, qs, sc),
                    ValueView::Q8(v) => group_avx2(k, v, scale, qs, sc),
                    ValueView::Q4(v) => group_avx2(k, v, scale, qs, sc),
                }
            }
        }
        match keys {
            KeyView::F16(k) => with_values(k, values, scale, qs, scores),
            KeyView::Q8(k) => with_values(k, values, scale, qs, scores),
            KeyView::Q4(k) => with_values(k, values, scale, qs, scores),
        }
    }

    const NAMES: [&str; 4] = ["f16", "q8_0", "q4_0", "q4h"];

    /// Every pair of formats, every path and grouping: the reference's bits, on odd lengths,
    /// several heads, many queries (several score blocks) and tree-style slot lists; and the
    /// result stays near attention over the exact rows.
    #[test]
    #[allow(clippy::needless_range_loop)]
    fn every_format_pair_and_path_equals_the_reference_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(5);
        for &(hd, kv_heads, cap) in &[(64, 3, 70), (128, 2, 41), (64, 1, 1), (128, 1, 300), (64, 2, 17), (256, 1, 35)] {
            let cache = Cache::new(&mut rng, hd, kv_heads, cap);
            for kf in 0..4 {
                for vf in 0..4 {
                    let head = rng.random_range(0..kv_heads);
                    let (keys, values) = (cache.keys(head, kf), cache.values(head, vf));
                    let n = if rng.random_bool(0.2) { rng.random_range(33..60) } else { rng.random_range(1..7) };
                    let qv: Vec<Vec<f32>> =
                        (0..n).map(|_| (0..hd).map(|_| rng.random_range(-1.5f32..1.5)).collect()).collect();
                    let lens: Vec<(usize, Vec<u32>)> = (0..n)
                        .map(|_| {
                            let prefix = rng.random_range(0..cap.max(2));
                            let extra: Vec<u32> =
                                (prefix as u32..cap as u32).filter(|_| rng.random_bool(0.3)).collect();
                            if prefix == 0 && extra.is_empty() { (1, extra) } else { (prefix, extra) }
                        })
                        .collect();
                    let total: usize = lens.iter().map(|(p, e)| p + e.len()).sum();
                    let mut scores = vec![0f32; total];
                    type Run = fn(KeyView, ValueView, f32, &mut [Query], &mut [f32]);
                    let run = |f: Run, group: bool, scores: &mut [f32]| -> Vec<Vec<f32>> {
                        let mut outs = vec![vec![0f32; hd]; n];
                        let mut qs: Vec<Query> = qv
                            .iter()
                            .zip(&lens)
                            .zip(outs.iter_mut())
                            .map(|((q, (p, e)), out)| Query { q, prefix: *p, extra: e, out })
                            .collect();
                        if group {
                            f(keys, values, 0.125, &mut qs, scores)
                        } else {
                            for q in qs.iter_mut() {
                                f(keys, values, 0.125, std::slice::from_mut(q), scores)
                            }
                        }
                        outs
                    };
                    let want = run(reference, false, &mut scores);
                    let mut paths: Vec<(&str, Run)> = vec![("dispatched", attend_group_blocks)];
                    #[cfg(target_arch = "x86_64")]
                    if cpu::avx2() {
                        paths.push(("avx2 build", avx2_build));
                    }
                    for (what, f) in paths {
                        for group in [true, false] {
                            let got = run(f, group, &mut scores);
                            for (a, b) in want.iter().zip(&got) {
                                assert!(
                                    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                                    "hd {hd} keys {} values {} {what} group {group}",
                                    NAMES[kf],
                                    NAMES[vf]
                                );
                            }
                        }
                    }
                    // Near the f64 attention over the exact rows.
                    for (qi, q) in qv.iter().enumerate() {
                        let (p, e) = &lens[qi];
                        let pos: Vec<usize> = (0..*p).chain(e.iter().map(|&x| x as usize)).collect();
                        let at = |ps: usize| ps * cache.kv_dim + head * hd;
                        let s: Vec<f64> = pos
                            .iter()
                            .map(|&ps| {
                                (0..hd).map(|j| q[j] as f64 * cache.exact_k[at(ps) + j] as f64).sum::<f64>() * 0.125
                            })
                            .collect();
                        let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let w: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                        let z: f64 = w.iter().sum();
                        let tol = [0.01, 0.03, 0.3, 0.3][kf.max(vf)];
                        for j in 0..hd {
                            let exact: f64 =
                                pos.iter().zip(&w).map(|(&ps, wi)| wi * cache.exact_v[at(ps) + j] as f64).sum::<f64>()
                                    / z;
                            assert!(
                                (want[qi][j] as f64 - exact).abs() < tol,
                                "hd {hd} keys {} values {} q{qi} dim {j}: {} vs {exact}",
                                NAMES[kf],
                                NAMES[vf],
                                want[qi][j]
                            );
                        }
                    }
                }
            }
        }
    }
}
