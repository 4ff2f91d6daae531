"""Host work of one step at many sequences: what the GPU must not wait for.

A decode step of N sequences (default 256, contexts of 64-500 tokens) on a worker with the GPU
engine, without the model's math, through the worker's own code:

    plan decode      StepRequest bytes -> the runner's inputs (the servicer)
    checks           StageRunner's plan checks and block tables -> StepInputs
    engine plan      SeqSlots.update + fill_plan (numpy into the staging buffer)
    result encode    SampledTokens -> StepResult bytes

twice in the same run: the plan's rows as DecodeColumns and the tokens as columns (what the
scheduler sends and the worker answers now), and, as the baseline, one SeqPlan message /
SeqStep object / SampledToken message per row (the protocol's general form); plus the
reference backend's own metadata for the same plan (AttentionMetadata.build).

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

from shardline.backends.base import StepInputs  # noqa: E402
from shardline.backends.gpu.step_plan import fill_plan  # noqa: E402
from shardline.models.attention import AttentionMetadata  # noqa: E402
from shardline.protocol.decode_rows import (DecodeColumnsBuilder, DecodeRows,  # noqa: E402
                                            encode_result)
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
    engine = runner.backend
    per_row = worker_pb2.StepRequest(seqs=[s.to_pb() for s in decode]).SerializeToString()
    cols = DecodeColumnsBuilder()
    for s in decode:
        cols.add(s.seq_id, 7, s.start_pos, 1, False, [])
    columns = worker_pb2.StepRequest(decode=cols.pb()).SerializeToString()

    def reset():                                    # the same step again, never kept
        for i, s in enumerate(decode):
            runner.seqs[i].num_computed = s.start_pos
            del runner.seqs[i].block_table[len(tables[i]):]

    def plan_rows():
        return [SeqStep.from_pb(p) for p in worker_pb2.StepRequest.FromString(per_row).seqs]

    def plan_columns():
        return DecodeRows.from_pb(worker_pb2.StepRequest.FromString(columns).decode)

    def checks_rows():
        reset()
        planned = runner._check(decode, None)
        return runner._apply(decode, planned)

    rows = plan_columns()

    def checks_columns():
        reset()
        states, toks = runner._check_decode(rows, set())
        inputs = StepInputs([], [], [], [], [], [], [], [], [], bs, [])
        runner._add_decode(inputs, rows, states, toks)
        return inputs

    inputs = checks_columns()

    def engine_plan():
        slots = engine.slots.update(inputs.seq_ids, inputs.admitted, inputs.new_block_ids, None)
        return fill_plan(engine.buffers, inputs, slots, engine.slots,
                         runner.kv_cache.scratch_block, engine.buckets, engine.rng)

    tokens = [SampledToken(i, 5) for i in range(n)]

    def encode_rows():
        return worker_pb2.StepResult(tokens=[t.to_pb() for t in tokens]).SerializeToString()

    def encode_columns():
        return encode_result(0, tokens).SerializeToString()

    def reference():
        return AttentionMetadata.build([s.start_pos for s in decode], [1] * n,
                                       inputs.block_tables, bs, "cpu")

    it = args.iters
    plan = _timed(engine_plan, it)
    ours = {"plan decode": _timed(plan_columns, it), "checks": _timed(checks_columns, it),
            "engine plan": plan, "result encode": _timed(encode_columns, it)}
    base = {"plan decode": _timed(plan_rows, it), "checks": _timed(checks_rows, it),
            "engine plan": plan, "result encode": _timed(encode_rows, it)}
    ref = _timed(reference, it)
    print(f"host work of one decode step, {n} sequences (median of {it} calls, µs)")
    print(f"  {'':<14} {'columns':>8} {'per row':>8}")
    for name in ours:
        print(f"  {name:<14} {ours[name]:8.0f} {base[name]:8.0f}")
    total, total_base = sum(ours.values()), sum(base.values())
    print(f"  {'total':<14} {total:8.0f} {total_base:8.0f}   ({total_base / total:.1f}x less)")
    print(f"engine plan vs the reference backend's AttentionMetadata.build ({ref:.0f} µs): "
          f"{ref / plan:.1f}x less host time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
