"""A tensor-parallel stage's decode step inside its processes: the time of one step (embed,
every layer, final norm, head) on T ranks against one unsharded stage, and the part of it spent
in the per-layer sums (waits for the other rank included), on the random checkpoints of
families_cpu.py (made there once if missing).

    .venv/bin/python benchmarks/tp_step.py --shape qwen3-0.6b --tp 1,2
    .venv/bin/python benchmarks/tp_step.py --shape moe-1b --tp 2 --expert-parallel

TP=1 runs with all the cores' threads; each of T ranks with cores / T (as `shardline worker
--tp T` splits them). bf16, the CPU kernels where they apply (the backend is printed).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from families_cpu import make_checkpoint  # noqa: E402

PREFILL = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(runner, steps: int) -> tuple[float, float]:
    """(ms per decode step, ms of it in the backend's sums) after a PREFILL-token prefill."""
    backend = runner.backend
    spent = [0.0]
    reduce = getattr(backend, "reduce", None)
    if reduce is not None:
        def timed(t):
            t0 = time.perf_counter()
            out = reduce(t)
            spent[0] += time.perf_counter() - t0
            return out
        backend.reduce = timed
    table = [list(range(-(-(PREFILL + steps) // runner.block_size)))]
    bs = runner.block_size
    with torch.inference_mode():
        backend.forward(backend.embed(list(range(100, 100 + PREFILL))),
                        backend.build_metadata([0], [PREFILL], table, bs), runner.kv_cache)
        spent[0] = 0.0
        t0 = time.perf_counter()
        for pos in range(PREFILL, PREFILL + steps):
            h = backend.forward(backend.embed([5]), backend.build_metadata([pos], [1], table, bs),
                                runner.kv_cache)
            backend.logits(h)
        total = time.perf_counter() - t0
    return total / steps * 1e3, spent[0] / steps * 1e3


def _load(path: str, a, **tp):
    from shardline.models.config import ModelConfig
    from shardline.worker.build import load_runner
    layers = ModelConfig.from_dir(path).num_layers
    return load_runner(path, 0, layers, dtype="bfloat16", kv_cache_bytes=64 << 20, **tp)


def _rank(rank: int, world: int, port: int, path: str, a, out) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    runner = _load(path, a, tensor_parallel=(rank, world), expert_parallel=a.expert_parallel)
    out[rank] = (runner.backend.name, *_steps(runner, a.steps))
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-0.6b")
    p.add_argument("--tp", default="1,2", help="tensor parallel sizes, comma-separated")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--expert-parallel", action="store_true")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/shardline/bench-models"))
    a = p.parse_args()
    path = str(make_checkpoint(a.shape, pathlib.Path(a.cache)))
    print(f"{a.shape}, bf16, {a.steps} decode steps after a {PREFILL}-token prefill, "
          f"{os.cpu_count()} cores", flush=True)
    print("| T | backend | ms per step | ms in the sums (per rank) |\n|---|---|---|---|")
    for t in (int(x) for x in a.tp.split(",")):
        if t == 1:
            runner = _load(path, a)
            ms, _ = _steps(runner, a.steps)
            print(f"| 1 | {runner.backend.name} | {ms:.1f} | - |", flush=True)
            del runner
            continue
        out = mp.Manager().dict()
        mp.start_processes(_rank, args=(t, _free_port(), path, a, out), nprocs=t,
                           start_method="spawn")
        names = {out[r][0] for r in range(t)}
        ms = max(out[r][1] for r in range(t))
        sums = " / ".join(f"{out[r][2]:.1f}" for r in range(t))
        print(f"| {t}{' EP' if a.expert_parallel else ''} | {', '.join(names)} | {ms:.1f} | "
              f"{sums} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
