"""`shardline bench`: a load generator against a running stack.

Sends `--requests` requests with `--concurrency` in flight, each a random prompt of
`--prompt-tokens` token ids generating exactly `--max-tokens` tokens (ignore_eos), and reports
output tok/s, TTFT p50/p99 and TPOT p50/p99. `--http URL` drives the same workload through the
OpenAI HTTP API instead (streamed /v1/completions with token-id prompts, TTFT and TPOT from the
arrival of the server-sent events); `--both` runs gRPC and then HTTP and prints the HTTP/gRPC
ratios. `--baseline hf` runs HF transformers `generate` on the same model and workload shape in
the same run and prints the ratios. Both APIs present $SHARDLINE_API_KEY when it is set.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import random
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

import grpc

from shardline.client.client import api_key_metadata, build_request
from shardline.client.openai_http import HttpApi
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


async def one_request(stub, ids: list[int], max_tokens: int, metadata=()) -> RequestTiming:
    req = build_request(token_ids=ids, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    ttft = None
    n = 0
    async for chunk in stub.Generate(req, metadata=metadata):
        if chunk.token_ids and ttft is None:
            ttft = time.perf_counter() - t0
        n += len(chunk.token_ids)
    return RequestTiming(ttft or 0.0, time.perf_counter() - t0, n)


def summarize(timings: list[RequestTiming], wall: float, concurrency: int) -> dict:
    out_tokens = sum(t.output_tokens for t in timings)
    return {
        "requests": len(timings), "concurrency": concurrency, "output_tokens": out_tokens,
        "wall_s": round(wall, 3), "output_tok_s": round(out_tokens / wall, 2),
        "ttft_p50_ms": round(pct([t.ttft_s for t in timings], 50) * 1e3, 1),
        "ttft_p99_ms": round(pct([t.ttft_s for t in timings], 99) * 1e3, 1),
        "tpot_p50_ms": round(pct([t.tpot_s for t in timings], 50) * 1e3, 2),
        "tpot_p99_ms": round(pct([t.tpot_s for t in timings], 99) * 1e3, 2),
    }


def _progress(done: int, total: int) -> None:
    print(f"\r  {done}/{total} requests", end="", file=sys.stderr, flush=True)


async def run_load(address: str, prompts: list[list[int]], max_tokens: int, concurrency: int,
                   progress: bool = True, api_key: Optional[str] = None) -> dict:
    """The workload over the gRPC Generate API (api_key: default $SHARDLINE_API_KEY)."""
    md = api_key_metadata(api_key)
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as ch:
        stub = generate_pb2_grpc.GenerationStub(ch)
        stats0 = await stub.GetStats(generate_pb2.StatsRequest(), metadata=md)
        sem = asyncio.Semaphore(concurrency)
        timings: list[RequestTiming] = []

        async def worker(ids):
            async with sem:
                t = await one_request(stub, ids, max_tokens, md)
            timings.append(t)
            if progress:
                _progress(len(timings), len(prompts))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(p) for p in prompts))
        wall = time.perf_counter() - t0
        if progress:
            print(file=sys.stderr)
        stats1 = await stub.GetStats(generate_pb2.StatsRequest(), metadata=md)
    return {**summarize(timings, wall, concurrency), "step_profile": step_profile(stats0, stats1)}


def http_request(api: HttpApi, ids: list[int], max_tokens: int) -> RequestTiming:
    """One streamed /v1/completions request; its first token arrives with the first event
    carrying a choice (every such event holds at least one token), its count with the usage."""
    body = {"prompt": ids, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}   # greedy, as gRPC's
    t0 = time.perf_counter()
    ttft = None
    n = 0
    for event in api.stream("/v1/completions", body):
        if event.get("choices") and ttft is None:
            ttft = time.perf_counter() - t0
        if event.get("usage"):
            n = event["usage"]["completion_tokens"]
    return RequestTiming(ttft or 0.0, time.perf_counter() - t0, n)


def run_http_load(url: str, address: str, prompts: list[list[int]], max_tokens: int,
                  concurrency: int, progress: bool = True, api_key: Optional[str] = None) -> dict:
    """The workload over the OpenAI HTTP API at url, `concurrency` threads each with one
    request in flight; the step profile comes from the gRPC GetStats at address."""
    api = HttpApi(url, api_key)
    md = api_key_metadata(api_key)
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as ch:
        stub = generate_pb2_grpc.GenerationStub(ch)
        stats0 = stub.GetStats(generate_pb2.StatsRequest(), metadata=md, timeout=30)
        timings: list[RequestTiming] = []
        lock = threading.Lock()

        def worker(ids):
            t = http_request(api, ids, max_tokens)
            with lock:
                timings.append(t)
                if progress:
                    _progress(len(timings), len(prompts))

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as ex:
            list(ex.map(worker, prompts))       # raises the first request's error, if any
        wall = time.perf_counter() - t0
        if progress:
            print(file=sys.stderr)
        stats1 = stub.GetStats(generate_pb2.StatsRequest(), metadata=md, timeout=30)
    return {**summarize(timings, wall, concurrency), "step_profile": step_profile(stats0, stats1)}


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


def http_vs_grpc(g: dict, h: dict) -> dict:
    """The HTTP run's numbers over the gRPC run's (throughput < 1, latencies > 1: HTTP costs)."""
    out = {}
    for key in ("output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms"):
        out[key] = round(h[key] / g[key], 3) if g[key] else float("nan")
    return out


def hf_ratios(s: dict, hf: dict, concurrency: int) -> dict:
    if concurrency == 1:
        return {"decode_tok_s_vs_hf_b1": round((1e3 / s["tpot_p50_ms"]) / hf["hf_b1_decode_tok_s"], 2),
                "ttft_hf_over_shardline": round(hf["hf_b1_ttft_ms"] / s["ttft_p50_ms"], 2)}
    key = f"hf_b{concurrency}_out_tok_s"
    return {f"out_tok_s_vs_{key}": round(s["output_tok_s"] / hf[key], 2)}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="shardline bench", description=__doc__)
    p.add_argument("--address", default="localhost:50051",
                   help="the gRPC API (also asked for the model and the step profile with --http)")
    p.add_argument("--http", default=None, metavar="URL",
                   help="drive the OpenAI HTTP API at URL (e.g. http://127.0.0.1:8000) instead")
    p.add_argument("--both", action="store_true",
                   help="with --http: run gRPC, then HTTP, and print the HTTP/gRPC ratios")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="requests sent (and not counted) first")
    p.add_argument("--baseline", choices=["none", "hf"], default="none")
    p.add_argument("--hf-model", default=None, help="default: the default model")
    p.add_argument("--hf-dtype", default="bfloat16",
                   help="dtype of the HF baseline: its fastest on CPUs with AVX512-BF16")
    p.add_argument("--hf-device", default="cpu")
    p.add_argument("--json", default=None, help="also write the results to this file")
    a = p.parse_args(argv)
    if a.both and not a.http:
        p.error("--both needs --http URL")
    return a


def run_api(a: argparse.Namespace, api: str, vocab: int, seed: int) -> dict:
    """One API's run: its warm-up, then the counted requests (prompts of their own seed, so a
    second run finds nothing of the first in the prefix cache)."""
    prompts = random_prompts(a.requests + a.warmup, a.prompt_tokens, vocab, seed)
    warm, counted = prompts[:a.warmup], prompts[a.warmup:]
    print(f"  {api}", file=sys.stderr, flush=True)
    if api == "http":
        if warm:
            run_http_load(a.http, a.address, warm, a.max_tokens, len(warm), progress=False)
        return {"api": "http", **run_http_load(a.http, a.address, counted, a.max_tokens,
                                               a.concurrency)}
    if warm:
        asyncio.run(run_load(a.address, warm, a.max_tokens, len(warm), progress=False))
    return {"api": "grpc", **asyncio.run(run_load(a.address, counted, a.max_tokens,
                                                  a.concurrency))}


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    with grpc.insecure_channel(a.address, options=CHANNEL_OPTIONS) as ch:
        info = generate_pb2_grpc.GenerationStub(ch).GetModelInfo(
            generate_pb2.ModelInfoRequest(), timeout=30, metadata=api_key_metadata())
    apis = ["grpc", "http"] if a.both else ["http"] if a.http else ["grpc"]
    target = " and ".join(a.address if api == "grpc" else a.http for api in apis)
    print(f"bench: {a.requests} requests, concurrency {a.concurrency}, prompt {a.prompt_tokens}, "
          f"output {a.max_tokens} tokens against {target} ({info.model}, {info.dtype}, "
          f"{info.device}, {info.num_stages} stage(s) x {info.num_replicas} replica(s))", file=sys.stderr)
    res = {}
    for i, api in enumerate(apis):
        key = "shardline" if i == 0 else f"shardline_{api}"
        res[key] = run_api(a, api, info.vocab_size, a.seed + i)
        res[key].update(model=info.model, dtype=info.dtype, device=info.device,
                        stages=info.num_stages, replicas=info.num_replicas)
    if a.both:
        res["http_vs_grpc"] = http_vs_grpc(res["shardline"], res["shardline_http"])
    if a.baseline == "hf":
        hf = hf_baseline(a.hf_model or info.model or DEFAULT_MODEL, a.prompt_tokens, a.max_tokens,
                         a.concurrency, a.hf_dtype, a.hf_device, a.seed)
        res["hf"] = hf
        res["ratios"] = hf_ratios(res["shardline"], hf, a.concurrency)
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0
