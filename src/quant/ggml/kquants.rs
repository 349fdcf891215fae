//! The 256-weight super-block formats (k-quants and IQ4_XS): an f16 scale (and minimum) per
//! super-block, small integer scales per sub-block of 16 or 32.

// ggml's own names for the block structs.
#![allow(non_camel_case_types)]

use half::f16;

use super::*;

/// 256 weights in 16 sub-blocks of 16: `scales[16]` (low nibble scale, high nibble min),
/// `qs[64]` of 2-bit codes, f16 `d`, f16 `dmin`. Codes: weight `128n + 32j + l` is bits
/// `2j..2j+2` of `qs[32n + l]`. Integer form: L[q] = q, s = sc & 0xF, M = dmin, m_k = −(sc >> 4).
/// C: `dl = d * (sc & 0xF); ml = min * (sc >> 4); y = dl * q - ml` — exactly our order.
pub struct Q2_K;
impl BlockFormat for Q2_K {
    const WEIGHTS: usize = 256;
    const BYTES: usize = 84;
    fn decode(b: &[u8], out: &mut [f32]) {
        decode_int::<Self>(b, out)
    }
}
impl BlockInt for Q2_K {
    const BITS: u32 = 2;
    const SUB: usize = 16;
    const LEVELS: &'static [i32] = &level_range::<4>(0);
    const HAS_MIN: bool = true;
    const F16_AT: &'static [usize] = &[80, 82];
    fn unpack(b: &[u8], codes: &mut [u8], scale: &mut [i32], min: &mut [i32]) -> (f16, f16) {
        for (k, &sc) in b[..16].iter().enumerate() {
            scale[k] = (sc & 0xf) as i32;
            min[k] = -((sc >> 4) as i32);
        }
        let qs = &b[16..80];
        for (i, c) in codes.iter_mut().enumerate() {
            let (n, j, l) = (i / 128, i / 32 % 4, i % 32);
            *c = (qs[32 * n + l] >> (2 * j)) & 3;
        }
        (f16_at(b, 80), f16_at(b, 82))
    }
}

/// 256 weights in 16 sub-blocks of 16: `hmask[32]`, `qs[64]` of low 2 bits (laid out as
/// Q2_K), 12 bytes of 6-bit scales, f16 `d`. Weight `128n + 32j + l` takes its third bit from
/// bit `4n + j` of `hmask[l]`. Integer form: code = low2 | hbit << 2, L[q] = q − 4 (that is
/// `low2 − (hbit ? 0 : 4)`), s = scale6 − 32, no minimum.
/// C: `dl = d_all * (scales[is] - 32); y = dl * (low2 - (hbit ? 0 : 4))` — our order.
pub struct Q3_K;
impl BlockFormat for Q3_K {
    const WEIGHTS: usize = 256;
    const BYTES: usize = 110;
    fn decode(b: &[u8], out: &mut [f32]) {
        decode_int::<Self>(b, out)
    }
}
impl BlockInt for Q3_K {
    const BITS: u32 = 3;
    const SUB: usize = 16;
    const LEVELS: &'static [i32] = &level_range::<8>(-4);
    const HAS_MIN: bool = false;
    const F16_AT: &'static [usize] = &[108];
    fn unpack(b: &[u8], codes: &mut [u8], scale: &mut [i32], min: &mut [i32]) -> (f16, f16) {
        let (hmask, qs, sc) = (&b[..32], &b[32..96], &b[96..108]);
        for (k, (s, m)) in scale.iter_mut().zip(min.iter_mut()).enumerate() {
            let low = if k < 8 { sc[k] & 0xf } else { sc[k - 8] >> 4 };
            let high = (sc[8 + k % 4] >> (2 * (k / 4))) & 3;
            *s = (low | (high << 4)) as i32 - 32;
            *m = 0;
        }
        for (i, c) in codes.iter_mut().enumerate() {
            let (n, j, l) = (i / 128, i / 32 % 4, i % 32);
            let low = (qs[32 * n + l] >> (2 * j)) & 3;
            let hbit = (hmask[l] >> (4 * n + j)) & 1;
            *c = low | (hbit << 2);
        }
        (f16_at(b, 108), f16::ZERO)
    }
}

/// 256 weights in 8 sub-blocks of 32: f16 `d`, f16 `dmin`, 12 bytes of 6-bit scales and mins
/// (`get_scale_min_k4`), `qs[128]` of nibbles: weight `64j + l` is the low nibble of
/// `qs[32j + l]`, `64j + 32 + l` its high nibble. Integer form: L[q] = q, s = scale6,
/// M = dmin, m_k = −min6.
/// C: `d1 = d * sc; m1 = min * m; y = d1 * q - m1` — our order.
pub struct Q4_K;
impl BlockFormat for Q4_K {
    const WEIGHTS: usize = 256;
    const BYTES: usize = 144;
    fn decode(b: &[u8], out: &mut [f32]) {
        decode_int::<Self>(b, out)
    }
}
impl BlockInt for Q4_K {
    const BITS: u32 = 4;
    const SUB: usize = 32;
    const LEVELS: &'static [i32] = &level_range::<16>(0);
    const HAS_MIN: bool = true;
    const F16_AT: &'static [usize] = &[0, 2];
    fn unpack(b: &[u8], codes: &mut [u8], scale: &mut [i32], min: &mut [i32]) -> (f16, f16) {
        for (k, (s, m)) in scale.iter_mut().zip(min.iter_mut()).enumerate() {
            let (sc, mn) = scale_min_k4(k, &b[4..16]);
            (*s, *m) = (sc, -mn);
        }
        for (c, qs) in codes.chunks_exact_mut(64).zip(b[16..144].chunks_exact(32)) {
            let (lo, hi) = c.split_at_mut(32);
            for ((l, h), &q) in lo.iter_mut().zip(hi).zip(qs) {
                *l = q & 0xf;
                *h = q >> 4;
            }
        }
        (f16_at(b, 0), f16_at(b, 2))
    }
}

/// 256 weights in 8 sub-blocks of 32: as Q4_K plus `qh[32]` of fifth bits: weight
/// `64j + l` takes bit `2j` of `qh[l]`, `64j + 32 + l` bit `2j + 1`. Integer form as Q4_K
/// with L[q] = q for 5-bit q.
/// C: `d1 = d * sc; m1 = min * m; y = d1 * (low + (hbit ? 16 : 0)) - m1` — our order.
pub struct Q5_K;
impl BlockFormat for Q5_K {
    const WEIGHTS: usize = 256;
    const BYTES: usize = 176;
    fn decode(b: &[u8], out: &mut [f32]) {
        decode_int::<Self>(b, out)
    }
}
impl BlockInt for Q5_K {
    const BITS: u32 = 5;
    const SUB: usize = 32;
    const LEVELS: &'static [i32] = &level_range::<32>(0);
    const HAS_MIN: bool = true;
    const F16_AT: &'static [usize] = &[0, 2];
    fn unpack(b: &[u8], codes: &mut [u8], scale: &mut [i32], min: &mut [i32]) -> (f16, f16) {
        for (k, (s, m)) in scale.iter_mut().zip(min.iter_mut()).enumerate() {
            let (sc, mn) = scale_min_k4(k, &b[4..16]);
            (*s, *m) = (sc, -mn);
        }
        let qh = &b[16..48];
        for (j, (c, qs)) in codes.chunks_exact_mut(64).zip(b[48..176].chunks_exact(32)).enumerate() {
            let (lo, hi) = c.split_at_mut(32);
            for (l, ((lo, hi), &q)) in lo.iter_mut().zip(hi).zip(qs).enumerate() {
                *lo = (q & 0xf) | (((qh[l] >> (2 * j)) & 1) << 4);
                *hi = (q >> 4) | (((qh[l] >> (2 * j + 1)) & 1) << 4);
            }
        }
        (f16_at(b, 0), f16_at(b, 2))
    }
}

/// 256 weights in 16 sub-blocks of 16: `ql[128]` low nibbles, `qh[64]` high 2-bit pairs,
/// 16 signed byte scales, f16 `d`. In each half `n` (ql += 64n, qh += 32n), for l < 32:
/// weight `l` = ql[l] low | qh[l] bits 0-1, `l+32` = ql[l+32] low | bits 2-3, `l+64` = ql[l]
/// high | bits 4-5, `l+96` = ql[l+32] high | bits 6-7. Integer form: L[q] = q − 32,
/// s = int8 scale, no minimum.
/// C: `y = d * sc[is] * q1`, which C evaluates as `(d * sc) * q1` — our order.
pub struct Q6_K;
impl BlockFormat for Q6_K {
    const WEIGHTS: usize = 256;
    const BYTES: usize = 210;
    fn decode(b: &[u8], out: &mut [f32]) {
        decode_int::<Self>(b, out)
    }
}
impl BlockInt for Q6_K {
    const BITS: u32 = 6;
    const SUB: usize = 16;
    const LEVELS: &'static [i32] = &level_range::<64>(-32);
    const HAS_MIN: bool = false;
    const F16_AT: &'static [usize] = &[208];
    fn unpack(b: &[u8], codes: &mut [u8], scale: &mut [i32], min: &mut [i32]) -> (f16, f16) {
        for (k, (s, m)) in scale.iter_mut().zip(min.iter_mut()).enumerate() {
            (*s, *m) = (b[192 + k] as i8 as i32, 0);
        }
        for (n, c) in codes.chunks_exact_mut(128).enumerate() {
            let (ql, qh) = (&b[64 * n..64 * n + 64], &b[128 + 32 * n..128 + 32 * n + 32]);
            for l in 0..32 {
                c[l] = (ql[l] & 0xf) | ((qh[l] & 3) << 4);
                c[l + 32] = (ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4);
                c[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                c[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
            }
        }
        (f16_at(b, 208), f16::ZERO)
    }
}
/// 256 weights in 8 sub-blocks of 32: f16 `d`, u16 `scales_h` (2 high bits per sub-block),
/// `scales_l[4]` (a nibble per sub-block), `qs[128]`: each sub-block's 16 bytes of nibbles as
/// IQ4_NL. Integer form: L = kvalues, s = ls − 32 (6-bit ls), no minimum.
/// C: `dl = d * (ls - 32); y = dl * kvalues_iq4nl[q]` — our order.
pub struct IQ4_XS;
impl BlockFormat for IQ4_XS {
    const WEIGHTS: usize = 256;
    const BYTES: usize = 136;
    fn decode(b: &[u8], out: &mut [f32]) {
        decode_int::<Self>(b, out)
    }
}
impl BlockInt for IQ4_XS {
    const BITS: u32 = 4;
    const SUB: usize = 32;
    const LEVELS: &'static [i32] = &KVALUES_IQ4NL;
    const HAS_MIN: bool = false;
    const F16_AT: &'static [usize] = &[0];
    fn unpack(b: &[u8], codes: &mut [u8], scale: &mut [i32], min: &mut [i32]) -> (f16, f16) {
        let scales_h = u16::from_le_bytes([b[2], b[3]]);
        for (k, (s, m)) in scale.iter_mut().zip(min.iter_mut()).enumerate() {
            let ls = ((b[4 + k / 2] >> (4 * (k % 2))) & 0xf) as i32 | ((((scales_h >> (2 * k)) & 3) as i32) << 4);
            (*s, *m) = (ls - 32, 0);
        }
        for (c, qs) in codes.chunks_exact_mut(32).zip(b[8..136].chunks_exact(16)) {
            nibbles32(qs, c);
        }
        (f16_at(b, 0), f16::ZERO)
    }
}
