#!/usr/bin/env python3
"""Golden data for the Qwen2.5-Coder GGUF models, from llama.cpp: tests/golden/qwen*.

For each model (Qwen2.5-Coder-1.5B-Instruct and -0.5B-Instruct, Q4_K_M) it writes

  tests/golden/TAG.tokenize.jsonl  {"name", "text", "ids"}: `llama-tokenize --ids --no-escape -f`
                                   of each text (specials parsed, llama-tokenize's default; no BOS,
                                   the Qwen GGUFs set add_bos_token = false)
  tests/golden/TAG.greedy.jsonl    {"name", "text", "prompt_ids", "greedy_ids", "greedy_text",
                                   "margins", "runner_up_ids"}: llama.cpp's greedy continuation
                                   (temperature 0, N tokens, or up to and including an
                                   end-of-generation token) and, at each generated position,
                                   llama.cpp's top-1 minus top-2 logit and the top-2 token
  tests/golden/TAG.meta.json       the model file (name, size, sha256), llama.cpp's version and
                                   the settings used

llama-completion prints only text, so the ids and logits come from bench/llama-greedy.cpp, a
small program compiled here against the same llama.cpp build (its source and libllama). It does
what llama-completion does and the script checks that: each greedy prompt is also run through
`llama-completion -bf FILE --no-escape --temp 0 -nr ...`, whose printed text must equal the
harness's, and tokenized by llama-tokenize, whose ids must equal the harness's prompt ids.

`-nr` (no extra buffer types: no weight repacking, no AMX) is used for every llama.cpp run: on
hosts whose CPU reports AMX that the hypervisor does not enable (the project's Sapphire Rapids
VMs) a llama.cpp built with -march=native otherwise dies with SIGILL/SIGSEGV in its AMX kernels.

Usage (about 13 minutes on 2 busy cores: 4 for the 0.5B model, 9 for the 1.5B; half of it the
llama-completion cross-check, which --no-crosscheck skips):

  python3 bench/make-qwen-goldens.py \\
      --model qwen2.5-coder-1.5b=~/.cache/bitnest/qwen2.5-coder-1.5b/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf \\
      --model qwen2.5-coder-0.5b=~/.cache/bitnest/qwen2.5-coder-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \\
      [--llama-bin ~/.cache/bitnest/llama.cpp/bin] [--out tests/golden] [--threads 2] [--n-predict 32]

Gemma 3 270M's goldens come from llama.cpp on the F32 dequantization of its file (about 3 minutes):

  python3 bench/make-qwen-goldens.py --f32-reference \
      --model gemma3-270m=~/.cache/bitnest/gemma3-270m/gemma-3-270m-q4_k_m.gguf

On the Q4_K_M file itself llama.cpp's int8 activations move Gemma's top-2 logit gaps by up to 1.2
from the exact ones (bitnest's f32 path agrees with the F32 run within 0.04), so the 0.1 margin
rule of tests/qwen_golden.rs needs the exact reference.

Without --model it uses the two Qwen cached paths ($BITNEST_CACHE overrides ~/.cache/bitnest).
--llama-bin defaults to $LLAMA_BIN, else $BITNEST_CACHE/llama.cpp/bin (what
bench/compare-llamacpp.sh builds); the harness needs that build's tree (found through its
CMakeCache.txt) and a C++17 compiler ($CXX, else c++).
"""

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def chatml(user, system=SYSTEM):
    """What the models' own chat template renders for one user turn (add_generation_prompt)."""
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def gemma(user):
    """What Gemma 3's template renders for one user turn, less the BOS text (the tokenizer adds
    BOS, and bitnest, like llama.cpp's chat formatting, drops the template's copy)."""
    return f"<start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n"


# Tokenization prompts: code, whitespace, scripts, emoji, numbers, contractions, specials.
TOKENIZE = [
    ("hello", "Hello world"),
    ("leading-space", " Hello world"),
    ("trailing-space", "Hello world "),
    ("spaces-both-ends", "  two spaces before and after  "),
    ("single-char", "a"),
    ("empty", ""),
    (
        "python",
        'import os\n\n\nclass Greeter:\n    """Says hello."""\n\n    def __init__(self, name: str) -> None:\n'
        "        self.name = name\n\n    def greet(self):\n        if not self.name:\n"
        "            raise ValueError('empty')\n        return f\"Hello, {self.name}!\"\n",
    ),
    (
        "rust",
        "use std::collections::HashMap;\n\nfn count<'a>(words: &[&'a str]) -> HashMap<&'a str, usize> {\n"
        "    let mut m = HashMap::new();\n    for w in words {\n        *m.entry(*w).or_insert(0) += 1;\n"
        "    }\n    m\n}\n",
    ),
    (
        "javascript",
        "const debounce = (fn, ms) => {\n  let t;\n  return (...args) => {\n    clearTimeout(t);\n"
        "    t = setTimeout(() => fn.apply(this, args), ms);\n  };\n};\nexport default debounce;\n",
    ),
    ("tabs", "\tdef f():\n\t\treturn 1\n\t\t\t# deeper\n\tx\t=\t2"),
    ("cpp-templates", "template <typename T>\nstd::vector<T> v{1, 2, 3}; // C++17\n#include <iostream>\n"),
    ("shell", 'for f in *.txt; do\n  echo "$f" | wc -c >> /tmp/out.log 2>&1\ndone'),
    ("space-runs", "a  b   c    d     e      f                g"),
    ("newline-runs", "line1\n\nline2\n\n\nline3\n\n\n\nline4\n"),
    ("triple-newline", "\n\n\n"),
    ("whitespace-only", "   \n\t  \n "),
    ("spaces-before-newline", "foo   \nbar \n\n  baz\t\n"),
    ("crlf", "first line\r\nsecond line\r\n\r\nthird"),
    ("indent-16", "                return value  # 16 spaces in"),
    ("cjk-chinese", "你好，世界！今天天气怎么样？我想写一个快速排序算法。"),
    ("cjk-japanese", "こんにちは、世界。カタカナとひらがなと漢字を混ぜた文です。"),
    ("korean", "안녕하세요, 세계! 한국어 문장입니다."),
    ("mixed-scripts", "Привет, мир! مرحبا بالعالم नमस्ते दुनिया Γειά σου κόσμε"),
    ("emoji", "I love 🦀 and 🐍! 👍🏽 👨‍👩‍👧‍👦 🇯🇵 ✨✨✨"),
    ("numbers", "1234567890 3.14159 -42 1e10 0x1F 2024-12-07 $1,000,000.00 100%"),
    ("digits-in-words", "abc123def 4567x A1B2C3 v2.5.1 utf8 x86_64"),
    ("contractions", "I'm sure you can't, won't or shouldn't; they'll, we've, she'd and it's fine."),
    ("contractions-upper", "I'M SURE IT'S FINE, DON'T WORRY, WE'LL SEE. He'S ThEy'Re"),
    ("chatml-specials", "<|im_start|>user\nhi<|im_end|>"),
    ("chatml-full", chatml("Write a haiku about Rust.")),
    ("fim-specials", "<|fim_prefix|>def add(a, b):\n    <|fim_suffix|>\n    return c<|fim_middle|>"),
    ("endoftext-special", "The end.<|endoftext|>Next document"),
    ("special-lookalike", "<|im_start without end, <|not_a_token|> and < |im_end| >"),
    (
        "long-words",
        "Pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism "
        "supercalifragilisticexpialidocious Donaudampfschifffahrtsgesellschaftskapitän",
    ),
    ("long-identifiers", "getHTTPResponseCode XMLHttpRequest snake_case_variable_name __init__ SCREAMING_CASE"),
    ("repeated-chars", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa ============================================"),
    ("punctuation", "!!!??? ... --- *** ### === <<< >>> ::: ;;; ((( ))) [[]] {{}} ''' \"\"\""),
    ("url-email", "See https://example.com/a/b?q=1&r=two#frag or mail user.name+tag@example.org."),
    ("accents", "naïve café résumé Ångström Straße façade coöperate"),
    ("combining-nbsp-zwj", "e\u0301 vs \u00e9, a\u00a0b (nbsp), x\u200by (zwsp), \u2028line sep"),
    ("markdown", "# Title\n\n- item 1\n- item 2\n\n```python\nprint('hi')\n```\n"),
    ("json", '{"key": [1, 2, 3], "nested": {"a": null, "b": true, "c": -0.5e-3}}'),
]

# Greedy continuations: code completion, ChatML chats, prose.
GREEDY = [
    ("code-python", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'),
    ("code-rust", "fn main() {\n    let v: Vec<u32> = (1..=10).collect();\n"),
    ("code-js", "// Debounce a function in JavaScript\nfunction debounce(fn, wait) {\n"),
    ("chat-code", chatml("Write a Python function that checks whether a string is a palindrome.")),
    ("chat-zh", chatml("用一句话解释什么是哈希表。")),
    ("prose", "The history of the printing press begins in"),
]

# Gemma's turns instead of ChatML, for tags that start with "gemma" (and a Gemma specials case
# in the tokenization set).
GEMMA_CHATS = [
    ("chat-code", gemma("Write a Python function that checks whether a string is a palindrome.")),
    ("chat-zh", gemma("用一句话解释什么是哈希表。")),
]
GEMMA_TOKENIZE = [("gemma-specials", "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n")]


def prompts_for(tag):
    """The tokenization texts and greedy prompts of a model tag."""
    if not tag.startswith("gemma"):
        return TOKENIZE, GREEDY
    chats = dict(GEMMA_CHATS)
    return TOKENIZE + GEMMA_TOKENIZE, [(n, chats.get(n, t)) for n, t in GREEDY]


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, **kw)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(map(str, cmd))}\n{r.stderr.decode(errors='replace')[-3000:]}")
    return r


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def llama_tree(bin_dir):
    """(source dir, library dir) of the llama.cpp build that `bin_dir`'s tools come from."""
    tool = (bin_dir / "llama-tokenize").resolve()
    build = tool.parent.parent
    cache = (build / "CMakeCache.txt").read_text()
    src = re.search(r"^llama\.cpp_SOURCE_DIR:STATIC=(.*)$", cache, re.M) or re.search(
        r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.*)$", cache, re.M
    )
    if not src:
        sys.exit(f"cannot find llama.cpp's source directory in {build / 'CMakeCache.txt'}")
    return Path(src.group(1)), tool.parent


def build_harness(bin_dir, work):
    src, lib = llama_tree(bin_dir)
    exe = work / "llama-greedy"
    cxx = os.environ.get("CXX", "c++")
    run([cxx, "-O2", "-std=c++17", str(ROOT / "bench" / "llama-greedy.cpp"), f"-I{src}/include",
         f"-I{src}/ggml/include", f"-L{lib}", "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{lib}", "-o", str(exe)])
    return exe


def tokenize(bin_dir, model, path, extra=()):
    out = run([str(bin_dir / "llama-tokenize"), "-m", str(model), "-f", str(path), "--no-escape", "--ids",
               "--log-disable", *extra]).stdout.decode()
    return json.loads(out.strip().splitlines()[-1])


def ids(s):
    return [int(x) for x in s.split(",")] if s else []


def main():
    cache = Path(os.environ.get("BITNEST_CACHE") or Path.home() / ".cache" / "bitnest")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", metavar="TAG=GGUF", help="a model and the tag its files get")
    ap.add_argument("--llama-bin", type=Path, default=Path(os.environ.get("LLAMA_BIN") or cache / "llama.cpp" / "bin"))
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "golden")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-predict", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--no-crosscheck", action="store_true", help="skip the llama-completion run per greedy prompt")
    ap.add_argument("--f32-reference", action="store_true",
                    help="run llama.cpp on the file's F32 dequantization (llama-quantize --allow-requantize FILE OUT "
                         "F32): exact weights and f32 activations, for models (Gemma 3) whose logits llama.cpp's int8 "
                         "activations move by more than the tests' 0.1 margin")
    a = ap.parse_args()
    models = a.model or [
        f"qwen2.5-coder-1.5b={cache}/qwen2.5-coder-1.5b/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        f"qwen2.5-coder-0.5b={cache}/qwen2.5-coder-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    ]
    a.out.mkdir(parents=True, exist_ok=True)
    version = run([str(a.llama_bin / "llama-tokenize"), "--version"]).stderr.decode().strip().splitlines()
    version = " ".join(line for line in version if line.startswith(("version", "built")))

    with tempfile.TemporaryDirectory(prefix="qwen-goldens-") as tmp:
        work = Path(tmp)
        harness = build_harness(a.llama_bin, work)
        for spec in models:
            tag, _, model = spec.partition("=")
            tokenize_set, greedy_set = prompts_for(tag)
            files = {}
            for name, text in tokenize_set + greedy_set:
                files[name] = work / f"{tag}-{name}.txt"
                files[name].write_bytes(text.encode())
            model = Path(os.path.expanduser(model))
            if not model.is_file():
                sys.exit(f"{tag}: no model at {model}")
            t0 = time.time()
            print(f"{tag}: {model}", file=sys.stderr)
            source = model
            if a.f32_reference:
                model = work / f"{tag}-f32.gguf"
                run([str(a.llama_bin / "llama-quantize"), "--allow-requantize", str(source), str(model), "F32"])
                print(f"  reference: {model.name}, the F32 dequantization", file=sys.stderr)

            tok_rows = []
            for name, text in tokenize_set:
                got = tokenize(a.llama_bin, model, files[name])
                tok_rows.append({"name": name, "text": text, "ids": got})
            hello = files["hello"]
            add_bos = tokenize(a.llama_bin, model, hello) != tokenize(a.llama_bin, model, hello, ["--no-bos"])
            print(f"  tokenized {len(tok_rows)} prompts ({time.time() - t0:.0f} s); add BOS: {add_bos}", file=sys.stderr)

            t1 = time.time()
            lines = run([str(harness), str(model), str(a.n_predict), str(a.threads), str(a.ctx)]
                        + [str(files[n]) for n, _ in greedy_set]).stdout.decode().splitlines()
            assert len(lines) == len(greedy_set), lines
            greedy_rows = []
            for (name, text), line in zip(greedy_set, lines):
                _, p_ids, g_ids, margins, second, hex_text = line.split("\t")
                row = {
                    "name": name,
                    "text": text,
                    "prompt_ids": ids(p_ids),
                    "greedy_ids": ids(g_ids),
                    "greedy_text": bytes.fromhex(hex_text).decode("utf-8", errors="replace"),
                    "margins": [float(m) for m in margins.split(",")],
                    "runner_up_ids": ids(second),
                }
                want = tokenize(a.llama_bin, model, files[name])
                if row["prompt_ids"] != want:
                    sys.exit(f"{tag} {name}: harness prompt ids {row['prompt_ids']} != llama-tokenize {want}")
                greedy_rows.append(row)
                low = [i for i, m in enumerate(row["margins"]) if m < 0.1]
                print(f"  {name}: {len(row['greedy_ids'])} tokens, min margin {min(row['margins']):.3f}, "
                      f"margin < 0.1 at {low}", file=sys.stderr)
            print(f"  harness: {time.time() - t1:.0f} s", file=sys.stderr)

            if not a.no_crosscheck:
                t2 = time.time()
                for row in greedy_rows:
                    r = run([str(a.llama_bin / "llama-completion"), "-m", str(model), "-bf", str(files[row["name"]]),
                             "--no-escape", "-n", str(a.n_predict), "--temp", "0", "-t", str(a.threads), "-c",
                             str(a.ctx), "-nr", "-no-cnv", "--no-warmup", "--no-display-prompt"])
                    printed = r.stdout.decode("utf-8", errors="replace")
                    # It ends its output with "\n\n", after " [end of text]\n" where an EOG token stopped it.
                    printed = printed.removesuffix("\n\n").removesuffix(" [end of text]\n")
                    want = row["greedy_text"]
                    if printed != want:
                        sys.exit(f"{tag} {row['name']}: llama-completion printed {printed!r}, harness {want!r}")
                print(f"  llama-completion prints the same text for all {len(greedy_rows)} ({time.time() - t2:.0f} s)",
                      file=sys.stderr)

            def write(path, rows):
                with open(path, "w", encoding="utf-8") as f:
                    for row in rows:
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")

            write(a.out / f"{tag}.tokenize.jsonl", tok_rows)
            write(a.out / f"{tag}.greedy.jsonl", greedy_rows)
            meta = {
                "model_file": source.name,
                "size": source.stat().st_size,
                "sha256": sha256(source),
                "reference": "llama.cpp on the F32 dequantization (llama-quantize --allow-requantize FILE OUT F32)"
                             if a.f32_reference else "llama.cpp on the file",
                "llama_cpp": version,
                "add_bos": add_bos,
                "parse_special": True,
                "n_predict": a.n_predict,
                "threads": a.threads,
                "ctx": a.ctx,
                "llama_completion": f"-bf FILE --no-escape -n {a.n_predict} --temp 0 -t {a.threads} -c {a.ctx} -nr "
                                    "-no-cnv --no-warmup --no-display-prompt",
                "crosschecked": not a.no_crosscheck,
            }
            (a.out / f"{tag}.meta.json").write_text(json.dumps(meta, indent=1) + "\n")
            print(f"  wrote {a.out}/{tag}.{{tokenize,greedy}}.jsonl, .meta.json ({time.time() - t0:.0f} s)",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
