#!/usr/bin/env python3
"""How many tokens per verification pass context lookup could give if drafted nodes cost nothing.

Decodes each prompt greedily with `bitnest run` (the plain output is what any lossless
speculative run must reproduce), then replays the output offline: at every step the lookup
source proposes continuations of the context, and the step accepts the longest proposed prefix
of what the model actually wrote next, plus the one token every pass adds. Nothing is timed, so
the figures hold on any machine; they bound what `--spec lookup` can reach whatever its tree
sizing, and show whether more chains or longer ones would be worth their nodes. It also counts
the outputs that end in a repetition loop, since those are where lookup gains most.

  python3 bench/lookup-ceiling.py --model F.bnest --bits 4 --per-category 10
  python3 bench/lookup-ceiling.py --model F.gguf --bits all --per-category 10

Variants: `recent` is what `src/spec/lookup.rs` proposes (the continuation of the most recent
occurrence of the longest matching suffix, 4 tokens down to 1); `branches B` adds the
continuations of up to B distinct earlier occurrences of that suffix as sibling branches.
"""
import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile

MAX_NGRAM = 4


def continuations(h, length):
    """Continuations (most recent first) of every earlier occurrence of h's longest matching suffix."""
    for n in range(min(MAX_NGRAM, len(h) - 1), 0, -1):
        suffix = h[len(h) - n:]
        found = [h[i + n:i + n + length] for i in range(len(h) - n - 1, -1, -1) if h[i:i + n] == suffix]
        if found:
            return found
    return []


def looped(gen, tail=48):
    """Whether the output ends in a loop: its last `tail` tokens repeat with a period of at most 24."""
    t = gen[-tail:]
    return len(t) == tail and any(all(t[i] == t[i - p] for i in range(p, tail)) for p in range(1, 25))


def replay(outputs, length, branches):
    """(tokens per pass, nodes per pass) over the outputs, each a (prompt ids, generated ids)."""
    steps = tokens = nodes = 0
    for prompt, gen in outputs:
        i = 0
        while i < len(gen):
            distinct = list(dict.fromkeys(tuple(c) for c in continuations(prompt + gen[:i], length)))
            trie = {c[:k] for c in distinct[:branches] for k in range(1, len(c) + 1)}
            acc = 0
            while i + acc < len(gen) and tuple(gen[i:i + acc + 1]) in trie:
                acc += 1
            steps += 1
            tokens += min(acc + 1, len(gen) - i)
            nodes += 1 + len(trie)
            i += acc + 1
    return tokens / steps, nodes / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--bits", default="4", help="planes to read from a .bnest; 'all' for a GGUF or every plane")
    ap.add_argument("--prompts", default=os.path.join(os.path.dirname(__file__), "../../shared/data/specbench-dev.jsonl"))
    ap.add_argument("--per-category", default="10")
    ap.add_argument("--max-tokens", default="128")
    ap.add_argument("--bitnest", default=os.path.join(os.path.dirname(__file__), "../target/release/bitnest"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rendered = os.path.join(work, "prompts.jsonl")
        subprocess.run([a.bitnest, "bench", "spec", "--model", a.model, "--prompts", a.prompts,
                        "--per-category", a.per_category, "--dump-prompts", rendered], check=True)
        by_cat = collections.defaultdict(list)
        for line in open(rendered):
            p = json.loads(line)
            bits = [] if a.bits == "all" else ["--bits", a.bits]
            r = subprocess.run([a.bitnest, "run", "--model", a.model, *bits, "--temperature", "0",
                                "--max-tokens", a.max_tokens, "--format", "json", "--prompt", p["text"]],
                               check=True, capture_output=True, text=True)
            j = json.loads(r.stdout)
            by_cat[p["category"]].append((j["prompt_ids"], j["ids"]))
            print(".", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    everything = [o for v in by_cat.values() for o in v]
    cats = sorted(by_cat)
    print("| lookup drafts | longest chain | tokens per pass (all) | nodes per pass | " + " | ".join(cats) + " |")
    print("|---|---|---|---|" + "---|" * len(cats))
    for branches in (1, 2, 3):
        for length in (6, 10):
            mat, npp = replay(everything, length, branches)
            per = " | ".join(f"{replay(by_cat[c], length, branches)[0]:.2f}" for c in cats)
            name = "recent" if branches == 1 else f"branches {branches}"
            print(f"| {name} | {length} | {mat:.2f} | {npp:.1f} | {per} |")
    # Lookup feeds on repetition, and small quantized models fall into greedy loops: say how much
    # of the figure above comes from outputs that end in one.
    loops_by_cat = {c: [o for o in by_cat[c] if looped(o[1])] for c in cats}
    loops = [o for c in cats for o in loops_by_cat[c]]
    rest = [o for o in everything if o not in loops]
    print(f"\noutputs ending in a loop (period <= 24 over the last 48 tokens): {len(loops)}/{len(everything)} "
          f"({', '.join(f'{c} {len(loops_by_cat[c])}' for c in cats)})")
    for name, part in (("in a loop", loops), ("not in a loop", rest)):
        if part:
            print(f"recent, chain 6, outputs {name}: {replay(part, 6, 1)[0]:.2f} tokens per pass")


if __name__ == "__main__":
    main()
