"""`shardline bench`: a load generator against a running stack.

Sends `--requests` requests with `--concurrency` in flight, each a random prompt of
`--prompt-tokens` token ids generating exactly `--max-tokens` tokens (ignore_eos), and reports
output tok/s, TTFT p50/p99 and TPOT p50/p99. `--baseline hf` runs HF transformers `generate` on
the same model and workload shape in the same run and prints the ratios.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass

import grpc

from shardline.client.client import build_request
from shardline.common.model_source import DEFAULT_MODEL, resolve_model
from shardline.common.server import CHANNEL_OPTIONS
from shardline.v1 import generate_pb2, generate_pb2_grpc


@dataclass
class RequestTiming:
    ttft_s: float
    total_s: float
    output_tokens: int

    @property
    def tpot_s(self) -> float:
        return (self.total_s - self.ttft_s) / max(1, self.output_tokens - 1)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


async def one_request(stub, ids: list[int], max_tokens: int) -> RequestTiming:
    req = build_request(token_ids=ids, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    ttft = None
    n = 0
    async for chunk in stub.Generate(req):
        if chunk.token_ids and ttft is None:
            ttft = time.perf_counter() - t0
        n += len(chunk.token_ids)
    return RequestTiming(ttft or 0.0, time.perf_counter() - t0, n)


async def run_load(address: str, prompts: list[list[int]], max_tokens: int, concurrency: int,
                   progress: bool = True) -> dict:
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as ch:
        stub = generate_pb2_grpc.GenerationStub(ch)
        stats0 = await stub.GetStats(generate_pb2.StatsRequest())
        sem = asyncio.Semaphore(concurrency)
        done = 0
        timings: list[RequestTiming] = []

        async def worker(ids):
            nonlocal done
            async with sem:
                t = await one_request(stub, ids, max_tokens)
            timings.append(t)
            done += 1
            if progress:
                print(f"\r  {done}/{len(prompts)} requests", end="", file=sys.stderr, flush=True)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(p) for p in prompts))
        wall = time.perf_counter() - t0
        if progress:
            print(file=sys.stderr)
        stats1 = await stub.GetStats(generate_pb2.StatsRequest())
    out_tokens = sum(t.output_tokens for t in timings)
    return {
        "requests": len(prompts), "concurrency": concurrency, "output_tokens": out_tokens,
        "wall_s": round(wall, 3), "output_tok_s": round(out_tokens / wall, 2),
        "ttft_p50_ms": round(pct([t.ttft_s for t in timings], 50) * 1e3, 1),
        "ttft_p99_ms": round(pct([t.ttft_s for t in timings], 99) * 1e3, 1),
        "tpot_p50_ms": round(pct([t.tpot_s for t in timings], 50) * 1e3, 2),
        "tpot_p99_ms": round(pct([t.tpot_s for t in timings], 99) * 1e3, 2),
        "step_profile": step_profile(stats0, stats1),
    }


def step_profile(a: generate_pb2.SchedulerStats, b: generate_pb2.SchedulerStats) -> dict:
    """Where a step's time went during the run, per step, summed over replicas (ms)."""
    keys = ("schedule_seconds", "wait_seconds", "compute_seconds", "postprocess_seconds")
    d = {k: sum(getattr(rb, k) - getattr(ra, k) for ra, rb in zip(a.replicas, b.replicas)) for k in keys}
    steps = sum(rb.num_steps - ra.num_steps for ra, rb in zip(a.replicas, b.replicas))
    if not steps:
        return {}
    per = {k.replace("_seconds", "_ms"): round(v / steps * 1e3, 3) for k, v in d.items()}
    per["transfer_and_grpc_ms"] = round(per["wait_ms"] - per["compute_ms"], 3)
    per["steps"] = steps
    return per


class HFBaseline:
    """HF transformers generate() on the same model and workload shape, loaded once so that
    its measurements can be interleaved with the stack's (see benchmarks/e2e_cpu.py)."""

    def __init__(self, model: str, prompt_len: int, dtype: str, device: str, seed: int,
                 threads: int = 0):
        import torch
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        self.torch, self.device, self.prompt_len = torch, device, prompt_len
        print(f"  loading HF transformers model ({dtype}, {device})", file=sys.stderr, flush=True)
        self.m = AutoModelForCausalLM.from_pretrained(
            resolve_model(model), dtype=getattr(torch, dtype)).to(device).eval()
        self.g = torch.Generator().manual_seed(seed)
        self._gen(self._prompts(1), 4)                            # warm-up

    def _prompts(self, batch: int):
        vocab = self.m.config.vocab_size
        return self.torch.randint(100, vocab - 100, (batch, self.prompt_len),
                                  generator=self.g).to(self.device)

    def _gen(self, x, n: int) -> None:
        with self.torch.inference_mode():
            self.m.generate(x, attention_mask=self.torch.ones_like(x), max_new_tokens=n,
                            min_new_tokens=n, do_sample=False, pad_token_id=0)
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def batch1(self, max_tokens: int) -> dict:
        p1 = self._prompts(1)
        t = time.perf_counter(); self._gen(p1, 1); ttft = time.perf_counter() - t
        t = time.perf_counter(); self._gen(p1, max_tokens); dt = time.perf_counter() - t
        return {"hf_b1_ttft_ms": round(ttft * 1e3, 1),
                "hf_b1_decode_tok_s": round((max_tokens - 1) / max(1e-9, dt - ttft), 2)}

    def batched(self, batch: int, max_tokens: int) -> dict:
        pb = self._prompts(batch)
        print(f"  HF batch {batch}", file=sys.stderr, flush=True)
        t = time.perf_counter(); self._gen(pb, max_tokens); dt = time.perf_counter() - t
        return {f"hf_b{batch}_out_tok_s": round(batch * max_tokens / dt, 2)}


def hf_baseline(model: str, prompt_len: int, max_tokens: int, batch: int, dtype: str,
                device: str, seed: int, threads: int = 0) -> dict:
    """HF transformers generate() on the same model and workload shape."""
    hf = HFBaseline(model, prompt_len, dtype, device, seed, threads)
    res = hf.batch1(max_tokens)
    if batch > 1:
        res.update(hf.batched(batch, max_tokens))
    return res


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shardline bench", description=__doc__)
    p.add_argument("--address", default="localhost:50051")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="requests sent (and not counted) first")
    p.add_argument("--baseline", choices=["none", "hf"], default="none")
    p.add_argument("--hf-model", default=None, help="default: the default model")
    p.add_argument("--hf-dtype", default="float32")
    p.add_argument("--hf-device", default="cpu")
    p.add_argument("--json", default=None, help="also write the results to this file")
    a = p.parse_args(argv)
    with grpc.insecure_channel(a.address, options=CHANNEL_OPTIONS) as ch:
        info = generate_pb2_grpc.GenerationStub(ch).GetModelInfo(generate_pb2.ModelInfoRequest(), timeout=30)
    prompts = random_prompts(a.requests + a.warmup, a.prompt_tokens, info.vocab_size, a.seed)
    print(f"bench: {a.requests} requests, concurrency {a.concurrency}, prompt {a.prompt_tokens}, "
          f"output {a.max_tokens} tokens against {a.address} ({info.model}, {info.dtype}, "
          f"{info.device}, {info.num_stages} stage(s) x {info.num_replicas} replica(s))", file=sys.stderr)
    if a.warmup:
        asyncio.run(run_load(a.address, prompts[:a.warmup], a.max_tokens, a.warmup, progress=False))
    res = {"shardline": asyncio.run(run_load(a.address, prompts[a.warmup:], a.max_tokens, a.concurrency))}
    res["shardline"].update(model=info.model, dtype=info.dtype, device=info.device,
                            stages=info.num_stages, replicas=info.num_replicas)
    if a.baseline == "hf":
        hf = hf_baseline(a.hf_model or info.model or DEFAULT_MODEL, a.prompt_tokens, a.max_tokens,
                         a.concurrency, a.hf_dtype, a.hf_device, a.seed)
        res["hf"] = hf
        s = res["shardline"]
        ratios = {}
        if a.concurrency == 1:
            ratios["decode_tok_s_vs_hf_b1"] = round((1e3 / s["tpot_p50_ms"]) / hf["hf_b1_decode_tok_s"], 2)
            ratios["ttft_hf_over_shardline"] = round(hf["hf_b1_ttft_ms"] / s["ttft_p50_ms"], 2)
        else:
            key = f"hf_b{a.concurrency}_out_tok_s"
            ratios[f"out_tok_s_vs_{key}"] = round(s["output_tok_s"] / hf[key], 2)
        res["ratios"] = ratios
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0
