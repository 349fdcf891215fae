//! Hugging Face checkpoints: a directory with `config.json`, `*.safetensors` and
//! `tokenizer.json`.
//!
//! Tensors are renamed to GGUF's names and the Q/K projections are permuted the way llama.cpp's
//! converter does (rotate-half pairs → interleaved pairs), so the model code sees one
//! convention whatever the source.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

/// Header bytes we are willing to parse; real headers are a few MB at most.
const MAX_HEADER: u64 = 100 << 20;

/// Memory-mapped safetensors shards of one checkpoint.
pub struct SafetensorsDir {
    pub dir: PathBuf,
    pub config: serde_json::Value,
    shards: Vec<Mmap>,
    /// tensor name → shard index
    index: HashMap<String, usize>,
}

impl SafetensorsDir {
    pub fn open(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg_text = std::fs::read(&cfg_path).with_context(|| format!("cannot read {}", cfg_path.display()))?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        ensure!(!files.is_empty(), "no *.safetensors files in {}", dir.display());
        let mut shards = Vec::new();
        for path in &files {
            let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: read-only map; every access goes through safetensors' bounds checks.
            let mmap = unsafe { Mmap::map(&f) }.with_context(|| format!("cannot map {}", path.display()))?;
            shards.push((path.display().to_string(), mmap));
        }
        Self::build(dir, &cfg_text, shards).with_context(|| format!("in {}", cfg_path.display()))
    }

    /// A checkpoint held in memory: `config.json`'s bytes and each shard's (the fuzzer's entry
    /// point; tests). `dir` is only where `tokenizer.json` would be looked for.
    pub fn from_parts(dir: &Path, config: &[u8], shards: &[&[u8]]) -> Result<Self> {
        ensure!(!shards.is_empty(), "no safetensors shards");
        let maps = shards
            .iter()
            .enumerate()
            .map(|(i, b)| Ok((format!("shard {i}"), super::map_bytes(b)?)))
            .collect::<Result<Vec<_>>>()?;
        Self::build(dir, config, maps)
    }

    fn build(dir: &Path, config: &[u8], shards: Vec<(String, Mmap)>) -> Result<Self> {
        let config: serde_json::Value = serde_json::from_slice(config).context("config.json is not valid JSON")?;
        let mut index = HashMap::new();
        let mut maps = Vec::with_capacity(shards.len());
        for (i, (name, mmap)) in shards.into_iter().enumerate() {
            check_header(&mmap).with_context(|| format!("invalid safetensors file {name}"))?;
            let st = SafeTensors::deserialize(&mmap).with_context(|| format!("invalid safetensors file {name}"))?;
            for t in st.names() {
                if index.insert(t.to_string(), i).is_some() {
                    bail!("tensor {t} appears in two shards");
                }
            }
            maps.push(mmap);
        }
        Ok(SafetensorsDir { dir: dir.to_path_buf(), config, shards: maps, index })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(|s| s.as_str())
    }

    /// A tensor by its Hugging Face name, converted to f32: `(shape, data)`.
    pub fn tensor_f32(&self, name: &str) -> Result<Option<(Vec<usize>, Vec<f32>)>> {
        let Some(&shard) = self.index.get(name) else {
            return Ok(None);
        };
        let st = SafeTensors::deserialize(&self.shards[shard])?;
        let t = st.tensor(name)?;
        let bytes = t.data();
        let data: Vec<f32> = match t.dtype() {
            Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            d => bail!("tensor {name}: dtype {d:?} is not supported (f32, f16, bf16 are)"),
        };
        Ok(Some((t.shape().to_vec(), data)))
    }
}

/// Rejects absurd header lengths before the safetensors crate allocates for them.
fn check_header(buf: &[u8]) -> Result<()> {
    ensure!(buf.len() >= 8, "file truncated: {} bytes, no header", buf.len());
    let n = u64::from_le_bytes(buf[..8].try_into().unwrap());
    ensure!(n <= MAX_HEADER, "header length {n} is absurd");
    ensure!(8 + n <= buf.len() as u64, "file truncated: header needs {n} bytes, file has {}", buf.len() - 8);
    Ok(())
}

/// Maps a GGUF tensor name to its Hugging Face name (llama/qwen2/mistral naming).
pub fn hf_name(gguf: &str) -> Option<String> {
    Some(match gguf {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        _ => {
            let rest = gguf.strip_prefix("blk.")?;
            let (layer, part) = rest.split_once('.')?;
            let (stem, kind) = part.rsplit_once('.')?;
            let hf = match stem {
                "attn_norm" => "input_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "attn_q_norm" => "self_attn.q_norm",
                "attn_k_norm" => "self_attn.k_norm",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                _ => return None,
            };
            format!("model.layers.{layer}.{hf}.{kind}")
        }
    })
}

/// Reorders the rows of a Q or K projection from rotate-half pairing (HF) to interleaved
/// pairing (GGUF): within each head, row `s·half + j` moves to `2j + s`. Works on weights
/// (`rows × cols`) and biases (`cols = 1`).
pub fn permute_qk(data: &[f32], n_heads: usize, cols: usize) -> Vec<f32> {
    let rows = data.len() / cols;
    let head_dim = rows / n_heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_heads {
        for s in 0..2 {
            for j in 0..half {
                let src = h * head_dim + s * half + j;
                let dst = h * head_dim + 2 * j + s;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways_for_a_block() {
        assert_eq!(hf_name("blk.3.attn_q.weight").unwrap(), "model.layers.3.self_attn.q_proj.weight");
        assert_eq!(hf_name("blk.0.attn_k.bias").unwrap(), "model.layers.0.self_attn.k_proj.bias");
        assert_eq!(hf_name("blk.2.attn_q_norm.weight").unwrap(), "model.layers.2.self_attn.q_norm.weight");
        assert_eq!(hf_name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert!(hf_name("blk.0.nonsense.weight").is_none());
    }

    #[test]
    fn permute_pairs_halves_into_neighbours() {
        // one head of dim 4, cols 1: [a0 a1 | b0 b1] → [a0 b0 a1 b1]
        assert_eq!(permute_qk(&[0.0, 1.0, 10.0, 11.0], 1, 1), vec![0.0, 10.0, 1.0, 11.0]);
    }
}
