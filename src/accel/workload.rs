//! The operations of one forward pass as the simulator sees them: every linear layer (the head
//! included, tied or not), then per block two attention products over the context. Built from a
//! model file (each tensor's precision from the file and the plan) or from a shape file of the
//! simulator's own kind (`../shared/anchors/bitmod-sim-configs/*.json`).

use anyhow::{Context, Result, ensure};
use serde::Serialize;

use crate::format::bnest::{BnestFile, Encoding};
use crate::model::{BitsPlan, LlamaConfig};

/// Which pass: one token against a context (the simulator's generation mode), or a whole
/// context at once (its discriminative mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Decode,
    Prefill,
}

/// One operation: a product of a "weight" operand `[cout, cin]` with an input `[rows, cin_in]`
/// into an output `[tokens, cout_out]`, in the simulator's terms.
#[derive(Debug, Clone, Serialize)]
pub struct Op {
    pub name: String,
    /// Block index, `None` for the head.
    pub layer: Option<usize>,
    pub weight: [usize; 2],
    /// `[rows, channels]`; channels may be fractional, as the simulator computes
    /// hidden ÷ heads × kv heads in floating point.
    pub input: [f64; 2],
    pub output: [usize; 2],
    /// Bits per weight the op's weight operand costs in DRAM and in the buffer (planes plus
    /// metadata for a linear layer; the activation precision for attention's operands).
    pub w_bits: f64,
    /// Bits of the input operand (activations; the KV cache's bits for attention).
    pub i_bits: f64,
    /// Bits per weight that set the PE latency and the buffer writes: the linear layer's own, and
    /// for attention the model's [`nominal_bits`] (the simulator applies its one weight precision
    /// to every op).
    pub pe_bits: f64,
    pub attention: bool,
}

/// What the simulator reads of a model: its linear layers in order and four dimensions.
#[derive(Debug, Clone)]
pub struct Shapes {
    pub n_layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Key/value width per token (heads × head size); `None`: hidden ÷ heads × kv heads, the
    /// simulator's formula, computed as it does.
    pub kv_dim: Option<usize>,
    /// (name, [out, in], bits per weight) in the model's order; bits `None` takes the default.
    pub linears: Vec<(String, [usize; 2], Option<f64>)>,
}

impl Shapes {
    /// A shape file as the simulator's `llm_shape_profile.py` writes it (as JSON: `model_config`
    /// with `num_hidden_layers`, `hidden_size`, `num_attention_heads`, optional
    /// `num_key_value_heads`; `layer_config`: {name: [out, in]} in module order).
    pub fn from_json(text: &str) -> Result<Self> {
        #[derive(serde::Deserialize)]
        struct File {
            model_config: ModelConfig,
            layer_config: InOrder,
        }
        #[derive(serde::Deserialize)]
        struct ModelConfig {
            num_hidden_layers: usize,
            hidden_size: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
        }
        let f: File = serde_json::from_str(text).context("not a shape file")?;
        let mc = f.model_config;
        let s = Shapes {
            n_layers: mc.num_hidden_layers,
            hidden: mc.hidden_size,
            n_heads: mc.num_attention_heads,
            n_kv_heads: mc.num_key_value_heads.unwrap_or(mc.num_attention_heads),
            kv_dim: None,
            linears: f.layer_config.0.into_iter().map(|(n, s)| (n, s, None)).collect(),
        };
        s.validate()?;
        Ok(s)
    }

    /// A `.bnest` file read with `plan`: every block's seven matrices and the head (the
    /// embedding table when the model ties them), each at the bits per weight it stores for the
    /// planes the plan reads, metadata included.
    pub fn from_bnest(file: &BnestFile, plan: &BitsPlan) -> Result<Self> {
        let cfg: LlamaConfig =
            serde_json::from_value(file.header.config.clone()).context("the file's model configuration")?;
        let find = |name: &str| file.header.tensors.iter().find(|t| t.name == name);
        let mut linears = Vec::new();
        let mut add = |name: &str, display: String| -> Result<()> {
            let t = find(name).with_context(|| format!("the file has no tensor {name}"))?;
            ensure!(t.shape.len() == 2, "{name} is not a matrix");
            let bits = match &t.encoding {
                Encoding::Planes { master_bits, .. } => t.bits_per_weight(plan.bits_for(name, *master_bits)?),
                Encoding::F32 { .. } => 32.0,
            };
            linears.push((display, [t.shape[0], t.shape[1]], Some(bits)));
            Ok(())
        };
        for l in 0..cfg.n_layers {
            for m in ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"] {
                add(&format!("blk.{l}.{m}.weight"), format!("blk.{l}.{m}"))?;
            }
        }
        if find("output.weight").is_some() {
            add("output.weight", "output".into())?;
        } else {
            add("token_embd.weight", "output (tied: token_embd)".into())?;
        }
        let s = Shapes {
            n_layers: cfg.n_layers,
            hidden: cfg.n_heads * cfg.head_dim,
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            kv_dim: Some(cfg.kv_dim()),
            linears,
        };
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.n_heads >= 1 && self.n_kv_heads >= 1 && self.hidden >= 1,
            "heads and hidden size must be positive"
        );
        ensure!(!self.linears.is_empty(), "no linear layers");
        for (name, [o, i], _) in &self.linears {
            ensure!(*o >= 1 && *i >= 1, "{name}: empty shape [{o}, {i}]");
        }
        Ok(())
    }

    /// The ops of one pass at `ctx` tokens of context; linear layers without their own bits
    /// take `default_bits`; attention reads keys at `kv_bits[0]` and values at `kv_bits[1]`
    /// (the simulator: both at the activation precision).
    pub fn ops(&self, phase: Phase, ctx: usize, default_bits: f64, act_bits: f64, kv_bits: [f64; 2]) -> Vec<Op> {
        let decode = phase == Phase::Decode;
        let tokens = if decode { 1 } else { ctx };
        let mut ops = Vec::with_capacity(self.linears.len() + 2 * self.n_layers);
        for (name, [cout, cin], bits) in &self.linears {
            let w_bits = bits.unwrap_or(default_bits);
            ops.push(Op {
                name: name.clone(),
                layer: layer_of(name),
                weight: [*cout, *cin],
                input: [tokens as f64, *cin as f64],
                output: [tokens, *cout],
                w_bits,
                i_bits: act_bits,
                pe_bits: w_bits,
                attention: false,
            });
        }
        let kv = match self.kv_dim {
            Some(d) => d as f64,
            None => self.hidden as f64 / self.n_heads as f64 * self.n_kv_heads as f64,
        };
        let (h, heads) = (self.hidden, self.n_heads);
        let nominal = nominal_bits(&ops);
        for l in 0..self.n_layers {
            let attn = |name: &str, weight: [usize; 2], output: [usize; 2], kv_bits: f64| Op {
                name: format!("model.layers.{l}.self_attn.{name}"),
                layer: Some(l),
                weight,
                input: [ctx as f64, kv],
                output,
                w_bits: act_bits,
                i_bits: kv_bits,
                pe_bits: nominal,
                attention: true,
            };
            if decode {
                ops.push(attn("attn_qk", [1, h], [heads, ctx], kv_bits[0]));
                ops.push(attn("attn_v", [heads, ctx], [1, h], kv_bits[1]));
            } else {
                ops.push(attn("attn_qk", [ctx, h], [heads * ctx, ctx], kv_bits[0]));
                ops.push(attn("attn_v", [heads * ctx, ctx], [ctx, h], kv_bits[1]));
            }
        }
        ops
    }
}

/// `layer_config`'s entries in file order (a JSON object read as a list: the order is the
/// model's, and sums are taken in it as the simulator does).
struct InOrder(Vec<(String, [usize; 2])>);

impl<'de> serde::Deserialize<'de> for InOrder {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = InOrder;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of layer name to [out, in]")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<InOrder, A::Error> {
                let mut v = Vec::new();
                while let Some(e) = m.next_entry::<String, [usize; 2]>()? {
                    v.push(e);
                }
                Ok(InOrder(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// The precision most of the weights have (counted by weight, over the linear ops): what the
/// weight buffer is built for and what attention's PE latency follows. A model at one precision
/// (the simulator's case) has just that one; a transcoded file whose head is wider than its
/// blocks has its blocks'.
pub fn nominal_bits(ops: &[Op]) -> f64 {
    let mut by_bits: Vec<(f64, f64)> = Vec::new();
    for o in ops.iter().filter(|o| !o.attention) {
        let n = (o.weight[0] * o.weight[1]) as f64;
        match by_bits.iter_mut().find(|(b, _)| *b == o.w_bits) {
            Some(e) => e.1 += n,
            None => by_bits.push((o.w_bits, n)),
        }
    }
    by_bits.iter().fold((0.0, -1.0), |best, &(b, n)| if n > best.1 { (b, n) } else { best }).0
}

/// The block index in a layer name (`model.layers.3.…`, `blk.3.…`).
fn layer_of(name: &str) -> Option<usize> {
    let mut parts = name.split('.');
    while let Some(p) = parts.next() {
        if p == "layers" || p == "blk" {
            return parts.next().and_then(|n| n.parse().ok());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names_give_their_block() {
        assert_eq!(layer_of("model.layers.12.mlp.up_proj"), Some(12));
        assert_eq!(layer_of("blk.3.attn_q.weight"), Some(3));
        assert_eq!(layer_of("lm_head"), None);
    }

    #[test]
    fn shape_files_are_checked() {
        assert!(Shapes::from_json("{}").is_err());
        let ok = r#"{"model_config": {"num_hidden_layers": 1, "hidden_size": 8, "num_attention_heads": 2},
                     "layer_config": {"model.layers.0.q": [8, 8], "lm_head": [16, 8]}}"#;
        let s = Shapes::from_json(ok).unwrap();
        assert_eq!((s.n_kv_heads, s.linears.len()), (2, 2));
        let ops = s.ops(Phase::Decode, 256, 4.0, 16.0, [16.0, 16.0]);
        assert_eq!(ops.len(), 4);
        assert_eq!(ops[2].weight, [1, 8]);
        assert_eq!(ops[3].output, [1, 8]);
        let bad = ok.replace("[16, 8]", "[16]");
        assert!(Shapes::from_json(&bad).is_err());
        let zero = ok.replace("[16, 8]", "[0, 8]");
        assert!(Shapes::from_json(&zero).is_err());
    }
}
