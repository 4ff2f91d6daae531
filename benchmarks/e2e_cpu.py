"""End-to-end benchmark through the whole stack, with peers measured in the same run.

Starts `shardline up`-equivalent processes on the default model, measures
  * batch-1 decode (TPOT) and TTFT for a 128-token prompt (concurrency 1),
  * throughput with 16 concurrent requests,
interleaved, round by round, with HF transformers `generate` (--hf-dtype, bfloat16: its fastest
on this CPU) on the same shapes and
llama.cpp (llama-cpp-python, same GGUF) when `--llamacpp-python` points at a Python that has
it. Prints a markdown table of medians and per-round ratios; `--json` writes everything.

    .venv/bin/python benchmarks/e2e_cpu.py --dtype bfloat16 --json /tmp/e2e.json
"""
from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from shardline.client.bench import HFBaseline, random_prompts, run_load
from shardline.launcher import build_stack, free_port
from shardline.common.model_source import DEFAULT_MODEL, resolve_model

LLAMACPP = r'''
import ctypes, json, sys, time, random
# ggml's CPU backend uses AMX tiles where the CPU has them, but does not ask Linux for them
# (arch_prctl ARCH_REQ_XCOMP_PERM): without this request it dies of SIGILL on such CPUs
ctypes.CDLL(None, use_errno=True).syscall(158, 0x1023, 18)
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


def cpu_model() -> str:
    """The CPU's model name and its AMX / AVX512-BF16 support, from /proc/cpuinfo."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines()
                      if line.startswith("flags")), []))
    found = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(found) or 'no AVX512-BF16'})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--hf-dtype", default="bfloat16",
                   help="dtype of the HF baseline (measure it at its best)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--llamacpp-python", default=None)
    p.add_argument("--gguf", default=None)
    p.add_argument("--extra-worker-args", default="")
    p.add_argument("--json", default=None)
    p.add_argument("--verbose", action="store_true", help="show the services' logs")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    model_dir = str(resolve_model(DEFAULT_MODEL))
    port = free_port()
    stack = build_stack(model_dir, DEFAULT_MODEL, 1, port, "cpu", a.dtype, "512MiB", a.threads,
                        quiet=not a.verbose, worker_extra=a.extra_worker_args.split())
    res: dict = {"machine": f"{cpu_model()}, {os.cpu_count()} cores",
                 "date": time.strftime("%Y-%m-%d"), "dtype": a.dtype, "threads": a.threads,
                 "worker_args": a.extra_worker_args}
    gguf = a.gguf or find_gguf()
    hf = HFBaseline(DEFAULT_MODEL, a.prompt_tokens, a.hf_dtype, "cpu", 0, threads=a.threads)
    print(f"starting stack ({a.dtype}, {a.threads} threads)", file=sys.stderr, flush=True)
    stack.start()
    rounds = []
    try:
        if not stack.wait_ready(300):
            raise SystemExit("stack failed to start")
        addr = stack.scheduler_address
        warm = random_prompts(2, a.prompt_tokens, 49152, 99)
        asyncio.run(run_load(addr, warm, 8, 1, progress=False))
        # rounds interleave the stack and its baselines: the host's speed drifts (shared
        # memory bandwidth), so each round's ratio compares figures taken a few seconds apart
        for r in range(a.rounds):
            print(f"round {r + 1}/{a.rounds}: batch 1", file=sys.stderr, flush=True)
            one = {"b1": asyncio.run(run_load(addr, random_prompts(4, a.prompt_tokens, 49152, r),
                                              a.max_tokens, 1, progress=False))}
            one["hf"] = hf.batch1(a.max_tokens)
            if a.llamacpp_python and gguf:
                out = subprocess.run([a.llamacpp_python, "-c", LLAMACPP, gguf,
                                      str(a.prompt_tokens), str(a.max_tokens), str(a.threads)],
                                     capture_output=True, text=True)
                one["llamacpp"] = (json.loads(out.stdout.strip().splitlines()[-1])
                                   if out.returncode == 0 else {"error": out.stderr[-500:]})
            print(f"round {r + 1}/{a.rounds}: concurrency {a.concurrency}", file=sys.stderr,
                  flush=True)
            one["cN"] = asyncio.run(run_load(
                addr, random_prompts(2 * a.concurrency, a.prompt_tokens, 49152, 100 + r),
                a.max_tokens, a.concurrency, progress=False))
            one["hf"].update(hf.batched(a.concurrency, a.max_tokens))
            rounds.append(one)
    finally:
        stack.stop()
    res["rounds"] = rounds
    n = a.concurrency
    per = {
        "decode": [1e3 / o["b1"]["tpot_p50_ms"] for o in rounds],
        "hf_decode": [o["hf"]["hf_b1_decode_tok_s"] for o in rounds],
        "ttft": [o["b1"]["ttft_p50_ms"] for o in rounds],
        "hf_ttft": [o["hf"]["hf_b1_ttft_ms"] for o in rounds],
        "cN": [o["cN"]["output_tok_s"] for o in rounds],
        "hf_bN": [o["hf"][f"hf_b{n}_out_tok_s"] for o in rounds],
    }
    ratios = {
        "decode": [x / y for x, y in zip(per["decode"], per["hf_decode"])],
        "ttft": [y / x for x, y in zip(per["ttft"], per["hf_ttft"])],
        "cN": [x / y for x, y in zip(per["cN"], per["hf_bN"])],
    }
    med = statistics.median
    res["medians"] = {k: med(v) for k, v in per.items()}
    res["ratios"] = ratios

    def show(v):
        return ", ".join(f"{x:.2f}" for x in v)
    rows = [
        ("batch-1 decode tok/s", f"{med(per['decode']):.1f}", f"{med(per['hf_decode']):.1f}",
         f"{med(ratios['decode']):.2f}x ({show(ratios['decode'])})"),
        (f"TTFT {a.prompt_tokens}-token prompt (ms)", f"{med(per['ttft']):.0f}",
         f"{med(per['hf_ttft']):.0f}", f"{med(ratios['ttft']):.2f}x faster"),
        (f"{n} concurrent, output tok/s", f"{med(per['cN']):.1f}", f"{med(per['hf_bN']):.1f}",
         f"{med(ratios['cN']):.2f}x ({show(ratios['cN'])})"),
    ]
    print(f"\n| metric | shardline ({a.dtype}) | HF transformers ({a.hf_dtype}) | ratio, median (per round) |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    lc = [o["llamacpp"]["llamacpp_b1_decode_tok_s"] for o in rounds
          if "llamacpp_b1_decode_tok_s" in o.get("llamacpp", {})]
    if lc:
        lr = [d / x for d, x in zip(per["decode"], lc)]
        print(f"| batch-1 decode vs llama.cpp (Q4_1 GGUF) | {med(per['decode']):.1f} | "
              f"llama.cpp {med(lc):.1f} | {med(lr):.2f}x ({show(lr)}) |")
    last = rounds[-1]
    print(f"\nlast round: TTFT p99 {last['b1']['ttft_p99_ms']} ms, TPOT p99 "
          f"{last['b1']['tpot_p99_ms']} ms (batch 1); {n}-concurrent TTFT p50 "
          f"{last['cN']['ttft_p50_ms']} ms, TPOT p50 {last['cN']['tpot_p50_ms']} ms")
    print(f"step profile, batch 1 (ms per step): {last['b1']['step_profile']}")
    print(f"step profile, {n} concurrent (ms per step): {last['cN']['step_profile']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
