"""`shardline scheduler`: the public Generate API, continuous batching, routing."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from shardline.common.server import Service, configure_logging
from shardline.scheduler.config import SchedulerConfig
from shardline.scheduler.engine import PipelineEngine
from shardline.scheduler.pipeline import PipelineClient
from shardline.scheduler.servicer import GenerationServicer, Limits
from shardline.scheduler.tokenizer_client import TokenizerClient
from shardline.v1 import generate_pb2, generate_pb2_grpc

log = logging.getLogger(__name__)


async def serve(cfg: SchedulerConfig) -> None:
    service = Service("scheduler", cfg.port, cfg.host)
    tokenizer = TokenizerClient(cfg.tokenizer, cfg.rpc_timeout_s)
    servicer = GenerationServicer(tokenizer)
    service.add(generate_pb2_grpc.add_GenerationServicer_to_server, servicer,
                ["shardline.v1.Generation"])
    await service.start()           # health answers NOT_SERVING while stages load
    await service.set_serving(False)
    info = await tokenizer.connect(cfg.connect_timeout_s)
    pipelines = [PipelineClient(i, addrs) for i, addrs in enumerate(cfg.pipelines)]
    await asyncio.gather(*(p.connect(cfg.connect_timeout_s) for p in pipelines))
    engines = [PipelineEngine(p, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.step_timeout_s)
               for p in pipelines]
    first = pipelines[0].infos
    max_context = first[0].max_position
    if cfg.max_context:
        max_context = min(max_context, cfg.max_context)
    limits = Limits(max_context=max_context, max_tokens_cap=cfg.max_tokens_cap,
                    default_max_tokens=cfg.default_max_tokens, vocab_size=first[-1].vocab_size,
                    capacity_tokens=min(p.num_blocks * p.block_size for p in pipelines))
    model_info = generate_pb2.ModelInfo(
        model=cfg.model or first[0].model, max_context=max_context,
        max_tokens_cap=cfg.max_tokens_cap, vocab_size=first[-1].vocab_size,
        num_stages=len(first), num_replicas=len(pipelines), block_size=pipelines[0].block_size,
        num_blocks=pipelines[0].num_blocks, dtype=first[0].dtype, device=first[0].device)
    servicer.ready(engines, limits, model_info)
    for e in engines:
        e.start()

    async def shutdown():
        for e in engines:
            await e.stop()
        await tokenizer.close()
    service.on_stop(shutdown)
    await service.set_serving(True)
    log.info("serving on port %d: %d replica(s) x %d stage(s), context %d", service.port,
             len(pipelines), len(first), max_context)
    await service.serve_until_stopped()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shardline scheduler", description=__doc__)
    SchedulerConfig.add_args(p)
    cfg = SchedulerConfig.from_args(p.parse_args(argv))
    configure_logging("scheduler", cfg.log_level)
    asyncio.run(serve(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
