#!/usr/bin/env python3
"""Drives a running `bitnest serve` with the official `openai` package and raw HTTP.

Usage: python3 tests/server/test_openai.py --base-url http://127.0.0.1:PORT --pid PID --ctx N

Run by `tests/server.rs`, which starts the server. Exits non-zero on the first failed check.
The load test's size comes from BITNEST_LOAD_CLIENTS / _REQUESTS / _MAX_TOKENS (16 / 8 / 4).
"""

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

try:
    import openai
except ImportError:
    print("FAIL: the `openai` package is not installed: python3 -m pip install 'openai>=1.40'", file=sys.stderr)
    sys.exit(2)

ARGS = None
CLIENT = None
MODEL = None


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def http(method, path, body=None, raw=None, headers=None, timeout=120):
    """Returns (status, headers, parsed JSON or text)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(ARGS.base_url + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, hdrs, text = r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        status, hdrs, text = e.code, dict(e.headers), e.read().decode()
    try:
        return status, hdrs, json.loads(text)
    except ValueError:
        return status, hdrs, text


def metric(name):
    _, _, text = http("GET", "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} missing")


def rss_kib():
    with open(f"/proc/{ARGS.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def assert_error(status, body, want_status, param=None, what=""):
    check(status == want_status, f"{what}: status {status}, wanted {want_status}: {body}")
    check(isinstance(body, dict) and isinstance(body.get("error"), dict), f"{what}: not an OpenAI error object: {body}")
    err = body["error"]
    for k in ("message", "type", "param", "code"):
        check(k in err, f"{what}: error lacks {k}: {err}")
    check(isinstance(err["message"], str) and err["message"], f"{what}: empty message")
    if param is not None:
        check(err["param"] == param, f"{what}: param {err['param']!r}, wanted {param!r}")


def still_serving():
    status, _, body = http("GET", "/health")
    slots = body.get("slots_idle", -1) + body.get("slots_processing", -1) if isinstance(body, dict) else -2
    check(status == 200 and body.get("status") == "ok" and slots == ARGS.parallel, f"health: {status} {body}")


# ---------------------------------------------------------------------------------------------


def test_models():
    models = CLIENT.models.list().data
    check(len(models) == 1, f"models: {models}")
    global MODEL
    MODEL = models[0].id
    check(CLIENT.models.retrieve(MODEL).id == MODEL, "models.retrieve")
    still_serving()


MSGS = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat():
    r = CLIENT.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12, temperature=0)
    c = r.choices[0]
    check(r.object == "chat.completion", r.object)
    check(c.message.role == "assistant" and isinstance(c.message.content, str) and c.message.content, f"{c}")
    check(c.finish_reason in ("stop", "length"), c.finish_reason)
    u = r.usage
    check(0 < u.completion_tokens <= 12 and u.prompt_tokens > 5, f"usage {u}")
    check(u.total_tokens == u.prompt_tokens + u.completion_tokens, f"usage {u}")
    if c.finish_reason == "length":
        check(u.completion_tokens == 12, f"length with {u.completion_tokens} tokens")
    # Greedy is deterministic; max_completion_tokens is the newer name of max_tokens.
    r2 = CLIENT.chat.completions.create(model=MODEL, messages=MSGS, max_completion_tokens=12, temperature=0)
    check(r2.choices[0].message.content == c.message.content, "greedy answers differ")
    # A seed makes sampling reproducible.
    a = [
        CLIENT.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=10, temperature=1.0, seed=7)
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    check(a[0] == a[1], f"seeded answers differ: {a}")
    return c.message.content


def test_chat_stream(greedy):
    stream = CLIENT.chat.completions.create(
        model=MODEL, messages=MSGS, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    text, finish, usage, roles = "", None, None, []
    for chunk in stream:
        check(chunk.object == "chat.completion.chunk", chunk.object)
        if chunk.usage is not None:
            usage = chunk.usage
            check(chunk.choices == [], "usage chunk has choices")
            continue
        d = chunk.choices[0].delta
        if d.role:
            roles.append(d.role)
        text += d.content or ""
        if chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    check(roles == ["assistant"], f"roles {roles}")
    check(text == greedy, f"stream {text!r} != non-stream {greedy!r}")
    check(finish in ("stop", "length"), finish)
    check(usage is not None and usage.completion_tokens > 0, f"usage {usage}")


def test_stop_strings(greedy):
    # Cut the greedy answer at a word in its middle; neither the stop string nor anything after
    # it may appear, streamed or not.
    words = greedy.split()
    check(len(words) >= 3, f"answer too short to test stop strings: {greedy!r}")
    stop = words[len(words) // 2]
    want = greedy[: greedy.index(stop)]
    r = CLIENT.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12, temperature=0, stop=[stop, "zzzz"])
    check(r.choices[0].message.content == want, f"stop {stop!r}: {r.choices[0].message.content!r} != {want!r}")
    check(r.choices[0].finish_reason == "stop", r.choices[0].finish_reason)
    pieces = []
    for chunk in CLIENT.chat.completions.create(
        model=MODEL, messages=MSGS, max_tokens=12, temperature=0, stop=stop, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    check("".join(pieces) == want, f"streamed stop: {pieces} vs {want!r}")


def test_logprobs():
    r = CLIENT.chat.completions.create(
        model=MODEL, messages=MSGS, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    check(len(content) == r.usage.completion_tokens, f"{len(content)} logprobs for {r.usage.completion_tokens} tokens")
    check("".join(t.token for t in content) == r.choices[0].message.content, "logprob tokens do not spell the answer")
    for t in content:
        check(t.logprob <= 0 and len(t.top_logprobs) == 3, f"{t}")
        tops = [x.logprob for x in t.top_logprobs]
        check(tops == sorted(tops, reverse=True), f"top_logprobs unsorted {tops}")
        # Greedy: the chosen token is the most likely one.
        check(abs(t.logprob - tops[0]) < 1e-5, f"greedy token is not the top one: {t}")


def test_completions():
    prompt = "The capital of France is"
    r = CLIENT.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    text = r.choices[0].text
    check(r.object == "text_completion" and text, f"{r}")
    check(r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason)
    check(r.usage.completion_tokens <= 8, f"{r.usage}")
    streamed = "".join(
        c.choices[0].text
        for c in CLIENT.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True)
        if c.choices
    )
    check(streamed == text, f"{streamed!r} != {text!r}")
    e = CLIENT.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True)
    check(e.choices[0].text.startswith(prompt), f"echo: {e.choices[0].text!r}")
    lp = CLIENT.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=2)
    check(len(lp.choices[0].logprobs.tokens) == lp.usage.completion_tokens, f"{lp.choices[0].logprobs}")
    check(all(len(t) >= 1 for t in lp.choices[0].logprobs.top_logprobs), "completion top_logprobs")
    # Token ids as the prompt give the same answer as the text.
    status, _, toks = http("POST", "/tokenize", {"content": prompt})
    check(status == 200, f"tokenize {toks}")
    r2 = CLIENT.completions.create(model=MODEL, prompt=toks["tokens"], max_tokens=8, temperature=0)
    check(r2.choices[0].text == text, f"id prompt: {r2.choices[0].text!r} != {text!r}")


def test_tokenize():
    for text in ["Hello world", "naïve café 🚀", "<|im_start|>user"]:
        status, _, body = http("POST", "/tokenize", {"content": text})
        check(status == 200 and isinstance(body["tokens"], list) and body["tokens"], f"tokenize {text!r}: {body}")
        status, _, back = http("POST", "/detokenize", {"tokens": body["tokens"]})
        check(status == 200, f"detokenize: {back}")
        if not text.startswith("<|"):
            check(back["content"] == text, f"round trip {text!r} -> {body['tokens']} -> {back['content']!r}")
    status, _, body = http("POST", "/tokenize", {"content": "<|im_start|>", "parse_special": True})
    check(len(body["tokens"]) == 1, f"special token not parsed: {body}")


def test_errors():
    chat = "/v1/chat/completions"
    cases = [
        ("malformed JSON", chat, b'{"messages": [', 400, None),
        ("not JSON", chat, b"hello", 400, None),
        ("empty body", chat, b"", 400, None),
        ("JSON array", chat, b"[1, 2]", 400, None),
        ("missing messages", chat, json.dumps({"model": MODEL}).encode(), 400, "messages"),
        ("messages not a list", chat, json.dumps({"messages": "hi"}).encode(), 400, "messages"),
        ("empty messages", chat, json.dumps({"messages": []}).encode(), 400, "messages"),
        ("missing role", chat, json.dumps({"messages": [{"content": "x"}]}).encode(), 400, "messages[0].role"),
        ("bad role", chat, json.dumps({"messages": [{"role": "x", "content": "x"}]}).encode(), 400, "messages[0].role"),
        ("temperature string", chat, json.dumps({"messages": MSGS, "temperature": "hot"}).encode(), 400, "temperature"),
        ("temperature range", chat, json.dumps({"messages": MSGS, "temperature": 5}).encode(), 400, "temperature"),
        ("max_tokens negative", chat, json.dumps({"messages": MSGS, "max_tokens": -1}).encode(), 400, "max_tokens"),
        ("max_tokens zero", chat, json.dumps({"messages": MSGS, "max_tokens": 0}).encode(), 400, "max_tokens"),
        ("stream not bool", chat, json.dumps({"messages": MSGS, "stream": "yes"}).encode(), 400, "stream"),
        ("stop number", chat, json.dumps({"messages": MSGS, "stop": 5}).encode(), 400, "stop"),
        ("n = 2", chat, json.dumps({"messages": MSGS, "n": 2}).encode(), 400, "n"),
        ("image part", chat, json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(), 400, "messages[0].content[0]"),
        ("completion no prompt", "/v1/completions", b'{"max_tokens": 3}', 400, "prompt"),
        ("completion bad token id", "/v1/completions", b'{"prompt": [999999999]}', 400, "prompt"),
        ("tokenize no content", "/tokenize", b"{}", 400, "content"),
        ("detokenize bad id", "/detokenize", b'{"tokens": [999999999]}', 400, "tokens"),
        ("detokenize mistyped", "/detokenize", b'{"tokens": "abc"}', 400, "tokens"),
    ]
    for what, path, raw, want, param in cases:
        status, _, body = http("POST", path, raw=raw)
        assert_error(status, body, want, param, what)
        if what in ("malformed JSON", "not JSON", "empty body"):
            # docs/SERVER.md: malformed JSON and an empty body are `invalid_json`.
            check(body["error"]["code"] == "invalid_json", f"{what}: {body}")
        still_serving()
    # Oversized prompt: more tokens than the context holds.
    long = " ".join(["word"] * (ARGS.ctx + 50))
    status, _, body = http("POST", chat, {"messages": [{"role": "user", "content": long}], "max_tokens": 4})
    assert_error(status, body, 400, "messages", "oversized prompt")
    check(body["error"]["code"] == "context_length_exceeded", f"{body}")
    status, _, body = http("POST", "/v1/completions", {"prompt": long, "max_tokens": 4})
    assert_error(status, body, 400, "prompt", "oversized completion prompt")
    # Oversized body: over --max-body.
    status, _, body = http("POST", chat, raw=b'{"messages": "' + b"x" * (ARGS.max_body + 10) + b'"}')
    assert_error(status, body, 400, None, "oversized body")
    check(body["error"]["code"] == "request_too_large", f"{body}")
    status, _, body = http("GET", "/v1/nope")
    assert_error(status, body, 404, None, "unknown endpoint")
    status, _, body = http("GET", "/v1/chat/completions")
    assert_error(status, body, 405, None, "wrong method")
    # The openai client maps 400 to BadRequestError.
    try:
        CLIENT.chat.completions.create(model=MODEL, messages=MSGS, temperature=9)
        check(False, "temperature 9 accepted")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and "temperature" in str(e), f"{e}")
    # Unknown fields are ignored.
    r = CLIENT.chat.completions.create(
        model="any-name", messages=MSGS, max_tokens=2, temperature=0,
        extra_body={"no_such_field": {"x": [1]}, "tools_please": True}, user="u1", frequency_penalty=0.0,
    )
    check(r.choices[0].message.content is not None, "unknown fields broke the request")
    still_serving()


def wait_cancelled(before, what):
    deadline = time.time() + 20
    while time.time() < deadline:
        if metric("bitnest_requests_finished_total{outcome=\"cancelled\"}") > before and metric("bitnest_active_requests") == 0:
            return
        time.sleep(0.2)
    check(False, f"{what}: the disconnected request was not cancelled")


def raw_post(path, body):
    u = urlparse(ARGS.base_url)
    s = socket.create_connection((u.hostname, u.port), timeout=60)
    body = json.dumps(body)
    s.sendall(
        (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
         f"Content-Length: {len(body)}\r\n\r\n{body}").encode()
    )
    return s


def test_cancel():
    """A client that disconnects frees its slot: generation stops (streaming or not)."""
    cancelled = "bitnest_requests_finished_total{outcome=\"cancelled\"}"
    before = metric(cancelled)
    s = raw_post("/v1/chat/completions", {"messages": MSGS, "max_tokens": 400, "stream": True, "temperature": 1.0, "seed": 1, "stop": ["never-seen"]})
    got = b""
    while got.count(b"data:") < 3:
        chunk = s.recv(4096)
        check(chunk, "stream ended early")
        got += chunk
    s.close()
    wait_cancelled(before, "streaming")
    before = metric(cancelled)
    # Counting at temperature 0 never reaches an end-of-text token, so the request is still
    # generating when the client leaves (a sampled story could end first on an idle machine).
    s = raw_post("/v1/completions", {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 400, "temperature": 0,
                                     "stop": ["never-seen"]})
    time.sleep(0.5)
    s.close()
    wait_cancelled(before, "non-streaming")
    still_serving()


def one_request(i, max_tokens):
    t0 = time.time()
    kind = i % 4
    prompt = f"Count from {i % 10}:"
    if kind == 0:
        r = CLIENT.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens)
        n = r.usage.completion_tokens
    elif kind == 1:
        n = 0
        for c in CLIENT.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True},
        ):
            if c.usage is not None:
                n = c.usage.completion_tokens
    elif kind == 2:
        r = CLIENT.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens)
        n = r.usage.completion_tokens
    else:
        n = 0
        for c in CLIENT.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}
        ):
            if c.usage is not None:
                n = c.usage.completion_tokens
    return time.time() - t0, n


def test_load():
    clients = int(os.environ.get("BITNEST_LOAD_CLIENTS", "16"))
    per = int(os.environ.get("BITNEST_LOAD_REQUESTS", "8"))
    max_tokens = int(os.environ.get("BITNEST_LOAD_MAX_TOKENS", "4"))
    # Warm every slot first so the RSS baseline includes all KV caches.
    with ThreadPoolExecutor(ARGS.parallel) as ex:
        list(ex.map(lambda i: one_request(i, 2), range(ARGS.parallel)))
    rss0 = rss_kib()
    failures, results = [], []
    lock = threading.Lock()

    def client(c):
        for k in range(per):
            try:
                res = one_request(c * per + k, max_tokens)
                with lock:
                    results.append(res)
            except Exception as e:  # noqa: BLE001 - every failure counts
                with lock:
                    failures.append(repr(e))

    t0 = time.time()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    rss1 = rss_kib()
    lat = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    p50 = statistics.median(lat) if lat else 0
    p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else 0
    report = {
        "clients": clients, "requests_per_client": per, "max_tokens": max_tokens, "ok": len(results),
        "failed": len(failures), "wall_s": round(wall, 2), "p50_s": round(p50, 3), "p95_s": round(p95, 3),
        "completion_tokens": tokens, "aggregate_tok_s": round(tokens / wall, 2),
        "rss_before_mib": round(rss0 / 1024, 1), "rss_after_mib": round(rss1 / 1024, 1),
    }
    print("LOAD " + json.dumps(report), flush=True)
    check(not failures, f"{len(failures)} failed requests, e.g. {failures[:3]}")
    check(len(results) == clients * per, "missing results")
    # Slots are preallocated and reused: serving must not grow memory beyond allocator noise.
    check(rss1 - rss0 < 64 * 1024, f"RSS grew from {rss0} to {rss1} KiB")


def test_overload():
    """More simultaneous requests than slots + queue: the excess gets 503 with Retry-After."""
    n = ARGS.parallel + ARGS.queue + 8
    body = {"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0}
    with ThreadPoolExecutor(n) as ex:
        out = list(ex.map(lambda _: http("POST", "/v1/completions", body), range(n)))
    codes = [s for s, _, _ in out]
    busy = [(h, b) for s, h, b in out if s == 503]
    check(all(c in (200, 503) for c in codes), f"codes {codes}")
    check(codes.count(200) >= ARGS.parallel, f"codes {codes}")
    check(busy, f"no 503 among {n} simultaneous requests: {codes}")
    for h, b in busy:
        check(any(k.lower() == "retry-after" for k in h), f"503 without Retry-After: {h}")
        assert_error(503, b, 503, None, "overload")
    print(f"OVERLOAD {n} simultaneous: {codes.count(200)} served, {len(busy)} got 503", flush=True)
    still_serving()


def test_metrics():
    _, hdrs, text = http("GET", "/metrics")
    for name in [
        "bitnest_requests_total", "bitnest_generated_tokens_total", "bitnest_decode_tokens_per_second",
        "bitnest_queue_depth", "bitnest_speculative_acceptance_rate", "bitnest_prompt_tokens_total",
    ]:
        check(f"# TYPE {name}" in text, f"metric {name} missing")
    check(metric("bitnest_generated_tokens_total") > 0, "no tokens counted")
    check(metric("bitnest_queue_depth") == 0, "queue not empty at rest")


def main():
    global ARGS, CLIENT
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--ctx", type=int, required=True)
    p.add_argument("--parallel", type=int, required=True)
    p.add_argument("--queue", type=int, required=True)
    p.add_argument("--max-body", type=int, required=True)
    p.add_argument("--only", default="")
    ARGS = p.parse_args()
    CLIENT = openai.OpenAI(base_url=ARGS.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    t0 = time.time()
    test_models()
    greedy = test_chat()
    steps = [
        ("chat_stream", lambda: test_chat_stream(greedy)),
        ("stop_strings", lambda: test_stop_strings(greedy)),
        ("logprobs", test_logprobs),
        ("completions", test_completions),
        ("tokenize", test_tokenize),
        ("errors", test_errors),
        ("cancel", test_cancel),
        ("load", test_load),
        ("overload", test_overload),
        ("metrics", test_metrics),
    ]
    for name, f in steps:
        if ARGS.only and name not in ARGS.only.split(","):
            continue
        t = time.time()
        f()
        print(f"ok {name} ({time.time() - t:.1f} s)", flush=True)
    print(f"all server checks passed in {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAIL: {e}", file=sys.stderr)
        sys.exit(1)
