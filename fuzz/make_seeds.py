#!/usr/bin/env python3
"""Writes the fuzzers' seed corpora into fuzz/corpus/<target>/ (run by bench/fuzz.sh).

Seeds are real, complete inputs, so that the fuzzer starts past the magic bytes and the
checksums and mutates files that load all the way to a forward pass:
- gguf: a tiny llama written with the `gguf` package (a 267-token byte-level BPE tokenizer,
  a chat template, f32/q8_0/q4_0 tensors), and the first 64 KiB of the real SmolLM2 file;
- bnest: that tiny model quantized by `bitnest quantize` (and transcoded), plus a last byte
  that picks the planes read;
- safetensors: the tiny model as a Hugging Face checkpoint, framed as the target reads it;
- tokenizer: Spec-Bench prompts and WikiText lines (text mode) and id runs (id mode);
- chat_template: the real models' templates and ChatML, with a conversation;
- request: request bodies of every endpoint, valid and not.

Usage: python3 fuzz/make_seeds.py BITNEST_BINARY
"""

import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np
import gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
CACHE = os.environ.get("BITNEST_CACHE") or os.path.expanduser("~/.cache/bitnest")


def put(target, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


def byte_tokens():
    """GPT-2's byte-to-unicode map: the 256 byte tokens of a byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_gguf(path, qtype):
    rng = np.random.default_rng(7)
    tokens = byte_tokens()
    merges = ["Ġ t", "h e", "i n", "Ġ a", "e r", "o n", "Ġt he", "r e"]
    tokens += [m.replace(" ", "") for m in merges] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    vocab, dim, ffn, heads, kv_heads, layers = len(tokens), 64, 96, 4, 2, 2
    hd = dim // heads
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 3)
    w.add_eos_token_id(vocab - 1)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    def t(name, shape, scale=0.2, offset=0.0, q=True):
        data = (offset + scale * rng.uniform(-1, 1, size=shape)).astype(np.float32)
        if q and qtype != gguf.GGMLQuantizationType.F32 and len(shape) == 2:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, data)

    t("token_embd.weight", (vocab, dim), 1.0)
    t("output.weight", (vocab, dim))
    t("output_norm.weight", (dim,), 0.1, 1.0)
    for l in range(layers):
        p = f"blk.{l}"
        t(f"{p}.attn_norm.weight", (dim,), 0.1, 1.0)
        t(f"{p}.ffn_norm.weight", (dim,), 0.1, 1.0)
        t(f"{p}.attn_q.weight", (heads * hd, dim), 0.3)
        t(f"{p}.attn_k.weight", (kv_heads * hd, dim), 0.3)
        t(f"{p}.attn_v.weight", (kv_heads * hd, dim))
        t(f"{p}.attn_output.weight", (dim, heads * hd))
        t(f"{p}.ffn_gate.weight", (ffn, dim))
        t(f"{p}.ffn_up.weight", (ffn, dim))
        t(f"{p}.ffn_down.weight", (dim, ffn))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokens


def safetensors_bytes(tensors):
    header, blobs, off = {}, [], 0
    for name, arr in tensors:
        b = arr.astype(np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def main():
    binary = sys.argv[1]
    tmp = tempfile.mkdtemp(prefix="bitnest-seeds-")
    # gguf
    for qt in [gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0]:
        p = os.path.join(tmp, f"tiny-{qt.name}.gguf")
        tiny_gguf(p, qt)
        put("gguf", open(p, "rb").read())
    real = os.path.join(CACHE, "smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf")
    if os.path.exists(real):
        put("gguf", open(real, "rb").read(65536))
    # bnest: quantized from the f32 tiny model, and transcoded from the q4_0 one
    src = os.path.join(tmp, "tiny-F32.gguf")
    for bits, extra in [(4, ["--group", "64"]), (8, ["--group", "32", "--sub-group", "0"])]:
        out = os.path.join(tmp, f"tiny-{bits}.bnest")
        r = subprocess.run([binary, "quantize", src, "--master-bits", str(bits), "-o", out] + extra,
                           capture_output=True, text=True)
        if r.returncode == 0:
            data = open(out, "rb").read()
            put("bnest", data + b"\x00")
            put("bnest", data + b"\x03")
        else:
            print(f"quantize {bits}: {r.stderr.strip()}", file=sys.stderr)
    # safetensors (HF names, f32)
    rng = np.random.default_rng(3)
    dim, ffn, layers, vocab = 64, 96, 2, 128
    ts = [("model.embed_tokens.weight", rng.uniform(-1, 1, (vocab, dim))),
          ("lm_head.weight", rng.uniform(-0.2, 0.2, (vocab, dim))),
          ("model.norm.weight", np.ones(dim))]
    for l in range(layers):
        p = f"model.layers.{l}"
        for n, s in [("input_layernorm", (dim,)), ("post_attention_layernorm", (dim,)),
                     ("self_attn.q_proj", (dim, dim)), ("self_attn.k_proj", (32, dim)),
                     ("self_attn.v_proj", (32, dim)), ("self_attn.o_proj", (dim, dim)),
                     ("mlp.gate_proj", (ffn, dim)), ("mlp.up_proj", (ffn, dim)), ("mlp.down_proj", (dim, ffn))]:
            ts.append((f"{p}.{n}.weight", rng.uniform(-0.2, 0.2, s)))
    cfg = json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": dim, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "intermediate_size": ffn, "num_hidden_layers": layers,
                      "vocab_size": vocab, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                      "max_position_embeddings": 256, "tie_word_embeddings": False}).encode()
    put("safetensors", struct.pack("<H", len(cfg)) + cfg + safetensors_bytes(ts))
    # tokenizer
    with open(os.path.join(SHARED, "data", "specbench-dev.jsonl")) as f:
        for i, line in enumerate(f):
            if i % 12 == 0:
                turns = json.loads(line).get("turns") or [""]
                put("tokenizer", b"\x00" + turns[0][:2000].encode())
    with open(os.path.join(SHARED, "data", "wikitext-2-raw-test.txt"), encoding="utf-8") as f:
        lines = [l for l in f.read().splitlines() if l.strip()][:4000:200]
    for l in lines:
        put("tokenizer", b"\x00" + l.encode())
    for s in ["héllo wörld 日本語 🙂\r\n\t  x", "<|im_start|>user\nHi<|im_end|>", "\x00\x01\x7f", "    def f(x):\n        return x"]:
        put("tokenizer", b"\x00" + s.encode())
    put("tokenizer", b"\x01" + bytes(range(256)))
    put("tokenizer", b"\x01" + b"\x00\x00\xf0\x00\x01\x00\x00\xbb\x01\x00\x00\xc3")
    # chat templates: the real models' and ChatML
    templates = [CHATML]
    for d, f in [("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                 ("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")]:
        p = os.path.join(CACHE, d, f)
        if os.path.exists(p):
            r = gguf.GGUFReader(p)
            fld = r.fields.get("tokenizer.chat_template")
            if fld is not None:
                templates.append(bytes(fld.parts[fld.data[0]]).decode())
    conv = "\0".join(["system", "You are terse.", "user", "Hello", "assistant", "Hi!", "user", "Bye"])
    for t in templates:
        put("chat_template", t + "\0" + "1" + "\0" + conv)
        put("chat_template", t + "\0" + "\0" + "user\0x")
    # requests
    bodies = [
        {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
        {"model": "m", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
         "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.7, "top_p": 0.9, "seed": 3,
         "stop": ["\n", "END"], "logprobs": True, "top_logprobs": 3, "max_completion_tokens": 16},
        {"model": "m", "prompt": "Once upon", "max_tokens": 4, "echo": True, "logprobs": 2, "n": 1},
        {"model": "m", "prompt": [1, 2, 3], "max_tokens": 4, "stop": "x", "presence_penalty": 0.5, "frequency_penalty": 0.5},
        {"content": "hello world", "add_special": True, "with_pieces": True},
        {"tokens": [1, 2, 3]},
        {"model": "m", "messages": [], "max_tokens": -1},
    ]
    for b in bodies:
        put("request", json.dumps(b))
    put("request", "{\"messages\": [{\"role\": \"user\", \"content\": \"\\ud800\"}]}")
    put("request", "[1, {\"a\": 1e999}]")
    n = sum(len(os.listdir(os.path.join(CORPUS, d))) for d in os.listdir(CORPUS))
    print(f"seeds: {n} files in {CORPUS}")


if __name__ == "__main__":
    main()
