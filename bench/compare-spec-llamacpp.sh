#!/usr/bin/env bash
# Speculative decoding side by side: llama.cpp's `llama-completion` (plain) and
# `llama-speculative-simple` (a Q4_0 draft model for a Q8_0 target; draft-free `ngram-cache` and
# `ngram-simple`) against `bitnest bench spec` on the same prompts, rendered with the same chat
# template, greedy, same thread count, in one run. Writes a markdown table and the raw JSON to
# bench/results/spec-STAMP.{md,jsonl}.
#
# The prompts are dealt into ROUNDS parts (prompt i to part i mod ROUNDS), and each part runs
# every llama.cpp configuration and then bitnest before the next part starts: a slow or fast
# spell of a shared host then falls on both engines alike instead of on whichever ran during it.
# The tables pool the parts; the per-round ratios against llama.cpp Q4_0 show the spread.
#
#   bash bench/compare-spec-llamacpp.sh                     # 5 prompts per category (30), 128 tokens
#   PER_CAT=40 bash bench/compare-spec-llamacpp.sh           # all 240 dev prompts
#
# Settings (environment): T=2 N=128 PER_CAT=5 ROUNDS=4 PROMPTS=../shared/data/specbench-dev.jsonl
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
ROUNDS=${ROUNDS:-4}
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
# Hosts that advertise AMX without enabling it kill llama.cpp's repacked (AMX) buffers with
# SIGILL: probe once and run llama.cpp with `-nr` (no repacking) there.
LLAMA_EXTRA=${LLAMA_EXTRA:-}
if [ -z "$LLAMA_EXTRA" ] && [ -n "${Q4:-}" ] &&
  ! "$BIN/llama-completion" -m "$Q4" -p hi -n 1 -t "$T" -no-cnv --no-warmup >/dev/null 2>&1; then
  LLAMA_EXTRA="-nr"
  log "llama-completion fails with repacked buffers on this CPU (AMX advertised but unusable?): using -nr"
fi

llama_rows() { # round, rendered-prompt file, name, then the command's arguments before -f
  local round=$1 file=$2 name=$3; shift 3
  case "|$LLAMA_ROWS|" in *"|$name|"*) ;; *) log "$name: skipped (LLAMA_ROWS)"; return ;; esac
  local i=0
  while IFS= read -r line; do
    printf '%s' "$line" | python3 -c 'import json,sys; sys.stdout.write(json.loads(sys.stdin.read())["text"])' > "$WORK/p.txt"
    local cat; cat=$(printf '%s' "$line" | python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["category"])')
    # shellcheck disable=SC2086
    "$@" $LLAMA_EXTRA -f "$WORK/p.txt" -n "$N" --temp 0 -t "$T" -c 4096 > "$WORK/out.txt" 2>&1 || die "$name failed: $(tail -3 "$WORK/out.txt")"
    python3 - "$name" "$cat" "$WORK/out.txt" "$round" >> "$OUT" <<'PY'
import json, re, sys
name, cat, path, rnd = sys.argv[1:5]
t = open(path, errors="replace").read()
m = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", t)
if m:
    rate = int(m.group(1)) / float(m.group(2))
else:
    m = re.search(r"\beval time =\s+([\d.]+) ms /\s+(\d+) runs", t)
    rate = int(m.group(2)) / (float(m.group(1)) / 1000)
acc = re.search(r"accept\s+=\s+([\d.]+)%", t)
print(json.dumps({"engine": "llama.cpp", "config": name, "category": cat, "tok_s": rate, "round": int(rnd),
                  "accept": float(acc.group(1)) / 100 if acc else None}))
PY
    i=$((i + 1))
  done < "$file"
  log "round $round, $name: $i prompts"
}

# Part j of the rendered prompts, and the same prompts in Spec-Bench's format for bitnest.
python3 - "$WORK/prompts.jsonl" "$PROMPTS" "$ROUNDS" "$WORK" <<'PY'
import json, sys
rendered, source, rounds, work = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
picked = [json.loads(l) for l in open(rendered)]
lines = {json.dumps(json.loads(l)["question_id"]): l for l in open(source) if l.strip()}
for j in range(rounds):
    part = picked[j::rounds]
    with open(f"{work}/round-{j}.rendered.jsonl", "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in part)
    with open(f"{work}/round-{j}.jsonl", "w") as f:
        f.writelines(lines[json.dumps(p["question_id"])] for p in part)
PY

for ((j = 0; j < ROUNDS; j++)); do
  P=$WORK/round-$j.rendered.jsonl
  [ -s "$P" ] || continue
  log "round $((j + 1))/$ROUNDS: llama.cpp (threads $T, $N tokens per prompt)"
  llama_rows "$j" "$P" "Q4_0 plain" "$BIN/llama-completion" -m "$Q4" -no-cnv --no-display-prompt
  llama_rows "$j" "$P" "Q8_0 plain" "$BIN/llama-completion" -m "$Q8" -no-cnv --no-display-prompt
  llama_rows "$j" "$P" "Q8_0 + Q4_0 draft" "$BIN/llama-speculative-simple" -m "$Q8" -md "$Q4" --spec-type draft-simple
  llama_rows "$j" "$P" "Q4_0 ngram-cache" "$BIN/llama-speculative-simple" -m "$Q4" --spec-type ngram-cache
  llama_rows "$j" "$P" "Q4_0 ngram-simple" "$BIN/llama-speculative-simple" -m "$Q4" --spec-type ngram-simple
  for r in $BITS; do
    log "round $((j + 1))/$ROUNDS: bitnest r=$r --spec $SPEC"
    "$B" bench spec --model "$BNEST" --bits "$r" --threads "$T" --prompts "$WORK/round-$j.jsonl" \
      --max-tokens "$N" --spec "$(echo $SPEC | tr ' ' ',')" --draft-bits "$DRAFT_BITS" --tree-nodes "$TREE_NODES" \
      --format json | python3 -c '
import json, sys
r, j = sys.argv[1:3]
for line in sys.stdin:
    v = json.loads(line); v["engine"] = "bitnest"; v["bits"] = int(r); v["round"] = int(j); print(json.dumps(v))' "$r" "$j" >> "$OUT"
  done
done

python3 - "$OUT" "$T" "$N" "$PER_CAT" "$ROUNDS" > "$RESULTS/spec-$STAMP.md" <<'PY'
import json, sys, collections
path, T, N, per, rounds = sys.argv[1:6]
rows = [json.loads(l) for l in open(path)]
mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
llama = collections.defaultdict(list)
for r in rows:
    if r["engine"] == "llama.cpp":
        llama[r["config"]].append(r)
q4 = mean([r["tok_s"] for r in llama["Q4_0 plain"]])
q4_round = {j: mean([r["tok_s"] for r in llama["Q4_0 plain"] if r["round"] == j]) for j in {r["round"] for r in llama["Q4_0 plain"]}}

# bitnest: one entry per configuration, its rounds pooled by category (the counts add up exactly).
Conf = lambda r: (r["bits"], r["mode"], r["draft_bits"], r["tree_nodes"])
pooled = collections.OrderedDict()
for r in rows:
    if r["engine"] != "bitnest":
        continue
    p = pooled.setdefault(Conf(r), {"cats": collections.OrderedDict(), "rounds": {}, "mismatches": []})
    p["rounds"][r["round"]] = (r["tok_s"], r["plain_tok_s"])
    p["mismatches"] += r["mismatches"]
    for c, v in r["categories"].items():
        a = p["cats"].setdefault(c, collections.Counter(identical=1))
        n = v["prompts"]
        a["prompts"] += n
        a["rate"] += v["tok_s"] * n
        a["plain"] += v["plain_tok_s"] * n
        for k in ("steps", "tokens", "nodes", "self_drafted", "self_accepted"):
            a[k] += v[k]
        a["identical"] = min(a["identical"], int(v["identical"]))
def total(cats):
    t = collections.Counter(identical=1)
    for a in cats.values():
        for k, x in a.items():
            t[k] = min(t[k], x) if k == "identical" else t[k] + x
    return t
def figures(a):
    n = a["prompts"]
    return dict(rate=a["rate"] / n, plain=a["plain"] / n, speedup=a["rate"] / a["plain"],
                mat=a["tokens"] / max(a["steps"], 1), npp=a["nodes"] / max(a["steps"], 1),
                acc=a["self_accepted"] / a["self_drafted"] if a["self_drafted"] else None, identical=bool(a["identical"]))

print(f"Speculative decoding, greedy, {T} threads, {N} new tokens, {per} Spec-Bench dev prompts per category, "
      f"in {rounds} interleaved rounds (`bash bench/compare-spec-llamacpp.sh`)\n")
print("| engine | configuration | tok/s | vs own plain | vs llama.cpp Q4_0 plain (per-round range) | MAT | nodes/pass | acceptance | identical to plain |")
print("|---|---|---|---|---|---|---|---|---|")
for name, rs in llama.items():
    rate = mean([r["tok_s"] for r in rs])
    base_rows = llama["Q8_0 plain" if "Q8_0" in name else "Q4_0 plain"]
    base = mean([r["tok_s"] for r in base_rows]) if base_rows else float("nan")
    acc = [r["accept"] for r in rs if r["accept"] is not None]
    print(f"| llama.cpp | {name} | {rate:.1f} | {rate / base:.2f}x | {rate / q4:.2f}x | – | – | {f'{mean(acc):.0%}' if acc else '–'} | – |")
def spread(rounds, i):
    ratios = [v[i] / q4_round[j] for j, v in rounds.items() if j in q4_round]
    return f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else ""
shown = set()
for (bits, mode, db, tn), p in pooled.items():
    f = figures(total(p["cats"]))
    if bits not in shown:
        shown.add(bits)
        print(f"| bitnest | r={bits} plain | {f['plain']:.1f} | 1.00x | {f['plain'] / q4:.2f}x{spread(p['rounds'], 1)} | 1.00 | 1.0 | – | – |")
    acc = f"{f['acc']:.0%}" if f["acc"] is not None else "–"
    print(f"| bitnest | r={bits} --spec {mode} (draft {db} bits, tree {tn}) | {f['rate']:.1f} | {f['speedup']:.2f}x | "
          f"{f['rate'] / q4:.2f}x{spread(p['rounds'], 0)} | {f['mat']:.2f} | {f['npp']:.1f} | {acc} | {f['identical']} |")
for (bits, mode, db, tn), p in pooled.items():
    print(f"\n\nbitnest r={bits} --spec {mode} per category:\n")
    print("| category | prompts | MAT | tok/s | plain tok/s | speedup | identical |")
    print("|---|---|---|---|---|---|---|")
    for c, a in sorted(p["cats"].items()):
        f = figures(a)
        print(f"| {c} | {a['prompts']} | {f['mat']:.2f} | {f['rate']:.1f} | {f['plain']:.1f} | {f['speedup']:.2f}x | {f['identical']} |")
    if p["mismatches"]:
        print(f"\nOutputs that differed from plain decoding: {p['mismatches']}")
PY
log "wrote $RESULTS/spec-$STAMP.md and $OUT"
cat "$RESULTS/spec-$STAMP.md"
exit 0
}
