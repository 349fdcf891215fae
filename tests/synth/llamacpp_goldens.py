#!/usr/bin/env python3
"""llama.cpp's figures for the synthetic architecture files (tests/arch_synth.rs reads them):
perplexity over 4 chunks of 128 tokens of WikiText-2 (f32 weights and KV cache) and a greedy
continuation, for each file tests/synth/make_gguf.py writes. Writes tests/golden/arch_synth.json.

    python3 tests/synth/llamacpp_goldens.py --llama-bin ~/.cache/bitnest/llama.cpp/bin \
        --tokenizer-from ~/.cache/bitnest/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# (name, architecture, matrix encoding): f32 files run on bitnest's f32 path; the Q8_0 one
# through the lossless transcode into bit planes (Phi-3's fused tensors cut apart there).
ARCHS = [("qwen3", "qwen3", "f32"), ("llama3", "llama3", "f32"), ("phi3", "phi3", "f32"), ("phi3-q8_0", "phi3", "q8_0"),
         ("gemma3", "gemma3", "f32"), ("mixtral", "mixtral", "f32"), ("mixtral-old", "mixtral-old", "f32"),
         ("mixtral-q8_0", "mixtral", "q8_0"), ("qwen2moe", "qwen2moe", "f32"), ("qwen3moe", "qwen3moe", "f32"),
         ("olmoe", "olmoe", "f32")]
# llama.cpp no longer loads Mixtral files of the old layout (one tensor per expert): its figures
# for one are those of the same weights in the stacked layout.
REFERENCE = {"mixtral-old": "mixtral"}
# Contexts beyond the common 128 at which an architecture is also measured (Phi-3: its long
# rope factors, past the original context of 256).
# Gemma 3: its local layers' window of 16 cuts at every context measured.
EXTRA_CTX = {"phi3": [512], "phi3-q8_0": [512], "gemma3": [512]}
# Mixtures also run with fewer and more experts per token than they were made with (llama.cpp's
# `--override-kv ARCH.expert_used_count=int:K`, bitnest's `--experts K`).
EXPERTS = {"mixtral": [1, 4], "qwen2moe": [1, 4], "qwen3moe": [1, 4], "olmoe": [1, 4]}
GGUF_ARCH = {"mixtral": "llama"}
PROMPT = "The history of the city"
N_PREDICT = 24


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-bin", required=True)
    ap.add_argument("--tokenizer-from", required=True)
    ap.add_argument("--text", default=os.path.join(ROOT, "..", "shared", "data", "wikitext-2-raw-test.txt"))
    a = ap.parse_args()
    out = {"text_bytes": 20000, "ctx": 128, "chunks": 4, "prompt": PROMPT, "n_predict": N_PREDICT, "archs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "wiki.txt")
        with open(a.text, "rb") as f, open(text, "wb") as g:
            g.write(f.read(out["text_bytes"]))
        for name, arch, ty in ARCHS:
            path = os.path.join(tmp, f"{name}.gguf")
            subprocess.run([sys.executable, os.path.join(ROOT, "tests/synth/make_gguf.py"), "--arch",
                            REFERENCE.get(arch, arch), "--type", ty, "--tokenizer-from", a.tokenizer_from, "--out",
                            path], check=True)
            def perplexity(ctx, experts=None):
                extra = [] if experts is None else [
                    "--override-kv", f"{GGUF_ARCH.get(arch, arch)}.expert_used_count=int:{experts}"]
                r = subprocess.run([os.path.join(a.llama_bin, "llama-perplexity"), "-m", path, "-f", text, "-c",
                                    str(ctx), "--chunks", "4", "-t", "1", "-b", str(ctx), "-ctk", "f32", "-ctv", "f32",
                                    "--no-repack"] + extra, capture_output=True, text=True, check=True)
                return float(re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr).group(1))

            gen = subprocess.run([os.path.join(a.llama_bin, "llama-completion"), "-m", path, "-p", PROMPT, "-n",
                                  str(N_PREDICT), "--temp", "0", "-t", "1", "-no-cnv", "--no-repack", "-ctk", "f32",
                                  "-ctv", "f32"], capture_output=True, text=True, errors="replace", check=True)
            # (Byte tokens that are not whole UTF-8 characters print as U+FFFD, as bitnest's.)
            text_out = gen.stdout
            assert text_out.startswith(PROMPT), text_out[:200]
            out["archs"][name] = {"arch": arch, "type": ty, "ppl": perplexity(128),
                                  "continuation": text_out[len(PROMPT):].rstrip("\n"),
                                  "ppl_at": {str(c): perplexity(c) for c in EXTRA_CTX.get(name, [])},
                                  "ppl_experts": {str(k): perplexity(128, k) for k in EXPERTS.get(name, [])}}
            print(name, out["archs"][name])
    path = os.path.join(ROOT, "tests/golden/arch_synth.json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(path + ".tmp", path)
    print("wrote", path)


if __name__ == "__main__":
    main()
