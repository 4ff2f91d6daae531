"""Host work of one step at many sequences: what the GPU must not wait for.

A decode step of N sequences (default 256, contexts of 64-500 tokens, a block boundary crossed
by every 16th) on a worker with the GPU engine, without the model's math:

    plan decode      StepRequest bytes -> SeqStep objects (the servicer)
    checks           StageRunner's plan checks and block tables -> StepInputs
    engine plan      SeqSlots.update + fill_plan (numpy into the staging buffer)
    result encode    SampledTokens -> StepResult bytes

and, as the baseline measured in the same run, what the reference backend's host side does
for the same plan (AttentionMetadata.build, which also copies its tensors to the device).

    python benchmarks/step_host.py [--seqs 256] [--iters 200]
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shardline.backends.gpu.step_plan import fill_plan  # noqa: E402
from shardline.models.attention import AttentionMetadata  # noqa: E402
from shardline.protocol.plan import SampledToken, SamplingConfig, SeqStep  # noqa: E402
from shardline.v1 import worker_pb2  # noqa: E402
from shardline.worker.build import load_runner  # noqa: E402
from tests.unit.conftest import make_tiny_model  # noqa: E402


def _timed(fn, iters: int) -> float:
    """Median microseconds of fn() over iters calls."""
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    n = args.seqs
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(pathlib.Path(tmp), num_layers=1)
        runner = load_runner(model, 0, 1, dtype="float32", cpu_kernels=False, gpu_engine="on",
                             kv_cache_bytes=(n * 70) * 16 * 2 * 2 * 32 * 4,
                             engine_options=dict(max_num_seqs=n))
    rng = np.random.default_rng(0)
    ctx = rng.integers(64, 500, size=n)          # the tiny model holds 512 positions
    bs, next_block = runner.block_size, 0
    tables = {}
    admit = []
    for i, c in enumerate(ctx):                 # admissions: each sequence's context cached
        nb = -(-int(c + 1) // bs)
        tables[i] = list(range(next_block, next_block + nb))
        next_block += nb
        admit.append(SeqStep(i, [1] * int(c), 0, tables[i], True, admit=True,
                             sampling=SamplingConfig()))
    for chunk in range(0, n, 16):
        runner.step(admit[chunk:chunk + 16], [], None)
    decode = [SeqStep(i, [7], int(c), [], True, num_generated=1) for i, c in enumerate(ctx)]
    req = worker_pb2.StepRequest(seqs=[s.to_pb() for s in decode]).SerializeToString()
    engine = runner.backend

    def plan_decode():
        return [SeqStep.from_pb(p) for p in worker_pb2.StepRequest.FromString(req).seqs]

    def checks():
        for i, s in enumerate(decode):              # the same step again, never applied
            runner.seqs[i].num_computed = s.start_pos
            del runner.seqs[i].block_table[len(tables[i]):]
        return runner._check_and_apply(decode, None)

    inputs_tables = checks()

    def engine_plan():
        slots = engine.slots.update(range(n), [False] * n, [[]] * n, None)
        return fill_plan(engine.buffers, _Inputs(decode, inputs_tables, bs), slots,
                         engine.slots, runner.kv_cache.scratch_block, engine.buckets,
                         engine.rng)

    tokens = [SampledToken(i, 5) for i in range(n)]

    def encode():
        return worker_pb2.StepResult(tokens=[t.to_pb() for t in tokens]).SerializeToString()

    def reference():
        return AttentionMetadata.build([s.start_pos for s in decode], [1] * n, inputs_tables,
                                       bs, "cpu")

    ours = {"plan decode": _timed(plan_decode, args.iters), "checks": _timed(checks, args.iters),
            "engine plan": _timed(engine_plan, args.iters), "result encode": _timed(encode,
                                                                                    args.iters)}
    base = _timed(reference, args.iters)
    total = sum(ours.values())
    print(f"host work of one decode step, {n} sequences (median of {args.iters}, µs)")
    for name, us in ours.items():
        print(f"  {name:<14} {us:8.0f}")
    print(f"  {'total':<14} {total:8.0f}")
    print(f"engine plan vs the reference's AttentionMetadata.build ({base:.0f} µs): "
          f"{base / ours['engine plan']:.1f}x less host time")
    return 0


class _Inputs:
    """The StepInputs fields fill_plan reads, for a pure decode step."""

    def __init__(self, seqs, tables, block_size):
        self.seq_ids = [s.seq_id for s in seqs]
        self.token_ids = [s.token_ids[0] for s in seqs]
        self.start_positions = [s.start_pos for s in seqs]
        self.num_tokens = [1] * len(seqs)
        self.block_tables = tables
        self.sample = [True] * len(seqs)
        self.num_generated = [s.num_generated for s in seqs]
        self.block_size = block_size
        self.fed_back = None


if __name__ == "__main__":
    sys.exit(main())
