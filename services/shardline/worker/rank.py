"""A tensor-parallel rank of a stage worker (ranks 1..T-1; rank 0 is the worker process).

Started by the worker (worker/rank_group.py) as

    python -m shardline.worker.rank --rank R --store-port P --seed S WORKER-FLAGS...

it joins rank 0's process groups, loads its part of the stage as rank 0 does, then runs every
command rank 0 sends (worker/step_broadcast.py: a step, forget every sequence, stop) with the
same inputs rank 0 runs. It serves no gRPC and answers nothing; it serves its own Prometheus
metrics (label rank="R") on the --metrics-port rank 0 gives it (the worker's + R), and with
tracing on each step is a span under rank 0's (shardline.tp_rank = R). It exits on STOP, with an
error when the group breaks (rank 0 gone) or a step fails otherwise than a bad plan (rank 0
sees the exit and takes the stage down), and by its parent-death signal when rank 0 dies.
Flags that do not fit the model (a ValueError while loading) end it with one log line and
EXIT_REFUSED, which rank 0 passes on as its own exit code.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import time

import torch
import torch.distributed as dist

from shardline.common import telemetry
from shardline.common.server import configure_logging
from shardline.v1 import worker_pb2
from shardline.worker.config import WorkerConfig
from shardline.worker.rank_group import EXIT_REFUSED
from shardline.worker.runner import StageRunner
from shardline.worker.server import build_runner
from shardline.worker.servicer import (STEP_SECONDS, STEP_TOKENS, step_args, step_span_name,
                                       step_tokens)
from shardline.worker.step_broadcast import Op, StepBroadcast

log = logging.getLogger("shardline.worker.rank")     # also when run as __main__


def serve_commands(wire: StepBroadcast, runner: StageRunner, stage: int, rank: int) -> int:
    """Run rank 0's commands until STOP (0). A step whose plan rank 0 refused too
    (ValueError) changes nothing and is skipped. Each step is observed in this rank's
    metrics and, when tracing is on and rank 0 sent its step span, is a span under it."""
    seconds = STEP_SECONDS.labels(str(stage), str(rank))
    tokens = STEP_TOKENS.labels(str(stage), str(rank))
    while True:
        cmd = wire.receive()
        if cmd.op is Op.STOP:
            log.info("stopping, as rank 0 asked")
            wire.close()
            telemetry.shutdown_tracing()
            return 0
        if cmd.op is Op.FORGET_ALL:
            runner.forget_all()
            continue
        req = cmd.request
        span = step_span(req, stage, rank) if telemetry.tracing_enabled() else None
        t0 = time.perf_counter()
        try:
            seqs, free_seq_ids, decode = step_args(req)
            runner.step(seqs, free_seq_ids, cmd.hidden, decode)
        except ValueError as exc:
            log.debug("step %d refused, as on rank 0: %s", req.step_id, exc)
        finally:
            seconds.observe(time.perf_counter() - t0)
            tokens.inc(step_tokens(req))
            if span is not None:
                span.end()


def step_span(req: worker_pb2.StepRequest, stage: int, rank: int):
    """This rank's span of a step: a child of rank 0's (the plan's trace_context), named as
    rank 0's, with shardline.tp_rank; None when the plan carries no context."""
    if not req.trace_context:
        return None
    return telemetry.tracer.start_span(
        step_span_name(stage), context=telemetry.extract(req.trace_context),
        attributes={"shardline.stage": stage, "shardline.step_id": req.step_id,
                    "shardline.tp_rank": rank,
                    "shardline.num_seqs": len(req.seqs) + len(req.decode.seq_ids)})


def build_parser() -> argparse.ArgumentParser:
    """A rank's flags: its own, then the worker's (worker/rank_group.py: rank_argv)."""
    p = argparse.ArgumentParser(prog="python -m shardline.worker.rank", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, required=True, help="this rank, 1..T-1")
    p.add_argument("--store-port", type=int, required=True,
                   help="rank 0's torch.distributed TCPStore on 127.0.0.1")
    p.add_argument("--seed", type=int, required=True, help="the torch RNG seed of every rank")
    WorkerConfig.add_args(p)
    return p


def main(argv: list[str]) -> int:
    p = build_parser()
    ns = p.parse_args(argv)
    try:
        cfg = WorkerConfig.from_args(ns)
    except ValueError as exc:                # exits EXIT_REFUSED (2) with the usage line
        p.error(str(exc))
    t = cfg.tensor_parallel_size
    if not 0 < ns.rank < t:
        p.error(f"--rank {ns.rank} outside [1, {t})")
    configure_logging(f"worker-{cfg.stage_index}-rank{ns.rank}", cfg.log_level)
    # its own metrics port (the worker's + rank) and spans, told apart by their rank
    telemetry.setup("worker", cfg.metrics_port,
                    **{"shardline.stage": cfg.stage_index, "shardline.tp_rank": ns.rank})
    device = torch.device(cfg.rank_device(ns.rank))
    try:
        store = dist.TCPStore("127.0.0.1", ns.store_port, t, is_master=False,
                              timeout=datetime.timedelta(seconds=cfg.tp_timeout_s))
        wire = StepBroadcast.join(store, ns.rank, t, device, cfg.tp_timeout_s)
        try:
            runner = build_runner(cfg, cfg.model, rank=ns.rank, seed=ns.seed)
        except ValueError as exc:            # the flags do not fit the model: as on rank 0
            log.error("rank %d refused to start: %s", ns.rank, exc)
            return EXIT_REFUSED
        runner.release_module_weights()
        blocks = wire.agree(runner.num_blocks)
        if len(set(blocks)) != 1:
            log.error("the ranks' KV caches differ (blocks per rank: %s)", blocks)
            return 1
        torch.manual_seed(ns.seed)
        log.info("rank %d of %d ready on %s (pid %d)", ns.rank, t, device, os.getpid())
        return serve_commands(wire, runner, cfg.stage_index, ns.rank)
    except (RuntimeError, ConnectionError) as exc:   # torch.distributed's errors included
        log.error("rank %d leaves: %s", ns.rank, exc)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
