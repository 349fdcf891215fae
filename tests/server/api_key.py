#!/usr/bin/env python3
"""Checks `bitnest serve --api-key`: run by `tests/server.rs` against a server started with
BITNEST_API_KEY=KEY.

- Without a key, or with a wrong one, every protected route answers 401 with an OpenAI-style
  error body (`invalid_api_key`) and `WWW-Authenticate: Bearer`; the official `openai` client
  raises its `AuthenticationError`.
- `/health` and `/v1/models` answer without a key.
- With the key, the `openai` client chats, streams and lists models; raw requests to
  `/tokenize` and `/metrics` succeed.
"""

import argparse
import json
import sys
import urllib.error
import urllib.request

import openai


def raw(base, path, body=None, auth=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method="GET" if body is None else "POST")
    req.add_header("Content-Type", "application/json")
    if auth is not None:
        req.add_header("Authorization", auth)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", required=True)
    p.add_argument("--key", required=True)
    a = p.parse_args()
    base, key = a.base_url, a.key
    chat = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    protected = [
        ("/v1/chat/completions", chat),
        ("/v1/completions", {"model": "m", "prompt": "Hi", "max_tokens": 2}),
        ("/tokenize", {"content": "hello"}),
        ("/detokenize", {"tokens": [1]}),
        ("/metrics", None),
        ("/no/such/route", None),
    ]
    checks = 0
    for path, body in protected:
        for auth in [None, "Bearer wrong-" + key, "Bearer " + key + "x", "Basic " + key, "Bearer "]:
            status, headers, text = raw(base, path, body, auth)
            assert status == 401, f"{path} with {auth!r}: status {status}, body {text[:200]}"
            err = json.loads(text)["error"]
            assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error", err
            assert err["message"], err
            assert headers.get("WWW-Authenticate", headers.get("www-authenticate")) == "Bearer", headers
            checks += 1
    for path in ["/health", "/v1/models"]:
        status, _, text = raw(base, path)
        assert status == 200, f"{path} without a key: {status} {text[:200]}"
        checks += 1

    bad = openai.OpenAI(base_url=base + "/v1", api_key="not-" + key, max_retries=0)
    try:
        bad.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401 and "API key" in str(e), e
    checks += 1

    good = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
    r = good.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    assert r.choices[0].message.content is not None and r.usage.completion_tokens > 0, r
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in good.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == r.choices[0].message.content, (streamed, r.choices[0].message.content)
    assert good.models.list().data, "empty model list"
    for path, body in [("/tokenize", {"content": "hello"}), ("/metrics", None)]:
        status, _, text = raw(base, path, body, "Bearer " + key)
        assert status == 200, f"{path} with the key: {status} {text[:200]}"
    checks += 4
    print(f"api key: {checks} checks passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
