#!/usr/bin/env python3
"""Load test: N concurrent chat clients against `bitnest serve --parallel N` and
`llama-server -np N -c N×CTX` (continuous batching), same model, same per-slot context, same
threads, in one run. Usually run through `bench/serve-load.sh`, which builds and resolves things.

For each server, each N in --clients and each sampling mode (greedy; sampled at temperature 0.8
with a per-request seed), N client threads send the Spec-Bench dev prompts (round robin, chat
template, --max-tokens new tokens, streamed) for --duration seconds; requests in flight at the
end are waited for and counted. Reported per configuration: aggregate decode tok/s (completion
tokens ÷ wall time), mean per-request decode tok/s (tokens after the first ÷ time after the
first), time to first token and total latency p50/p99, errors, and the server's peak RSS
(VmHWM). Writes a JSON-lines file of every configuration and prints a markdown table.
Standard library only.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base, proc, timeout=600):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.5)
    raise RuntimeError("server not ready")


def peak_rss_mib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def scrape(base):
    """bitnest's counters (empty for a server without them)."""
    out = {}
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("bitnest_") and " " in line:
                    k, v = line.rsplit(" ", 1)
                    out[k] = float(v)
    except Exception:  # noqa: BLE001 - llama-server has other metrics, or none
        pass
    return out


def chat_stream(base, body):
    """One streamed chat completion: (completion tokens, ttft s, total s)."""
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    t0 = time.time()
    ttft, chunks, usage = None, 0, None
    with urllib.request.urlopen(req, timeout=900) as r:
        for raw in r:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            ev = json.loads(data)
            if ev.get("usage"):
                usage = ev["usage"].get("completion_tokens")
            for c in ev.get("choices") or []:
                if (c.get("delta") or {}).get("content"):
                    if ttft is None:
                        ttft = time.time() - t0
                    chunks += 1
    total = time.time() - t0
    return (usage if usage is not None else chunks), (ttft if ttft is not None else total), total


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def run_load(base, prompts, clients, duration, max_tokens, sampled):
    lock = threading.Lock()
    state = {"next": 0, "results": [], "errors": 0, "seed": 0}
    deadline = time.time() + duration

    def client():
        while time.time() < deadline:
            with lock:
                q = prompts[state["next"] % len(prompts)]
                state["next"] += 1
                state["seed"] += 1
                seed = state["seed"]
            body = {"messages": [{"role": "user", "content": q}], "max_tokens": max_tokens, "stream": True,
                    "stream_options": {"include_usage": True}}
            if sampled:
                body.update(temperature=0.8, seed=seed)
            else:
                body.update(temperature=0)
            try:
                res = chat_stream(base, body)
                with lock:
                    state["results"].append(res)
            except Exception as e:  # noqa: BLE001 - any failure counts as an error
                with lock:
                    state["errors"] += 1
                print(f"  request failed: {e}", file=sys.stderr)

    t0 = time.time()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    res = state["results"]
    tokens = sum(r[0] for r in res)
    per_req = [(r[0] - 1) / (r[2] - r[1]) for r in res if r[0] > 1 and r[2] > r[1]]
    return {
        "requests": len(res),
        "errors": state["errors"],
        "wall_s": wall,
        "completion_tokens": tokens,
        "aggregate_tok_s": tokens / wall,
        "per_request_tok_s": sum(per_req) / len(per_req) if per_req else 0.0,
        "ttft_p50_s": pct([r[1] for r in res], 50),
        "ttft_p99_s": pct([r[1] for r in res], 99),
        "latency_p50_s": pct([r[2] for r in res], 50),
        "latency_p99_s": pct([r[2] for r in res], 99),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bitnest", required=True, help="the bitnest binary")
    p.add_argument("--llama-server", help="the llama-server binary (omit to measure bitnest only)")
    p.add_argument("--model", required=True, help="GGUF both servers load")
    p.add_argument("--prompts", required=True)
    p.add_argument("--clients", default="1,2,4,8,16")
    p.add_argument("--duration", type=float, default=30)
    p.add_argument("--ctx", type=int, default=2048, help="context per slot")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", default="greedy,sampled")
    p.add_argument("--llama-extra", default="", help="extra llama-server flags (e.g. --no-repack)")
    p.add_argument("--bitnest-extra", default="", help="extra bitnest serve flags (e.g. --spec none)")
    p.add_argument("--out", required=True, help="JSON-lines output")
    p.add_argument("--curve", help="examples/batch_cost output: adds bitnest's batching bound to the table")
    p.add_argument("--report-only", action="store_true", help="only print the tables of the rows in --out")
    a = p.parse_args()
    prompts = [json.loads(line)["turns"][0] for line in open(a.prompts) if line.strip()]
    servers = ["bitnest"] + (["llama.cpp"] if a.llama_server else [])
    rows = [json.loads(line) for line in open(a.out)] if a.report_only else []
    for n in [] if a.report_only else [int(x) for x in a.clients.split(",")]:
        for server in servers:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            if server == "bitnest":
                cmd = [a.bitnest, "serve", "--model", a.model, "--port", str(port), "--parallel", str(n),
                       "--ctx", str(a.ctx), "--threads", str(a.threads), "--queue", "256"] + a.bitnest_extra.split()
            else:
                cmd = [a.llama_server, "-m", a.model, "--port", str(port), "-np", str(n), "-c", str(n * a.ctx),
                       "-t", str(a.threads), "-tb", str(a.threads)] + a.llama_extra.split()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_ready(base, proc)
                # Warm-up: one short request.
                chat_stream(base, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
                                   "temperature": 0, "stream": True})
                for mode in a.modes.split(","):
                    before = scrape(base)
                    r = run_load(base, prompts, n, a.duration, a.max_tokens, mode == "sampled")
                    after = scrape(base)
                    d = lambda k: after.get(k, 0.0) - before.get(k, 0.0)  # noqa: E731
                    if after:
                        # bitnest's own split of the pass time: prompt tokens' share and decode's.
                        pre, dec = d("bitnest_prefill_seconds_total"), d("bitnest_decode_seconds_total")
                        steps = d("bitnest_steps_total")
                        r.update(prefill_share=pre / (pre + dec) if pre + dec else 0.0,
                                 decode_only_tok_s=d("bitnest_generated_tokens_total") / dec if dec else 0.0,
                                 passes=steps,
                                 prompt_tokens=d("bitnest_prompt_tokens_total"),
                                 prompt_tokens_processed=d("bitnest_prompt_tokens_total")
                                 - d("bitnest_prompt_tokens_cached_total"),
                                 generated_tokens=d("bitnest_generated_tokens_total"))
                    r.update(server=server, clients=n, mode=mode, peak_rss_mib=peak_rss_mib(proc.pid),
                             ctx_per_slot=a.ctx, threads=a.threads, max_tokens=a.max_tokens)
                    rows.append(r)
                    with open(a.out, "a") as f:
                        f.write(json.dumps(r) + "\n")
                    print(f"[serve-load] {server:9s} clients {n:2d} {mode:7s}: {r['aggregate_tok_s']:7.1f} tok/s "
                          f"aggregate, {r['per_request_tok_s']:6.1f} per request, ttft p50 {r['ttft_p50_s']:.2f} s, "
                          f"{r['requests']} requests, {r['errors']} errors, rss {r['peak_rss_mib']} MiB",
                          file=sys.stderr, flush=True)
            finally:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    # Markdown table.
    by = {(r["server"], r["clients"], r["mode"]): r for r in rows}
    print("| clients | mode | bitnest agg tok/s | llama.cpp agg tok/s | ratio | bitnest per-req tok/s | "
          "llama.cpp per-req tok/s | bitnest TTFT p50/p99 s | llama.cpp TTFT p50/p99 s | bitnest latency p50/p99 s | "
          "llama.cpp latency p50/p99 s | errors b/l | peak RSS MiB b/l |")
    print("|" + "---|" * 13)
    for n in [int(x) for x in a.clients.split(",")]:
        for mode in a.modes.split(","):
            b, l = by.get(("bitnest", n, mode)), by.get(("llama.cpp", n, mode))
            if not b:
                continue
            f = lambda r, k, d=1: f"{r[k]:.{d}f}" if r else "–"  # noqa: E731
            ratio = f"{b['aggregate_tok_s'] / l['aggregate_tok_s']:.2f}×" if l and l["aggregate_tok_s"] else "–"
            pair = lambda r, k: f"{r[k + '_p50_s']:.2f} / {r[k + '_p99_s']:.2f}" if r else "–"  # noqa: E731
            print(f"| {n} | {mode} | {f(b, 'aggregate_tok_s')} | {f(l, 'aggregate_tok_s')} | {ratio} | "
                  f"{f(b, 'per_request_tok_s')} | {f(l, 'per_request_tok_s')} | {pair(b, 'ttft')} | {pair(l, 'ttft')} | "
                  f"{pair(b, 'latency')} | {pair(l, 'latency')} | {b['errors']}/{l['errors'] if l else '–'} | "
                  f"{b['peak_rss_mib'] or 0:.0f}/{(l['peak_rss_mib'] or 0) if l else 0:.0f} |")
    if a.curve:
        # "n=  8  pass    17.79 ms ... bound × 2.17 aggregate ..." → {8: 2.17}, {8: 17.79};
        # "prefill 256 prompt tokens  pass ... ms  0.6321 ms per token ..." → 0.6321
        bound, pass_ms, prefill_ms = {}, {}, None
        for line in open(a.curve):
            if line.startswith("n=") and "bound ×" in line:
                n = int(line[2:].split()[0])
                bound[n] = float(line.split("bound ×")[1].split()[0])
                pass_ms[n] = float(line.split("pass")[1].split()[0])
            if line.startswith("prefill") and "ms per token" in line:
                prefill_ms = float(line.split("ms per token")[0].split()[-1])
        print()
        print("| clients | mode | bitnest aggregate tok/s | × of 1 client | batch-cost bound × | measured ÷ bound | "
              "prompt share of pass time | decode tokens ÷ decode time | its × of 1 client | its ÷ bound |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for n in [int(x) for x in a.clients.split(",")]:
            for mode in a.modes.split(","):
                b, one = by.get(("bitnest", n, mode)), by.get(("bitnest", 1, mode))
                if not b or not one or n not in bound:
                    continue
                x = b["aggregate_tok_s"] / one["aggregate_tok_s"]
                y = b.get("decode_only_tok_s", 0) / one["decode_only_tok_s"] if one.get("decode_only_tok_s") else 0
                print(f"| {n} | {mode} | {b['aggregate_tok_s']:.1f} | {x:.2f}× | {bound[n]:.2f}× | {x / bound[n]:.2f} | "
                      f"{100 * b.get('prefill_share', 0):.0f}% | {b.get('decode_only_tok_s', 0):.1f} | {y:.2f}× | "
                      f"{y / bound[n]:.2f} |")
        # The curve's bound leaves the prompts out. Priced in: the load's completion tokens as
        # n-token decode passes at the curve's cost, plus its processed prompt tokens (those not
        # reused from a slot's cache) at the measured prefill cost per token.
        if prefill_ms is not None:
            print()
            print("With the prompts priced in (decode passes at the curve's cost, prompt tokens at the "
                  f"prefill pass's {prefill_ms:.4f} ms per token):")
            print()
            print("| clients | mode | completion tokens | prompt tokens processed (of sent) | prompt ÷ completion | "
                  "bound with prompts, tok/s | measured tok/s | measured ÷ bound |")
            print("|---|---|---|---|---|---|---|---|")
            for n in [int(x) for x in a.clients.split(",")]:
                for mode in a.modes.split(","):
                    b = by.get(("bitnest", n, mode))
                    if not b or n not in pass_ms or not b.get("generated_tokens"):
                        continue
                    c, pp = b["generated_tokens"], b["prompt_tokens_processed"]
                    ideal_s = (c / n * pass_ms[n] + pp * prefill_ms) / 1e3
                    bnd = c / ideal_s
                    print(f"| {n} | {mode} | {c:.0f} | {pp:.0f} ({b['prompt_tokens']:.0f}) | {pp / c:.2f} | {bnd:.1f} | "
                          f"{b['aggregate_tok_s']:.1f} | {b['aggregate_tok_s'] / bnd:.2f} |")


if __name__ == "__main__":
    main()
