#!/usr/bin/env python3
"""Writes a small random-weight GGUF of one architecture, with SmolLM2's tokenizer borrowed, for
comparing bitnest with llama.cpp on architectures no real file here has (tests/arch_synth.rs).

    python3 tests/synth/make_gguf.py --arch qwen3 --tokenizer-from SMOLLM2.gguf --out qwen3.gguf

Deterministic (NumPy's frozen legacy generator, a fixed seed). f32 weights; scaled so that each layer changes
the residual stream visibly and the logits spread over several units (far from ties).
Architectures:
  qwen3   q/k RMS norms per head, no biases, head size 32 with 4 heads on a width of 64 (so the
          query width 128 differs from the model's), rotate-half RoPE
  llama3  Llama with a `rope_freqs` tensor (Llama 3.1's rope scaling, factor 8, low/high
          frequency factors 1/4, original context 32), so positions past 32 are scaled
  phi3    fused `attn_qkv` and gate+up `ffn_up`, LongRoPE: `rope_factors_short`/`_long`, an
          original context of 256 (so a context of 128 takes the short factors, 512 the long
          ones; llama.cpp pads its context to a multiple of 256 before choosing) and an
          attention factor of 1.19
  gemma3  six layers, five of them local (a sliding window of 16 positions, rope base 10,000)
          and the last global (rope base 1e6); embeddings × √width, q/k norms, norms after
          attention and after the FFN, GeGLU, head size 32, the head tied to the embeddings
Mixtures of experts (8 experts of width 64, 2 used per token; router weights large, so that
a token's choice of experts is far from ties):
  mixtral      `llama` with `expert_count`: experts stacked in `ffn_{gate,up,down}_exps`
  mixtral-old  the same weights in the layout of files written before llama.cpp PR #6387, one
               tensor per expert (`blk.N.ffn_gate.E.weight`), which llama.cpp no longer loads
  qwen2moe     q/k/v biases, unnormalized top-k weights, a shared expert (width 96) gated by
               σ(`ffn_gate_inp_shexp`·x)
  qwen3moe     per-head q/k norms, head size 32, renormalized top-k weights
  olmoe        q/k norms over the whole query and key vectors, unnormalized top-k weights
"""
import argparse
import math

import numpy as np
from gguf import GGUFReader, GGUFWriter

# The tokenizer's metadata, key by key, with the writer method that stores it.
TOKENIZER_KEYS = {
    "tokenizer.ggml.model": "add_tokenizer_model",
    "tokenizer.ggml.pre": "add_tokenizer_pre",
    "tokenizer.ggml.tokens": "add_token_list",
    "tokenizer.ggml.token_type": "add_token_types",
    "tokenizer.ggml.merges": "add_token_merges",
    "tokenizer.ggml.bos_token_id": "add_bos_token_id",
    "tokenizer.ggml.eos_token_id": "add_eos_token_id",
    "tokenizer.ggml.unknown_token_id": "add_unk_token_id",
    "tokenizer.ggml.padding_token_id": "add_pad_token_id",
    "tokenizer.ggml.add_bos_token": "add_add_bos_token",
    "tokenizer.ggml.add_space_prefix": "add_add_space_prefix",
}


def copy_tokenizer(src, w, pre=None):
    r = GGUFReader(src)
    for key, method in TOKENIZER_KEYS.items():
        f = r.fields.get(key)
        if key == "tokenizer.ggml.pre" and pre is not None:
            w.add_tokenizer_pre(pre)
        elif f is not None:
            getattr(w, method)(f.contents())
    return len(r.fields["tokenizer.ggml.tokens"].contents())


def llama3_rope_factors(head_dim, base, factor=8.0, low=1.0, high=4.0, original=32):
    """Llama 3.1's frequency factors, as llama.cpp's converter writes `rope_freqs`."""
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    low_wavelen, high_wavelen = original / low, original / high
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", required=True,
                    choices=["qwen3", "llama3", "phi3", "gemma3", "mixtral", "mixtral-old", "qwen2moe", "qwen3moe", "olmoe"])
    ap.add_argument("--tokenizer-from", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=20261207)
    ap.add_argument("--scale", type=int, default=1,
                    help="width, feed-forward widths and heads times this, layers times 4 if above 1 "
                         "(a model large enough to time; the tests use 1)")
    ap.add_argument("--pre", help="the tokenizer's pre-tokenizer name instead of the borrowed one's (e.g. llama-bpe)")
    ap.add_argument("--break", dest="breakage", choices=["expert-count-0", "used-over-count", "no-expert-count",
                                                          "missing-expert", "expert-shape"],
                    help="write a malformed mixture-of-experts file, which a loader must refuse clearly")
    ap.add_argument("--type", choices=["f32", "q8_0"], default="f32",
                    help="encoding of the matrices (q8_0: llama.cpp's blocks, which bitnest transcodes)")
    a = ap.parse_args()
    # The legacy generator: its streams are frozen across NumPy versions, so the file (and the
    # llama.cpp figures stored for it) stay the same wherever the test runs.
    rng = np.random.RandomState(a.seed)
    gguf_arch = {"qwen3": "qwen3", "llama3": "llama", "phi3": "phi3", "gemma3": "gemma3", "mixtral": "llama",
                 "mixtral-old": "llama", "qwen2moe": "qwen2moe", "qwen3moe": "qwen3moe", "olmoe": "olmoe"}[a.arch]
    n_layers, dim, ffn, n_heads, n_kv = 2, 64, 128, 4, 2
    if a.arch == "gemma3":
        n_layers = 6
    moe = a.arch in ("mixtral", "mixtral-old", "qwen2moe", "qwen3moe", "olmoe")
    n_expert, n_used, expert_ffn, shared_ffn = 8, 2, 64, 96
    if a.scale > 1:
        n_layers, dim, ffn, n_heads, n_kv = 4 * n_layers, a.scale * dim, a.scale * ffn, a.scale * n_heads, a.scale * n_kv
        expert_ffn, shared_ffn = a.scale * expert_ffn, a.scale * shared_ffn
    if a.arch == "olmoe":
        n_kv = n_heads  # its k norm spans the whole key vector, as wide as the model
    head_dim = 32 if a.arch in ("qwen3", "gemma3", "qwen3moe") else dim // n_heads
    q_dim, kv_dim = n_heads * head_dim, n_kv * head_dim
    base = 1e6 if a.arch == "gemma3" else 10000.0
    w = GGUFWriter(a.out, gguf_arch)
    add_tensor = w.add_tensor
    if a.type == "q8_0":
        from gguf import GGMLQuantizationType, quants

        def add_tensor(name, t):
            # (Routers stay f32, as llama-quantize leaves them.)
            if t.ndim >= 2 and "ffn_gate_inp" not in name:
                w.add_tensor(name, quants.quantize(t, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
            else:
                w.add_tensor(name, t)
    # (Not the architecture's name: llama.cpp keys vocabulary quirks on "phi3" in it.)
    w.add_name("synthetic test model")
    vocab = copy_tokenizer(a.tokenizer_from, w, a.pre)
    w.add_block_count(n_layers)
    w.add_context_length(4096)
    w.add_embedding_length(dim)
    if not (a.arch.startswith("mixtral") or a.arch == "olmoe"):
        w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(base)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)
    w.add_file_type(0 if a.type == "f32" else 7)  # all f32, or mostly Q8_0
    if moe and a.breakage != "no-expert-count":
        w.add_expert_count(0 if a.breakage == "expert-count-0" else n_expert)
        w.add_expert_used_count(n_expert + 1 if a.breakage == "used-over-count" else n_used)
    if moe:
        if a.arch.startswith("mixtral") or a.arch == "olmoe":
            w.add_feed_forward_length(expert_ffn)  # (their experts' width is the file's FFN width)
        else:
            w.add_expert_feed_forward_length(expert_ffn)
        if a.arch == "qwen2moe":
            w.add_expert_shared_feed_forward_length(shared_ffn)
    if a.arch == "gemma3":
        w.add_sliding_window(16)
    if a.arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(256)
        w.add_rope_scaling_attn_factors(1.19)

    def mat(rows, cols, scale=1.0):
        return (rng.standard_normal((rows, cols)) * scale / math.sqrt(cols)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    # Gemma's head is the embedding table: smaller entries keep its logits within a few units.
    embd_scale = 0.3 if a.arch == "gemma3" else 1.0
    add_tensor("token_embd.weight", (embd_scale * rng.standard_normal((vocab, dim))).astype(np.float32))
    for l in range(n_layers):
        p = f"blk.{l}"
        add_tensor(f"{p}.attn_norm.weight", norm(dim))
        q, k, v = mat(q_dim, dim, 2.0), mat(kv_dim, dim, 2.0), mat(kv_dim, dim)
        if a.arch == "phi3":
            add_tensor(f"{p}.attn_qkv.weight", np.concatenate([q, k, v]))
        else:
            add_tensor(f"{p}.attn_q.weight", q)
            add_tensor(f"{p}.attn_k.weight", k)
            add_tensor(f"{p}.attn_v.weight", v)
        if a.arch == "qwen2moe":
            for t, n in (("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)):
                add_tensor(f"{p}.{t}.bias", (0.5 * rng.standard_normal(n)).astype(np.float32))
        add_tensor(f"{p}.attn_output.weight", mat(dim, q_dim))
        if a.arch in ("qwen3", "gemma3", "qwen3moe"):
            add_tensor(f"{p}.attn_q_norm.weight", norm(head_dim))
            add_tensor(f"{p}.attn_k_norm.weight", norm(head_dim))
        if a.arch == "olmoe":
            add_tensor(f"{p}.attn_q_norm.weight", norm(q_dim))
            add_tensor(f"{p}.attn_k_norm.weight", norm(kv_dim))
        if a.arch == "gemma3":
            add_tensor(f"{p}.post_attention_norm.weight", norm(dim))
        add_tensor(f"{p}.ffn_norm.weight", norm(dim))
        if moe:
            add_tensor(f"{p}.ffn_gate_inp.weight", mat(n_expert, dim, 4.0))
            gates = np.stack([mat(expert_ffn, dim) for _ in range(n_expert)])
            ups = np.stack([mat(expert_ffn, dim) for _ in range(n_expert)])
            downs = np.stack([mat(dim, expert_ffn - 16 if a.breakage == "expert-shape" else expert_ffn)
                              for _ in range(n_expert)])
            for part, t in (("ffn_gate", gates), ("ffn_up", ups), ("ffn_down", downs)):
                if a.breakage == "missing-expert" and l == n_layers - 1 and part == "ffn_down":
                    continue
                if a.arch == "mixtral-old":
                    for e in range(n_expert):
                        add_tensor(f"{p}.{part}.{e}.weight", t[e])
                else:
                    add_tensor(f"{p}.{part}_exps.weight", t)
            if a.arch == "qwen2moe":
                add_tensor(f"{p}.ffn_gate_inp_shexp.weight", (rng.standard_normal(dim) / math.sqrt(dim)).astype(np.float32))
                add_tensor(f"{p}.ffn_gate_shexp.weight", mat(shared_ffn, dim))
                add_tensor(f"{p}.ffn_up_shexp.weight", mat(shared_ffn, dim))
                add_tensor(f"{p}.ffn_down_shexp.weight", mat(dim, shared_ffn))
            continue
        gate, up = mat(ffn, dim), mat(ffn, dim)
        if a.arch == "phi3":
            add_tensor(f"{p}.ffn_up.weight", np.concatenate([gate, up]))
        else:
            add_tensor(f"{p}.ffn_gate.weight", gate)
            add_tensor(f"{p}.ffn_up.weight", up)
        add_tensor(f"{p}.ffn_down.weight", mat(dim, ffn))
        if a.arch == "gemma3":
            add_tensor(f"{p}.post_ffw_norm.weight", norm(dim))
    if a.arch == "llama3":
        add_tensor("rope_freqs.weight", llama3_rope_factors(head_dim, base))
    if a.arch == "phi3":
        half = head_dim // 2
        add_tensor("rope_factors_short.weight", (1.0 + 0.5 * rng.rand(half)).astype(np.float32))
        add_tensor("rope_factors_long.weight", (1.0 + 20.0 * rng.rand(half)).astype(np.float32))
    add_tensor("output_norm.weight", norm(dim))
    if a.arch != "gemma3":
        add_tensor("output.weight", mat(vocab, dim, 4.0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
