"""Weight variants through the whole stack on the CPU: batch-1 decode and 16-concurrent
throughput per variant, rounds interleaved (variant A, B, C, A, B, C, ...) so that a noisy
host shifts every variant alike; medians reported, with ratios to the bf16 variant.

    .venv/bin/python benchmarks/weights_stack.py --rounds 3 --json /tmp/weights_stack.json
    .venv/bin/python benchmarks/weights_stack.py --variants none,int4-head --rounds 2

Each variant is one `shardline up`-equivalent stack (tokenizer, scheduler, one worker) with the
worker flags below; prompts of 128 random tokens, 64 output tokens, ignore_eos.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

from shardline.client.bench import random_prompts, run_load
from shardline.launcher import build_stack, free_port
from shardline.common.model_source import DEFAULT_MODEL, resolve_model

VARIANTS = {
    "none": [],
    "int8": ["--quantize", "int8"],
    "int8-head": ["--quantize", "int8", "--quantize-head"],
    "int4": ["--quantize", "int4"],
    "int4-head": ["--quantize", "int4", "--quantize-head"],
    "unfused": ["--no-fuse"],
    "no-kernels": ["--no-cpu-kernels"],
}


def worker_rss_mib(stack) -> float:
    """The worker's resident memory (weights as held, 512 MiB of KV cache, the runtime)."""
    worker = next(c for c in stack.children if c.name.startswith("worker"))
    with open(f"/proc/{worker.proc.pid}/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return round(kib / 1024)


def measure(model_dir: str, args: list[str], a) -> dict:
    stack = build_stack(model_dir, DEFAULT_MODEL, 1, free_port(), "cpu", "bfloat16", "512MiB",
                        a.threads, quiet=True, worker_extra=args)
    stack.start()
    try:
        if not stack.wait_ready(300):
            raise SystemExit(f"stack with {args} failed to start")
        addr = stack.scheduler_address
        asyncio.run(run_load(addr, random_prompts(2, 128, 49152, 99), 8, 1, progress=False))
        b1 = asyncio.run(run_load(addr, random_prompts(4, 128, 49152, 1), 64, 1, progress=False))
        out = {"b1_tok_s": round(1e3 / b1["tpot_p50_ms"], 1), "ttft_ms": b1["ttft_p50_ms"]}
        if a.concurrency:
            c = asyncio.run(run_load(addr, random_prompts(2 * a.concurrency, 128, 49152, 2), 64,
                                     a.concurrency, progress=False))
            out["cN_tok_s"] = round(c["output_tok_s"], 1)
        out["worker_rss_mib"] = worker_rss_mib(stack)
        return out
    finally:
        stack.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="none,int8-head,int4-head")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--concurrency", type=int, default=16, help="0: batch 1 only")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    model_dir = str(resolve_model(DEFAULT_MODEL))
    names = a.variants.split(",")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(a.rounds):
        for n in names:
            res = measure(model_dir, VARIANTS[n], a)
            runs[n].append(res)
            print(f"round {r + 1}/{a.rounds} {n}: {res}", file=sys.stderr, flush=True)
    med = {n: {k: statistics.median(x[k] for x in runs[n]) for k in runs[n][0]} for n in names}
    base = med.get("none")
    print(f"\n| variant | batch-1 decode tok/s | vs bf16 | TTFT ms | {a.concurrency} concurrent "
          "tok/s | worker RSS MiB |")
    print("|---|---|---|---|---|---|")
    for n in names:
        m = med[n]
        ratio = f"{m['b1_tok_s'] / base['b1_tok_s']:.2f}x" if base else ""
        print(f"| {n} | {m['b1_tok_s']:.1f} | {ratio} | {m['ttft_ms']:.0f} | "
              f"{m.get('cN_tok_s', '')} | {m['worker_rss_mib']:.0f} |")
    print(f"\n(medians of {a.rounds} interleaved rounds; per round: "
          + "; ".join(f"{n} {[x['b1_tok_s'] for x in runs[n]]}" for n in names) + ")")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "runs": runs, "medians": med}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
