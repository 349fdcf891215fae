#!/usr/bin/env python3
"""Checks that a continuously batching `bitnest serve` answers every request under load exactly
as it answers it alone.

Usage: python3 tests/server/batch_identity.py --alone URL --batched URL --prompts FILE [--clients N]

Run by `tests/server.rs`, which starts both servers on the same model: `--alone` with one slot
(each request has every forward pass to itself), `--batched` with many (every active request's
token shares each pass). A mix of requests (greedy with log-probabilities, seeded sampling at
several temperatures and seeds, short limits, a stop string, prompts of very different lengths
so that prompt chunks and decode tokens share passes) is sent to the batched server all at once
by N clients, then one at a time to the other. Text, finish reason, token counts and
log-probabilities must be identical, bit for bit; no request may fail; and the batched server's
metrics must show passes that held several sequences. Standard library only.
"""

import argparse
import json
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

# One chat answer as (text, finish reason, completion tokens, log-probabilities), as the
# speculative identity check compares them (this script's folder is on the import path).
from spec_identity import answer


def metric(base, name):
    with urllib.request.urlopen(base + "/metrics", timeout=60) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} missing")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--alone", required=True)
    p.add_argument("--batched", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=40)
    a = p.parse_args()
    rows = [json.loads(line) for line in open(a.prompts)]
    # Prompts of every category, short and long.
    seen, prompts = set(), []
    for r in rows:
        if r["category"] not in seen:
            seen.add(r["category"])
            prompts.append(r["turns"][0][:3000])
    bodies = []
    for i in range(a.clients):
        q = prompts[i % len(prompts)]
        msgs = [{"role": "user", "content": q}]
        kind = i % 4
        if kind == 0:
            b = {"messages": msgs, "max_tokens": a.max_tokens, "temperature": 0, "logprobs": True, "top_logprobs": 2}
        elif kind == 1:
            b = {"messages": msgs, "max_tokens": a.max_tokens, "temperature": 0.7 + 0.1 * (i % 3), "seed": 100 + i}
        elif kind == 2:
            b = {"messages": msgs, "max_tokens": 5 + i, "temperature": 0}
        else:
            b = {"messages": msgs, "max_tokens": a.max_tokens, "temperature": 1.0, "top_p": 0.9, "seed": i,
                 "stop": [" the"]}
        bodies.append((f"request {i} ({['greedy', 'seeded', 'limit', 'stop'][kind]})", b))
    with ThreadPoolExecutor(len(bodies)) as ex:
        batched = list(ex.map(lambda wb: answer(a.batched, wb[1]), bodies))
    for (what, body), got in zip(bodies, batched):
        want = answer(a.alone, body)
        if want != got:
            raise AssertionError(f"{what}: alone {want[:3]!r} != batched {got[:3]!r}"
                                 + (" (log-probabilities differ)" if want[:3] == got[:3] else ""))
        print(f"ok {what}: {got[2]} tokens, {got[1]}", flush=True)
    mean = metric(a.batched, "bitnest_batch_size_mean")
    failed = metric(a.batched, 'bitnest_requests_finished_total{outcome="failed"}')
    if failed != 0:
        raise AssertionError(f"{failed} failed requests")
    if not mean > 1.5:
        raise AssertionError(f"the batched server's passes held {mean} sequences on average")
    print(f"ok {len(bodies)} concurrent clients; {mean:.2f} sequences per pass on average", flush=True)


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAIL: {e}", file=sys.stderr)
        sys.exit(1)
