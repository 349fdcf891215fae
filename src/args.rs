//! The command line: every subcommand's arguments (clap derive), and the small conversions
//! from arguments to library settings. What each command does is in `main.rs`.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use bitnest::fetch::DEFAULT_MODEL;
use bitnest::model::BitsPlan;
use bitnest::model::llama::{KvType, KvTypes};
use bitnest::sampling::SamplingParams;

#[derive(Parser)]
#[command(name = "bitnest", version, about = "One quantized model file, every precision: CPU LLM inference")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// Generate a continuation of a prompt (or one chat answer with --chat).
    Run(RunArgs),
    /// Interactive multi-turn chat using the model's template.
    Chat(ChatArgs),
    /// OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, ...).
    Serve(ServeArgs),
    /// Perplexity of a text file, measured as llama-perplexity does.
    Ppl(PplArgs),
    /// Show the model's architecture, tensors, tokenizer and chat template.
    Inspect(InspectArgs),
    /// Quantize a model into one .bnest file that runs at every precision (--bits r).
    Quantize(QuantizeArgs),
    /// Cut a dense model's feed-forward layers into experts (MoEfication) and quantize it: with
    /// every expert running (the default) it is the dense model; a self-draft may run fewer
    /// (--draft-experts).
    Moefy(MoefyArgs),
    /// Prompt-processing and generation speed, measured as llama-bench does (pp512, tg128).
    Bench(BenchArgs),
    /// What the model would cost on a bit-serial accelerator (BitMoD's PE array) and the designs
    /// it is compared with, layer by layer, beside the CPU (docs/ACCEL.md).
    AccelReport(AccelArgs),
}

#[derive(Args)]
pub(crate) struct MoefyArgs {
    #[command(flatten)]
    pub(crate) quantize: QuantizeArgs,
    /// Experts each layer's feed-forward neurons are split into (dividing its width).
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=256))]
    pub(crate) experts: u32,
}

#[derive(Args)]
pub(crate) struct AccelArgs {
    /// The model (each layer's precision comes from its file and --bits/--bits-plan; the KV
    /// cache's from --cache-type). A quantized GGUF is read through its bit-plane transcode.
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Price a shape file of the simulator's kind (JSON: model_config, layer_config) instead of
    /// a model, every layer at --w-prec bits, as the authors' simulator does.
    #[arg(long, requires = "w_prec")]
    pub(crate) shapes: Option<PathBuf>,
    /// Bits per weight, metadata included, for --shapes (BitMoD: 3.0625, 4.0625, 6.0625).
    #[arg(long, requires = "shapes")]
    pub(crate) w_prec: Option<f64>,
    /// Tokens of context: attention's length in decode, the tokens of a prefill pass.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub(crate) ctx: u64,
    #[arg(long, value_enum, default_value = "decode")]
    pub(crate) phase: bitnest::accel::Phase,
    /// The accelerator: bitmod, ant, olive or fp16 (the paper's values), unless --hw gives one.
    #[arg(long, default_value = "bitmod")]
    pub(crate) accel: String,
    /// A hardware description file (JSON, the shape --print-hw writes).
    #[arg(long)]
    pub(crate) hw: Option<PathBuf>,
    /// Print the accelerator's description as JSON (a starting point for --hw) and stop.
    #[arg(long)]
    pub(crate) print_hw: bool,
    /// Clock for converting cycles to time and tokens per second.
    #[arg(long, default_value_t = 1000.0)]
    pub(crate) clock_mhz: f64,
    /// List every op, not only each layer's sum.
    #[arg(long)]
    pub(crate) ops: bool,
    /// Also time every linear layer on this CPU at the same precision (the model is loaded).
    #[arg(long)]
    pub(crate) cpu: bool,
    #[arg(long, value_enum, default_value = "text")]
    pub(crate) format: OutputFormat,
}

#[derive(Args)]
pub(crate) struct QuantizeArgs {
    /// Source model: GGUF file, Hugging Face directory, known name, or a .bnest file.
    pub(crate) input: String,
    /// Output .bnest file (written atomically).
    #[arg(long, short = 'o')]
    pub(crate) output: PathBuf,
    /// Weights per group along the input dimension (a multiple of 8). Default: the model's
    /// width when it is a multiple of 64 up to 2048 (one group per row of its square matrices,
    /// 576 for SmolLM2-135M), else 512.
    #[arg(long)]
    pub(crate) group: Option<usize>,
    /// Planes stored: the highest precision the file can be read at.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(2..=8))]
    pub(crate) master_bits: u32,
    /// Datatype families each group may choose from: int, bitmod, or int,bitmod.
    #[arg(long, default_value = "int,bitmod")]
    pub(crate) dtypes: String,
    /// Objective weights as `r:λ,...` (default: the master plus its 4/3/2-bit views).
    #[arg(long)]
    pub(crate) objective: Option<String>,
    /// Scale multipliers tried per group, comma-separated.
    #[arg(long, default_value = "1,0.9")]
    pub(crate) scale_search: String,
    /// Two-level scales: sub-blocks of this many weights (dividing --group) refine each group's
    /// scale and offset with small integers, as llama.cpp's k-quants do. 0: one level.
    /// Default: 32 where it divides a larger group, else 0.
    #[arg(long)]
    pub(crate) sub_group: Option<usize>,
    /// Bits of each sub-block's scale and of its offset.
    #[arg(long, default_value_t = 6)]
    pub(crate) sub_bits: u32,
    /// Calibration text: the model runs over it first, and each weight's error is weighted by
    /// the mean square of the activations its column sees (llama.cpp's imatrix idea).
    #[arg(long)]
    pub(crate) calib: Option<PathBuf>,
    /// Tokens of the calibration text used (in windows of 512).
    #[arg(long, default_value_t = 8192)]
    pub(crate) calib_tokens: usize,
    #[arg(long, short = 't')]
    pub(crate) threads: Option<usize>,
}

#[derive(Args, Clone)]
pub(crate) struct ModelArgs {
    /// A GGUF file, a Hugging Face directory (config.json + *.safetensors + tokenizer.json), or
    /// a known model name (fetched on first use into $BITNEST_CACHE, default ~/.cache/bitnest).
    #[arg(long, short = 'm', default_value = DEFAULT_MODEL)]
    pub(crate) model: String,
    /// Worker threads (default: all cores).
    #[arg(long, short = 't')]
    pub(crate) threads: Option<usize>,
    /// Bit planes to read from a .bnest model (default: all it stores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub(crate) bits: Option<u32>,
    /// Per-layer precision plan for a .bnest model: lines of `TENSOR-PREFIX BITS`.
    #[arg(long)]
    pub(crate) bits_plan: Option<PathBuf>,
    /// What the KV cache stores keys and values as (llama.cpp's --cache-type-k/-v; f16 is
    /// also its default). `inspect` reports the cache's size for it.
    #[arg(long, value_enum, default_value_t = KvType::F16)]
    pub(crate) cache_type: KvType,
    /// What the cache stores keys as (overrides --cache-type for keys; llama.cpp's -ctk).
    #[arg(long, value_enum)]
    pub(crate) cache_type_k: Option<KvType>,
    /// What the cache stores values as (overrides --cache-type for values; llama.cpp's -ctv).
    #[arg(long, value_enum)]
    pub(crate) cache_type_v: Option<KvType>,
    /// Run a GGUF model through the dequantized-f32 reference path. By default a GGUF with
    /// quantized tensors is transcoded once, losslessly, into a cached .bnest beside it (or in
    /// $BITNEST_CACHE/transcoded) and runs on the bit-plane kernels.
    #[arg(long)]
    pub(crate) f32: bool,
    /// Experts each token runs in a mixture-of-experts model (default: as many as it was
    /// trained with; llama.cpp's --override-kv ARCH.expert_used_count=int:K).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub(crate) experts: Option<u32>,
}

impl ModelArgs {
    /// The cache types of keys and values: `--cache-type`, unless `--cache-type-k`/`-v` say
    /// otherwise.
    pub(crate) fn kv_type(&self) -> KvTypes {
        KvTypes { k: self.cache_type_k.unwrap_or(self.cache_type), v: self.cache_type_v.unwrap_or(self.cache_type) }
    }

    pub(crate) fn plan(&self) -> Result<Option<BitsPlan>> {
        Ok(match (&self.bits_plan, self.bits) {
            (Some(f), b) => Some(BitsPlan::from_file(f, b)?),
            (None, Some(b)) => Some(BitsPlan::uniform(Some(b))),
            (None, None) => None,
        })
    }
}

#[derive(Args, Clone)]
pub(crate) struct SamplingArgs {
    /// 0 means greedy decoding.
    #[arg(long, default_value_t = 0.8)]
    pub(crate) temperature: f32,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 40)]
    pub(crate) top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    pub(crate) top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    pub(crate) min_p: f32,
    /// 1.0 disables the penalty.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    pub(crate) repeat_last_n: usize,
    /// Seed for reproducible sampling (default: random).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
}

impl SamplingArgs {
    pub(crate) fn params(&self) -> Result<SamplingParams> {
        let p = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed,
        };
        p.validate()?;
        Ok(p)
    }
}

/// Speculative decoding (`docs/SPECULATIVE.md`); greedy output is identical to `--spec none`.
#[derive(Args, Clone)]
pub(crate) struct SpecArgs {
    /// none; auto (whichever of lookup, recycle+lookup and self+recycle+lookup measures fastest); or
    /// draft sources joined with '+': self (low-bit view of the same .bnest), recycle (Token
    /// Recycling tree), lookup (continuations copied from the context); both = self+recycle.
    #[arg(long, default_value = "none")]
    pub(crate) spec: String,
    /// Planes the self-draft reads.
    #[arg(long, default_value_t = 3)]
    pub(crate) draft_bits: u32,
    /// Experts per token the self-draft of a mixture-of-experts model runs: a count, auto
    /// (half the model's, rounded up) or all.
    #[arg(long, default_value = "all")]
    pub(crate) draft_experts: String,
    /// Longest self-drafted chain (the length used adapts below it).
    #[arg(long, default_value_t = bitnest::spec::SpecOptions::default().max_draft)]
    pub(crate) max_draft: usize,
    /// Most Token Recycling tree nodes per verification pass (root excluded); fewer are used
    /// when the measured cost of a pass says so.
    #[arg(long, default_value_t = bitnest::spec::SpecOptions::default().tree_nodes)]
    pub(crate) tree_nodes: usize,
}

impl SpecArgs {
    pub(crate) fn options(&self) -> Result<bitnest::spec::SpecOptions> {
        let mode: bitnest::spec::SpecMode = self.spec.parse()?;
        if !(1..=8).contains(&self.draft_bits) {
            bail!("--draft-bits must be between 1 and 8");
        }
        if self.max_draft > 64 || self.tree_nodes > 256 {
            bail!("--max-draft is at most 64 and --tree-nodes at most 256");
        }
        Ok(bitnest::spec::SpecOptions {
            mode,
            draft_bits: self.draft_bits,
            draft_experts: self.draft_experts.parse()?,
            max_draft: self.max_draft,
            tree_nodes: self.tree_nodes,
            adaptive: true,
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum OutputFormat {
    Text,
    Json,
}

#[derive(Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[arg(long, short = 'p')]
    pub(crate) prompt: String,
    /// Wrap the prompt as a user turn with the model's chat template.
    #[arg(long)]
    pub(crate) chat: bool,
    #[arg(long, short = 'n', default_value_t = 128)]
    pub(crate) max_tokens: usize,
    /// Context size in tokens (default: the model's, at most 4096).
    #[arg(long)]
    pub(crate) ctx: Option<usize>,
    #[arg(long, value_enum, default_value = "text")]
    pub(crate) format: OutputFormat,
    #[command(flatten)]
    pub(crate) sampling: SamplingArgs,
    #[command(flatten)]
    pub(crate) spec: SpecArgs,
}

#[derive(Args)]
pub(crate) struct ChatArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// System prompt (default: the template's own default, if any).
    #[arg(long)]
    pub(crate) system: Option<String>,
    #[arg(long, short = 'n', default_value_t = 512)]
    pub(crate) max_tokens: usize,
    #[arg(long)]
    pub(crate) ctx: Option<usize>,
    #[command(flatten)]
    pub(crate) sampling: SamplingArgs,
    #[command(flatten)]
    pub(crate) spec: SpecArgs,
}

#[derive(Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) host: String,
    /// Port to listen on (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8080)]
    pub(crate) port: u16,
    /// Context size per request in tokens (prompt + answer); each slot's KV cache holds this many.
    #[arg(long, default_value_t = 2048)]
    pub(crate) ctx: usize,
    /// Requests generated at once (one KV cache each; every step runs them all in one forward pass).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub(crate) parallel: u32,
    /// Requests that may wait for a slot; beyond that the server answers 503.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub(crate) queue: u32,
    /// Largest request body accepted, in bytes (larger: 400, `request_too_large`).
    #[arg(long, default_value_t = 1 << 20)]
    pub(crate) max_body: usize,
    /// Prompt tokens computed per step, over all requests still in their prompt (a long prompt
    /// shares each step with the others' decode tokens).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub(crate) prefill_chunk: u32,
    #[command(flatten)]
    pub(crate) spec: SpecArgs,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 30)]
    pub(crate) grace: u64,
    /// Model id reported to clients (default: the --model name or file name).
    #[arg(long)]
    pub(crate) alias: Option<String>,
    /// Require `Authorization: Bearer KEY` on every route but /health and /v1/models (401
    /// otherwise). Prefer the environment variable: a command line is visible to other users.
    #[arg(long, env = "BITNEST_API_KEY", hide_env_values = true)]
    pub(crate) api_key: Option<String>,
}

#[derive(Args)]
pub(crate) struct PplArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Text file to score (e.g. wikitext-2-raw test).
    #[arg(long, short = 'f')]
    pub(crate) file: PathBuf,
    #[arg(long, short = 'c', default_value_t = 512)]
    pub(crate) ctx: usize,
    /// Score at most this many chunks.
    #[arg(long)]
    pub(crate) chunks: Option<usize>,
    /// Round activations through block formats as the pass makes them, to measure what
    /// storing them so would cost (BCT's runtime state; docs/BCT.md): `COMPONENT=FORMAT,…`,
    /// components embed, residual, norm, attn_out, ffn_mid or all; formats q8_0, q4_0, bf16.
    #[arg(long)]
    pub(crate) state_blocks: Option<String>,
    #[arg(long, value_enum, default_value = "text")]
    pub(crate) format: OutputFormat,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    pub(crate) what: Option<BenchWhat>,
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Prompt tokens processed in one pass (llama-bench -p); 0 skips the test.
    #[arg(long, short = 'p', default_value_t = 512)]
    pub(crate) n_prompt: usize,
    /// Tokens generated one pass at a time (llama-bench -n); 0 skips the test.
    #[arg(long, short = 'n', default_value_t = 128)]
    pub(crate) n_gen: usize,
    /// Timed repetitions of each test, after one warm-up (llama-bench -r).
    #[arg(long, short = 'r', default_value_t = 3)]
    pub(crate) reps: usize,
    /// Tokens already in the KV cache when each test starts, filled untimed (llama-bench -d):
    /// speed at long context.
    #[arg(long, short = 'd', default_value_t = 0)]
    pub(crate) depth: usize,
    #[arg(long, value_enum, default_value = "text")]
    pub(crate) format: OutputFormat,
}

#[derive(Subcommand)]
pub(crate) enum BenchWhat {
    /// Speculative decoding on a prompt set against plain decoding (Spec-Bench style).
    Spec(SpecBenchArgs),
}

#[derive(Args)]
pub(crate) struct SpecBenchArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// JSONL prompts (`{"category", "turns": [...]}`; the first turn is asked).
    #[arg(long)]
    pub(crate) prompts: PathBuf,
    #[arg(long, default_value_t = 128)]
    pub(crate) max_tokens: usize,
    /// Modes to measure, comma-separated (auto, or sources joined with '+': self, recycle,
    /// lookup; both = self+recycle).
    #[arg(long, default_value = "auto")]
    pub(crate) spec: String,
    /// Self-draft precisions to measure, comma-separated.
    #[arg(long, default_value = "3")]
    pub(crate) draft_bits: String,
    /// Self-draft expert counts to measure (mixtures of experts), comma-separated: counts, auto
    /// or all.
    #[arg(long, default_value = "all")]
    pub(crate) draft_experts: String,
    #[arg(long, default_value_t = bitnest::spec::SpecOptions::default().max_draft)]
    pub(crate) max_draft: usize,
    /// Largest Token Recycling trees to measure, comma-separated.
    #[arg(long, default_value_t = bitnest::spec::SpecOptions::default().tree_nodes.to_string())]
    pub(crate) tree_nodes: String,
    /// Always draft --max-draft tokens and --tree-nodes nodes (no adaptation): acceptance at a
    /// fixed shape, as papers report it.
    #[arg(long)]
    pub(crate) fixed: bool,
    /// Use only the first N prompts of each category.
    #[arg(long)]
    pub(crate) per_category: Option<usize>,
    /// Generations of the first prompt before timing (warms the Token Recycling matrix).
    #[arg(long, default_value_t = 3)]
    pub(crate) warmup: usize,
    #[arg(long, default_value_t = 4096)]
    pub(crate) ctx: usize,
    #[arg(long, value_enum, default_value = "text")]
    pub(crate) format: OutputFormat,
    /// Only write the selected prompts, rendered with the chat template, as JSONL
    /// (`{"question_id", "category", "text"}`) to this file, for other engines to run.
    #[arg(long)]
    pub(crate) dump_prompts: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct InspectArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// List every tensor instead of a per-type summary.
    #[arg(long)]
    pub(crate) tensors: bool,
}
