#!/usr/bin/env python3
"""What a load balancer sees of one `bitnest serve` (run by tests/server.rs; standard library only).

Started while the server is still loading its model (the test holds the load with
BITNEST_SERVE_LOAD_DELAY_MS):
  loading   /health 503 {"status":"loading"}; a chat request 503 code "loading" with Retry-After
  ready     /health 200 with slot figures; /metrics bitnest_ready 1
  draining  a long request is running when SIGTERM arrives: /health 503 {"status":"draining"},
            a new chat request 503 code "draining" with Retry-After, /v1/models still 200,
            /metrics bitnest_draining 1; the running request still gets its whole answer
            (or, with --expect-cancel, the server's --grace runs out and it ends with a 503
            `shutting_down` and Retry-After, which a router may retry elsewhere)
The caller checks that the process then exits with status 0.
"""
import argparse
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

FAILS = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        FAILS.append(what)


def call(base, path, body=None, timeout=120):
    """(status, headers, parsed JSON or text) of one request; HTTP errors are answers too."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, headers, raw = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, headers, raw = e.code, dict(e.headers), e.read()
    try:
        return status, {k.lower(): v for k, v in headers.items()}, json.loads(raw)
    except ValueError:
        return status, {k.lower(): v for k, v in headers.items()}, raw.decode(errors="replace")


def metric(base, name):
    _, _, text = call(base, "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--long-tokens", type=int, default=160)
    ap.add_argument("--expect-cancel", action="store_true")
    a = ap.parse_args()
    base = a.base_url
    chat = {"messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 4}

    # Loading.
    s, h, b = call(base, "/health")
    check(s == 503 and b == {"status": "loading"}, f"loading: /health is 503 loading ({s} {b})")
    s, h, b = call(base, "/v1/chat/completions", chat)
    code = b.get("error", {}).get("code") if isinstance(b, dict) else None
    check(s == 503 and code == "loading" and "retry-after" in h, f"loading: a chat request is 503 loading ({s} {code})")

    # Ready.
    deadline = time.time() + 120
    while time.time() < deadline:
        s, h, b = call(base, "/health")
        if s == 200:
            break
        time.sleep(0.05)
    check(s == 200 and b.get("status") == "ok" and b.get("slots_idle", 0) >= 1, f"ready: /health is 200 ok ({s} {b})")
    check(metric(base, "bitnest_ready") == 1 and metric(base, "bitnest_draining") == 0, "ready: /metrics bitnest_ready 1")
    s, h, b = call(base, "/v1/chat/completions", chat)
    check(s == 200 and h.get("x-bitnest-prefix", "").startswith("p1-"), f"ready: a chat request is answered with its prefix key ({s})")

    # Draining: a long request runs when SIGTERM arrives.
    # Counting never reaches an end-of-text token, so the answer runs to max_tokens.
    long = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": a.long_tokens, "temperature": 0}
    got = {}

    def run_long():
        got["answer"] = call(base, "/v1/completions", long, timeout=900)

    t = threading.Thread(target=run_long)
    t.start()
    deadline = time.time() + 60
    while time.time() < deadline and (metric(base, "bitnest_generated_tokens_total") or 0) < 4 + 3:
        time.sleep(0.02)
    os.kill(a.pid, signal.SIGTERM)
    deadline = time.time() + 5
    while time.time() < deadline and metric(base, "bitnest_draining") != 1:
        time.sleep(0.01)
    s, h, b = call(base, "/health")
    check(s == 503 and b == {"status": "draining"}, f"draining: /health is 503 draining ({s} {b})")
    s, h, b = call(base, "/v1/chat/completions", chat)
    code = b.get("error", {}).get("code") if isinstance(b, dict) else None
    check(s == 503 and code == "draining" and h.get("retry-after") == "1",
          f"draining: a new chat request is 503 draining with Retry-After ({s} {code})")
    s, _, b = call(base, "/v1/models")
    check(s == 200, f"draining: /v1/models is still served ({s})")
    t.join(900)
    s, h, b = got.get("answer", (None, None, None))
    usage = b.get("usage", {}) if isinstance(b, dict) else {}
    if a.expect_cancel:
        code = b.get("error", {}).get("code") if isinstance(b, dict) else None
        check(s == 503 and code == "shutting_down" and h.get("retry-after") == "1",
              f"draining: past --grace the running request is cut short with a retryable 503 ({s} {code})")
    else:
        check(s == 200 and usage.get("completion_tokens") == a.long_tokens,
              f"draining: the running request gets its whole answer ({s}, {usage.get('completion_tokens')} of {a.long_tokens} tokens)")
    if FAILS:
        print(f"{len(FAILS)} check(s) failed", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
