"""A tensor-parallel rank of a stage worker (ranks 1..T-1; rank 0 is the worker process).

Started by the worker (worker/rank_group.py) as

    python -m shardline.worker.rank --rank R --store-port P --seed S WORKER-FLAGS...

it joins rank 0's process groups, loads its part of the stage as rank 0 does, then runs every
command rank 0 sends (worker/step_broadcast.py: a step, forget every sequence, stop) with the
same inputs rank 0 runs. It serves nothing and answers nothing. It exits on STOP, with an
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

import torch
import torch.distributed as dist

from shardline.common.server import configure_logging
from shardline.worker.config import WorkerConfig
from shardline.worker.rank_group import EXIT_REFUSED
from shardline.worker.runner import StageRunner
from shardline.worker.server import build_runner
from shardline.worker.servicer import step_args
from shardline.worker.step_broadcast import Op, StepBroadcast

log = logging.getLogger("shardline.worker.rank")     # also when run as __main__


def serve_commands(wire: StepBroadcast, runner: StageRunner) -> int:
    """Run rank 0's commands until STOP (0). A step whose plan rank 0 refused too
    (ValueError) changes nothing and is skipped."""
    while True:
        cmd = wire.receive()
        if cmd.op is Op.STOP:
            log.info("stopping, as rank 0 asked")
            wire.close()
            return 0
        if cmd.op is Op.FORGET_ALL:
            runner.forget_all()
            continue
        seqs, free_seq_ids, decode = step_args(cmd.request)
        try:
            runner.step(seqs, free_seq_ids, cmd.hidden, decode)
        except ValueError as exc:
            log.debug("step %d refused, as on rank 0: %s", cmd.request.step_id, exc)


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
        return serve_commands(wire, runner)
    except (RuntimeError, ConnectionError) as exc:   # torch.distributed's errors included
        log.error("rank %d leaves: %s", ns.rank, exc)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
