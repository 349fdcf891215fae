#!/usr/bin/env python3
"""The prefix-affinity key of a request to `bitnest serve` (key version 1, docs/SERVER.md).

Send it as the header `X-Bitnest-Prefix` and a router that hashes on it (deploy/nginx.conf)
sends every turn of a conversation to the replica that already holds its prefix:

    from prefix_key import chat_key
    client.chat.completions.create(model=..., messages=messages,
                                   extra_headers={"X-Bitnest-Prefix": chat_key(messages)})

The server computes the same key for every request and returns it in the same response header.
Standard library only; copy this file into a client.
"""
import hashlib
import sys

HEADER = "X-Bitnest-Prefix"
COMPLETION_PREFIX_BYTES = 2048


def _text(content):
    """A message's text: a string, or a list of text parts joined with nothing."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text") or "" for p in content if p.get("type") == "text")


def _key(data):
    return "p1-" + hashlib.sha256(data).hexdigest()[:16]


def chat_key(messages):
    """The key of a chat request: its messages up to and including the first user message."""
    data = bytearray()
    for m in messages:
        data += m["role"].encode() + b"\n" + _text(m.get("content")).encode() + b"\x1e"
        if m["role"] == "user":
            break
    return _key(bytes(data))


def completion_key(prompt):
    """The key of a completion request: the prompt's first 2048 bytes (whole characters), or for
    a list of token ids their decimal values joined by commas, within the same bytes."""
    if isinstance(prompt, str):
        raw = prompt.encode()[:COMPLETION_PREFIX_BYTES].decode(errors="ignore")
        return _key(b"prompt\n" + raw.encode())
    text = ""
    for i, t in enumerate(prompt):
        nxt = str(t) if i == 0 else f",{t}"
        if len(text) + len(nxt) > COMPLETION_PREFIX_BYTES:
            break
        text += nxt
    return _key(b"prompt\n" + text.encode())


if __name__ == "__main__":
    # python3 deploy/prefix_key.py < request.json : the key of a request body.
    import json

    body = json.load(sys.stdin)
    print(chat_key(body["messages"]) if "messages" in body else completion_key(body["prompt"]))
