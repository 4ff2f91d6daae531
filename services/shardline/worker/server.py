"""`shardline worker`: one pipeline stage as a gRPC service."""
from __future__ import annotations

import argparse
import dataclasses
import asyncio
import logging
import os
import sys
from typing import Optional

import torch

from shardline.common import auth, telemetry
from shardline.common.model_source import resolve_model
from shardline.common.server import Service, configure_logging
from shardline.v1 import worker_pb2_grpc
from shardline.models.config import ModelConfig
from shardline.models.parallel import check_tensor_parallel
from shardline.worker.build import load_runner
from shardline.worker.config import ENGINE_SEQS_PER_DEFAULT, WorkerConfig, batch_defaults
from shardline.worker.heap import keep_freed_memory
from shardline.worker.rank_group import EXIT_REFUSED, RankGroup
from shardline.worker.runner import StageRunner
from shardline.worker.servicer import StageWorkerServicer

log = logging.getLogger(__name__)


def build_runner(cfg: WorkerConfig, model_dir, rank: int = 0,
                 seed: Optional[int] = None) -> StageRunner:
    """Load tensor-parallel rank `rank`'s part of this stage's layers of the model in
    model_dir (slow: runs off the event loop); on an initialized process group when
    --tensor-parallel-size > 1. seed: the draws of unseeded sampling on the device (the GPU
    engine's), which every rank of a stage must make alike."""
    threads = cfg.rank_threads(os.cpu_count() or 1)
    if threads > 0:
        torch.set_num_threads(threads)
    device = cfg.rank_device(rank)
    if device == "cpu":
        keep_freed_memory()              # steps reuse their activations' memory (heap.py)
    start, end = cfg.layer_range(ModelConfig.from_dir(model_dir).num_layers)
    sharding = {}
    if cfg.tensor_parallel_size > 1:
        log.info("stage %d/%d: tensor-parallel rank %d of %d on %s, %d thread(s), experts %s",
                 cfg.stage_index, cfg.num_stages, rank, cfg.tensor_parallel_size, device,
                 torch.get_num_threads(), "whole per rank" if cfg.expert_parallel else "sharded")
        sharding = dict(tensor_parallel=(rank, cfg.tensor_parallel_size),
                        expert_parallel=cfg.expert_parallel)
    log.info("stage %d/%d: layers [%d, %d) of %s on %s in %s", cfg.stage_index, cfg.num_stages,
             start, end, cfg.model, device, cfg.dtype)
    return load_runner(model_dir, start, end, device=device, dtype=cfg.dtype,
                       kv_cache_bytes=cfg.kv_cache_bytes(),
                       kv_cache_fraction=cfg.kv_cache_fraction, block_size=cfg.block_size,
                       cpu_kernels=cfg.cpu_kernels, gpu_engine=cfg.gpu_engine,
                       engine_options=engine_options(cfg, seed), **sharding,
                       **dataclasses.asdict(cfg.transforms()))


def load_stage(cfg: WorkerConfig, model_dir, ranks: Optional[RankGroup]) -> StageRunner:
    """Compute thread: join the other ranks (tensor parallel), build rank 0's runner, free
    the module weights the backend does not need, and wait until every rank is ready."""
    if ranks is not None:
        ranks.join()
    runner = build_runner(cfg, model_dir, seed=None if ranks is None else ranks.seed)
    freed = runner.release_module_weights()     # the CPU kernels hold their own copy
    if freed:
        log.info("released %.0f MiB of module weights (the CPU kernels hold their own layout)",
                 freed / 2**20)
    if ranks is not None:
        ranks.ready(runner.num_blocks)
    return runner


def engine_options(cfg: WorkerConfig, seed: Optional[int] = None) -> dict:
    """The GPU engine's buffer sizes: steps of up to --max-step-tokens tokens, and sequences
    up to ENGINE_SEQS_PER_DEFAULT times the device's default --max-num-seqs; and the seed of
    its unseeded draws (None: fresh; a tensor-parallel stage's ranks share one)."""
    seqs, _ = batch_defaults(cfg.device)
    return dict(max_num_seqs=seqs * ENGINE_SEQS_PER_DEFAULT, max_num_tokens=cfg.max_step_tokens,
                seed=seed)


async def serve(cfg: WorkerConfig) -> int:
    """Serve until stopped (0), or refuse to start (EXIT_REFUSED, after one log line naming
    the reason) when the flags do not fit the model: a ValueError while finding the model or
    loading the stage (a --tensor-parallel-size that does not split it, a KV budget that holds
    no block, ...). Other exceptions are unexpected and propagate with their traceback."""
    telemetry.setup("worker", cfg.metrics_port, **{"shardline.stage": cfg.stage_index})
    auth.configure(cfg.security, f"worker-{cfg.stage_index}")
    # Draining, a stage refuses new calls (a new Step stream, GetInfo) and serves the Step
    # stream it has until the scheduler closes it (after draining the replica) or the timeout.
    # The model is found first (downloaded or converted on a first start): its config.json
    # sizes the largest message accepted, fixed when the server is made.
    loop = asyncio.get_running_loop()
    service = None
    servicer = StageWorkerServicer(cfg.model, next_stages=cfg.next_stages)
    try:
        model_dir = await loop.run_in_executor(None, resolve_model, cfg.model, cfg.cache_dir)
        model = ModelConfig.from_dir(model_dir)
        if cfg.tensor_parallel_size > 1:       # before any rank starts
            check_tensor_parallel(model, cfg.tensor_parallel_size, cfg.expert_parallel)
        service = Service(f"worker-{cfg.stage_index}", cfg.port, cfg.host,
                          drain_timeout_s=cfg.drain_timeout_s,
                          max_receive_bytes=cfg.receive_bytes(model.hidden_size,
                                                              model.max_position_embeddings))
        servicer.stage_index = cfg.stage_index
        servicer.max_step_tokens = cfg.max_step_tokens
        service.add(worker_pb2_grpc.add_StageWorkerServicer_to_server, servicer,
                    ["shardline.v1.StageWorker"])
        await service.start()
        await service.set_serving(False)
        log.info("listening on %s:%d, loading model", cfg.host, service.port)
        if cfg.tensor_parallel_size > 1:      # ranks 1..T-1, started from this (the main) thread
            ranks = servicer.ranks = RankGroup.start(cfg, str(model_dir))
            service.on_stop(lambda: ranks.stop(servicer.executor))
        r = servicer.runner = await loop.run_in_executor(servicer.executor, load_stage, cfg,
                                                         model_dir, servicer.ranks)
    except Exception as exc:
        if isinstance(exc, ValueError):
            log.error("refused to start: %s", exc)
        if servicer.ranks is not None:          # the other ranks go with this start
            servicer.ranks.abandon()
        if service is not None:
            await service.server.stop(0)
        if not isinstance(exc, ValueError):
            raise
        return EXIT_REFUSED
    log.info("ready: %d KV blocks of %d tokens", r.num_blocks, r.block_size)
    await service.set_serving(True)
    await service.serve_until_stopped()
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shardline worker", description=__doc__)
    WorkerConfig.add_args(p)
    try:
        cfg = WorkerConfig.from_args(p.parse_args(argv))
    except ValueError as exc:                # exits EXIT_REFUSED (2) with the usage line
        p.error(str(exc))
    configure_logging(f"worker-{cfg.stage_index}", cfg.log_level)
    return asyncio.run(serve(cfg))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
