"""Shared-prefix workload: prefix caching on vs off, and cache-aware vs random routing.

A. One replica: a long system prompt (~1,500 tokens) plus short questions from concurrent
   clients, with automatic prefix caching on and off (`--no-prefix-caching`), same run.
B. Two replicas: several system prompts, cache-aware routing vs random assignment
   (`--routing random`): cached-token ratio and throughput.

    .venv/bin/python benchmarks/prefix_cache.py --clients 16
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import time

from shardline.client import Client
from shardline.launcher import build_stack, free_port
from shardline.common.model_source import DEFAULT_MODEL, resolve_model

PARA = ("Our store sells garden tools, seeds, soil, pots and outdoor furniture. Orders ship within "
        "two business days; returns are accepted for thirty days with a receipt. ")


def system_prompt(i: int, words: int) -> str:
    base = f"You are assistant number {i} of the shop. " + PARA * (words // len(PARA.split()) + 1)
    return " ".join(base.split()[:words])


def run(address, prompts, concurrency, max_tokens):
    def one(msgs):
        with Client(address) as c:
            t0 = time.perf_counter()
            ttft, usage = None, None
            for ch in c.stream(messages=msgs, max_tokens=max_tokens, ignore_eos=True):
                if ch.token_ids and ttft is None:
                    ttft = time.perf_counter() - t0
                usage = ch.usage or usage
            return ttft, usage
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as ex:
        out = list(ex.map(one, prompts))
    wall = time.perf_counter() - t0
    ttfts = [o[0] for o in out]
    prompt = sum(o[1].prompt_tokens for o in out)
    cached = sum(o[1].cached_tokens for o in out)
    return {"requests": len(prompts), "ttft_p50_ms": round(statistics.median(ttfts) * 1e3, 1),
            "ttft_max_ms": round(max(ttfts) * 1e3, 1),
            "output_tok_s": round(len(prompts) * max_tokens / wall, 2), "wall_s": round(wall, 2),
            "prompt_tokens": prompt, "cached_tokens": cached,
            "cached_ratio": round(cached / prompt, 3)}


def with_stack(model_dir, replicas, threads, extra, fn):
    port = free_port()
    s = build_stack(model_dir, DEFAULT_MODEL, 1, port, "cpu", "bfloat16", "512MiB", threads,
                    extra, replicas=replicas, quiet=True)
    s.start()
    try:
        if not s.wait_ready(300):
            raise SystemExit("stack failed to start")
        return fn(s.scheduler_address)
    finally:
        s.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--prefix-words", type=int, default=1100, help="~1.35 tokens per word")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    model_dir = str(resolve_model(DEFAULT_MODEL))
    sysp = system_prompt(0, a.prefix_words)
    qs = [[{"role": "system", "content": sysp}, {"role": "user", "content": f"Question {i}: do you ship to town {i}?"}]
          for i in range(a.clients)]
    res = {"date": time.strftime("%Y-%m-%d"), "clients": a.clients}

    def part_a(addr):
        run(addr, qs[:1], 1, a.max_tokens)                     # one request warms the prefix
        return run(addr, qs, a.clients, a.max_tokens)
    for name, extra in (("cache_on", []), ("cache_off", ["--no-prefix-caching"])):
        print(f"A: {name}", file=sys.stderr, flush=True)
        res[name] = with_stack(model_dir, 1, 2, extra, part_a)
    res["ttft_p50_speedup"] = round(res["cache_off"]["ttft_p50_ms"] / res["cache_on"]["ttft_p50_ms"], 2)

    prompts = [[{"role": "system", "content": system_prompt(k, 300)},
                {"role": "user", "content": f"Question {i}?"}] for i in range(24) for k in [i % 4]]
    for name, extra in (("cache_aware", []), ("random", ["--routing", "random"])):
        print(f"B: {name}", file=sys.stderr, flush=True)
        res[name] = with_stack(model_dir, 2, 1, extra, lambda addr: run(addr, prompts, 4, a.max_tokens))
    print(json.dumps(res, indent=1))
    if a.json:
        json.dump(res, open(a.json, "w"), indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
