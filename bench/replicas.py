#!/usr/bin/env python3
"""Two `bitnest serve` replicas on loopback behind nginx with deploy/nginx.conf's rules (prefix
affinity by consistent hashing, failover on refused connections and 503s), driven by the official
`openai` client. Checks, and writes bench/results/replicas-<stamp>.md:

1. identity: greedy answers through the router equal a replica's own, token for token;
2. affinity: every turn of a conversation carrying the X-Bitnest-Prefix key (deploy/prefix_key.py,
   which must equal the key the server returns) lands on one replica, and its cached prompt
   tokens grow turn by turn; the prefix-cache hit rate of the same workload with and without
   the key;
3. kill: 8 clients send requests (half streamed) while one replica is SIGKILLed: no request fails
   that was not in flight at the kill, and every request after it succeeds on the other;
4. drain: the killed replica is restarted, then the other gets SIGTERM under the same load: no
   request fails, and the drained replica exits 0.

    bash bench/replicas.sh            (builds bitnest, installs nginx if missing, runs this)
    python3 bench/replicas.py --bin target/release/bitnest [--model smollm2-135m]
"""
import argparse
import datetime
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "deploy"))
from prefix_key import HEADER, chat_key  # noqa: E402

FAILS = []
LINES = []


def say(line=""):
    print(line, flush=True)
    LINES.append(line)


def check(ok, what):
    say(("- ok: " if ok else "- **FAIL**: ") + what)
    if not ok:
        FAILS.append(what)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(base):
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def wait_health(base, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{base}: exited with {proc.returncode} before it was ready")
        if health(base) == 200:
            return
        time.sleep(0.1)
    raise SystemExit(f"{base}: not ready after {timeout} s")


class Replica:
    def __init__(self, args, port, log_dir, name):
        self.args, self.port, self.name = args, port, name
        self.base = f"http://127.0.0.1:{port}"
        self.log = open(os.path.join(log_dir, f"{name}.log"), "ab")
        self.proc = None

    def start(self):
        cmd = [self.args.bin, "serve", "--model", self.args.model, "--host", "127.0.0.1", "--port", str(self.port),
               "--threads", "1", "--parallel", str(self.args.parallel), "--ctx", "2048", "--grace", "60"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log)
        wait_health(self.base, self.proc)

    def kill(self, sig):
        self.proc.send_signal(sig)


def nginx_conf(tmp, listen, ports):
    """deploy/nginx.conf with the replicas' loopback ports, a loopback listen address and the
    access log in `tmp`; nothing else changed."""
    text = open(os.path.join(ROOT, "deploy", "nginx.conf")).read()
    servers = re.findall(r"^\s*server replica-\d+:8080 .*$", text, flags=re.M)
    if len(servers) != 2:
        raise SystemExit("deploy/nginx.conf: expected two `server replica-N:8080` lines")
    for line, port in zip(servers, ports):
        text = text.replace(line, re.sub(r"replica-\d+:8080", f"127.0.0.1:{port}", line))
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{listen};")
    text = text.replace("/var/log/nginx/access.log", os.path.join(tmp, "access.log"))
    path = os.path.join(tmp, "nginx.conf")
    open(path, "w").write(text)
    return path


def start_nginx(tmp, conf):
    os.makedirs(os.path.join(tmp, "logs"), exist_ok=True)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    glob = f"daemon off; pid {tmp}/nginx.pid; error_log {tmp}/error.log;"
    if os.geteuid() == 0:
        glob += " user root;"
    test = subprocess.run([nginx, "-t", "-p", tmp, "-c", conf, "-g", glob], capture_output=True, text=True)
    if test.returncode != 0:
        raise SystemExit(f"nginx -t failed:\n{test.stderr}")
    return subprocess.Popen([nginx, "-p", tmp, "-c", conf, "-g", glob],
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "nginx.stderr"), "w"))


def client(base):
    # No client-side retries: what the router does is what is measured.
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)


def ask(c, messages, max_tokens, key=None, stream=False):
    """(text, finish_reason, usage, upstream, returned key) of one greedy chat request."""
    headers = {HEADER: key} if key else {}
    if not stream:
        raw = c.chat.completions.with_raw_response.create(
            model="m", messages=messages, max_tokens=max_tokens, temperature=0, extra_headers=headers)
        r = raw.parse()
        return (r.choices[0].message.content, r.choices[0].finish_reason, r.usage,
                raw.headers.get("x-bitnest-upstream"), raw.headers.get("x-bitnest-prefix"))
    with c.chat.completions.with_streaming_response.create(
            model="m", messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            extra_headers=headers) as raw:
        text, finish = "", None
        for chunk in raw.parse():
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish, None, raw.headers.get("x-bitnest-upstream"), raw.headers.get("x-bitnest-prefix")


PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that adds two numbers.",
    "Name three colours of the rainbow.",
    "Explain what a prime number is in one sentence.",
    "Translate 'good morning' into Spanish.",
    "Give me a haiku about autumn.",
]


def identity(router, direct):
    say("\n## 1. Identity: through the router and from a replica directly\n")
    same = 0
    for p in PROMPTS:
        m = [{"role": "user", "content": p}]
        a = ask(router, m, 48)
        b = ask(direct, m, 48)
        same += a[0] == b[0] and a[1] == b[1]
    check(same == len(PROMPTS), f"{same} of {len(PROMPTS)} greedy answers identical (48 tokens, temperature 0)")


def conversations(router, topic, n_conv, turns, with_key):
    """Runs n_conv conversations of `turns` turns, 4 at a time; returns per-conversation lists of
    (upstream, cached tokens, prompt tokens, key ok)."""
    results = [[] for _ in range(n_conv)]

    def one(i):
        msgs = [{"role": "system", "content": f"You are assistant number {i} for {topic}. Answer in one short paragraph."},
                {"role": "user", "content": f"Tell me something about {topic}, fact {i}."}]
        key = chat_key(msgs)
        for t in range(turns):
            text, _, usage, up, back = ask(router, msgs, 24, key=key if with_key else None)
            cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
            results[i].append((up, cached, usage.prompt_tokens, back == key))
            msgs += [{"role": "assistant", "content": text}, {"role": "user", "content": f"And then? ({t})"}]

    threads = []
    for i in range(n_conv):
        threads.append(threading.Thread(target=one, args=(i,)))
    for k in range(0, n_conv, 4):
        batch = threads[k:k + 4]
        for t in batch:
            t.start()
        for t in batch:
            t.join()
    return results


def affinity(router):
    say("\n## 2. Prefix affinity\n")
    n_conv, turns = 8, 4
    res = conversations(router, "lighthouses", n_conv, turns, with_key=True)
    sticky = sum(len({up for up, *_ in conv}) == 1 for conv in res)
    check(sticky == n_conv, f"{sticky} of {n_conv} conversations ({turns} turns each) stayed on one replica with the key")
    growing = sum(all(conv[t][1] > conv[t - 1][1] for t in range(1, turns)) for conv in res)
    check(growing == n_conv, f"{growing} of {n_conv} conversations: cached prompt tokens grow every turn")
    keys = sum(ok for conv in res for *_, ok in conv)
    check(keys == n_conv * turns, f"the server returned deploy/prefix_key.py's key on {keys} of {n_conv * turns} requests")
    spread = {up for conv in res for up, *_ in conv}
    # Informational: the ring depends on the replicas' ports, so all 8 may hash to one (p ≈ 1%).
    say(f"- conversations spread over {len(spread)} replicas")
    rate = lambda rs: sum(c for conv in rs for _, c, _, _ in conv[1:]) / max(1, sum(p for conv in rs for _, _, p, _ in conv[1:]))
    without = conversations(router, "volcanoes", n_conv, turns, with_key=False)
    moved = sum(len({up for up, *_ in conv}) > 1 for conv in without)
    with_rate, without_rate = rate(res), rate(without)
    say(f"\n| workload ({n_conv} conversations × {turns} turns, 4 at a time) | prefix-cache hit rate, turns 2–{turns} | conversations that changed replica |")
    say("|---|---|---|")
    say(f"| with `X-Bitnest-Prefix` | **{with_rate:.1%}** | 0 |")
    say(f"| without (spread at random) | {without_rate:.1%} | {moved} |\n")
    check(with_rate > without_rate, "the hit rate with the key is above the hit rate without")
    return with_rate, without_rate


def load(router, seconds, event_at, event, n_clients=8):
    """n_clients send requests (odd clients stream) for `seconds`; `event` runs at `event_at`.
    Returns (records, event time): a record is (start, end, ok, error)."""
    records, lock = [], threading.Lock()
    stop = time.time() + seconds

    def worker(i):
        j = 0
        while time.time() < stop:
            m = [{"role": "user", "content": f"{PROMPTS[(i + j) % len(PROMPTS)]} (client {i}, request {j})"}]
            t0 = time.time()
            try:
                text, finish, *_ = ask(router, m, 32, stream=i % 2 == 1)
                ok, err = finish in ("stop", "length") and bool(text), None if finish else "stream ended without a finish"
            except Exception as e:  # noqa: BLE001 - every failure is counted
                ok, err = False, f"{type(e).__name__}: {e}"[:200]
            with lock:
                records.append((t0, time.time(), ok, err))
            j += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    time.sleep(event_at)
    t_event = time.time()
    event()
    for t in threads:
        t.join()
    return records, t_event


def access_log_retries(tmp, t_event):
    """Requests the router retried on a second replica (their upstream status lists two), split
    into those it had begun before `t_event` (in flight there: rescued) and those after."""
    before = after = 0
    for line in open(os.path.join(tmp, "access.log")):
        end = float(line.split()[0])
        took = re.search(r"time=([0-9.]+)", line)
        start = end - float(took.group(1)) if took else end
        if end >= t_event and re.search(r"up_status=\d+, \d+", line):
            if start < t_event:
                before += 1
            else:
                after += 1
    return before, after


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/bitnest"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bitnest-replicas-")
    ports = [free_port(), free_port()]
    listen = free_port()
    replicas = [Replica(a, p, tmp, f"replica-{i + 1}") for i, p in enumerate(ports)]
    nginx = None
    try:
        for r in replicas:
            r.start()
        nginx = start_nginx(tmp, nginx_conf(tmp, listen, ports))
        router_base = f"http://127.0.0.1:{listen}"
        wait_health(router_base, nginx, 30)
        router, direct = client(router_base), client(replicas[0].base)
        say(f"# Replicas behind nginx ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)\n")
        say(f"Two `bitnest serve --model {a.model} --threads 1 --parallel {a.parallel}` replicas on loopback behind "
            f"nginx {subprocess.run(['nginx', '-v'], capture_output=True, text=True).stderr.strip().split('/')[-1]} "
            "with deploy/nginx.conf's rules; command: `bash bench/replicas.sh`.")

        identity(router, direct)
        affinity(router)

        say("\n## 3. A replica killed under load (SIGKILL)\n")
        victim = replicas[0]
        recs, t_kill = load(router, 16, 6, lambda: victim.kill(signal.SIGKILL))
        victim.proc.wait()
        failed = [r for r in recs if not r[2]]
        in_flight = [r for r in recs if r[0] < t_kill < r[1]]
        outside = [r for r in failed if not (r[0] < t_kill)]
        after = [r for r in recs if r[0] > t_kill]
        rescued, rerouted = access_log_retries(tmp, t_kill)
        say(f"{len(recs)} requests, {len(in_flight)} in flight at the kill (on either replica), {len(failed)} failed; "
            f"the router retried {rescued} of those in flight on the other replica (non-streamed: no byte had "
            f"reached the client) and rerouted {rerouted} later ones that it first sent to the dead replica.")
        for r in failed[:5]:
            say(f"  - failed: {r[3]}")
        check(not outside, f"no failed request outside those in flight at the kill ({len(outside)} such)")
        check(all(r[2] for r in after), f"all {len(after)} requests started after the kill succeeded")
        kill_figures = (len(recs), len(in_flight), len(failed))

        say("\n## 4. A replica drained under load (SIGTERM)\n")
        victim.start()
        time.sleep(6)  # the router's fail_timeout: it tries the restarted replica again
        drained = replicas[1]
        recs, t_term = load(router, 16, 6, lambda: drained.kill(signal.SIGTERM))
        rc = drained.proc.wait(timeout=90)
        failed = [r for r in recs if not r[2]]
        in_flight = [r for r in recs if r[0] < t_term < r[1]]
        turned = sum(access_log_retries(tmp, t_term))
        say(f"{len(recs)} requests, {len(in_flight)} in flight at the SIGTERM, {len(failed)} failed; "
            f"{turned} were turned away while draining (or refused after) and retried on the other replica.")
        for r in failed[:5]:
            say(f"  - failed: {r[3]}")
        check(not failed, "no request lost to the drain")
        check(rc == 0, f"the drained replica exited with status {rc}")
        say("\n## Summary\n")
        say(f"kill: {kill_figures[0]} requests, {kill_figures[2]} failed (all {kill_figures[1]} in flight at the kill "
            f"were candidates); drain: {len(recs)} requests, {len(failed)} failed.")
        say("\n" + ("All checks passed." if not FAILS else f"{len(FAILS)} check(s) failed."))
    finally:
        for r in replicas:
            if r.proc and r.proc.poll() is None:
                r.proc.kill()
        if nginx and nginx.poll() is None:
            nginx.terminate()
            nginx.wait()
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        out = a.out or os.path.join(ROOT, "bench", "results", f"replicas-{stamp}.md")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out + ".tmp", "w") as f:
            f.write("\n".join(LINES) + "\n")
        os.replace(out + ".tmp", out)
        print(f"wrote {out} (logs in {tmp})")
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
