#!/usr/bin/env bash
# Speculative decoding side by side: llama.cpp's `llama-completion` (plain) and
# `llama-speculative-simple` (a Q4_0 draft model for a Q8_0 target; draft-free `ngram-cache` and
# `ngram-simple`) against `bitnest bench spec` on the same prompts, rendered with the same chat
# template, greedy, same thread count, in one run. Writes a markdown table and the raw JSON to
# bench/results/spec-STAMP.{md,jsonl}.
#
#   bash bench/compare-spec-llamacpp.sh                     # 5 prompts per category (30), 128 tokens
#   PER_CAT=40 bash bench/compare-spec-llamacpp.sh           # all 240 dev prompts
#
# Settings (environment): T=2 N=128 PER_CAT=5 PROMPTS=../shared/data/specbench-dev.jsonl
#   BITS="8 4"            target precisions of the bitnest .bnest file
#   SPEC="self recycle both auto"  bitnest modes;  DRAFT_BITS=3  TREE_NODES=6
#   BNEST=<file>          bitnest model (default: the one compare-llamacpp.sh made)
# llama.cpp must already be built and its models quantized: `ONLY=build bash bench/compare-llamacpp.sh`
# then `ONLY=llamacpp bash bench/compare-llamacpp.sh` (both cached outside the repository).
set -euo pipefail
{
cd "$(dirname "$0")/.."
REPO=$PWD
T=${T:-2}
N=${N:-128}
PER_CAT=${PER_CAT:-5}
PROMPTS=${PROMPTS:-$REPO/../shared/data/specbench-dev.jsonl}
BITS=${BITS:-8 4}
SPEC=${SPEC:-self recycle both auto}
DRAFT_BITS=${DRAFT_BITS:-3}
TREE_NODES=${TREE_NODES:-6}
# Which llama.cpp configurations to run (names as in the table); a full 240-prompt run may keep
# just the Q4_0 baseline: LLAMA_ROWS="Q4_0 plain".
LLAMA_ROWS=${LLAMA_ROWS:-Q4_0 plain|Q8_0 plain|Q8_0 + Q4_0 draft|Q4_0 ngram-cache|Q4_0 ngram-simple}
BITNEST_CACHE=${BITNEST_CACHE:-$HOME/.cache/bitnest}
export BITNEST_CACHE
LC=${BITNEST_LLAMACPP:-$BITNEST_CACHE/llama.cpp}
BIN=$LC/bin
MODELS=$LC/models
BNEST=${BNEST:-$(ls "$MODELS"/*.default-v2.bnest "$MODELS"/*.bnest 2>/dev/null | head -1)}
STAMP=$(date +%Y%m%d-%H%M%S)
RESULTS=${RESULTS:-$REPO/bench/results}
log() { echo "[spec-compare] $*" >&2; }
die() { echo "[spec-compare] error: $*" >&2; exit 1; }

[ -x "$BIN/llama-speculative-simple" ] && [ -x "$BIN/llama-completion" ] \
  || die "llama.cpp is not built in $BIN; run: ONLY=build bash bench/compare-llamacpp.sh"
Q4=$(ls "$MODELS"/*.Q4_0.gguf 2>/dev/null | head -1); Q8=$(ls "$MODELS"/*.Q8_0.gguf 2>/dev/null | head -1)
[ -f "$Q4" ] && [ -f "$Q8" ] || die "no Q4_0/Q8_0 models in $MODELS; run: ONLY=llamacpp bash bench/compare-llamacpp.sh"
[ -f "$BNEST" ] || die "no .bnest model; set BNEST=<file> (bitnest quantize smollm2-135m -o FILE)"

cargo build --release --quiet
B=$REPO/target/release/bitnest
mkdir -p "$RESULTS"
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
OUT=$RESULTS/spec-$STAMP.jsonl
: > "$OUT"

log "rendering prompts ($PER_CAT per category) with the model's chat template"
"$B" bench spec --model "$BNEST" --prompts "$PROMPTS" --per-category "$PER_CAT" --dump-prompts "$WORK/prompts.jsonl"

# One llama.cpp configuration over every prompt: per-prompt decode tok/s and acceptance.
llama_rows() { # name, then the command's arguments before -p
  local name=$1; shift
  case "|$LLAMA_ROWS|" in *"|$name|"*) ;; *) log "$name: skipped (LLAMA_ROWS)"; return ;; esac
  local i=0
  while IFS= read -r line; do
    printf '%s' "$line" | python3 -c 'import json,sys; sys.stdout.write(json.loads(sys.stdin.read())["text"])' > "$WORK/p.txt"
    local cat; cat=$(printf '%s' "$line" | python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["category"])')
    "$@" -f "$WORK/p.txt" -n "$N" --temp 0 -t "$T" -c 4096 > "$WORK/out.txt" 2>&1 || die "$name failed: $(tail -3 "$WORK/out.txt")"
    python3 - "$name" "$cat" "$WORK/out.txt" >> "$OUT" <<'PY'
import json, re, sys
name, cat, path = sys.argv[1:4]
t = open(path, errors="replace").read()
m = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", t)
if m:
    rate = int(m.group(1)) / float(m.group(2))
else:
    m = re.search(r"\beval time =\s+([\d.]+) ms /\s+(\d+) runs", t)
    rate = int(m.group(2)) / (float(m.group(1)) / 1000)
acc = re.search(r"accept\s+=\s+([\d.]+)%", t)
print(json.dumps({"engine": "llama.cpp", "config": name, "category": cat, "tok_s": rate,
                  "accept": float(acc.group(1)) / 100 if acc else None}))
PY
    i=$((i + 1))
  done < "$WORK/prompts.jsonl"
  log "$name: $i prompts"
}

log "llama.cpp (threads $T, $N tokens per prompt)"
llama_rows "Q4_0 plain" "$BIN/llama-completion" -m "$Q4" -no-cnv --no-display-prompt
llama_rows "Q8_0 plain" "$BIN/llama-completion" -m "$Q8" -no-cnv --no-display-prompt
llama_rows "Q8_0 + Q4_0 draft" "$BIN/llama-speculative-simple" -m "$Q8" -md "$Q4" --spec-type draft-simple
llama_rows "Q4_0 ngram-cache" "$BIN/llama-speculative-simple" -m "$Q4" --spec-type ngram-cache
llama_rows "Q4_0 ngram-simple" "$BIN/llama-speculative-simple" -m "$Q4" --spec-type ngram-simple

for r in $BITS; do
  log "bitnest r=$r: --spec $SPEC"
  "$B" bench spec --model "$BNEST" --bits "$r" --threads "$T" --prompts "$PROMPTS" --per-category "$PER_CAT" \
    --max-tokens "$N" --spec "$(echo $SPEC | tr ' ' ',')" --draft-bits "$DRAFT_BITS" --tree-nodes "$TREE_NODES" \
    --format json | python3 -c '
import json, sys
r = sys.argv[1]
for line in sys.stdin:
    v = json.loads(line); v["engine"] = "bitnest"; v["bits"] = int(r); print(json.dumps(v))' "$r" >> "$OUT"
done

python3 - "$OUT" "$T" "$N" "$PER_CAT" > "$RESULTS/spec-$STAMP.md" <<'PY'
import json, sys, collections
path, T, N, per = sys.argv[1:5]
rows = [json.loads(l) for l in open(path)]
llama = collections.defaultdict(list)
for r in rows:
    if r["engine"] == "llama.cpp":
        llama[r["config"]].append(r)
mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
q4 = mean([r["tok_s"] for r in llama["Q4_0 plain"]])
print(f"Speculative decoding, greedy, {T} threads, {N} new tokens, {per} Spec-Bench dev prompts per category (`bash bench/compare-spec-llamacpp.sh`)\n")
print("| engine | configuration | tok/s | vs own plain | vs llama.cpp Q4_0 plain | MAT | acceptance | identical to plain |")
print("|---|---|---|---|---|---|---|---|")
for name, rs in llama.items():
    rate = mean([r["tok_s"] for r in rs])
    base = mean([r["tok_s"] for r in llama["Q8_0 plain" if "Q8_0" in name else "Q4_0 plain"]]) if llama["Q8_0 plain" if "Q8_0" in name else "Q4_0 plain"] else float("nan")
    acc = [r["accept"] for r in rs if r["accept"] is not None]
    print(f"| llama.cpp | {name} | {rate:.1f} | {rate / base:.2f}x | {rate / q4:.2f}x | – | {f'{mean(acc):.0%}' if acc else '–'} | – |")
shown = set()
for r in rows:
    if r["engine"] != "bitnest":
        continue
    cfg = f"r={r['bits']} --spec {r['mode']} (draft {r['draft_bits']} bits, tree {r['tree_nodes']})"
    if r["bits"] not in shown:
        shown.add(r["bits"])
        print(f"| bitnest | r={r['bits']} plain | {r['plain_tok_s']:.1f} | 1.00x | {r['plain_tok_s'] / q4:.2f}x | 1.00 | – | – |")
    print(f"| bitnest | {cfg} | {r['tok_s']:.1f} | {r['speedup']:.2f}x | {r['tok_s'] / q4:.2f}x | {r['mat']:.2f} | "
          f"{r['self_acceptance']:.0%} | {r['identical']} |")
print()
for r in rows:
    if r["engine"] != "bitnest":
        continue
    print(f"\nbitnest r={r['bits']} --spec {r['mode']} per category:\n")
    print("| category | prompts | MAT | tok/s | plain tok/s | speedup | identical |")
    print("|---|---|---|---|---|---|---|")
    for c, v in r["categories"].items():
        print(f"| {c} | {v['prompts']} | {v['mat']:.2f} | {v['tok_s']:.1f} | {v['plain_tok_s']:.1f} | {v['speedup']:.2f}x | {v['identical']} |")
PY
log "wrote $RESULTS/spec-$STAMP.md and $OUT"
cat "$RESULTS/spec-$STAMP.md"
exit 0
}
