#!/usr/bin/env bash
# Long-context decode with each KV cache type, bitnest and llama.cpp side by side in one run:
# `bitnest bench -d $DEPTH -p 0 -n $N --cache-type T` and `llama-bench -d $DEPTH -p 0 -n $N -fa 1
# -ctk T -ctv T --repack 0` (llama.cpp needs flash attention for a quantized V, so its f16 row
# uses it too), in $ROUNDS interleaved rounds, every row once per round. Writes a markdown table
# (tok/s mean ± sd over rounds, ratios, bitnest's peak RSS and cache bytes) to bench/results/.
#
#   bash bench/kv-depth.sh                                   # SmolLM2 at depth 7680
#   DEPTH=16384 ROUNDS=1 bash bench/kv-depth.sh qwen2.5-coder-1.5b
#
# Settings (environment):
#   DEPTH=7680 N=32 ROUNDS=2 T=2
#   TYPES="f16 q8_0 q4_0"          types both engines run (keys and values alike)
#   OWN="q4h f16/q4h"              bitnest-only types (K/V for keys and values apart)
#   LLAMA_MODEL=<gguf>             llama.cpp's file (default: its Q4_0 re-quantization from
#                                  bench/compare-llamacpp.sh, else the model's own GGUF)
# Needs llama.cpp built by bench/compare-llamacpp.sh (ONLY=build) and a release build of bitnest.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-smollm2-135m}
DEPTH=${DEPTH:-7680}
N=${N:-32}
ROUNDS=${ROUNDS:-2}
T=${T:-2}
TYPES=${TYPES:-f16 q8_0 q4_0}
OWN=${OWN-q4h f16/q4h}
CACHE=${BITNEST_CACHE:-$HOME/.cache/bitnest}
LC=${BITNEST_LLAMACPP:-$CACHE/llama.cpp}
B=./target/release/bitnest
[ -x "$B" ] || cargo build --release
[ -x "$LC/bin/llama-bench" ] || { echo "llama-bench missing: run ONLY=build bash bench/compare-llamacpp.sh" >&2; exit 1; }

case "$MODEL" in
  smollm2-135m) GGUF=$CACHE/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf ;;
  qwen2.5-coder-1.5b) GGUF=$CACHE/qwen2.5-coder-1.5b/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf ;;
  *) GGUF=$MODEL ;;
esac
Q40=$LC/models/$(basename "${GGUF%.gguf}").Q4_0.gguf
LLAMA_MODEL=${LLAMA_MODEL:-$( [ -f "$Q40" ] && echo "$Q40" || echo "$GGUF")}
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=bench/results/kv-depth-$STAMP.md
RAW=$(mktemp -d)
trap 'rm -rf "$RAW"' EXIT

for r in $(seq 1 "$ROUNDS"); do
  for t in $TYPES $OWN; do
    k=${t%/*}; v=${t#*/}
    echo "[kv-depth] round $r: bitnest $t" >&2
    $B bench -m "$MODEL" -t "$T" -d "$DEPTH" -p 0 -n "$N" -r 1 --cache-type-k "$k" --cache-type-v "$v" \
      --format json > "$RAW/b-${t//\//_}-$r.json"
  done
  for t in $TYPES; do
    echo "[kv-depth] round $r: llama.cpp $t" >&2
    "$LC/bin/llama-bench" -m "$LLAMA_MODEL" -t "$T" -d "$DEPTH" -p 0 -n "$N" -r 1 -fa 1 -ctk "$t" -ctv "$t" \
      --repack 0 -o json > "$RAW/l-$t-$r.json" 2>/dev/null
  done
done

python3 - "$RAW" "$OUT" "$MODEL" "$LLAMA_MODEL" "$DEPTH" "$N" "$ROUNDS" "$T" "$TYPES" "$OWN" <<'EOF'
import json, statistics, sys, glob, os
raw, out, model, lmodel, depth, n, rounds, threads, types, own = sys.argv[1:]
types, own = types.split(), own.split()
def stats(xs):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)
def bit(t):
    rows = [json.load(open(f)) for f in sorted(glob.glob(f"{raw}/b-{t.replace('/', '_')}-*.json"))]
    tg = [next(v for k, v in r.items() if k.startswith("tg") and k.endswith("_tok_s")) for r in rows]
    return stats(tg), max(r["peak_rss_mb"] for r in rows), rows[0].get("kv_mb")
def lla(t):
    xs = []
    for f in sorted(glob.glob(f"{raw}/l-{t}-*.json")):
        xs += [r["avg_ts"] for r in json.load(open(f)) if r.get("n_gen", 0) > 0]
    return stats(xs)
b = {t: bit(t) for t in types + own}
l = {t: lla(t) for t in types}
f16 = b["f16"][0][0] if "f16" in b else None
lines = [f"# KV cache types at depth {depth}: {model}", "",
         f"`bash bench/kv-depth.sh {model}` with DEPTH={depth} N={n} ROUNDS={rounds} T={threads}; "
         f"llama.cpp: `llama-bench -m {os.path.basename(lmodel)} -d {depth} -p 0 -n {n} -fa 1 -ctk T -ctv T --repack 0`.", "",
         f"| cache | bitnest tg{n} tok/s | × own f16 | llama.cpp tok/s | bitnest ÷ llama.cpp | bitnest peak RSS MiB | KV cache MiB |",
         "|---|---|---|---|---|---|---|"]
for t in types + own:
    (m, sd), rss, kv = b[t]
    own_ratio = f"{m / f16:.2f}×" if f16 else "-"
    if t in l:
        lm, lsd = l[t]
        lcol, ratio = f"{lm:.1f} ± {lsd:.1f}", f"{m / lm:.2f}×"
    else:
        lcol, ratio = "-", "-"
    kvs = f"{kv:.1f}" if isinstance(kv, (int, float)) else "-"
    lines.append(f"| {t} | {m:.1f} ± {sd:.1f} | {own_ratio} | {lcol} | {ratio} | {rss:.1f} | {kvs} |")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"\nwritten to {out}", file=sys.stderr)
EOF
