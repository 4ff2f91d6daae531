"""What tensor parallelism's collectives cost on this machine: torch.distributed all_reduce of
one step's [rows, hidden] activations between T ranks (gloo on the CPU, NCCL on CUDA), the op
a sharded stage runs twice per layer (after attention and after the MLP), plus the per-step
total for a model's layer count.

    .venv/bin/python benchmarks/tp_allreduce.py --world 2 --hidden 576,4096 --rows 1,16 --layers 30
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, args, out) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    results = {}
    for hidden in args.hidden:
        for rows in args.rows:
            x = torch.randn(rows, hidden, dtype=getattr(torch, args.dtype), device=dev)
            for _ in range(10):
                dist.all_reduce(x)
            times = []
            for _ in range(args.iters):
                if cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                dist.all_reduce(x)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            results[(hidden, rows)] = statistics.median(times) * 1e6
    if rank == 0:
        out.put(results)
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--hidden", type=lambda s: [int(x) for x in s.split(",")], default=[576, 4096])
    p.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--iters", type=int, default=200)
    a = p.parse_args()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, a.world, port, a, out)) for r in range(a.world)]
    for proc in procs:
        proc.start()
    results = out.get(timeout=600)
    for proc in procs:
        proc.join(timeout=60)
    backend = "NCCL" if a.device == "cuda" else "gloo"
    print(f"| hidden | rows | bytes | all_reduce ({backend}, {a.world} ranks) | per step "
          f"({a.layers} layers x 2) |")
    print("|---|---|---|---|---|")
    itemsize = torch.empty((), dtype=getattr(torch, a.dtype)).element_size()
    for (hidden, rows), us in results.items():
        print(f"| {hidden} | {rows} | {rows * hidden * itemsize} | {us:.0f} us | "
              f"{2 * a.layers * us / 1e3:.2f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
