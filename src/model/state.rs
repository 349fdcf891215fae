//! BCT's question for the runtime state besides the weights and the KV cache: which of the
//! activations a token's pass writes could be held in a block format, at what cost in
//! accuracy. Each [`StateBlocks`] component rounds one kind of activation through a block
//! format where the pass produces it (quantize, then dequantize in place), so perplexity
//! measures what storing it that way would cost; `docs/BCT.md` has the table.
//!
//! Nothing here is on by default: the matrix inputs are already int8 per 32 in the kernels
//! (`kernels::planes::acts`), and the measured costs decide whether a component earns a real
//! block-format buffer.

use anyhow::{Result, bail};
use half::f16;

use crate::kernels::attention::formats::{BLOCK, quantize_q4, quantize_q8};

/// A block format an activation row is rounded through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateFormat {
    /// int8 codes and an f16 step per 32 values (8.5 bits a value).
    Q8,
    /// llama.cpp's q4_0 rule: 4-bit codes and an f16 step per 32 (4.5 bits a value).
    Q4,
    /// bfloat16 (16 bits): a float's top half, rounded to nearest even.
    Bf16,
}

impl StateFormat {
    /// Bits a value takes in this format.
    pub fn bits(self) -> f64 {
        match self {
            StateFormat::Q8 => 8.5,
            StateFormat::Q4 => 4.5,
            StateFormat::Bf16 => 16.0,
        }
    }

    /// `x` replaced by its value in this format (`x.len()` a multiple of 64 for the block
    /// formats).
    pub fn round_trip(self, x: &mut [f32]) {
        match self {
            StateFormat::Bf16 => x.iter_mut().for_each(|v| *v = half::bf16::from_f32(*v).to_f32()),
            StateFormat::Q8 => {
                let mut codes = [0i8; BLOCK];
                let mut step = [f16::ZERO];
                for xb in x.chunks_exact_mut(BLOCK) {
                    quantize_q8(xb, &mut codes, &mut step);
                    let d = step[0].to_f32();
                    xb.iter_mut().zip(&codes).for_each(|(v, &c)| *v = c as f32 * d);
                }
            }
            StateFormat::Q4 => {
                let mut codes = [0u8; 32];
                let mut steps = [f16::ZERO; 2];
                for xb in x.chunks_exact_mut(64) {
                    quantize_q4(xb, &mut codes, &mut steps);
                    for (j, v) in xb.iter_mut().enumerate() {
                        let c = crate::kernels::attention::formats::q4_code(&codes, j);
                        *v = (c as f32 - 8.0) * steps[j / BLOCK].to_f32();
                    }
                }
            }
        }
    }
}

/// Which activations a pass rounds through a block format (`None`: kept as f32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateBlocks {
    /// Each token's embedding row, as looked up.
    pub embed: Option<StateFormat>,
    /// The residual stream after every residual addition (what a pass carries between layers).
    pub residual: Option<StateFormat>,
    /// The RMSNorm outputs that feed the attention and MLP projections.
    pub norm: Option<StateFormat>,
    /// The attention output that feeds the output projection.
    pub attn_out: Option<StateFormat>,
    /// The gated MLP intermediate `silu(gate)·up` that feeds the down projection.
    pub ffn_mid: Option<StateFormat>,
}

impl StateBlocks {
    /// Parses `component=format` pairs separated by commas (`residual=q8_0,ffn_mid=q4_0`;
    /// formats `q8_0`, `q4_0`, `bf16`; components `embed`, `residual`, `norm`, `attn_out`,
    /// `ffn_mid`, or `all`).
    pub fn parse(s: &str) -> Result<StateBlocks> {
        let mut b = StateBlocks::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((c, f)) = part.split_once('=') else {
                bail!("state block {part:?}: expected COMPONENT=FORMAT, e.g. residual=q8_0")
            };
            let f = match f {
                "q8_0" => StateFormat::Q8,
                "q4_0" => StateFormat::Q4,
                "bf16" => StateFormat::Bf16,
                _ => bail!("state block format {f:?}: expected q8_0, q4_0 or bf16"),
            };
            match c {
                "embed" => b.embed = Some(f),
                "residual" => b.residual = Some(f),
                "norm" => b.norm = Some(f),
                "attn_out" => b.attn_out = Some(f),
                "ffn_mid" => b.ffn_mid = Some(f),
                "all" => {
                    b = StateBlocks {
                        embed: Some(f),
                        residual: Some(f),
                        norm: Some(f),
                        attn_out: Some(f),
                        ffn_mid: Some(f),
                    }
                }
                _ => bail!("state component {c:?}: expected embed, residual, norm, attn_out, ffn_mid or all"),
            }
        }
        Ok(b)
    }

    /// Why a model of width `dim`, attention width `q_dim` and MLP width `ffn` cannot take
    /// these formats, if it cannot (the block formats need multiples of 64).
    pub fn unsupported(&self, dim: usize, q_dim: usize, ffn: usize) -> Option<String> {
        let block = |f: Option<StateFormat>| matches!(f, Some(StateFormat::Q8 | StateFormat::Q4));
        let checks = [
            (block(self.embed) || block(self.residual) || block(self.norm), dim, "model width"),
            (block(self.attn_out), q_dim, "attention width"),
            (block(self.ffn_mid), ffn, "MLP width"),
        ];
        checks.iter().find(|(on, n, _)| *on && !n.is_multiple_of(64)).map(|(_, n, what)| {
            format!("block formats for the runtime state need a {what} that is a multiple of 64, not {n}")
        })
    }
}

/// Rounds `x` through `f` where one is set.
#[inline]
pub(super) fn apply(f: Option<StateFormat>, x: &mut [f32]) {
    if let Some(f) = f {
        f.round_trip(x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_are_close_and_idempotent() {
        let x: Vec<f32> = (0..128).map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0).collect();
        for (f, tol) in [(StateFormat::Bf16, 0.02), (StateFormat::Q8, 0.02), (StateFormat::Q4, 0.5)] {
            let mut y = x.clone();
            f.round_trip(&mut y);
            assert!(y.iter().zip(&x).all(|(a, b)| (a - b).abs() <= tol), "{f:?}");
            let mut z = y.clone();
            f.round_trip(&mut z);
            let drift = z.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(drift <= tol * 0.5, "{f:?}: a second round trip moves {drift}");
        }
    }

    #[test]
    fn parses_and_refuses() {
        let b = StateBlocks::parse("residual=q8_0, ffn_mid=q4_0").unwrap();
        assert_eq!(b.residual, Some(StateFormat::Q8));
        assert_eq!(b.ffn_mid, Some(StateFormat::Q4));
        assert_eq!(b.embed, None);
        assert!(StateBlocks::parse("all=bf16").unwrap().norm == Some(StateFormat::Bf16));
        for bad in ["residual", "residual=q3", "weights=q8_0"] {
            assert!(StateBlocks::parse(bad).is_err(), "{bad}");
        }
        assert!(b.unsupported(576, 576, 1536).is_none());
        assert!(b.unsupported(576, 576, 1500).unwrap().contains("MLP width"));
    }
}
