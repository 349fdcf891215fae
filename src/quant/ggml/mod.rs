//! The llama.cpp (ggml) tensor encodings we import: their block layouts and dequantization.
//!
//! Each block format is one struct implementing [`BlockFormat`] (decoding) and, for the
//! quantized ones, [`BlockInt`] (the integer form below). Only the formats bitnest also writes
//! (Q8_0, Q4_0, Q4_1) implement [`BlockEncode`]. At this stage everything is dequantized to f32
//! at load; the bit-plane formats of `crate::quant` are what runs fast.
//!
//! # The integer ("affine") form
//!
//! Every quantized ggml format here stores unsigned codes `q` of `bits` bits, grouped into
//! sub-blocks of `sub` weights that share a small signed integer scale `s_k` and minimum `m_k`,
//! under one or two f16 values per block, `D` and `M` (`M` is +0 where the format has no
//! minimum). Weight `i` of sub-block `k = i / sub` is
//!
//! ```text
//! w = (D · s_k) · L[q]  −  M · (−m_k)          (f32 arithmetic, in this order, no fma)
//! ```
//!
//! where `L` is the format's table of 2^bits signed levels, sorted ascending. Mathematically
//! that is `(D·s_k)·L[q] + M·m_k`; it is written as a subtraction because that is what
//! llama.cpp's `dequantize_row_*` evaluate (`y = d1*q - m1` with `m1 = dmin*m`), and the two
//! differ in the sign of a zero result: with `m_k = 0` and `(D·s_k)·L[q] = −0`, C yields
//! `−0 − (+0) = −0` where an addition would give `+0`. Subtracting `M·(−m_k) = +0` is an exact
//! identity, so formats without a minimum need no special case (it is skipped anyway).
//! [`affine_weight`] evaluates the formula; [`GgmlType::unpack_into`] produces its inputs, and
//! [`GgmlType::dequantize`] computes exactly `affine_weight` of them, which reproduces
//! llama.cpp's reference dequantization bit for bit (each struct's comment gives the C line).
//!
//! "Bit for bit with llama.cpp" assumes the C is compiled without floating-point contraction
//! of `x*d + m` into an fma, as ggml-base (which holds ggml-quants.c) is for the generic x86-64
//! target; gguf-py's numpy dequantizers compute in the same order and agree bit for bit
//! (tests/ggml_oracle.rs checks that on random blocks and, opt-in, on whole GGUF files).

// ggml's own names (Q4_K, IQ4_XS) for the types and their block structs.
#![allow(non_camel_case_types)]

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
    Q5_0,
    Q5_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    IQ4_NL,
    IQ4_XS,
}

/// Runs `$e` with `$B` naming the block struct of `$t`, or `$float` for F32/F16/BF16.
macro_rules! with_block {
    ($t:expr, $B:ident => $e:expr, float => $float:expr) => {
        match $t {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => $float,
            GgmlType::Q8_0 => {
                type $B = Q8_0;
                $e
            }
            GgmlType::Q4_0 => {
                type $B = Q4_0;
                $e
            }
            GgmlType::Q4_1 => {
                type $B = Q4_1;
                $e
            }
            GgmlType::Q5_0 => {
                type $B = Q5_0;
                $e
            }
            GgmlType::Q5_1 => {
                type $B = Q5_1;
                $e
            }
            GgmlType::Q2_K => {
                type $B = Q2_K;
                $e
            }
            GgmlType::Q3_K => {
                type $B = Q3_K;
                $e
            }
            GgmlType::Q4_K => {
                type $B = Q4_K;
                $e
            }
            GgmlType::Q5_K => {
                type $B = Q5_K;
                $e
            }
            GgmlType::Q6_K => {
                type $B = Q6_K;
                $e
            }
            GgmlType::IQ4_NL => {
                type $B = IQ4_NL;
                $e
            }
            GgmlType::IQ4_XS => {
                type $B = IQ4_XS;
                $e
            }
        }
    };
}

impl GgmlType {
    /// Every type bitnest reads, in ggml id order.
    pub const ALL: [GgmlType; 15] = [
        Self::F32,
        Self::F16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q2_K,
        Self::Q3_K,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
        Self::IQ4_NL,
        Self::IQ4_XS,
        Self::BF16,
    ];

    /// Maps ggml's on-disk type id; unknown or unsupported ids are an error naming the type.
    pub fn from_id(id: u32) -> Result<Self> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2_K,
            11 => Self::Q3_K,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            20 => Self::IQ4_NL,
            23 => Self::IQ4_XS,
            30 => Self::BF16,
            _ => match UNSUPPORTED.iter().find(|(i, _)| *i == id) {
                Some((_, name)) => bail!("ggml type {id} ({name}) is not supported yet"),
                None => bail!("unknown ggml type id {id}"),
            },
        })
    }
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2_K => 10,
            Self::Q3_K => 11,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::IQ4_NL => 20,
            Self::IQ4_XS => 23,
            Self::BF16 => 30,
        }
    }
    /// Weights per block.
    pub fn block_size(self) -> usize {
        with_block!(self, B => B::WEIGHTS, float => 1)
    }
    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        with_block!(self, B => B::BYTES, float => if self == Self::F32 { 4 } else { 2 })
    }
    /// Bits per weight including block scales.
    pub fn bits_per_weight(self) -> f64 {
        self.block_bytes() as f64 * 8.0 / self.block_size() as f64
    }

    /// Width of the integer codes of [`Self::unpack_into`]; `None` for F32/F16/BF16.
    pub fn code_bits(self) -> Option<u32> {
        with_block!(self, B => Some(B::BITS), float => None)
    }
    /// Weights per sub-block (one `scale`/`min` pair each); `None` for F32/F16/BF16.
    pub fn sub_block(self) -> Option<usize> {
        with_block!(self, B => Some(B::SUB), float => None)
    }
    /// The level table `L` (2^bits signed integers, ascending); `None` for F32/F16/BF16.
    pub fn levels(self) -> Option<&'static [i32]> {
        with_block!(self, B => Some(B::LEVELS), float => None)
    }
    /// Whether blocks carry a minimum (`dmin`, `min`); false means `dmin` = +0 and `min` = 0.
    pub fn has_min(self) -> bool {
        with_block!(self, B => B::HAS_MIN, float => false)
    }
    /// Byte offsets of the block's f16 fields: `d`, then `dmin` where the format has one.
    /// Empty for F32/F16/BF16.
    pub fn f16_offsets(self) -> &'static [usize] {
        with_block!(self, B => B::F16_AT, float => &[])
    }

    /// Unpacks one block into the integer form (module docs): `codes` gets
    /// [`Self::block_size`] codes in weight order, `scale` and `min` one entry per sub-block;
    /// returns `(d, dmin)`. Allocation-free; every length must be exact.
    pub fn unpack_into(self, block: &[u8], codes: &mut [u8], scale: &mut [i32], min: &mut [i32]) -> Result<(f16, f16)> {
        with_block!(self, B => {
            ensure!(block.len() == B::BYTES, "{self:?}: a block is {} bytes, got {}", B::BYTES, block.len());
            ensure!(codes.len() == B::WEIGHTS, "{self:?}: {} codes per block, buffer holds {}", B::WEIGHTS, codes.len());
            let ns = B::WEIGHTS / B::SUB;
            ensure!(
                scale.len() == ns && min.len() == ns,
                "{self:?}: {ns} sub-blocks per block, buffers hold {} scales and {} minimums",
                scale.len(),
                min.len()
            );
            Ok(B::unpack(block, codes, scale, min))
        }, float => bail!("{self:?} has no integer form"))
    }

    /// [`Self::unpack_into`] into freshly allocated buffers.
    pub fn unpack(self, block: &[u8]) -> Result<BlockCodes> {
        let (Some(sub), Some(levels)) = (self.sub_block(), self.levels()) else {
            bail!("{self:?} has no integer form");
        };
        let n = self.block_size();
        let mut c = BlockCodes {
            codes: vec![0; n],
            d: f16::ZERO,
            dmin: f16::ZERO,
            scale: vec![0; n / sub],
            min: vec![0; n / sub],
            sub,
            levels,
        };
        (c.d, c.dmin) = self.unpack_into(block, &mut c.codes, &mut c.scale, &mut c.min)?;
        Ok(c)
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
        with_block!(self, B => decode_blocks::<B>(src, dst), float => match self {
            Self::F32 => dst
                .iter_mut()
                .zip(src.chunks_exact(4))
                .for_each(|(d, s)| *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]])),
            Self::F16 => dst
                .iter_mut()
                .zip(src.chunks_exact(2))
                .for_each(|(d, s)| *d = f16::from_le_bytes([s[0], s[1]]).to_f32()),
            _ => dst
                .iter_mut()
                .zip(src.chunks_exact(2))
                .for_each(|(d, s)| *d = bf16::from_le_bytes([s[0], s[1]]).to_f32()),
        });
        Ok(())
    }

    /// Whether [`Self::quantize`] can write this type.
    pub fn can_quantize(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::BF16 | Self::Q8_0 | Self::Q4_0 | Self::Q4_1)
    }

    /// Encodes f32 weights (length a multiple of the block size) with round-to-nearest, as
    /// ggml's reference quantizers do. Used to write test fixtures and exports. Types without
    /// an encoder ([`Self::can_quantize`]) are an error.
    pub fn quantize(self, src: &[f32]) -> Result<Vec<u8>> {
        ensure!(
            src.len().is_multiple_of(self.block_size()),
            "{self:?}: {} weights are not whole blocks of {}",
            src.len(),
            self.block_size()
        );
        Ok(match self {
            Self::F32 => src.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Self::F16 => src.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
            Self::BF16 => src.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
            Self::Q8_0 => encode_blocks::<Q8_0>(src),
            Self::Q4_0 => encode_blocks::<Q4_0>(src),
            Self::Q4_1 => encode_blocks::<Q4_1>(src),
            Self::Q5_0
            | Self::Q5_1
            | Self::Q2_K
            | Self::Q3_K
            | Self::Q4_K
            | Self::Q5_K
            | Self::Q6_K
            | Self::IQ4_NL
            | Self::IQ4_XS => bail!("bitnest cannot encode {self:?} (it only decodes it)"),
        })
    }
}

/// ggml type ids bitnest knows by name but cannot decode.
const UNSUPPORTED: [(u32, &str); 20] = [
    (4, "Q4_2, removed from ggml"),
    (5, "Q4_3, removed from ggml"),
    (9, "Q8_1"),
    (15, "Q8_K"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (39, "MXFP4"),
    (40, "NVFP4"),
];

/// One block in integer form: `w[i] = affine_weight(d, scale[k], levels[codes[i]], dmin,
/// min[k])` with `k = i / sub` (module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockCodes {
    /// Unsigned codes, each below 2^bits, in weight order.
    pub codes: Vec<u8>,
    pub d: f16,
    /// +0 where the type has no minimum.
    pub dmin: f16,
    /// One per sub-block.
    pub scale: Vec<i32>,
    /// One per sub-block; 0 where the type has no minimum.
    pub min: Vec<i32>,
    /// Weights per sub-block.
    pub sub: usize,
    /// The type's level table.
    pub levels: &'static [i32],
}

impl BlockCodes {
    /// Weight `i`, exactly as [`GgmlType::dequantize`] (and llama.cpp) computes it.
    pub fn weight(&self, i: usize) -> f32 {
        let k = i / self.sub;
        affine_weight(
            self.d.to_f32(),
            self.scale[k],
            self.levels[self.codes[i] as usize],
            self.dmin.to_f32(),
            self.min[k],
        )
    }
}

/// The integer form's weight, `(d·scale)·level − dmin·(−min)`, in llama.cpp's order of
/// operations (module docs): bit-identical to ggml's dequantization of every type here.
#[inline]
pub fn affine_weight(d: f32, scale: i32, level: i32, dmin: f32, min: i32) -> f32 {
    (d * scale as f32) * level as f32 - dmin * (-min) as f32
}

/// Decoding side of one ggml block format: a fixed number of weights in a fixed number of bytes.
pub trait BlockFormat {
    const WEIGHTS: usize;
    const BYTES: usize;
    /// Decodes one block (`BYTES` bytes) into `WEIGHTS` floats.
    fn decode(block: &[u8], out: &mut [f32]);
}

/// Encoding side, for the formats bitnest writes.
pub trait BlockEncode: BlockFormat {
    fn encode(x: &[f32], out: &mut Vec<u8>);
}

/// The integer form of a block format (module docs).
pub trait BlockInt: BlockFormat {
    /// Code width.
    const BITS: u32;
    /// Weights per sub-block.
    const SUB: usize;
    /// The 2^BITS levels, ascending.
    const LEVELS: &'static [i32];
    /// Whether blocks carry a minimum.
    const HAS_MIN: bool;
    /// Byte offsets of the f16 fields `d` (then `dmin`).
    const F16_AT: &'static [usize];
    /// `LEVELS` as f32, padded to 256 so a `u8` code indexes it without a bounds check.
    const LEVELS_F32: [f32; 256] = levels_f32(Self::LEVELS);
    /// Unpacks a block of exactly `BYTES` bytes into `WEIGHTS` codes and `WEIGHTS / SUB`
    /// scales and minimums; returns `(d, dmin)`.
    fn unpack(block: &[u8], codes: &mut [u8], scale: &mut [i32], min: &mut [i32]) -> (f16, f16);
}

const fn levels_f32(l: &[i32]) -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < l.len() {
        t[i] = l[i] as f32;
        i += 1;
    }
    t
}

const fn level_range<const N: usize>(lo: i32) -> [i32; N] {
    let mut t = [0i32; N];
    let mut i = 0;
    while i < N {
        t[i] = lo + i as i32;
        i += 1;
    }
    t
}

/// `BlockFormat::decode` of every integer-form type: unpack, then [`affine_weight`] with the
/// per-sub-block products hoisted (the same operations in the same order).
fn decode_int<B: BlockInt>(block: &[u8], out: &mut [f32]) {
    let mut codes = [0u8; 256];
    let mut scale = [0i32; 16];
    let mut min = [0i32; 16];
    let ns = B::WEIGHTS / B::SUB;
    let (d, dmin) = B::unpack(block, &mut codes[..B::WEIGHTS], &mut scale[..ns], &mut min[..ns]);
    let (d, dmin) = (d.to_f32(), dmin.to_f32());
    let lv = &B::LEVELS_F32;
    for (k, (o, c)) in out[..B::WEIGHTS].chunks_exact_mut(B::SUB).zip(codes.chunks_exact(B::SUB)).enumerate() {
        let dl = d * scale[k] as f32;
        if B::HAS_MIN {
            let ml = dmin * (-min[k]) as f32;
            for (o, &q) in o.iter_mut().zip(c) {
                *o = dl * lv[q as usize] - ml;
            }
        } else {
            // `x - (+0)` is an identity, so skipping it is exact (module docs).
            for (o, &q) in o.iter_mut().zip(c) {
                *o = dl * lv[q as usize];
            }
        }
    }
}

fn decode_blocks<B: BlockFormat>(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(B::BYTES).zip(dst.chunks_exact_mut(B::WEIGHTS)) {
        B::decode(b, o);
    }
}

fn encode_blocks<B: BlockEncode>(src: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len() / B::WEIGHTS * B::BYTES);
    for x in src.chunks_exact(B::WEIGHTS) {
        B::encode(x, &mut out);
    }
    out
}

fn f16_at(b: &[u8], i: usize) -> f16 {
    f16::from_le_bytes([b[i], b[i + 1]])
}

/// 32 nibbles stored as 16 bytes: low nibbles are weights 0..16, high nibbles 16..32.
fn nibbles32(qs: &[u8], codes: &mut [u8]) {
    let (lo, hi) = codes.split_at_mut(16);
    for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&qs[..16]) {
        *l = q & 0x0f;
        *h = q >> 4;
    }
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K/Q5_K block (ggml's
/// `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (i32, i32) {
    if j < 4 {
        ((q[j] & 63) as i32, (q[j + 4] & 63) as i32)
    } else {
        (((q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4)) as i32, ((q[j + 4] >> 4) | ((q[j] >> 6) << 4)) as i32)
    }
}

mod kquants;
mod legacy;
pub use kquants::{IQ4_XS, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K};
pub use legacy::{IQ4_NL, KVALUES_IQ4NL, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    const QUANTS: [GgmlType; 12] = [
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::IQ4_NL,
        GgmlType::IQ4_XS,
    ];

    fn roundtrip_rmse(t: GgmlType, x: &[f32]) -> f32 {
        let mut y = vec![0f32; x.len()];
        t.dequantize(&t.quantize(x).unwrap(), &mut y).unwrap();
        (x.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum::<f32>() / x.len() as f32).sqrt()
    }

    fn h(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    fn decode(t: GgmlType, b: &[u8]) -> Vec<f32> {
        let mut out = vec![0f32; t.block_size()];
        t.dequantize(b, &mut out).unwrap();
        out
    }

    /// Random bytes with the f16 fields replaced by finite values of either sign (zeros
    /// included, to exercise signed-zero results).
    fn random_block(t: GgmlType, rng: &mut StdRng) -> Vec<u8> {
        let mut b = vec![0u8; t.block_bytes()];
        rng.fill(&mut b[..]);
        for &at in t.f16_offsets() {
            let v = match rng.random_range(0..8) {
                0 => 0.0,
                1 => -0.0,
                _ => rng.random_range(-4.0f32..4.0),
            };
            b[at..at + 2].copy_from_slice(&h(v));
        }
        b
    }

    #[test]
    fn block_sizes_match_ggml() {
        assert_eq!(Q4_0::BYTES, 2 + 16);
        assert_eq!(Q4_1::BYTES, 2 + 2 + 16);
        assert_eq!(Q8_0::BYTES, 2 + 32);
        assert_eq!(GgmlType::Q4_1.bits_per_weight(), 5.0);
        let ggml = [
            (GgmlType::Q5_0, 6, 32, 22),
            (GgmlType::Q5_1, 7, 32, 24),
            (GgmlType::Q2_K, 10, 256, 84),
            (GgmlType::Q3_K, 11, 256, 110),
            (GgmlType::Q4_K, 12, 256, 144),
            (GgmlType::Q5_K, 13, 256, 176),
            (GgmlType::Q6_K, 14, 256, 210),
            (GgmlType::IQ4_NL, 20, 32, 18),
            (GgmlType::IQ4_XS, 23, 256, 136),
        ];
        for (t, id, weights, bytes) in ggml {
            assert_eq!((t.id(), t.block_size(), t.block_bytes()), (id, weights, bytes), "{t:?}");
        }
        assert_eq!(GgmlType::Q4_K.bits_per_weight(), 4.5);
        assert_eq!(GgmlType::Q6_K.bits_per_weight(), 6.5625);
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()).unwrap(), t);
            if let (Some(bits), Some(sub), Some(levels)) = (t.code_bits(), t.sub_block(), t.levels()) {
                assert_eq!(levels.len(), 1 << bits, "{t:?}");
                assert!(levels.windows(2).all(|w| w[0] < w[1]), "{t:?} levels not ascending");
                assert_eq!(t.block_size() % sub, 0);
                assert!(t.block_size() <= 256 && t.block_size() / sub <= 16);
                assert_eq!(t.f16_offsets().len(), 1 + t.has_min() as usize);
            } else {
                assert!(matches!(t, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16));
            }
        }
        for id in [9, 15, 16, 21, 22, 29] {
            let e = GgmlType::from_id(id).unwrap_err().to_string();
            assert!(e.contains("not supported yet"), "{e}");
        }
        assert!(GgmlType::from_id(999).unwrap_err().to_string().contains("unknown ggml type"));
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
    fn quantize_refuses_types_without_an_encoder() {
        let x = vec![0.5f32; 256];
        for t in GgmlType::ALL {
            assert_eq!(t.quantize(&x).is_ok(), t.can_quantize(), "{t:?}");
        }
        assert!(GgmlType::Q8_0.quantize(&x[..31]).is_err());
    }

    #[test]
    fn q4_1_decodes_known_block() {
        let mut b = Vec::new();
        b.extend(h(0.5));
        b.extend(h(-1.0));
        b.extend([0x21u8; 16]);
        let out = decode(GgmlType::Q4_1, &b);
        assert_eq!(out[0], -0.5); // q = 1
        assert_eq!(out[16], 0.0); // q = 2
    }

    #[test]
    fn q5_0_and_q5_1_decode_known_blocks() {
        // Fifth bits set for weights 0 and 17 only; nibbles 0x3 (low) and 0xA (high).
        let qh = (1u32 | (1 << 17)).to_le_bytes();
        let mut b = h(0.25).to_vec();
        b.extend(qh);
        b.extend([0xA3u8; 16]);
        let out = decode(GgmlType::Q5_0, &b);
        assert_eq!(out[0], 0.25 * (0x13 - 16) as f32);
        assert_eq!(out[1], 0.25 * (0x03 - 16) as f32);
        assert_eq!(out[16], 0.25 * (0x0A - 16) as f32);
        assert_eq!(out[17], 0.25 * (0x1A - 16) as f32);

        let mut b = h(0.5).to_vec();
        b.extend(h(-2.0));
        b.extend(qh);
        b.extend([0xA3u8; 16]);
        let out = decode(GgmlType::Q5_1, &b);
        assert_eq!(out[0], 0.5 * 19.0 - 2.0);
        assert_eq!(out[1], 0.5 * 3.0 - 2.0);
        assert_eq!(out[17], 0.5 * 26.0 - 2.0);
    }

    #[test]
    fn q2_k_decodes_known_block() {
        let mut b = vec![0u8; 84];
        b[0] = 0x21; // sub-block 0: scale 1, min 2
        b[1] = 0x03; // sub-block 1: scale 3, min 0
        b[5] = 0x15; // sub-block 5 (weights 80..96): scale 5, min 1
        b[16] = 0b11_10_01_00; // qs[0]: weight 0 → 0, 32 → 1, 64 → 2, 96 → 3
        b[16 + 16] = 0b0000_1000; // qs[16]: weight 16 → 0, weight 48 → 2
        b[16 + 17] = 0b0000_0011; // qs[17]: weight 17 → 3
        b[80..82].copy_from_slice(&h(0.5));
        b[82..84].copy_from_slice(&h(0.25));
        let out = decode(GgmlType::Q2_K, &b);
        assert_eq!(out[0], 0.5 * 1.0 * 0.0 - 0.25 * 2.0);
        assert_eq!(out[17], 0.5 * 3.0 * 3.0);
        assert_eq!(out[16], 0.0);
        // Weight 32 is sub-block 2 (scale 0, min 0): 0·1 − 0 = 0.
        assert_eq!(out[32], 0.0);
        // Weight 80: sub-block 5, qs[16] bits 4..6 = 0 → −0.25.
        assert_eq!(out[80], -0.25);
        assert_eq!(out[81], -0.25);
    }

    #[test]
    fn q3_k_decodes_known_block() {
        let mut b = vec![0u8; 110];
        // All 6-bit scales 32 + 2 = 34: low nibbles 2, high bits 2 (0b10 in every field).
        for i in 0..8 {
            b[96 + i] = 0x22;
        }
        for i in 8..12 {
            b[96 + i] = 0b10_10_10_10;
        }
        // hmask bit 0 of byte 0 set: weight 0 has hbit 1. qs[0] = 0b01: weight 0 low2 = 1.
        b[0] = 1;
        b[32] = 0b0000_0001;
        b[108..110].copy_from_slice(&h(0.5));
        let out = decode(GgmlType::Q3_K, &b);
        assert_eq!(out[0], 0.5 * 2.0 * 1.0); // low2 1, hbit set → 1
        assert_eq!(out[1], 0.5 * 2.0 * -4.0); // low2 0, no hbit → −4
        assert_eq!(out[255], -4.0);
        // A negative scale: sub-block 15 scale 6 bits = 0 → −32.
        b[96 + 7] = 0x02; // sub-block 15's low nibble is sc[7] >> 4 = 0
        b[96 + 11] = 0b00_10_10_10; // and its high bits (bits 6-7 of sc[11]) = 0
        let out = decode(GgmlType::Q3_K, &b);
        assert_eq!(out[255], 0.5 * -32.0 * -4.0);
    }

    #[test]
    fn q4_k_and_q5_k_decode_known_blocks() {
        let mut b = vec![0u8; 144];
        b[0..2].copy_from_slice(&h(0.5));
        b[2..4].copy_from_slice(&h(0.125));
        let sc = &mut b[4..16];
        sc[0] = 3; // sub-block 0: scale 3
        sc[4] = 8; // sub-block 0: min 8
        sc[8] = 0x5A; // sub-block 4: scale low 0xA, min low 0x5
        sc[0] |= 0b01 << 6; // sub-block 4: scale high bits 01 → scale 0x1A = 26
        sc[4] |= 0b10 << 6; // sub-block 4: min high bits 10 → min 0x25 = 37
        b[16] = 0x7C; // weight 0 → 0xC, weight 32 → 0x7
        b[16 + 64] = 0x09; // weight 128 → 9 (sub-block 4)
        let out = decode(GgmlType::Q4_K, &b);
        assert_eq!(out[0], 0.5 * 3.0 * 12.0 - 0.125 * 8.0);
        assert_eq!(out[32], 0.0); // sub-block 1: scale 0, min 0
        assert_eq!(out[128], 0.5 * 26.0 * 9.0 - 0.125 * 37.0);

        // Q5_K: same header, qh[0] bit 0 → weight 0 gains 16, bit 1 → weight 32 gains 16.
        let mut c = b[..16].to_vec();
        let mut qh = [0u8; 32];
        qh[0] = 0b11;
        c.extend(qh);
        c.extend(&b[16..144]);
        let out = decode(GgmlType::Q5_K, &c);
        assert_eq!(out[0], 0.5 * 3.0 * 28.0 - 0.125 * 8.0);
        assert_eq!(out[32], 0.0);
        assert_eq!(out[128], 0.5 * 26.0 * 9.0 - 0.125 * 37.0);
    }

    #[test]
    fn q6_k_decodes_known_block() {
        let mut b = vec![0u8; 210];
        for k in 0..16 {
            b[192 + k] = (k as i8 - 8) as u8;
        }
        b[208..210].copy_from_slice(&h(0.5));
        b[0] = 0x53; // weight 0 low nibble 3, weight 64 low nibble 5
        b[128] = 0b11_00_10_01; // weight 0 high 01, weight 32 high 10, 64 high 00, 96 high 11
        let out = decode(GgmlType::Q6_K, &b);
        assert_eq!(out[0], 0.5 * -8.0 * (0x13 - 32) as f32); // sub-block 0: scale −8
        assert_eq!(out[32], 0.5 * -6.0 * (0x20 - 32) as f32); // sub-block 2: scale −6
        assert_eq!(out[64], 0.5 * -4.0 * (0x05 - 32) as f32);
        assert_eq!(out[96], 0.5 * -2.0 * (0x30 - 32) as f32);
        assert_eq!(out[255], 0.5 * 7.0 * -32.0);
    }

    #[test]
    fn iq4_decodes_known_blocks() {
        let mut b = h(0.5).to_vec();
        b.extend([0xF0u8; 16]);
        let out = decode(GgmlType::IQ4_NL, &b);
        assert_eq!(out[0], 0.5 * -127.0);
        assert_eq!(out[16], 0.5 * 113.0);

        let mut b = vec![0u8; 136];
        b[0..2].copy_from_slice(&h(0.25));
        b[2..4].copy_from_slice(&(0b10u16 << 2).to_le_bytes()); // sub-block 1 high bits 10
        b[4] = 0x31; // sub-block 0 low 1, sub-block 1 low 3
        b[8] = 0x08; // weight 0 → kvalue 1, weight 16 → −127
        b[8 + 16] = 0xF0; // weight 32 → −127, weight 48 → 113
        let out = decode(GgmlType::IQ4_XS, &b);
        assert_eq!(out[0], 0.25 * (1 - 32) as f32 * 1.0);
        assert_eq!(out[16], 0.25 * (1 - 32) as f32 * -127.0);
        assert_eq!(out[32], 0.25 * (0x23 - 32) as f32 * -127.0);
        assert_eq!(out[48], 0.25 * (0x23 - 32) as f32 * 113.0);
    }

    #[test]
    fn integer_form_reproduces_dequantize_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut signed_zeros = 0;
        for t in QUANTS {
            let bits = t.code_bits().unwrap();
            for _ in 0..2000 {
                let b = random_block(t, &mut rng);
                let c = t.unpack(&b).unwrap();
                assert!(c.codes.iter().all(|&q| (q as u32) < 1 << bits), "{t:?} code out of range");
                if !t.has_min() {
                    assert!(c.min.iter().all(|&m| m == 0) && c.dmin.to_bits() == 0, "{t:?}");
                }
                let out = decode(t, &b);
                for (i, &w) in out.iter().enumerate() {
                    assert_eq!(c.weight(i).to_bits(), w.to_bits(), "{t:?} weight {i}: {} vs {w}", c.weight(i));
                    signed_zeros += (w.to_bits() == 0x8000_0000) as usize;
                }
            }
        }
        assert!(signed_zeros > 0, "the random blocks never produced −0");
    }

    #[test]
    fn unpack_matches_a_naive_affine_evaluation() {
        // The affine form as a sum, with the one documented exception: a zero result's sign.
        let mut rng = StdRng::seed_from_u64(11);
        for t in QUANTS {
            let b = random_block(t, &mut rng);
            let c = t.unpack(&b).unwrap();
            for (i, &w) in decode(t, &b).iter().enumerate() {
                let k = i / c.sub;
                let sum = (c.d.to_f32() * c.scale[k] as f32) * c.levels[c.codes[i] as usize] as f32
                    + c.dmin.to_f32() * c.min[k] as f32;
                assert!(sum == w, "{t:?} weight {i}: {sum} vs {w}");
            }
        }
    }

    #[test]
    fn wrong_length_is_an_error() {
        let mut out = [0f32; 32];
        assert!(GgmlType::Q4_0.dequantize(&[0u8; 17], &mut out).is_err());
        for t in QUANTS {
            let n = t.block_size();
            let mut out = vec![0f32; 2 * n];
            assert!(t.dequantize(&vec![0u8; 2 * t.block_bytes()], &mut out).is_ok());
            assert!(t.dequantize(&vec![0u8; 2 * t.block_bytes() - 1], &mut out).is_err(), "{t:?}");
            assert!(t.dequantize(&vec![0u8; 2 * t.block_bytes() + 1], &mut out).is_err(), "{t:?}");
            assert!(t.dequantize(&vec![0u8; 2 * t.block_bytes()], &mut out[..2 * n - 1]).is_err(), "{t:?}");
            let ns = n / t.sub_block().unwrap();
            let (mut codes, mut s, mut m) = (vec![0u8; n], vec![0i32; ns], vec![0i32; ns]);
            let block = vec![0u8; t.block_bytes()];
            assert!(t.unpack_into(&block, &mut codes, &mut s, &mut m).is_ok());
            assert!(t.unpack_into(&block[1..], &mut codes, &mut s, &mut m).is_err(), "{t:?}");
            assert!(t.unpack_into(&block, &mut codes[1..], &mut s, &mut m).is_err(), "{t:?}");
            assert!(t.unpack_into(&block, &mut codes, &mut s[1..], &mut m).is_err(), "{t:?}");
            assert!(t.unpack(&block[1..]).is_err());
        }
        assert!(GgmlType::F32.unpack(&[0u8; 4]).is_err());
    }
}
