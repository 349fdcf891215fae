//! The llama.cpp (ggml) tensor encodings we import: their block layouts and dequantization.
//!
//! Each block format is one [`BlockFormat`] implementation, so adding a format is one struct
//! and one `match` arm. At this stage everything is dequantized to f32 at load; the bit-plane
//! formats of `crate::quant` are what runs fast.

use anyhow::{Result, bail, ensure};
use half::{bf16, f16};

/// A ggml tensor type that bitnest can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
}

impl GgmlType {
    /// Maps ggml's on-disk type id; unknown or unsupported ids are an error naming the type.
    pub fn from_id(id: u32) -> Result<Self> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            30 => Self::BF16,
            6 | 7 => bail!("ggml type {id} (Q5_0/Q5_1) is not supported yet"),
            9..=23 => bail!("ggml type {id} (k-quant or i-quant) is not supported yet"),
            _ => bail!("unknown ggml type id {id}"),
        })
    }
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
            Self::BF16 => 30,
        }
    }
    /// Weights per block.
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q8_0 => Q8_0::WEIGHTS,
            Self::Q4_0 => Q4_0::WEIGHTS,
            Self::Q4_1 => Q4_1::WEIGHTS,
        }
    }
    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q8_0 => Q8_0::BYTES,
            Self::Q4_0 => Q4_0::BYTES,
            Self::Q4_1 => Q4_1::BYTES,
        }
    }
    /// Bits per weight including block scales.
    pub fn bits_per_weight(self) -> f64 {
        self.block_bytes() as f64 * 8.0 / self.block_size() as f64
    }

    /// Decodes `src` (whole blocks) into `dst`; lengths must agree exactly.
    pub fn dequantize(self, src: &[u8], dst: &mut [f32]) -> Result<()> {
        ensure!(
            dst.len().is_multiple_of(self.block_size())
                && src.len() == dst.len() / self.block_size() * self.block_bytes(),
            "{self:?}: {} bytes cannot hold {} weights",
            src.len(),
            dst.len()
        );
        match self {
            Self::F32 => dst
                .iter_mut()
                .zip(src.chunks_exact(4))
                .for_each(|(d, s)| *d = f32::from_le_bytes(s.try_into().unwrap())),
            Self::F16 => dst
                .iter_mut()
                .zip(src.chunks_exact(2))
                .for_each(|(d, s)| *d = f16::from_le_bytes([s[0], s[1]]).to_f32()),
            Self::BF16 => dst
                .iter_mut()
                .zip(src.chunks_exact(2))
                .for_each(|(d, s)| *d = bf16::from_le_bytes([s[0], s[1]]).to_f32()),
            Self::Q8_0 => decode_blocks::<Q8_0>(src, dst),
            Self::Q4_0 => decode_blocks::<Q4_0>(src, dst),
            Self::Q4_1 => decode_blocks::<Q4_1>(src, dst),
        }
        Ok(())
    }

    /// Encodes f32 weights (length a multiple of the block size) with round-to-nearest, as
    /// ggml's reference quantizers do. Used to write test fixtures and exports.
    pub fn quantize(self, src: &[f32]) -> Vec<u8> {
        assert_eq!(src.len() % self.block_size(), 0, "length must be whole blocks");
        match self {
            Self::F32 => src.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Self::F16 => src.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
            Self::BF16 => src.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
            Self::Q8_0 => encode_blocks::<Q8_0>(src),
            Self::Q4_0 => encode_blocks::<Q4_0>(src),
            Self::Q4_1 => encode_blocks::<Q4_1>(src),
        }
    }
}

/// One ggml block format: a fixed number of weights in a fixed number of bytes.
pub trait BlockFormat {
    const WEIGHTS: usize;
    const BYTES: usize;
    fn decode(block: &[u8], out: &mut [f32]);
    fn encode(x: &[f32], out: &mut Vec<u8>);
}

fn decode_blocks<B: BlockFormat>(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(B::BYTES).zip(dst.chunks_exact_mut(B::WEIGHTS)) {
        B::decode(b, o);
    }
}

fn encode_blocks<B: BlockFormat>(src: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len() / B::WEIGHTS * B::BYTES);
    for x in src.chunks_exact(B::WEIGHTS) {
        B::encode(x, &mut out);
    }
    out
}

fn half_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// 32 weights: f16 scale `d`, then 32 signed bytes; w = d·q.
pub struct Q8_0;
impl BlockFormat for Q8_0 {
    const WEIGHTS: usize = 32;
    const BYTES: usize = 34;
    fn decode(b: &[u8], out: &mut [f32]) {
        let d = half_at(b, 0);
        for (o, &q) in out.iter_mut().zip(&b[2..34]) {
            *o = d * (q as i8) as f32;
        }
    }
    fn encode(x: &[f32], out: &mut Vec<u8>) {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16::from_f32(d).to_le_bytes());
        out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
    }
}

/// 32 weights: f16 scale `d`, then 16 bytes of nibbles (low nibbles are weights 0..16, high
/// nibbles 16..32); w = d·(q − 8).
pub struct Q4_0;
impl BlockFormat for Q4_0 {
    const WEIGHTS: usize = 32;
    const BYTES: usize = 18;
    fn decode(b: &[u8], out: &mut [f32]) {
        let d = half_at(b, 0);
        for (j, &q) in b[2..18].iter().enumerate() {
            out[j] = d * ((q & 0x0f) as i32 - 8) as f32;
            out[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
        }
    }
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
pub struct Q4_1;
impl BlockFormat for Q4_1 {
    const WEIGHTS: usize = 32;
    const BYTES: usize = 20;
    fn decode(b: &[u8], out: &mut [f32]) {
        let d = half_at(b, 0);
        let m = half_at(b, 2);
        for (j, &q) in b[4..20].iter().enumerate() {
            out[j] = d * (q & 0x0f) as f32 + m;
            out[j + 16] = d * (q >> 4) as f32 + m;
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip_rmse(t: GgmlType, x: &[f32]) -> f32 {
        let mut y = vec![0f32; x.len()];
        t.dequantize(&t.quantize(x), &mut y).unwrap();
        (x.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum::<f32>() / x.len() as f32).sqrt()
    }

    #[test]
    fn block_sizes_match_ggml() {
        assert_eq!(Q4_0::BYTES, 2 + 16);
        assert_eq!(Q4_1::BYTES, 2 + 2 + 16);
        assert_eq!(Q8_0::BYTES, 2 + 32);
        assert_eq!(GgmlType::Q4_1.bits_per_weight(), 5.0);
    }

    #[test]
    fn quantize_roundtrip_error_within_ggml_bounds() {
        // Same input as ggml's test-quantize-fns: 0.1 + 2cos(i + offset).
        let x: Vec<f32> = (0..4096).map(|i| 0.1 + 2.0 * (i as f32 + 0.3).cos()).collect();
        assert!(roundtrip_rmse(GgmlType::Q8_0, &x) < 0.01);
        assert!(roundtrip_rmse(GgmlType::Q4_0, &x) < 0.2);
        assert!(roundtrip_rmse(GgmlType::Q4_1, &x) < 0.1);
        assert!(roundtrip_rmse(GgmlType::F16, &x) < 1e-3);
        assert_eq!(roundtrip_rmse(GgmlType::F32, &x), 0.0);
    }

    #[test]
    fn q4_1_decodes_known_block() {
        let mut b = Vec::new();
        b.extend(f16::from_f32(0.5).to_le_bytes());
        b.extend(f16::from_f32(-1.0).to_le_bytes());
        b.extend([0x21u8; 16]);
        let mut out = [0f32; 32];
        GgmlType::Q4_1.dequantize(&b, &mut out).unwrap();
        assert_eq!(out[0], -0.5); // q = 1
        assert_eq!(out[16], 0.0); // q = 2
    }

    #[test]
    fn wrong_length_is_an_error() {
        let mut out = [0f32; 32];
        assert!(GgmlType::Q4_0.dequantize(&[0u8; 17], &mut out).is_err());
    }
}
