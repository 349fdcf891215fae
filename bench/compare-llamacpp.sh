#!/usr/bin/env bash
# Side-by-side speed of bitnest and llama.cpp on the same model, machine, thread count and run:
# `llama-bench -p 512 -n 128 -r $R` for llama.cpp types and `bitnest bench` for each r-bit view
# of one .bnest file, in $ROUNDS interleaved rounds (every engine once per round), so that a
# slow minute of a shared host falls on all of them rather than on whichever ran then. Writes a
# markdown table (means and standard deviations over rounds) and the raw JSON to bench/results/.
#
#   bash bench/compare-llamacpp.sh                   # everything (builds llama.cpp once, ~5-30 min on 2 cores)
#   bash bench/compare-llamacpp.sh qwen2.5-coder-1.5b   # another model: a known name or a GGUF path
#   T=4 ROUNDS=5 BITS="8 4 2" bash bench/compare-llamacpp.sh
#   ONLY=build bash bench/compare-llamacpp.sh         # only build llama.cpp into the cache
#   ONLY=llamacpp bash bench/compare-llamacpp.sh      # only the llama.cpp rows
#   ONLY=bitnest bash bench/compare-llamacpp.sh       # only the bitnest rows
#
# Settings (environment):
#   T=2 ROUNDS=5 R=1 P=512 N=128        threads, rounds, repetitions per round, prompt and generated tokens
#   BITS="8 6 5 4 3 2"                  bitnest views of the .bnest file (BITS="" none: no quantize)
#   DEPTH=4096 DEPTH_N=32 DEPTH_BITS="4 2"  decode tg$DEPTH_N with $DEPTH tokens in the cache
#                                       (llama-bench -d), Q4_0 and these views; DEPTH=0 skips it
#   BITNEST_F32=1                       also a bitnest row for SRC through the f32 path (--f32; 0 leaves it out)
#   LLAMA_TYPES="Q4_0 IQ4_NL Q8_0"      llama.cpp types, re-quantized from SRC; "SRC" is the file as shipped
#   SRC=<gguf or name>                  source GGUF (default: the first argument, else bitnest's cached SmolLM2 Q4_1)
#   REF=Q4_0                            the llama.cpp row ratios are taken against (SRC: the file as shipped)
#   TBITS="4 3"                         views of SRC's lossless transcode read at fewer planes (rows
#                                       "bitnest transcode r=…"); the transcode at its own precision always runs
#   BNEST=<file>                        bitnest model (default: made from SRC with default settings)
#   BITNEST_CACHE=~/.cache/bitnest      where bitnest keeps downloaded models
#   BITNEST_LLAMACPP=$BITNEST_CACHE/llama.cpp   llama.cpp source, build and quantized models
#   LLAMACPP_VERSION=0.3.36             version of the llama-cpp-python sdist that vendors llama.cpp
#   JOBS=2                              parallel compile jobs
#
# Nothing from llama.cpp is written inside the repository; it needs network only for PyPI (the
# llama-cpp-python source package, and cmake if it is missing) and for the model on first use.
set -euo pipefail
{ # Parsed whole before it runs, so editing this file during a (long) run cannot derail it.
cd "$(dirname "$0")/.."
REPO=$PWD

T=${T:-2}
ROUNDS=${ROUNDS:-5}
R=${R:-1}
DEPTH=${DEPTH:-4096}
DEPTH_N=${DEPTH_N:-32}
DEPTH_BITS=${DEPTH_BITS:-4 2}
P=${P:-512}
N=${N:-128}
BITS=${BITS-8 6 5 4 3 2}
LLAMA_TYPES=${LLAMA_TYPES:-Q4_0 IQ4_NL Q8_0}
JOBS=${JOBS:-2}
ONLY=${ONLY:-}
BITNEST_CACHE=${BITNEST_CACHE:-$HOME/.cache/bitnest}
export BITNEST_CACHE
LC=${BITNEST_LLAMACPP:-$HOME/.cache/bitnest/llama.cpp}
LLAMACPP_VERSION=${LLAMACPP_VERSION:-0.3.36}
BIN=$LC/bin
STAMP=$(date +%Y%m%d-%H%M%S)
RESULTS=${RESULTS:-$REPO/bench/results}

log() { echo "[compare] $*" >&2; }
die() { echo "[compare] error: $*" >&2; exit 1; }

# ---------------------------------------------------------------- llama.cpp build (cached)
find_cmake() {
  if command -v cmake >/dev/null 2>&1; then CMAKE=$(command -v cmake); return; fi
  if [ -x "$LC/cmake-venv/bin/cmake" ]; then CMAKE=$LC/cmake-venv/bin/cmake; return; fi
  log "cmake not found: installing it from PyPI into $LC/cmake-venv (python3 -m pip install cmake)"
  mkdir -p "$LC"
  python3 -m venv "$LC/cmake-venv" || die "python3 -m venv failed; install cmake (apt-get install cmake) and retry"
  "$LC/cmake-venv/bin/python" -m pip install --quiet cmake || die "pip install cmake failed"
  CMAKE=$LC/cmake-venv/bin/cmake
}

build_llamacpp() {
  if [ -x "$BIN/llama-bench" ] && [ -x "$BIN/llama-quantize" ] && [ -x "$BIN/llama-tokenize" ] &&
    [ -x "$BIN/llama-server" ]; then
    log "llama.cpp already built in $BIN"
    return
  fi
  command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || die "no C compiler (install gcc/g++)"
  find_cmake
  mkdir -p "$LC/dl"
  local sdist=$LC/dl/llama_cpp_python-$LLAMACPP_VERSION.tar.gz
  if [ ! -f "$sdist" ]; then
    log "downloading the llama-cpp-python $LLAMACPP_VERSION source package from PyPI (it vendors llama.cpp)"
    # Only this package from source: its build backend then comes as a wheel, so pip can read the
    # sdist's metadata in seconds instead of compiling the backend (and cmake) from source first.
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python --dest "$LC/dl" \
      "llama-cpp-python==$LLAMACPP_VERSION" || die "pip download llama-cpp-python failed"
    [ -f "$sdist" ] || die "pip did not produce $sdist"
  fi
  # Unpacked once per version, so an interrupted build resumes where it stopped.
  if [ "$(cat "$LC/src/.version" 2>/dev/null)" != "$LLAMACPP_VERSION" ]; then
    rm -rf "$LC/src" "$LC/build"
    mkdir -p "$LC/src"
    tar -xzf "$sdist" -C "$LC/src" --strip-components=1
    echo "$LLAMACPP_VERSION" >"$LC/src/.version"
  fi
  local src=$LC/src/vendor/llama.cpp
  [ -f "$src/CMakeLists.txt" ] || die "no vendor/llama.cpp in $sdist"
  log "configuring llama.cpp ($src) with $CMAKE"
  "$CMAKE" -S "$src" -B "$LC/build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON >"$LC/configure.log" 2>&1 ||
    { tail -30 "$LC/configure.log" >&2; die "cmake configure failed (log: $LC/configure.log)"; }
  # Build the tools this project compares against, where this llama.cpp version has them.
  local targets=() t
  local all_targets
  all_targets=$("$CMAKE" --build "$LC/build" --target help 2>/dev/null || true)
  for t in llama-bench llama-quantize llama-perplexity llama-cli llama-completion llama-speculative-simple llama-tokenize llama-server llama-batched-bench; do
    if grep -qE "(^|[ .])$t(:|$| )" <<<"$all_targets"; then targets+=("$t"); fi
  done
  [ ${#targets[@]} -gt 0 ] || targets=(llama-bench llama-quantize)
  log "building ${targets[*]} with -j$JOBS (this takes a while; log: $LC/build.log)"
  local start=$SECONDS
  "$CMAKE" --build "$LC/build" --config Release -j"$JOBS" --target "${targets[@]}" >"$LC/build.log" 2>&1 ||
    { tail -30 "$LC/build.log" >&2; die "llama.cpp build failed (log: $LC/build.log)"; }
  mkdir -p "$BIN"
  for t in "${targets[@]}"; do
    [ -x "$LC/build/bin/$t" ] && ln -sf "$LC/build/bin/$t" "$BIN/$t"
  done
  log "built llama.cpp in $((SECONDS - start)) s: $BIN"
}

[ "$ONLY" = bitnest ] || build_llamacpp
[ "$ONLY" = build ] && exit 0

# ---------------------------------------------------------------- models
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo +dirty)
cargo build --release --quiet --bin bitnest
mkdir -p "$LC/models"
# A copy, so a rebuild while this runs cannot change the binary midway.
cp target/release/bitnest "$LC/bitnest-compare"
B=$LC/bitnest-compare

SRC=${SRC:-${1:-smollm2-135m}}
if [ ! -f "$SRC" ]; then
  # A known model name: fetched (once) into $BITNEST_CACHE; `inspect` names the file.
  log "resolving $SRC (fetched into $BITNEST_CACHE on first use)"
  SRC=$($B inspect --model "$SRC" --f32 | sed -n 's/^model: //p')
fi
[ -f "$SRC" ] || die "source GGUF not found: $SRC"
NAME=$(basename "$SRC" .gguf)

llama_model() { # type -> path of the re-quantized GGUF (made once); SRC: the file as shipped
  local ty=$1 out=$LC/models/$NAME.$1.gguf
  if [ "$ty" = SRC ]; then echo "$SRC"; return; fi
  if [ ! -f "$out" ]; then
    log "llama-quantize --allow-requantize $NAME -> $ty"
    "$BIN/llama-quantize" --allow-requantize "$SRC" "$out.tmp" "$ty" >"$LC/models/quantize-$ty.log" 2>&1 ||
      { tail -20 "$LC/models/quantize-$ty.log" >&2; die "llama-quantize to $ty failed"; }
    mv "$out.tmp" "$out"
  fi
  echo "$out"
}

# Named after the default settings, so a change of defaults makes a new file rather than
# silently benchmarking an old one (v2: two-level scales).
DEFAULT_BNEST=$LC/models/$NAME.default-v2.bnest
BNEST=${BNEST:-$DEFAULT_BNEST}
if [ "$ONLY" != llamacpp ] && [ -f "$BNEST" ] && [ "$BNEST" = "$DEFAULT_BNEST" ] &&
  ! $B inspect --model "$BNEST" >/dev/null 2>&1; then
  log "the cached $BNEST does not open with this bitnest (format changed?): making it again"
  rm -f "$BNEST"
fi
if [ "$ONLY" != llamacpp ] && [ -n "$BITS$DEPTH_BITS" ] && [ "$DEPTH" -gt 0 -o -n "$BITS" ] && [ ! -f "$BNEST" ]; then
  log "bitnest quantize $SRC -> $BNEST (default settings)"
  $B quantize "$SRC" -o "$BNEST" >&2
fi

# ---------------------------------------------------------------- runs
mkdir -p "$RESULTS"
RAW=$RESULTS/compare-$STAMP.jsonl
: >"$RAW"
log "threads $T, $ROUNDS rounds of $R repetitions, pp$P / tg$N; raw results: $RAW"

# Peak RSS of a child process (llama-bench has none of its own): getrusage(RUSAGE_CHILDREN).
with_rss() {
  python3 - "$@" <<'PY'
import resource, subprocess, sys, json
p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE)
kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
sys.stdout.write(json.dumps({"rc": p.returncode, "peak_rss_mib": kib / 1024, "out": p.stdout.decode()}))
PY
}

# CPU time the hypervisor gave to others while we ran (the `steal` column of /proc/stat), in
# clock ticks summed over CPUs; reported so that a noisy run says so.
cpu_ticks() { awk '/^cpu /{print $2+$3+$4+$5+$6+$7+$8+$9, $9}' /proc/stat 2>/dev/null || echo "0 0"; }

# Some hosts advertise AMX but the hypervisor does not enable it: llama.cpp's repacked (AMX)
# buffers then die on SIGILL and llama-bench prints nothing. Probe once; fall back to
# `--repack 0` (llama.cpp's plain AVX-512 kernels) and say so in the report.
LLAMA_EXTRA=${LLAMA_EXTRA:-}
if [ "$ONLY" != bitnest ] && [ -z "$LLAMA_EXTRA" ]; then
  if ! "$BIN/llama-bench" -m "$SRC" -t "$T" -p 8 -n 0 -r 1 -o json 2>/dev/null | grep -q avg_ts; then
    LLAMA_EXTRA="--repack 0"
    log "llama-bench fails with its repacked buffers on this CPU (AMX advertised but unusable?): using $LLAMA_EXTRA"
  fi
fi

llama_row() { # round, type[, depth]
  local round=$1 ty=$2 depth=${3:-0} m name=$2 p=$P n=$N
  m=$(llama_model "$ty")
  if [ "$depth" -gt 0 ]; then name="$ty @ d$depth" p=0 n=$DEPTH_N; fi
  log "round $round: llama-bench $name"
  # shellcheck disable=SC2086
  with_rss "$BIN/llama-bench" -m "$m" -t "$T" -p "$p" -n "$n" -d "$depth" -r "$R" $LLAMA_EXTRA -o json | python3 -c '
import json, os, sys
w = json.load(sys.stdin)
if w["rc"] != 0:
    sys.exit("llama-bench failed")
rows = json.loads(w["out"])
d = {"engine": "llama.cpp", "name": sys.argv[1], "file": sys.argv[2], "peak_rss_mb": w["peak_rss_mib"],
     "round": int(sys.argv[3])}
for r in rows:
    key = "pp" if r["n_prompt"] > 0 else "tg"
    d[key + "_tok_s"], d[key + "_std"] = r["avg_ts"], r["stddev_ts"]
    d["n_prompt" if key == "pp" else "n_gen"] = r["n_prompt"] or r["n_gen"]
    d["bits_per_weight"] = r["model_size"] * 8 / r["model_n_params"]
    d["file_mb"] = os.path.getsize(sys.argv[2]) / 2**20
    d["threads"] = r["n_threads"]
    d["build"] = r.get("build_commit")
print(json.dumps(d))' "$name" "$m" "$round" >>"$RAW" || die "llama-bench $name failed"
}

bitnest_row() { # round, row name, bench args... (-p and -n, unless given)
  local round=$1 name=$2; shift 2
  log "round $round: bitnest bench $*"
  case " $* " in *" -n "*) ;; *) set -- "$@" -p "$P" -n "$N" ;; esac
  $B bench "$@" --threads "$T" -r "$R" --format json | python3 -c '
import json, sys
d = json.load(sys.stdin)
d.update(engine="bitnest", name=sys.argv[1], pp_tok_s=d["pp512_tok_s"], pp_std=d["pp512_std"],
         tg_tok_s=d["tg128_tok_s"], tg_std=d["tg128_std"], round=int(sys.argv[2]))
print(json.dumps(d))' "$name" "$round" >>"$RAW" || die "bitnest bench $* failed"
}

TICKS0=$(cpu_ticks)
for round in $(seq 1 "$ROUNDS"); do
  if [ "$ONLY" != bitnest ]; then
    for ty in $LLAMA_TYPES; do llama_row "$round" "$ty"; done
  fi
  if [ "$ONLY" != llamacpp ]; then
    for r in $BITS; do
      bitnest_row "$round" "bitnest r=$r" --model "$BNEST" --bits "$r"
    done
    # The source GGUF as bitnest runs it by default: its lossless transcode into bit planes, at
    # the source's own precision, then lower views of the same file.
    bitnest_row "$round" "bitnest transcode (source precision)" --model "$SRC"
    for r in ${TBITS:-}; do
      bitnest_row "$round" "bitnest transcode r=$r" --model "$SRC" --bits "$r"
    done
    # The f32 reference path (dequantized at load).
    [ "${BITNEST_F32:-1}" = 0 ] || bitnest_row "$round" "bitnest f32 (GGUF)" --model "$SRC" --f32
  fi
  # Long context: decoding with $DEPTH tokens already in the cache (llama-bench -d).
  if [ "$DEPTH" -gt 0 ]; then
    [ "$ONLY" = bitnest ] || llama_row "$round" "${REF:-Q4_0}" "$DEPTH"
    if [ "$ONLY" != llamacpp ]; then
      bitnest_row "$round" "bitnest transcode @ d$DEPTH" --model "$SRC" -d "$DEPTH" -p 0 -n "$DEPTH_N"
      for r in $DEPTH_BITS; do
        bitnest_row "$round" "bitnest r=$r @ d$DEPTH" --model "$BNEST" --bits "$r" -d "$DEPTH" -p 0 -n "$DEPTH_N"
      done
    fi
  fi
done
TICKS1=$(cpu_ticks)
STEAL=$(python3 -c 'import sys; a, b = sys.argv[1].split(), sys.argv[2].split()
t, s = int(b[0]) - int(a[0]), int(b[1]) - int(a[1])
print(f"{100 * s / t:.1f}" if t > 0 else "–")' "$TICKS0" "$TICKS1")

# ---------------------------------------------------------------- report
MD=$RESULTS/compare-$STAMP.md
CPU=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | xargs || uname -m)
python3 - "$RAW" "$MD" "$T" "$R" "$P" "$N" "$SRC" "$CPU ($(nproc) cores visible)" "$COMMIT" "$ROUNDS" "$STEAL" "$DEPTH_N" "${REF:-Q4_0}" "$LLAMA_EXTRA" <<'PY'
import json, statistics, sys
raw, md, t, r, p, n, src, cpu, commit, rounds, steal, depth_n = sys.argv[1:13]
extra = sys.argv[14] if len(sys.argv) > 14 else ""
runs = [json.loads(l) for l in open(raw) if l.strip()]
# One row per engine/type: the mean over rounds of each round's tok/s, the standard deviation
# over rounds (over repetitions when there was one round), the largest peak RSS.
rows, by_name = [], {}
for d in runs:
    if d["name"] not in by_name:
        by_name[d["name"]] = []
        rows.append(dict(d))
    by_name[d["name"]].append(d)
for d in rows:
    same = by_name[d["name"]]
    for k in ("pp", "tg"):
        vals = [x[k + "_tok_s"] for x in same if x.get(k + "_tok_s") is not None]
        if vals:
            d[k + "_tok_s"] = statistics.fmean(vals)
            if len(vals) > 1:
                d[k + "_std"] = statistics.stdev(vals)
    rss = [x["peak_rss_mb"] for x in same if x.get("peak_rss_mb") is not None]
    d["peak_rss_mb"] = max(rss) if rss else None
REF = sys.argv[13] if len(sys.argv) > 13 else "Q4_0"
def ref_name(d):
    # Rows at a depth compare with the reference type at the same depth.
    return REF + (d["name"][d["name"].index(" @ "):] if " @ " in d["name"] else "")
refs = {d["name"]: d for d in rows if d["engine"] == "llama.cpp"}
def f(x, nd=1):
    return "–" if x is None else f"{x:.{nd}f}"
def ratio(d, k):
    ref = refs.get(ref_name(d))
    if ref is None or d.get(k) is None or not ref.get(k):
        return "–"
    return f"{d[k] / ref[k]:.2f}×"
def spread(d, k):
    # Each round's ratio against the Q4_0 run of the same round: the paired comparison.
    ref_round = {x["round"]: x for x in by_name.get(ref_name(d), []) if "round" in x}
    rs = [x[k] / ref_round[x["round"]][k] for x in by_name[d["name"]]
          if x.get("round") in ref_round and x.get(k) and ref_round[x["round"]].get(k)]
    return f"{min(rs):.2f}–{max(rs):.2f}" if len(rs) > 1 else "–"
out = []
out.append(f"# bitnest vs llama.cpp: pp{p} / tg{n}, {t} threads, {rounds} rounds of {r} repetitions\n")
builds = sorted({d["build"] for d in rows if d.get("build")})
out.append(f"Source model: `{src.split('/')[-1]}`. Machine: {cpu}. bitnest {commit}"
           + (f", llama.cpp {', '.join(builds)}" if builds else "") + ". "
           f"Produced by `bash bench/compare-llamacpp.sh`; raw numbers in `{raw.split('/')[-1]}`. "
           "Every engine runs once per round, rounds one after another; tok/s are means over rounds ± their "
           "standard deviation. Sizes are MiB; peak RSS is VmHWM for bitnest and the getrusage max RSS of the "
           "llama-bench process (which runs both tests). Ratios are mean tok/s over llama.cpp " + REF + "'s (SRC: the "
           "file as shipped); the range is the lowest and highest ratio of one round to the " + REF + " run of the same round. "
           f"CPU time stolen by the hypervisor during the runs: {steal}%."
           + (f" llama.cpp ran with `{extra}`." if extra else "") + "\n")
out.append(f"| engine / type | bits/weight | file MiB | pp{p} tok/s | tg{n} tok/s (tg{depth_n} at a depth) | peak RSS MiB "
           "| pp vs " + REF + " | tg vs " + REF + " | pp range | tg range |")
out.append("|---|---|---|---|---|---|---|---|---|---|")
for d in rows:
    out.append(
        f"| {d['name']} | {f(d.get('bits_per_weight'), 2)} | {f(d.get('file_mb'))} "
        f"| {f(d.get('pp_tok_s'))} ± {f(d.get('pp_std'))} | {f(d.get('tg_tok_s'))} ± {f(d.get('tg_std'))} "
        f"| {f(d.get('peak_rss_mb'), 0)} | {ratio(d, 'pp_tok_s')} | {ratio(d, 'tg_tok_s')} "
        f"| {spread(d, 'pp_tok_s')} | {spread(d, 'tg_tok_s')} |")
out.append("")
if any(d["engine"] == "bitnest" for d in rows):
    out.append("bitnest peak RSS against the budget file + KV cache + 64 MiB: " + ", ".join(
        f"{d['name']}: {d['peak_rss_mb']:.0f} / {d['file_mb'] + d['kv_mb'] + 64:.0f}"
        for d in rows if d["engine"] == "bitnest" and d.get("peak_rss_mb") is not None) + ".\n")
open(md, "w").write("\n".join(out))
print("\n".join(out))
PY
log "wrote $MD"
exit 0
}
