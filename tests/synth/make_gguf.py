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
    ap.add_argument("--arch", required=True, choices=["qwen3", "llama3", "phi3", "gemma3"])
    ap.add_argument("--tokenizer-from", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=20261207)
    ap.add_argument("--pre", help="the tokenizer's pre-tokenizer name instead of the borrowed one's (e.g. llama-bpe)")
    ap.add_argument("--type", choices=["f32", "q8_0"], default="f32",
                    help="encoding of the matrices (q8_0: llama.cpp's blocks, which bitnest transcodes)")
    a = ap.parse_args()
    # The legacy generator: its streams are frozen across NumPy versions, so the file (and the
    # llama.cpp figures stored for it) stay the same wherever the test runs.
    rng = np.random.RandomState(a.seed)
    gguf_arch = {"qwen3": "qwen3", "llama3": "llama", "phi3": "phi3", "gemma3": "gemma3"}[a.arch]
    n_layers, dim, ffn, n_heads, n_kv = 2, 64, 128, 4, 2
    if a.arch == "gemma3":
        n_layers = 6
    head_dim = 32 if a.arch in ("qwen3", "gemma3") else dim // n_heads
    q_dim, kv_dim = n_heads * head_dim, n_kv * head_dim
    base = 1e6 if a.arch == "gemma3" else 10000.0
    w = GGUFWriter(a.out, gguf_arch)
    add_tensor = w.add_tensor
    if a.type == "q8_0":
        from gguf import GGMLQuantizationType, quants

        def add_tensor(name, t):
            if t.ndim == 2:
                w.add_tensor(name, quants.quantize(t, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
            else:
                w.add_tensor(name, t)
    # (Not the architecture's name: llama.cpp keys vocabulary quirks on "phi3" in it.)
    w.add_name("synthetic test model")
    vocab = copy_tokenizer(a.tokenizer_from, w, a.pre)
    w.add_block_count(n_layers)
    w.add_context_length(4096)
    w.add_embedding_length(dim)
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
        add_tensor(f"{p}.attn_output.weight", mat(dim, q_dim))
        if a.arch in ("qwen3", "gemma3"):
            add_tensor(f"{p}.attn_q_norm.weight", norm(head_dim))
            add_tensor(f"{p}.attn_k_norm.weight", norm(head_dim))
        if a.arch == "gemma3":
            add_tensor(f"{p}.post_attention_norm.weight", norm(dim))
        add_tensor(f"{p}.ffn_norm.weight", norm(dim))
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
