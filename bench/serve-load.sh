#!/usr/bin/env bash
# Serving under load, bitnest against llama.cpp's server, same model, machine, threads and
# per-slot context, in one run: the batch-cost curve (`examples/batch_cost`: one pass of n decode
# tokens of n sequences, relative to one, which bounds what batching can give), then for N = 1, 2,
# 4, 8, 16 concurrent clients `bitnest serve --parallel N` and `llama-server -np N -c N×CTX`
# (continuous batching) with the Spec-Bench dev prompts (chat template, 128 new tokens, greedy and
# sampled) for DURATION seconds each (bench/serve-load.py). Writes a markdown report and the raw
# JSON lines to bench/results/.
#
#   bash bench/serve-load.sh                        # SmolLM2 (the default model)
#   bash bench/serve-load.sh qwen2.5-coder-1.5b     # another model: a known name or a GGUF path
#   CLIENTS=8 DURATION=60 MODES=greedy bash bench/serve-load.sh
#
# Settings (environment): T=2 threads, CLIENTS="1 2 4 8 16", DURATION=30 seconds per
# configuration, CTX=2048 tokens per slot, MAX_TOKENS=128, MODES="greedy,sampled",
# CURVE_DEPTH=384 (context of the batch-cost curve: about the load's mean, a dev prompt's ~300
# tokens and half an answer), SPEC=none (bitnest's --spec; llama-server runs without a draft model), LLAMA_EXTRA (extra
# llama-server flags; --no-repack is added when llama.cpp's repacked buffers fail on this CPU).
# llama-server is built by `ONLY=build bash bench/compare-llamacpp.sh` (once, into the cache).
set -euo pipefail
{
cd "$(dirname "$0")/.."
T=${T:-2}
CLIENTS=${CLIENTS:-1 2 4 8 16}
DURATION=${DURATION:-30}
CTX=${CTX:-2048}
MAX_TOKENS=${MAX_TOKENS:-128}
MODES=${MODES:-greedy,sampled}
SPEC=${SPEC:-none}
BITNEST_CACHE=${BITNEST_CACHE:-$HOME/.cache/bitnest}
export BITNEST_CACHE
LC=${BITNEST_LLAMACPP:-$BITNEST_CACHE/llama.cpp}
BIN=$LC/bin
STAMP=$(date +%Y%m%d-%H%M%S)
RESULTS=${RESULTS:-bench/results}
log() { echo "[serve-load] $*" >&2; }

ONLY=build bash bench/compare-llamacpp.sh
[ -x "$BIN/llama-server" ] || { log "no llama-server in $BIN"; exit 1; }
cargo build --release --quiet --bin bitnest --example batch_cost
cp target/release/bitnest "$LC/bitnest-serve-load"
B=$LC/bitnest-serve-load
SRC=${SRC:-${1:-smollm2-135m}}
if [ ! -f "$SRC" ]; then
  log "resolving $SRC (fetched into $BITNEST_CACHE on first use)"
  SRC=$($B inspect --model "$SRC" --f32 | sed -n 's/^model: //p')
fi
[ -f "$SRC" ] || { log "model not found: $SRC"; exit 1; }
LLAMA_EXTRA=${LLAMA_EXTRA:-}
if [ -z "$LLAMA_EXTRA" ] && ! "$BIN/llama-bench" -m "$SRC" -t "$T" -p 8 -n 0 -r 1 -o json 2>/dev/null | grep -q avg_ts; then
  LLAMA_EXTRA="--no-repack"
  log "llama.cpp's repacked buffers fail on this CPU (AMX advertised but unusable?): llama-server $LLAMA_EXTRA"
fi
# The transcode every bitnest command uses, made before the clock starts.
$B inspect --model "$SRC" >/dev/null

mkdir -p "$RESULTS"
REPORT=$RESULTS/serve-load-$STAMP.md
RAW=$RESULTS/serve-load-$STAMP.jsonl
CURVE=$(NS=1,2,4,8,16 DEPTH=${CURVE_DEPTH:-384} ./target/release/examples/batch_cost "$SRC" "$T" 2>/dev/null)
echo "$CURVE" >"$RESULTS/serve-load-$STAMP.curve"
log "batch-cost curve:"
echo "$CURVE" >&2
TABLE=$(python3 bench/serve-load.py --bitnest "$B" --llama-server "$BIN/llama-server" --model "$SRC" \
  --prompts "${PROMPTS:-../shared/data/specbench-dev.jsonl}" --clients "$(echo $CLIENTS | tr ' ' ,)" \
  --duration "$DURATION" --ctx "$CTX" --max-tokens "$MAX_TOKENS" --threads "$T" --modes "$MODES" \
  --llama-extra="$LLAMA_EXTRA" --bitnest-extra="--spec $SPEC" --out "$RAW" --curve "$RESULTS/serve-load-$STAMP.curve")
{
  echo "# Serving under load: $(basename "$SRC")"
  echo
  echo "\`bash bench/serve-load.sh $*\` at $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo +dirty), $(date -u +%Y-%m-%dT%H:%MZ);"
  echo "$T threads, $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)); per-slot context $CTX,"
  echo "$MAX_TOKENS new tokens, $DURATION s per configuration; bitnest \`--spec $SPEC\`; llama-server \`$LLAMA_EXTRA\`."
  echo
  echo "## Batch-cost curve (\`examples/batch_cost\`, depth ${CURVE_DEPTH:-384})"
  echo
  echo '```'
  echo "$CURVE"
  echo '```'
  echo
  echo "## Load"
  echo
  echo "$TABLE"
} >"$REPORT"
log "report: $REPORT"
cat "$REPORT"
exit 0
}
