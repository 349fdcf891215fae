//! The 32-weight block formats: one f16 scale (and minimum) per block.

// ggml's own names for the block structs.
#![allow(non_camel_case_types)]

use half::f16;

use super::*;

/// 32 weights: f16 scale `d`, then 32 signed bytes; w = d·q.
/// Integer form: code = byte ^ 0x80 (= int8 + 128), L[q] = q − 128, s = 1.
/// C: `y = x[i].qs[j]*d`, one product, so the order cannot matter.
pub struct Q8_0;
impl BlockFormat for Q8_0 {
    const WEIGHTS: usize = 32;
    const BYTES: usize = 34;
    fn decode(b: &[u8], out: &mut [f32]) {
        decode_int::<Self>(b, out)
    }
}
impl BlockInt for Q8_0 {
    const BITS: u32 = 8;
    const SUB: usize = 32;
    const LEVELS: &'static [i32] = &level_range::<256>(-128);
    const HAS_MIN: bool = false;
    const F16_AT: &'static [usize] = &[0];
    fn unpack(b: &[u8], codes: &mut [u8], scale: &mut [i32], min: &mut [i32]) -> (f16, f16) {
        for (c, &q) in codes.iter_mut().zip(&b[2..34]) {
            *c = q ^ 0x80;
        }
        (scale[0], min[0]) = (1, 0);
        (f16_at(b, 0), f16::ZERO)
    }
}
impl BlockEncode for Q8_0 {
    fn encode(x: &[f32], out: &mut Vec<u8>) {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16::from_f32(d).to_le_bytes());
        out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
    }
}

/// 32 weights: f16 scale `d`, then 16 bytes of nibbles (low nibbles are weights 0..16, high
/// nibbles 16..32); w = d·(q − 8). Integer form: L[q] = q − 8, s = 1.
/// C: `y = x0*d` with `x0 = q - 8`: one product.
pub struct Q4_0;
impl BlockFormat for Q4_0 {
    const WEIGHTS: usize = 32;
    const BYTES: usize = 18;
    fn decode(b: &[u8], out: &mut [f32]) {
        decode_int::<Self>(b, out)
    }
}
impl BlockInt for Q4_0 {
    const BITS: u32 = 4;
    const SUB: usize = 32;
    const LEVELS: &'static [i32] = &level_range::<16>(-8);
    const HAS_MIN: bool = false;
    const F16_AT: &'static [usize] = &[0];
    fn unpack(b: &[u8], codes: &mut [u8], scale: &mut [i32], min: &mut [i32]) -> (f16, f16) {
        nibbles32(&b[2..18], codes);
        (scale[0], min[0]) = (1, 0);
        (f16_at(b, 0), f16::ZERO)
    }
}
impl BlockEncode for Q4_0 {
    fn encode(x: &[f32], out: &mut Vec<u8>) {
        // ggml: the scale maps the signed extreme to -8.
        let max = x.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16::from_f32(d).to_le_bytes());
        let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
        out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
    }
}

/// 32 weights: f16 scale `d`, f16 minimum `m`, then 16 bytes of nibbles; w = d·q + m.
/// Integer form: L[q] = q, s = 1, M = m, m_k = 1.
/// C: `y = x0*d + m`; ours `(d·1)·q − m·(−1)` is the same two roundings (`x − (−m)` is
/// `x + m` by definition in IEEE 754).
pub struct Q4_1;
impl BlockFormat for Q4_1 {
    const WEIGHTS: usize = 32;
    const BYTES: usize = 20;
    fn decode(b: &[u8], out: &mut [f32]) {
        decode_int::<Self>(b, out)
    }
}
impl BlockInt for Q4_1 {
    const BITS: u32 = 4;
    const SUB: usize = 32;
    const LEVELS: &'static [i32] = &level_range::<16>(0);
    const HAS_MIN: bool = true;
    const F16_AT: &'static [usize] = &[0, 2];
    fn unpack(b: &[u8], codes: &mut [u8], scale: &mut [i32], min: &mut [i32]) -> (f16, f16) {
        nibbles32(&b[4..20], codes);
        (scale[0], min[0]) = (1, 1);
        (f16_at(b, 0), f16_at(b, 2))
    }
}
impl BlockEncode for Q4_1 {
    fn encode(x: &[f32], out: &mut Vec<u8>) {
        let min = x.iter().cloned().fold(f32::INFINITY, f32::min);
        let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16::from_f32(d).to_le_bytes());
        out.extend(f16::from_f32(min).to_le_bytes());
        let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
        out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
    }
}

/// Fifth bits of Q5_0/Q5_1: bit `i` of the little-endian u32 `qh` is weight `i`'s.
fn add_high_bits32(qh: &[u8], codes: &mut [u8]) {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    for (i, c) in codes.iter_mut().enumerate() {
        *c |= (((qh >> i) & 1) as u8) << 4;
    }
}

/// 32 weights: f16 `d`, u32 of fifth bits, 16 bytes of nibbles (as Q4_0); w = d·(q − 16).
/// Integer form: L[q] = q − 16, s = 1. C: `y = x0*d`, one product.
pub struct Q5_0;
impl BlockFormat for Q5_0 {
    const WEIGHTS: usize = 32;
    const BYTES: usize = 22;
    fn decode(b: &[u8], out: &mut [f32]) {
        decode_int::<Self>(b, out)
    }
}
impl BlockInt for Q5_0 {
    const BITS: u32 = 5;
    const SUB: usize = 32;
    const LEVELS: &'static [i32] = &level_range::<32>(-16);
    const HAS_MIN: bool = false;
    const F16_AT: &'static [usize] = &[0];
    fn unpack(b: &[u8], codes: &mut [u8], scale: &mut [i32], min: &mut [i32]) -> (f16, f16) {
        nibbles32(&b[6..22], codes);
        add_high_bits32(&b[2..6], codes);
        (scale[0], min[0]) = (1, 0);
        (f16_at(b, 0), f16::ZERO)
    }
}

/// 32 weights: f16 `d`, f16 `m`, u32 of fifth bits, 16 bytes of nibbles; w = d·q + m.
/// Integer form: L[q] = q, s = 1, M = m, m_k = 1. C: `y = x0*d + m` (as Q4_1).
pub struct Q5_1;
impl BlockFormat for Q5_1 {
    const WEIGHTS: usize = 32;
    const BYTES: usize = 24;
    fn decode(b: &[u8], out: &mut [f32]) {
        decode_int::<Self>(b, out)
    }
}
impl BlockInt for Q5_1 {
    const BITS: u32 = 5;
    const SUB: usize = 32;
    const LEVELS: &'static [i32] = &level_range::<32>(0);
    const HAS_MIN: bool = true;
    const F16_AT: &'static [usize] = &[0, 2];
    fn unpack(b: &[u8], codes: &mut [u8], scale: &mut [i32], min: &mut [i32]) -> (f16, f16) {
        nibbles32(&b[8..24], codes);
        add_high_bits32(&b[4..8], codes);
        (scale[0], min[0]) = (1, 1);
        (f16_at(b, 0), f16_at(b, 2))
    }
}

/// The 16 non-linear levels of IQ4_NL and IQ4_XS (ggml's `kvalues_iq4nl`), ascending.
pub const KVALUES_IQ4NL: [i32; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// 32 weights: f16 `d`, 16 bytes of nibbles (as Q4_0) indexing [`KVALUES_IQ4NL`].
/// Integer form: L = kvalues, s = 1. C: `y = d * kvalues_iq4nl[q]`, one product.
pub struct IQ4_NL;
impl BlockFormat for IQ4_NL {
    const WEIGHTS: usize = 32;
    const BYTES: usize = 18;
    fn decode(b: &[u8], out: &mut [f32]) {
        decode_int::<Self>(b, out)
    }
}
impl BlockInt for IQ4_NL {
    const BITS: u32 = 4;
    const SUB: usize = 32;
    const LEVELS: &'static [i32] = &KVALUES_IQ4NL;
    const HAS_MIN: bool = false;
    const F16_AT: &'static [usize] = &[0];
    fn unpack(b: &[u8], codes: &mut [u8], scale: &mut [i32], min: &mut [i32]) -> (f16, f16) {
        nibbles32(&b[2..18], codes);
        (scale[0], min[0]) = (1, 0);
        (f16_at(b, 0), f16::ZERO)
    }
}
