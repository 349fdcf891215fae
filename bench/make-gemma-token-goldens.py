#!/usr/bin/env python3
"""Golden token ids for Gemma 3 270M's SentencePiece tokenizer, from llama.cpp:
tests/golden/gemma3_tokens.json, checked by tests/tokenizer_spm.rs.

For each text it runs, on the exact bytes of the text (written to a file),

  llama-tokenize -m GGUF -f FILE --no-escape --ids --log-disable                      -> "ids"
  llama-tokenize -m GGUF -f FILE --no-escape --ids --log-disable --no-parse-special   -> "plain_ids"

BOS is added (the GGUF sets add_bos_token = true), as Tokenizer::encode does. The texts cover
spaces (Gemma has user-defined tokens for runs of 2-31 spaces, 1-31 newlines and 1-31 tabs),
byte fallback, emoji, CJK, HTML tags (user-defined), the chat control tokens, `</s>` (user-defined
but treated as control by llama.cpp), the empty string.

Usage (about a minute; each call loads the 262k-entry vocabulary):

  python3 bench/make-gemma-token-goldens.py [--model GGUF] [--llama-bin DIR] [--out FILE]

--model defaults to $BITNEST_CACHE/gemma3-270m/gemma-3-270m-q4_k_m.gguf (~/.cache/bitnest if
unset); --llama-bin to $LLAMA_BIN, else $BITNEST_CACHE/llama.cpp/bin.
"""

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("BITNEST_CACHE") or Path.home() / ".cache" / "bitnest")

TEXTS = [
    ("hello", "Hello world"),
    ("leading-space", " Hello world"),
    ("trailing-space", "Hello world "),
    ("space-runs", "a  b   c    d" + " " * 31 + "e" + " " * 40 + "f"),
    ("only-spaces", "   "),
    ("tabs-newlines", "a\tb\t\tc\n\nd\r\ne\n" + "\n" * 35),
    ("mixed-whitespace", "  \t \n \t\t\n  x  \n"),
    ("python", "def greet(name):\n    \"\"\"Say hello.\"\"\"\n    return f\"Hello, {name}!\"\n\n\nclass A:\n\tpass\n"),
    ("rust", "fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    println!(\"{:?}\", v);\n}\n"),
    ("numbers", "3.14159 1,000,000 0x1F600 2024-05-17 12:30:45 -42e-3"),
    ("repeats", "===== ---------- .......... ababababa hahahahaha ****"),
    ("wikitext-heading", " = = = Gameplay = = = \n"),
    ("emoji", "Hello 🌍! 👨‍👩‍👧‍👦 🇺🇸🇯🇵 😀😀"),
    ("cjk", "日本語のテキストです。中文测试，标点符号。한국어 텍스트"),
    ("scripts", "Привет, мир! مرحبا بالعالم नमस्ते दुनिया Ελληνικά"),
    ("byte-fallback", "\x00\x01\x7f \ue000 \U000F0000 \ufeff 𓀀 ꙮ"),
    ("combining", "e\u0301 naïve café \u00a0nbsp\u00a0 zero\u200bwidth"),
    ("chat", "<start_of_turn>user\nWrite a haiku about the sea.<end_of_turn>\n<start_of_turn>model\n"),
    ("chat-bos", "<bos><start_of_turn>user\nhi<end_of_turn>\n"),
    ("control-names", "<pad><eos><unk><mask><unused0><start_of_image><end_of_image>[multimodal]"),
    ("eos-s", "<s>x</s> <b>bold</b>"),
    ("special-look-alikes", "<start_of_turn <end_of_turn> start_of_turn> < eos > <0x41>"),
    ("html", "<table><tr><td>1</td><th>h</th></tr></table>\n<h1>Title</h1><div><span>s</span></div>"),
    ("markdown", "# Title\n\n- item **bold** _it_\n\n```bash\necho hi\n```\n"),
    ("json", "{\"key\": [1, 2, {\"n\": null, \"s\": \"a b\"}]}"),
    ("url-path", "https://example.com/a?q=1&r=2#x C:\\Users\\me\\file.txt user@example.com"),
    ("contractions", "It's don't WON'T y'all I'M"),
    ("long-word", "Pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism"),
    ("math", "∑_{i=1}^{n} i² = n(n+1)/2, α+β=γ, √2 ≈ 1.414"),
    ("single-char", "a"),
    ("empty", ""),
]


def _goldens():
    """bench/make-qwen-goldens.py, for its `run` and `sha256` helpers."""
    spec = importlib.util.spec_from_file_location("qwen_goldens", Path(__file__).with_name("make-qwen-goldens.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_G = _goldens()
run, sha256 = _G.run, _G.sha256


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=CACHE / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf")
    ap.add_argument("--llama-bin", type=Path, default=Path(os.environ.get("LLAMA_BIN") or CACHE / "llama.cpp" / "bin"))
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "golden" / "gemma3_tokens.json")
    a = ap.parse_args()
    tool = a.llama_bin / "llama-tokenize"
    base = [str(tool), "-m", str(a.model), "-f", "FILE", "--no-escape", "--ids", "--log-disable"]

    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "text"
        cmd = [str(path) if x == "FILE" else x for x in base]
        for name, text in TEXTS:
            path.write_bytes(text.encode())
            ids = json.loads(run(cmd).stdout.decode().strip().splitlines()[-1])
            plain = json.loads(run(cmd + ["--no-parse-special"]).stdout.decode().strip().splitlines()[-1])
            cases.append({"name": name, "text": text, "ids": ids, "plain_ids": plain})
            print(f"{name}: {len(ids)} tokens", file=sys.stderr)

    version = run([str(tool), "--version"]).stderr.decode().strip().splitlines()
    version = " ".join(line for line in version if line.startswith(("version", "built")))
    out = {
        "about": "llama.cpp's ids for Gemma 3 270M's tokenizer; made by bench/make-gemma-token-goldens.py",
        "model": {"file": a.model.name, "size": a.model.stat().st_size, "sha256": sha256(a.model)},
        "llama_cpp": version,
        "command": " ".join(["llama-tokenize", "-m", a.model.name] + base[3:]) + " [--no-parse-special for plain_ids]",
        "cases": [],
    }
    # One case per line, so that a change in the goldens reads as a change of one text.
    head = json.dumps(out, ensure_ascii=False, indent=1).rsplit("[]", 1)[0]
    body = ",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in cases)
    a.out.write_text(head + "[\n" + body + "\n ]\n}\n")
    print(f"wrote {a.out} ({len(cases)} texts)", file=sys.stderr)


if __name__ == "__main__":
    main()
