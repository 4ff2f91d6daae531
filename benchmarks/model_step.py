"""Decode-step micro-benchmark: StageRunner.step against HF transformers' forward.

Both run the same converted checkpoint, decoding one token per sequence after a prompt of
--ctx tokens; HF uses its DynamicCache and computes logits for the last position only, then
argmax (our step includes the sampler). Reports the median and the best step time.

    .venv/bin/python benchmarks/model_step.py --threads 2 --hf
    .venv/bin/python benchmarks/model_step.py --device cuda --dtypes bfloat16 --batches 1,16,64
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from shardline.common.model_source import DEFAULT_MODEL, resolve_model
from shardline.models.config import ModelConfig
from shardline.protocol.plan import SamplingConfig, SeqStep
from shardline.worker.build import load_runner
from shardline.worker.heap import keep_freed_memory


def _timed(fn, steps: int, device: str) -> tuple[float, float]:
    fn(0)
    times = []
    for i in range(1, steps + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, min(times) * 1e3


def bench_runner(model_dir, dtype, batch: int, ctx: int, steps: int, device: str):
    num_layers = ModelConfig.from_dir(model_dir).num_layers
    runner = load_runner(model_dir, 0, num_layers, device=device, dtype=dtype,
                         kv_cache_bytes=1 << 30)
    blocks_per_seq = -(-(ctx + steps + 2) // runner.block_size)
    if blocks_per_seq * batch > runner.num_blocks:
        raise SystemExit(f"KV cache too small for batch {batch} x {ctx + steps} tokens")
    prompt = [[1 + (j * 7 + i) % 1000 for j in range(ctx)] for i in range(batch)]
    runner.step([SeqStep(i, prompt[i], 0, list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)),
                         True, admit=True, sampling=SamplingConfig()) for i in range(batch)],
                [], None)

    def decode(k: int):
        runner.step([SeqStep(i, [42], ctx + k, [], True, num_generated=k + 1)
                     for i in range(batch)], [], None)
    return _timed(decode, steps, device)


def bench_hf(model_dir, dtype, batch: int, ctx: int, steps: int, device: str):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    with torch.inference_mode():
        ids = torch.randint(1, 1000, (batch, ctx), device=device)
        cache = model(input_ids=ids, use_cache=True).past_key_values
        tok = torch.full((batch, 1), 42, device=device)

        def decode(k: int):
            out = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            out.logits[:, -1].argmax(-1).tolist()
        return _timed(decode, steps, device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=128, help="prompt tokens before decoding")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--hf", action="store_true", help="also time HF transformers' forward")
    a = p.parse_args()
    keep_freed_memory()                  # as a worker process does (worker/heap.py)
    torch.set_num_threads(a.threads)
    model_dir = resolve_model(a.model)
    for name in a.dtypes.split(","):
        dtype = getattr(torch, name)
        for batch in map(int, a.batches.split(",")):
            med, best = bench_runner(model_dir, dtype, batch, a.ctx, a.steps, a.device)
            line = (f"{name:9s} batch {batch:3d}: runner.step median {med:7.2f} ms "
                    f"(best {best:7.2f})")
            if a.hf:
                med, best = bench_hf(model_dir, dtype, batch, a.ctx, a.steps, a.device)
                line += f" | HF forward median {med:7.2f} ms (best {best:7.2f})"
            print(line, flush=True)


if __name__ == "__main__":
    main()
