#!/usr/bin/env python3
"""Checks that a speculating `bitnest serve` answers exactly as a plain one.

Usage: python3 tests/server/spec_identity.py --plain URL --spec URL --mode MODE --prompts FILE

Run by `tests/server.rs`, which starts both servers on the same model. The same requests go to
both: greedy chat answers (with log-probabilities), a seeded sampled answer, a stop string and
a short token limit, then the spec server takes several requests at once (its slots share one
Token Recycling matrix). Every answer must match the plain server's text, finish reason and
token counts, and the log-probabilities to 1e-4. Exits non-zero on the first mismatch.
Standard library only.
"""

import argparse
import json
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def post(base, path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read().decode())


def metric(base, name):
    with urllib.request.urlopen(base + "/metrics", timeout=60) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name):
                return line
    raise AssertionError(f"metric {name} missing")


def answer(base, body):
    r = post(base, "/v1/chat/completions", body)
    c = r["choices"][0]
    lps = [(t["token"], t["logprob"]) for t in (c.get("logprobs") or {}).get("content") or []]
    return c["message"]["content"], c["finish_reason"], r["usage"]["completion_tokens"], lps


def same(a, b, what):
    (ta, fa, na, la), (tb, fb, nb, lb) = a, b
    if (ta, fa, na) != (tb, fb, nb):
        raise AssertionError(f"{what}: plain {ta!r} ({fa}, {na} tokens) != spec {tb!r} ({fb}, {nb} tokens)")
    if [t for t, _ in la] != [t for t, _ in lb]:
        raise AssertionError(f"{what}: log-probability tokens differ")
    worst = max((abs(x - y) for (_, x), (_, y) in zip(la, lb)), default=0.0)
    if worst > 1e-4:
        raise AssertionError(f"{what}: log-probabilities differ by {worst}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--plain", required=True)
    p.add_argument("--spec", required=True)
    p.add_argument("--mode", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--max-tokens", type=int, default=48)
    a = p.parse_args()
    rows = [json.loads(line) for line in open(a.prompts)]
    # One prompt of each kind that copies from its context and of each that does not.
    picked = {}
    for r in rows:
        picked.setdefault(r["category"], r["turns"][0])
    prompts = [picked[c] for c in ("rag", "summarization", "translation", "math_reasoning", "writing") if c in picked]
    bodies = []
    for i, q in enumerate(prompts):
        msgs = [{"role": "user", "content": q}]
        bodies.append((f"greedy {i}", {"messages": msgs, "max_tokens": a.max_tokens, "temperature": 0, "logprobs": True}))
    msgs = [{"role": "user", "content": prompts[0]}]
    bodies.append(("seeded", {"messages": msgs, "max_tokens": a.max_tokens, "temperature": 0.8, "seed": 7}))
    bodies.append(("limit", {"messages": msgs, "max_tokens": 3, "temperature": 0}))
    plain = {w: answer(a.plain, b) for w, b in bodies}
    # A stop string taken from the middle of the plain answer.
    text = plain["greedy 0"][0]
    words = text.split()
    if len(words) > 6:
        stop_body = {"messages": msgs, "max_tokens": a.max_tokens, "temperature": 0, "stop": [" " + words[5]]}
        bodies.append(("stop string", stop_body))
        plain["stop string"] = answer(a.plain, stop_body)
    for w, b in bodies:
        same(plain[w], answer(a.spec, b), w)
        print(f"ok {w}: {plain[w][2]} tokens, {plain[w][1]}", flush=True)
    # Concurrent requests: the slots step round-robin and share the recycled candidates.
    greedy = [(w, b) for w, b in bodies if w.startswith("greedy")]
    with ThreadPoolExecutor(len(greedy)) as ex:
        got = list(ex.map(lambda wb: answer(a.spec, wb[1]), greedy))
    for (w, _), g in zip(greedy, got):
        same(plain[w], g, w + " (concurrent)")
    print(f"ok {len(greedy)} concurrent requests", flush=True)
    line = metric(a.spec, "bitnest_speculative_acceptance_rate")
    rate = float(line.rsplit(" ", 1)[1])
    if f'mode="{a.mode}"' not in line or not 0.0 < rate <= 1.0:
        raise AssertionError(f"acceptance metric: {line}")
    print(f"ok {line}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAIL: {e}", file=sys.stderr)
        sys.exit(1)
