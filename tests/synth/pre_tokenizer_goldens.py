#!/usr/bin/env python3
"""llama-tokenize's ids under pre-tokenizers no real vocabulary here uses: SmolLM2's vocabulary and
merges with `tokenizer.ggml.pre` set to another name (Llama 3's `llama-bpe`: its tiktoken-style
split, and llama.cpp's ignore_merges rule for it), over the tokenization texts of
bench/make-qwen-goldens.py. Writes tests/golden/pre_tokenizers.json, which
tests/arch_synth.rs checks bitnest's tokenizer against.

    python3 tests/synth/pre_tokenizer_goldens.py --llama-bin ~/.cache/bitnest/llama.cpp/bin \\
        --tokenizer-from ~/.cache/bitnest/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRES = ["llama-bpe"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-bin", required=True)
    ap.add_argument("--tokenizer-from", required=True)
    a = ap.parse_args()
    spec = importlib.util.spec_from_file_location("goldens", os.path.join(ROOT, "bench", "make-qwen-goldens.py"))
    goldens = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(goldens)
    out = {"borrowed_vocabulary": os.path.basename(a.tokenizer_from), "pre": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for pre in PRES:
            path = os.path.join(tmp, f"{pre}.gguf")
            subprocess.run([sys.executable, os.path.join(ROOT, "tests/synth/make_gguf.py"), "--arch", "llama3",
                            "--pre", pre, "--tokenizer-from", a.tokenizer_from, "--out", path], check=True)
            rows = []
            for name, text in goldens.TOKENIZE:
                f = os.path.join(tmp, "text.txt")
                with open(f, "wb") as g:
                    g.write(text.encode())
                rows.append({"name": name, "text": text, "ids": goldens.tokenize(Path(a.llama_bin), path, f)})
            out["pre"][pre] = rows
            print(pre, len(rows), "texts")
    path = os.path.join(ROOT, "tests/golden/pre_tokenizers.json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(path + ".tmp", path)
    print("wrote", path)


if __name__ == "__main__":
    main()
