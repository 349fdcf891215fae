//! What differs between the architectures bitnest runs, described in one place.
//!
//! Every supported architecture is one [`Arch`] entry: its names in GGUF metadata and Hugging
//! Face `config.json`, and the conventions its weights follow. Loading code asks the entry
//! instead of branching on the architecture's name.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// How rotary position embeddings pair the dimensions of a head.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeStyle {
    /// Dimensions `2i` and `2i + 1` rotate together. llama.cpp's converter permutes the Q/K
    /// rows of `llama`-style models into this order (its `LLAMA_ROPE_TYPE_NORM`).
    #[default]
    Interleaved,
    /// Dimensions `i` and `i + head_dim/2` rotate together ("rotate half", GPT-NeoX): the order
    /// of Hugging Face checkpoints, which llama.cpp keeps unpermuted for `qwen2` and friends
    /// (`LLAMA_ROPE_TYPE_NEOX`).
    Neox,
}

/// The activation of the gated feed-forward block: `act(gate) · up`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FfnAct {
    /// SwiGLU: `gate·σ(gate)`.
    #[default]
    Silu,
    /// GeGLU with the tanh approximation of GELU (Gemma).
    GeluTanh,
}

/// Interleaved local (sliding-window) and global attention layers: of every `period` layers,
/// the first `period − 1` attend to the last `sliding_window` positions only (the window size
/// is the file's `attention.sliding_window`) and rotate with their own rope base.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlidingWindow {
    pub period: usize,
    /// The local layers' rope base (the global ones keep `rope.freq_base`).
    pub rope_base: f64,
}

/// One architecture's description.
#[derive(Debug)]
pub struct Arch {
    /// `general.architecture` in GGUF files, and the name bitnest reports.
    pub name: &'static str,
    /// `architectures[0]` / `model_type` values of Hugging Face `config.json`.
    pub hf_names: &'static [&'static str],
    /// The pairing of the Q/K rows as stored in this architecture's GGUF files. Hugging Face
    /// checkpoints are brought into the same order at load, so one model path serves both.
    pub rope: RopeStyle,
    /// Whether token embeddings are multiplied by √width before the first block (Gemma).
    pub embed_scale: bool,
    pub ffn_act: FfnAct,
    /// Local and global attention layers, when the architecture interleaves them.
    pub sliding_window: Option<SlidingWindow>,
    /// The chat template to use when a file carries none (llama.cpp would fall back to ChatML,
    /// which models of this family were never trained on).
    pub chat_template: Option<&'static str>,
    /// How its mixture-of-experts blocks route, for architectures that have them (`llama` has
    /// them when its file has `expert_count`: Mixtral).
    pub experts: Option<Routing>,
}

/// How an architecture's router turns its logits into expert weights (llama.cpp's
/// `build_moe_ffn` arguments for it): softmax over all experts, the top k kept, and then
/// either renormalized to sum to 1 or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Routing {
    /// The k weights are divided by their sum (Mixtral, Qwen3-MoE), or kept as softmax
    /// probabilities over all experts (Qwen2-MoE, OLMoE).
    pub renormalize: bool,
    /// Whether every block must be a mixture (Qwen-MoE, OLMoE); `llama` may be either.
    pub required: bool,
    /// A shared expert that every token also runs, gated by σ(w·x) (Qwen2-MoE:
    /// `ffn_{gate,up,down}_shexp` and `ffn_gate_inp_shexp`).
    pub shared_expert: bool,
}

/// The llama conventions, which most entries share.
const LLAMA: Arch = Arch {
    name: "llama",
    hf_names: &["LlamaForCausalLM", "llama"],
    rope: RopeStyle::Interleaved,
    embed_scale: false,
    ffn_act: FfnAct::Silu,
    sliding_window: None,
    chat_template: None,
    experts: Some(Routing { renormalize: true, required: false, shared_expert: false }),
};

/// Gemma 3's own chat template (string contents only): a system message is folded into the
/// first user turn; the assistant's role is `model`.
const GEMMA_TEMPLATE: &str = r#"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if message['role'] == 'assistant' -%}{%- set role = "model" -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}{{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"#;

/// Every architecture bitnest runs.
pub const ARCHS: &[Arch] = &[
    LLAMA,
    Arch { name: "mistral", hf_names: &["MistralForCausalLM", "mistral"], experts: None, ..LLAMA },
    Arch { name: "qwen2", hf_names: &["Qwen2ForCausalLM", "qwen2"], rope: RopeStyle::Neox, experts: None, ..LLAMA },
    // Qwen2 without the q/k/v biases, with an RMS norm of each query and key head before RoPE
    // (`attn_q_norm`, `attn_k_norm`: loaded wherever a file has them) and a head size of its
    // own (`attention.key_length`, 128 on every Qwen3, whatever the width).
    Arch { name: "qwen3", hf_names: &["Qwen3ForCausalLM", "qwen3"], rope: RopeStyle::Neox, experts: None, ..LLAMA },
    // Llama's block with q, k, v in one `attn_qkv` and gate and up in one `ffn_up` (cut apart
    // at load, `source::fused_part`), and LongRoPE (`rope_factors_short`/`_long`, chosen by a
    // session's context against `rope.scaling.original_context_length`; `attn_factor`).
    Arch { name: "phi3", hf_names: &["Phi3ForCausalLM", "phi3"], rope: RopeStyle::Neox, experts: None, ..LLAMA },
    // Embeddings × √width; q/k head norms; a norm after attention and after the FFN as well as
    // before them (`post_attention_norm`, `post_ffw_norm`: loaded wherever a file has them);
    // GeGLU; five sliding-window layers (rope base 10,000) to each global one (`rope.freq_base`),
    // as llama.cpp's `gemma3` (its norms already hold 1 + w, added by the converter).
    Arch {
        name: "gemma3",
        // Not from safetensors yet: its checkpoints store norms as w (llama.cpp's converter
        // adds the 1) and name them differently from Llama's.
        hf_names: &[],
        rope: RopeStyle::Neox,
        embed_scale: true,
        ffn_act: FfnAct::GeluTanh,
        sliding_window: Some(SlidingWindow { period: 6, rope_base: 10_000.0 }),
        chat_template: Some(GEMMA_TEMPLATE),
        experts: None,
    },
    // Mixtures of experts. Qwen2-MoE: Qwen2's attention (q/k/v biases); softmax weights of the
    // top k kept as they are; a shared expert gated by σ(`ffn_gate_inp_shexp`·x) beside them.
    // Not from safetensors yet (their experts are named per expert, unlike Llama's MLP).
    Arch {
        name: "qwen2moe",
        hf_names: &[],
        rope: RopeStyle::Neox,
        experts: Some(Routing { renormalize: false, required: true, shared_expert: true }),
        ..LLAMA
    },
    // Qwen3's attention (q/k head norms); the top k weights renormalized.
    Arch {
        name: "qwen3moe",
        hf_names: &[],
        rope: RopeStyle::Neox,
        experts: Some(Routing { renormalize: true, required: true, shared_expert: false }),
        ..LLAMA
    },
    // OLMoE: RMS norms over the whole query and key vectors (not per head) before RoPE; the
    // top k weights kept as they are.
    Arch {
        name: "olmoe",
        hf_names: &[],
        rope: RopeStyle::Neox,
        experts: Some(Routing { renormalize: false, required: true, shared_expert: false }),
        ..LLAMA
    },
];

impl Arch {
    /// The entry for a GGUF `general.architecture` name.
    pub fn from_gguf(name: &str) -> Result<&'static Arch> {
        match ARCHS.iter().find(|a| a.name == name) {
            Some(a) => Ok(a),
            None => bail!("architecture {name:?} is not supported ({} are)", Self::names()),
        }
    }

    /// The entry for a Hugging Face architecture class or model type.
    pub fn from_hf(name: &str) -> Result<&'static Arch> {
        match ARCHS.iter().find(|a| a.hf_names.contains(&name)) {
            Some(a) => Ok(a),
            None => bail!("architecture {name:?} is not supported ({} are)", Self::names()),
        }
    }

    fn names() -> String {
        ARCHS.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_and_unknown_ones_are_errors() {
        assert_eq!(Arch::from_gguf("qwen2").unwrap().rope, RopeStyle::Neox);
        assert_eq!(Arch::from_gguf("llama").unwrap().rope, RopeStyle::Interleaved);
        assert_eq!(Arch::from_hf("Qwen2ForCausalLM").unwrap().name, "qwen2");
        let e = Arch::from_gguf("gpt2").unwrap_err().to_string();
        assert!(e.contains("gpt2") && e.contains("qwen2"), "{e}");
    }
}
