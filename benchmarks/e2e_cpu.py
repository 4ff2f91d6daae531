"""End-to-end benchmark through the whole stack, with peers measured in the same run.

Starts `shardline up`-equivalent processes on the default model, measures
  * batch-1 decode (TPOT) and TTFT for a 128-token prompt (concurrency 1),
  * throughput with 16 concurrent requests,
then stops the stack and measures HF transformers `generate` (float32) on the same shapes,
and llama.cpp (llama-cpp-python, same GGUF) when `--llamacpp-python` points at a Python
that has it. Prints a markdown table of figures and ratios; `--json` writes everything.

    .venv/bin/python benchmarks/e2e_cpu.py --dtype bfloat16 --json /tmp/e2e.json
"""
from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import platform
import subprocess
import sys
import time

from shardline.client.bench import hf_baseline, random_prompts, run_load
from shardline.launcher import build_stack, free_port
from shardline.worker.loader import DEFAULT_MODEL, resolve_model

LLAMACPP = r'''
import json, sys, time, random
from llama_cpp import Llama
gguf, n_prompt, n_out, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=gguf, n_ctx=1024, n_threads=threads, verbose=False, n_batch=512)
rng = random.Random(0)
ids = [rng.randrange(100, 49000) for _ in range(n_prompt)]
llm.reset(); llm.eval(ids[:8])
llm.reset(); t = time.perf_counter(); llm.eval(ids); ttft = time.perf_counter() - t
t = time.perf_counter()
for i in range(n_out):
    tok = llm.sample(temp=0.0)
    llm.eval([tok if tok != llm.token_eos() else 100])
dt = time.perf_counter() - t
print(json.dumps({"llamacpp_prefill_ms": round(ttft * 1e3, 1), "llamacpp_b1_decode_tok_s": round(n_out / dt, 1)}))
'''


def find_gguf() -> str | None:
    hits = glob.glob(os.path.expanduser("~/.cache/shardline/gguf/*.gguf")) + \
        glob.glob(os.path.expanduser("~/.cache/shardline/**/*.gguf"), recursive=True)
    return hits[0] if hits else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--llamacpp-python", default=None)
    p.add_argument("--gguf", default=None)
    p.add_argument("--extra-worker-args", default="")
    p.add_argument("--json", default=None)
    p.add_argument("--verbose", action="store_true", help="show the services' logs")
    a = p.parse_args()
    model_dir = str(resolve_model(DEFAULT_MODEL))
    port = free_port()
    stack = build_stack(model_dir, DEFAULT_MODEL, 1, port, "cpu", a.dtype, "512MiB", a.threads,
                        quiet=not a.verbose, worker_extra=a.extra_worker_args.split())
    res: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                 "date": time.strftime("%Y-%m-%d"), "dtype": a.dtype, "threads": a.threads,
                 "worker_args": a.extra_worker_args}
    print(f"starting stack ({a.dtype}, {a.threads} threads)", file=sys.stderr, flush=True)
    stack.start()
    try:
        if not stack.wait_ready(300):
            raise SystemExit("stack failed to start")
        addr = stack.scheduler_address
        warm = random_prompts(2, a.prompt_tokens, 49152, 99)
        asyncio.run(run_load(addr, warm, 8, 1, progress=False))
        print("batch 1 (concurrency 1)", file=sys.stderr, flush=True)
        res["b1"] = asyncio.run(run_load(addr, random_prompts(5, a.prompt_tokens, 49152, 1),
                                         a.max_tokens, 1))
        print(f"concurrency {a.concurrency}", file=sys.stderr, flush=True)
        res[f"c{a.concurrency}"] = asyncio.run(run_load(
            addr, random_prompts(2 * a.concurrency, a.prompt_tokens, 49152, 2), a.max_tokens,
            a.concurrency))
    finally:
        stack.stop()
    print("HF transformers baseline (float32)", file=sys.stderr, flush=True)
    res["hf"] = hf_baseline(DEFAULT_MODEL, a.prompt_tokens, a.max_tokens, a.concurrency,
                            "float32", "cpu", 0, threads=a.threads)
    gguf = a.gguf or find_gguf()
    if a.llamacpp_python and gguf:
        print("llama.cpp baseline", file=sys.stderr, flush=True)
        out = subprocess.run([a.llamacpp_python, "-c", LLAMACPP, gguf, str(a.prompt_tokens),
                              str(a.max_tokens), str(a.threads)], capture_output=True, text=True)
        res["llamacpp"] = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 \
            else {"error": out.stderr[-500:]}
    b1, cN, hf = res["b1"], res[f"c{a.concurrency}"], res["hf"]
    decode = 1e3 / b1["tpot_p50_ms"]
    rows = [
        ("batch-1 decode tok/s", f"{decode:.1f}", f"{hf['hf_b1_decode_tok_s']:.1f}",
         f"{decode / hf['hf_b1_decode_tok_s']:.2f}x"),
        (f"TTFT {a.prompt_tokens}-token prompt (ms)", f"{b1['ttft_p50_ms']:.0f}",
         f"{hf['hf_b1_ttft_ms']:.0f}", f"{hf['hf_b1_ttft_ms'] / b1['ttft_p50_ms']:.2f}x faster"),
        (f"{a.concurrency} concurrent, output tok/s", f"{cN['output_tok_s']:.1f}",
         f"{hf[f'hf_b{a.concurrency}_out_tok_s']:.1f}",
         f"{cN['output_tok_s'] / hf[f'hf_b{a.concurrency}_out_tok_s']:.2f}x"),
    ]
    print(f"\n| metric | shardline ({a.dtype}) | HF transformers (float32) | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if "llamacpp" in res and "llamacpp_b1_decode_tok_s" in res["llamacpp"]:
        lc = res["llamacpp"]["llamacpp_b1_decode_tok_s"]
        print(f"| batch-1 decode vs llama.cpp (Q4_1 GGUF) | {decode:.1f} | llama.cpp {lc:.1f} | "
              f"{decode / lc:.2f}x |")
    print(f"\nTTFT p99 {b1['ttft_p99_ms']} ms, TPOT p99 {b1['tpot_p99_ms']} ms (batch 1); "
          f"{a.concurrency}-concurrent TTFT p50 {cN['ttft_p50_ms']} ms, TPOT p50 {cN['tpot_p50_ms']} ms")
    print(f"step profile, batch 1 (ms per step): {b1['step_profile']}")
    print(f"step profile, {a.concurrency} concurrent (ms per step): {cN['step_profile']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
