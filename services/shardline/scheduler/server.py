"""`shardline scheduler`: the public Generate API, continuous batching, routing."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from shardline.common import auth, telemetry
from shardline.common.auth import ApiKeys
from shardline.common.server import Service, configure_logging
from shardline.scheduler.config import SchedulerConfig
from shardline.scheduler.discovery import KubernetesDiscovery
from shardline.scheduler.engine import PipelineEngine
from shardline.scheduler.metrics import register_replicas
from shardline.scheduler.pipeline import PipelineClient
from shardline.scheduler.prefix_index import PrefixIndex
from shardline.scheduler.router import Router
from shardline.scheduler.generation import Generation, Limits
from shardline.scheduler.http_server import HttpServer
from shardline.scheduler.openai_api import build_app
from shardline.scheduler.servicer import GenerationServicer
from shardline.scheduler.tokenizer_client import TokenizerClient
from shardline.v1 import generate_pb2, generate_pb2_grpc

log = logging.getLogger(__name__)


async def serve(cfg: SchedulerConfig) -> None:
    telemetry.setup("scheduler", cfg.metrics_port)
    auth.configure(cfg.security, "scheduler")      # its channels to the tokenizer and workers
    api_keys = ApiKeys.load(cfg.api_keys_file) if cfg.api_keys_file else None
    service = Service("scheduler", cfg.port, cfg.host,
                      public_auth=[api_keys.interceptor()] if api_keys else [],
                      drain_timeout_s=cfg.drain_timeout_s,
                      max_receive_bytes=cfg.receive_bytes())
    tokenizer = TokenizerClient(cfg.tokenizer, cfg.rpc_timeout_s)
    generation = Generation(tokenizer)
    service.add(generate_pb2_grpc.add_GenerationServicer_to_server,
                GenerationServicer(generation, api_keys),
                ["shardline.v1.Generation"])
    await service.start()           # health answers NOT_SERVING while stages load
    await service.set_serving(False)
    if cfg.http_port:
        app = build_app(generation, lambda: service.serving, api_keys,
                        max_body_bytes=cfg.receive_bytes())
        http = HttpServer(app, cfg.host, cfg.http_port, service.drain)
        await http.start()
        service.on_stop(http.stop)          # its requests in flight count in the drain
        log.info("OpenAI HTTP API on port %d", http.port)
    await tokenizer.connect(cfg.connect_timeout_s)

    def make_engine(pipeline: PipelineClient, on_failure, listener) -> PipelineEngine:
        return PipelineEngine(pipeline, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                              cfg.step_timeout_s, listener=listener, on_failure=on_failure,
                              enable_prefix_caching=cfg.enable_prefix_caching,
                              async_scheduling=cfg.async_scheduling,
                              max_queue_wait_s=cfg.max_queue_wait_s,
                              priority_aging_s=cfg.priority_aging_s)

    index = None
    if cfg.redis_url:
        index = PrefixIndex(cfg.redis_url, key_prefix=cfg.redis_prefix, ttl_s=cfg.redis_ttl_s)
        await index.start()
    router = Router(make_engine, cfg.connect_timeout_s, cfg.unavailable_timeout_s, index=index,
                    routing=cfg.routing)
    if cfg.metrics_port:
        register_replicas(router)
    discovery = None
    if cfg.discovery == "kubernetes":
        discovery = KubernetesDiscovery(cfg.k8s_namespace, cfg.k8s_selector, cfg.worker_port)
        await discovery.start()
        follow = asyncio.create_task(router.follow(discovery))
        first_engine = await router.wait_for_replica(cfg.connect_timeout_s)
    else:
        await asyncio.gather(*(router.add_pipeline(str(i), addrs)
                               for i, addrs in enumerate(cfg.pipelines)))
        first_engine = await router.wait_for_replica(0)
    if first_engine is None:
        raise SystemExit("scheduler: no pipeline replica could be reached")
    first = first_engine.pipeline
    infos = first.infos
    max_context = infos[0].max_position
    if cfg.max_context:
        max_context = min(max_context, cfg.max_context)
    limits = Limits(max_context=max_context, max_tokens_cap=cfg.max_tokens_cap,
                    default_max_tokens=cfg.default_max_tokens, vocab_size=infos[-1].vocab_size,
                    capacity_tokens=router.capacity_tokens, max_queued=cfg.max_queued_requests,
                    max_queue_wait_s=cfg.max_queue_wait_s,
                    max_prompt_chars=cfg.prompt_chars(max_context))
    model_info = generate_pb2.ModelInfo(
        model=cfg.model or infos[0].model, max_context=max_context,
        max_tokens_cap=cfg.max_tokens_cap, vocab_size=infos[-1].vocab_size,
        num_stages=len(infos), num_replicas=len(router.engines), block_size=first.block_size,
        num_blocks=first.num_blocks, dtype=infos[0].dtype, device=infos[0].device)
    generation.ready(router, limits, model_info)

    async def shutdown():
        if discovery is not None:
            follow.cancel()
            await discovery.close()
        await router.close()
        await tokenizer.close()
    service.on_stop(shutdown)
    await service.set_serving(True)
    log.info("serving on port %d: %d replica(s) x %d stage(s), context %d", service.port,
             len(router.engines), len(infos), max_context)
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
