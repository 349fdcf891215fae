#!/usr/bin/env python3
"""Load soak: many concurrent clients against one `bitnest serve` for a fixed time.

Each client loops over a random mix of requests (standard library only, raw HTTP/1.1 over
asyncio, so that it can misbehave on purpose):
  chat          chat completion, 1-64 new tokens
  chat_stream   the same, streamed (server-sent events, must end with `data: [DONE]`)
  completion    legacy completion
  cancel        a stream whose client hangs up after its first events
  slow_reader   a stream read a few bytes at a time, with pauses
  too_long      a prompt longer than the context (must be 400 context_length_exceeded)
  bad_json      malformed JSON (must be 400 invalid_json)
  too_large     a body over --max-body (must be 400 request_too_large)
  tokenize      /tokenize
Every response is classified: a valid answer, a documented error (docs/SERVER.md: the
OpenAI-shaped body, 400/404/405/503 with its code), or BAD (anything else, a reset, a hang past
300 s). The server's RSS is sampled every 5 s from /proc.

Usage: python3 bench/soak.py [--minutes 30] [--clients 32] [--bits 4] [--parallel 8]
Starts the server itself (target/release/bitnest serve --model smollm2-135m ...) and writes
bench/results/soak-<date>.md. Exits non-zero on any BAD response or a server crash.
"""

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "jolly bankers near the river bank under pale moonlight").split()


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None


async def http(port, method, path, body=None, reader_mode="normal", raw=None, timeout=300):
    """Returns (status, headers, body bytes, events) or raises. reader_mode: normal, cancel
    (close after 2 events), slow (read 64 bytes at a time with pauses)."""
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
    try:
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
        w.write(head + data)
        await w.drain()
        status_line = await asyncio.wait_for(r.readline(), timeout)
        status = int(status_line.split()[1])
        headers = {}
        while True:
            line = await asyncio.wait_for(r.readline(), timeout)
            if line in (b"\r\n", b""):
                break
            k, v = line.decode().split(":", 1)
            headers[k.strip().lower()] = v.strip()
        chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        out = bytearray()
        events = 0
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError("response body past the deadline")
            if chunked:
                size_line = await asyncio.wait_for(r.readline(), timeout)
                if not size_line:
                    raise ConnectionError("connection closed inside a chunked body")
                n = int(size_line.split(b";")[0], 16)
                if n == 0:
                    await r.readline()
                    break
                if reader_mode == "slow":
                    chunk = bytearray()
                    while len(chunk) < n:
                        chunk += await asyncio.wait_for(r.readexactly(min(64, n - len(chunk))), timeout)
                        await asyncio.sleep(0.05)
                else:
                    chunk = await asyncio.wait_for(r.readexactly(n), timeout)
                await r.readexactly(2)
                out += chunk
                events = out.count(b"\ndata: ") + out.startswith(b"data: ")
                if reader_mode == "cancel" and events >= 2:
                    return status, headers, bytes(out), "cancelled"
            else:
                n = int(headers.get("content-length", "-1"))
                out += await asyncio.wait_for(r.readexactly(n) if n >= 0 else r.read(), timeout)
                break
        return status, headers, bytes(out), None
    finally:
        w.close()


def documented_error(status, body, want_code=None):
    if status not in (400, 404, 405, 503):
        return False
    try:
        e = json.loads(body)["error"]
    except Exception:
        return False
    if not (isinstance(e.get("message"), str) and e["message"] and isinstance(e.get("type"), str)):
        return False
    return want_code is None or e.get("code") == want_code


def valid_answer(kind, status, body):
    if status != 200:
        return False
    if kind in ("chat_stream", "slow_reader"):
        text = body.decode()
        events = [l[6:] for l in text.split("\n") if l.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return False
        for e in events[:-1]:
            j = json.loads(e)
            if "error" in j or j.get("object") != "chat.completion.chunk":
                return False
        return True
    j = json.loads(body)
    if kind == "chat":
        c = j["choices"][0]
        return isinstance(c["message"]["content"], str) and c["finish_reason"] in ("stop", "length")
    if kind == "completion":
        return isinstance(j["choices"][0]["text"], str) and j["usage"]["completion_tokens"] >= 0
    if kind == "tokenize":
        return isinstance(j["tokens"], list) and len(j["tokens"]) > 0
    return False


def prompt(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


async def client(i, port, stop_at, stats, rng, max_body, ctx):
    kinds = ["chat"] * 6 + ["chat_stream"] * 5 + ["completion"] * 2 + ["cancel"] * 2 + ["slow_reader", "too_long",
                                                                                             "bad_json", "too_large", "tokenize"]
    while time.monotonic() < stop_at:
        kind = rng.choice(kinds)
        msgs = [{"role": "user", "content": prompt(rng, rng.randint(3, 60))}]
        t0 = time.monotonic()
        try:
            if kind in ("chat", "chat_stream", "cancel", "slow_reader"):
                body = {"model": "m", "messages": msgs, "max_tokens": rng.randint(1, 64),
                        "temperature": rng.choice([0, 0.7]), "seed": rng.randint(0, 1 << 30)}
                if kind != "chat":
                    body["stream"] = True
                mode = {"cancel": "cancel", "slow_reader": "slow"}.get(kind, "normal")
                status, _, data, note = await http(port, "POST", "/v1/chat/completions", body, mode)
                if note == "cancelled":
                    ok = status == 200
                else:
                    ok = valid_answer(kind, status, data) or documented_error(status, data, "server_overloaded")
            elif kind == "completion":
                body = {"model": "m", "prompt": prompt(rng, rng.randint(3, 40)), "max_tokens": rng.randint(1, 32)}
                status, _, data, _ = await http(port, "POST", "/v1/completions", body)
                ok = valid_answer(kind, status, data) or documented_error(status, data, "server_overloaded")
            elif kind == "too_long":
                body = {"model": "m", "messages": [{"role": "user", "content": prompt(rng, ctx + 200)}], "max_tokens": 4}
                status, _, data, _ = await http(port, "POST", "/v1/chat/completions", body)
                ok = documented_error(status, data, "context_length_exceeded")
            elif kind == "bad_json":
                raw = rng.choice([b"{", b"{\"messages\": [", b"not json", b"", b"{\"model\": \"m\",}"])
                status, _, data, _ = await http(port, "POST", "/v1/chat/completions", raw=raw)
                ok = documented_error(status, data, "invalid_json")
            elif kind == "too_large":
                raw = b"{\"prompt\": \"" + b"x" * (max_body + 10) + b"\"}"
                status, _, data, _ = await http(port, "POST", "/v1/completions", raw=raw)
                ok = documented_error(status, data, "request_too_large")
            else:
                status, _, data, _ = await http(port, "POST", "/tokenize", {"content": prompt(rng, 20)})
                ok = valid_answer(kind, status, data)
            outcome = ("ok" if status == 200 else f"error {status}") if ok else "BAD"
            detail = None if ok else f"{kind}: status {status}, body {data[:300]!r}"
        except Exception as e:  # a reset, a hang, a malformed response
            outcome, detail = "BAD", f"{kind}: {type(e).__name__}: {e}"
        dt = time.monotonic() - t0
        stats.append((kind, outcome, dt, detail))
        if outcome == "BAD":
            print(f"client {i}: {detail}", file=sys.stderr, flush=True)


async def sample_rss(pid, stop_at, samples, t_start):
    while time.monotonic() < stop_at:
        samples.append((time.monotonic() - t_start, rss_mb(pid)))
        await asyncio.sleep(5)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


async def amain(a):
    max_body, ctx = 65536, 1024
    cmd = [os.path.join(ROOT, "target", "release", "bitnest"), "serve", "--model", a.model, "--port", "0",
           "--ctx", str(ctx), "--parallel", str(a.parallel), "--queue", str(a.queue), "--max-body", str(max_body)]
    if a.bits:
        cmd += ["--bits", str(a.bits)]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(os.path.join(ROOT, "target", "soak-server.log"), "w"))
    port = None
    for line in server.stdout:
        line = line.decode()
        if "listening on" in line:
            port = int(line.split("listening on http://")[1].split()[0].rsplit(":", 1)[1])
            break
    assert port, "the server did not start"
    print(f"server pid {server.pid} on port {port}: {' '.join(cmd[1:])}", flush=True)
    t_start = time.monotonic()
    stop_at = t_start + a.minutes * 60
    stats, samples = [], []
    rng = random.Random(a.seed)
    tasks = [client(i, port, stop_at, stats, random.Random(rng.random()), max_body, ctx) for i in range(a.clients)]

    async def progress():
        while time.monotonic() < stop_at:
            await asyncio.sleep(60)
            bad = sum(1 for s in stats if s[1] == "BAD")
            print(f"{(time.monotonic() - t_start) / 60:.0f} min: {len(stats)} requests, {bad} BAD, "
                  f"RSS {rss_mb(server.pid)} MB", flush=True)

    await asyncio.gather(sample_rss(server.pid, stop_at, samples, t_start), progress(), *tasks)
    alive = server.poll() is None
    rss_end = rss_mb(server.pid)
    server.terminate()
    try:
        code = server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        code = "killed after 60 s"
    first_min = [r for t, r in samples if 55 <= t <= 65 and r] or [r for t, r in samples if r][:1]
    rss_1 = first_min[0] if first_min else float("nan")
    kinds = sorted({s[0] for s in stats})
    bad = [s for s in stats if s[1] == "BAD"]
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    L = [f"# Soak, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
         f"`python3 bench/soak.py --minutes {a.minutes} --clients {a.clients} --bits {a.bits} --parallel {a.parallel}` "
         f"at commit {commit}, {os.cpu_count()} cores; server: `{' '.join(cmd[1:])}`.", "",
         f"- {len(stats)} requests in {a.minutes} min from {a.clients} clients; **{len(bad)} BAD** "
         "(neither a valid answer nor a documented error); server "
         + ("alive at the end" if alive else "**DIED**") + f", exit after SIGTERM: {code}.",
         f"- RSS after the first minute {rss_1:.1f} MB, at the end {rss_end or float('nan'):.1f} MB "
         f"({((rss_end or 0) / rss_1 - 1) * 100:+.1f}%), max {max((r for _, r in samples if r), default=0):.1f} MB.", "",
         "| request kind | count | ok | documented errors | BAD | p50 s | p99 s |", "|---|---|---|---|---|---|---|"]
    for k in kinds:
        xs = [s for s in stats if s[0] == k]
        errs = {}
        for s in xs:
            if s[1].startswith("error"):
                errs[s[1]] = errs.get(s[1], 0) + 1
        e = ", ".join(f"{n} × {c[6:]}" for c, n in sorted(errs.items())) or "0"
        L.append(f"| {k} | {len(xs)} | {sum(1 for s in xs if s[1] == 'ok')} | {e} | {sum(1 for s in xs if s[1] == 'BAD')} | "
                 f"{pct([s[2] for s in xs], 50):.2f} | {pct([s[2] for s in xs], 99):.2f} |")
    L += ["", "RSS (MB) every 5 minutes: " + ", ".join(f"{t / 60:.0f} min {r:.0f}" for t, r in samples if r and int(t) % 300 < 5)]
    L += [f"- BAD: {s[3]}" for s in bad[:20]]
    out = os.path.join(ROOT, "bench", "results", f"soak-{stamp}.md")
    with open(out, "w") as f:
        f.write("\n".join(L) + "\n")
    print("\n".join(L))
    return 0 if alive and not bad else 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--queue", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    sys.exit(asyncio.run(amain(ap.parse_args())))


if __name__ == "__main__":
    main()
