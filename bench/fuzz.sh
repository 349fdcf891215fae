#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) for SECONDS each under libFuzzer, JOBS at a time,
# with a per-input timeout and a 2 GiB memory limit, and writes a summary (executions,
# coverage, corpus, crashes) to bench/results/fuzz-<date>.md.
#
#   bash bench/fuzz.sh [SECONDS] [TARGET...]        (default: 60 s, every target)
#   JOBS=2 bash bench/fuzz.sh 1800                   (the 30-minute runs of docs/RELIABILITY.md)
#
# Needs the nightly toolchain (libFuzzer's instrumentation) and cargo-fuzz; the normal build
# stays on stable. The corpus persists in fuzz/corpus/<target> (seeded by fuzz/make_seeds.py on
# first use), so runs split into parts add up; crashes are saved in fuzz/artifacts/<target>/.
# FUZZ_LOGS=target/fuzz-logs/<stamp> only writes the summary of that earlier run's logs.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH="${1:-60}"
shift || true
JOBS="${JOBS:-1}"
TIMEOUT="${FUZZ_TIMEOUT:-10}"
RSS_MB="${FUZZ_RSS_MB:-2048}"
ALL="gguf safetensors bnest tokenizer chat_template request"
TARGETS="${*:-$ALL}"

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "bench/fuzz.sh: the nightly toolchain is not installed (libFuzzer needs it): rustup toolchain install nightly" >&2
  exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "bench/fuzz.sh: cargo-fuzz is not installed: cargo install cargo-fuzz --locked" >&2
  exit 2
fi
stamp="$(date -u +%Y%m%d-%H%M%S)"
logs="${FUZZ_LOGS:-target/fuzz-logs/$stamp}"
mkdir -p "$logs" bench/results
if [ -z "${FUZZ_LOGS:-}" ]; then
cargo build --release --locked --bin bitnest
cargo +nightly fuzz build -O >/dev/null
if [ ! -d fuzz/corpus ]; then
  python3 fuzz/make_seeds.py target/release/bitnest
fi
run_one() {
  local t="$1"
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  # -rss_limit_mb and -malloc_limit_mb: an input that needs more than the limit is a finding.
  cargo +nightly fuzz run -O "$t" "fuzz/corpus/$t" -- \
    -max_total_time="$SECONDS_EACH" -timeout="$TIMEOUT" -rss_limit_mb="$RSS_MB" -malloc_limit_mb="$RSS_MB" \
    -max_len=1048576 -print_final_stats=1 -close_fd_mask=1 >"$logs/$t.log" 2>&1 || echo "exit $?" >>"$logs/$t.log"
}
running=0
for t in $TARGETS; do
  run_one "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait
fi

out="bench/results/fuzz-$stamp.md"
findings=0
{
  echo "# Fuzzing, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "\`JOBS=$JOBS bash bench/fuzz.sh $SECONDS_EACH $*\` at commit $(git rev-parse --short HEAD), $(nproc) cores; logs $logs;"
  echo "libFuzzer -timeout=$TIMEOUT s, -rss_limit_mb=$RSS_MB. Coverage is libFuzzer's \`cov\` (edges reached) and \`ft\` (features)."
  echo
  echo "| target | seconds | executions | exec/s | cov | ft | corpus | peak RSS MB | crashes, timeouts, OOMs |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for t in $TARGETS; do
    log="$logs/$t.log"
    last="$(grep -E '^#[0-9]+' "$log" | tail -1 || true)"
    cov="$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")"
    ft="$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")"
    corp="$(sed -nE 's/.* corp: ([0-9]+\/[0-9]+[a-zA-Z]*).*/\1/p' <<<"$last")"
    execs="$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+).*/\1/p' "$log")"
    eps="$(sed -nE 's/^stat::average_exec_per_sec: *([0-9]+).*/\1/p' "$log")"
    rss="$(sed -nE 's/^stat::peak_rss_mb: *([0-9]+).*/\1/p' "$log")"
    bad="$(grep -c 'Test unit written to' "$log" || true)"
    arts="$(sed -nE 's/.*Test unit written to (.*)$/\1/p' "$log" | sed "s|$PWD/||" | tr '\n' ' ' || true)"
    findings=$((findings + ${bad:-0}))
    echo "| $t | $SECONDS_EACH | ${execs:-?} | ${eps:-?} | ${cov:-?} | ${ft:-?} | ${corp:-?} | ${rss:-?} | ${bad:-0} ${arts} |"
  done
  echo
  echo "Findings: $findings."
} >"$out"
cat "$out"
echo "logs: $logs"
findings="$(sed -nE 's/^Findings: ([0-9]+)\./\1/p' "$out")"
if [ "$findings" != 0 ]; then
  echo "bench/fuzz.sh: $findings findings; the inputs are in fuzz/artifacts/ (copy each to tests/fuzz/<target>/ once fixed)" >&2
  exit 1
fi
