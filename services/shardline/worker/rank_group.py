"""Tensor parallelism, rank 0's side: a stage worker with --tensor-parallel-size T starts ranks
1..T-1 itself (worker/rank.py, one process per device), joins them in a torch.distributed
process group and sends every step's inputs to them before running its own (the rest of the
worker is unchanged: rank 0 alone serves gRPC and answers).

    ranks = RankGroup.start(cfg, model_dir)     # main thread: ranks started, each watched
    ranks.join()                                # compute thread: the process groups
    runner = build_runner(cfg, model_dir)       # every rank loads its part of the stage
    ranks.ready(runner)                         # every rank loaded, with the same KV blocks
    with ranks.step(req, hidden):               # each step: sent, then rank 0's own
        runner.step(...)
    ranks.forget_all()                          # as rank 0 forgets
    await ranks.stop(executor)                  # after the server stopped

A rank that dies (its process exits: each has a watching thread) or a step that fails on rank 0
otherwise than a bad plan (a collective that timed out, --tp-timeout-s) leaves the ranks out of
step: the worker then exits non-zero at once, killing the other ranks, so that its Step stream
breaks and the scheduler moves the replica's sequences (the supervisor, `shardline up` or the
kubelet, starts it again). The ranks exit when rank 0 dies: their parent-death signal
(common/spawn.py) or the broken connection.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from typing import Iterator, Mapping, Optional

import torch
import torch.distributed as dist

from shardline.common.config_args import config_argv
from shardline.common.spawn import spawn
from shardline.v1 import worker_pb2
from shardline.worker.config import WorkerConfig
from shardline.worker.step_broadcast import Op, StepBroadcast

log = logging.getLogger(__name__)

RANK_MODULE = "shardline.worker.rank"
STOP_TIMEOUT_S = 10.0          # stopping: for the ranks to leave after STOP, then SIGKILL
EXIT_RANK_FAILED = 1
# a start-up refusal (a ValueError while configuring or loading: a --tensor-parallel-size that
# does not split the model, a KV budget that holds no block, ...): rank 0 or a rank exits with
# it after one log line naming the reason, and the worker with it (a usage error, as argparse's)
EXIT_REFUSED = 2
# the worker's flags a rank does not take: it serves nothing and forwards nothing; its model
# is the directory rank 0 resolved; its metrics port is its own (rank_metrics_port)
_NOT_FOR_RANKS = {"port", "host", "next_stages", "metrics_port", "model"}


def rank_metrics_port(metrics_port: int, rank: int) -> int:
    """Where rank `rank` serves Prometheus metrics: the worker's --metrics-port + rank (0: off,
    as the worker's). Rank 0 is the worker itself."""
    return metrics_port + rank if metrics_port else 0


def rank_argv(cfg: WorkerConfig, model_dir: str, rank: int, store_port: int,
              seed: int) -> list[str]:
    """The command line of `python -m shardline.worker.rank` for rank `rank` of cfg's stage."""
    names = [f.name for f in dataclasses.fields(WorkerConfig)
             if "help" in f.metadata and f.name not in _NOT_FOR_RANKS]
    metrics = rank_metrics_port(cfg.metrics_port, rank)
    return ["--rank", str(rank), "--store-port", str(store_port), "--seed", str(seed),
            "--model", str(model_dir), *config_argv(WorkerConfig, cfg, names),
            *(["--metrics-port", str(metrics)] if metrics else [])]


class RankGroup:
    """Rank 0's view of its stage's other ranks: their processes and the wire to them."""

    def __init__(self, cfg: WorkerConfig, store: dist.TCPStore,
                 procs: dict[int, subprocess.Popen], seed: int):
        self.cfg = cfg
        self.world_size = cfg.tensor_parallel_size
        self.store = store
        self.procs = procs                       # rank -> its process
        self.seed = seed                         # every rank's torch RNG (unseeded sampling)
        self.wire: Optional[StepBroadcast] = None
        self.stopping = False
        self._failing = threading.Lock()

    @classmethod
    def start(cls, cfg: WorkerConfig, model_dir: str) -> "RankGroup":
        """Start ranks 1..T-1 and a thread watching each. Call it from the thread that
        outlives them (the main thread: their parent-death signal follows it)."""
        t = cfg.tensor_parallel_size
        store = dist.TCPStore("127.0.0.1", 0, t, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=cfg.tp_timeout_s))
        seed = secrets.randbits(62)
        procs = {r: spawn([sys.executable, "-m", RANK_MODULE,
                           *rank_argv(cfg, model_dir, r, store.port, seed)],
                          start_new_session=True)       # not the terminal's Ctrl-C: rank 0's
                 for r in range(1, t)}
        group = cls(cfg, store, procs, seed)
        for r, proc in procs.items():
            threading.Thread(target=group._watch, args=(r, proc), daemon=True,
                             name=f"rank{r}-watch").start()
        log.info("tensor parallel: %d ranks, started ranks 1..%d (pids %s), store on 127.0.0.1:%d",
                 t, t - 1, ", ".join(str(p.pid) for p in procs.values()), store.port)
        return group

    def join(self) -> None:
        """Rank 0 joins the process groups; returns once every rank has (compute thread)."""
        self.wire = StepBroadcast.join(self.store, 0, self.world_size,
                                       torch.device(self.cfg.rank_device(0)),
                                       self.cfg.tp_timeout_s)

    def ready(self, num_blocks: int) -> None:
        """Wait until every rank has loaded its part of the stage; they must hold as many KV
        blocks as rank 0 (the scheduler's block ids are every rank's)."""
        t0 = time.perf_counter()
        blocks = self.wire.agree(num_blocks)
        if len(set(blocks)) != 1:
            raise RuntimeError(f"the ranks' KV caches differ (blocks per rank: {blocks})")
        torch.manual_seed(self.seed)
        log.info("tensor parallel: all %d ranks ready (waited %.1f s for the others)",
                 self.world_size, time.perf_counter() - t0)

    @contextlib.contextmanager
    def step(self, req: worker_pb2.StepRequest, hidden: Optional[torch.Tensor],
             trace_context: Optional[Mapping[str, str]] = None) -> Iterator[None]:
        """Send the step to the other ranks, then run rank 0's own (the with block). A bad
        plan (ValueError) is refused by every rank alike; any other failure leaves the ranks
        out of step, and the stage exits. trace_context: rank 0's step span (tracing on), the
        parent of each rank's."""
        self._send(Op.STEP, req, hidden, trace_context)
        try:
            yield
        except ValueError:
            raise
        except Exception as exc:
            self.fail(f"step {req.step_id} failed on rank 0: {exc!r}")
            raise

    def forget_all(self) -> None:
        """The other ranks forget every sequence too (call before rank 0's runner does)."""
        self._send(Op.FORGET_ALL)

    def _send(self, op: Op, req=None, hidden=None, trace_context=None) -> None:
        try:
            self.wire.send(op, req, hidden, trace_context)
        except Exception as exc:
            self.fail(f"sending {op.name} to the other ranks failed: {exc!r}")
            raise

    def _watch(self, rank: int, proc: subprocess.Popen) -> None:
        rc = proc.wait()
        if self.stopping:
            return
        if rc == EXIT_REFUSED:              # it logged why (the same reason rank 0 would give)
            self._exit(EXIT_REFUSED, f"refused to start: rank {rank} (pid {proc.pid}) refused; "
                                     f"its log line (worker-{self.cfg.stage_index}-rank{rank}) "
                                     f"says why")
        self.fail(f"rank {rank} (pid {proc.pid}) exited with {rc}")

    def abandon(self) -> None:
        """Rank 0 could not start (a refusal it logged, or an error it raises): the other
        ranks are killed, without the stage counting as broken."""
        self.stopping = True
        self._kill()

    def fail(self, why: str) -> None:
        """The stage cannot go on: kill the other ranks and exit now (EXIT_RANK_FAILED), unless
        it is stopping anyway. The compute thread may be stuck in a collective, so the process
        does not wait for it."""
        if self.stopping:
            log.warning("tensor parallel (stopping): %s", why)
            return
        self._exit(EXIT_RANK_FAILED, f"tensor-parallel stage broken: {why}; exiting so that "
                                     f"the scheduler moves this replica's sequences")

    def _exit(self, code: int, line: str) -> None:
        self._failing.acquire()                  # the first failure exits; others wait for it
        log.error("%s", line)
        self._kill()
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(code)

    def _kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()

    async def stop(self, executor) -> None:
        """Tell the ranks to exit (on the compute thread, after its queued work: the last
        stream's forget_all), wait up to STOP_TIMEOUT_S for them, then SIGKILL the rest."""
        self.stopping = True
        loop = asyncio.get_running_loop()
        if self.wire is not None:
            try:
                await asyncio.wait_for(loop.run_in_executor(executor, self._send_stop),
                                       STOP_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - stopping anyway
                log.warning("tensor parallel: STOP not sent to the ranks: %r", exc)
        await loop.run_in_executor(None, self._reap)

    def _send_stop(self) -> None:
        self.wire.send(Op.STOP)
        self.wire.close()

    def _reap(self) -> None:
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
