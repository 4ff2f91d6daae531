"""The public gRPC Generation service: a thin adapter over scheduler.generation."""
from __future__ import annotations

from typing import Optional

import grpc

from shardline.common.auth import ApiKeys, bearer
from shardline.common.server import Unavailable
from shardline.scheduler.generation import REQUEST_ID_KEY, TENANT_KEY, Generation
from shardline.scheduler.profiling import ClusterProfiler, ProfileRunning
from shardline.v1 import generate_pb2, generate_pb2_grpc


def tenant_of(context, api_keys: Optional[ApiKeys] = None) -> str:
    """The request's tenant: the one its API key is bound to, else metadata
    x-shardline-tenant; '' is the shared default tenant."""
    metadata = context.invocation_metadata() or ()
    bound = api_keys.tenant(bearer(metadata)) if api_keys is not None else None
    if bound:
        return bound
    for key, value in metadata:
        if key == TENANT_KEY:
            return value
    return ""


class GenerationServicer(generate_pb2_grpc.GenerationServicer):
    """The gRPC front door: Generate, GetModelInfo, GetStats, Profile over the shared
    Generation."""

    def __init__(self, generation: Generation, api_keys: Optional[ApiKeys] = None):
        self.generation = generation
        self.api_keys = api_keys            # checked by its interceptor; here for the tenant
        self.profiler = ClusterProfiler()

    async def GetModelInfo(self, request, context):
        gen = self.generation
        if gen.model_info is None:
            raise Unavailable("scheduler is still connecting to its workers")
        info = generate_pb2.ModelInfo()
        info.CopyFrom(gen.model_info)
        info.num_replicas = len(gen.router.live)
        return info

    async def GetStats(self, request, context):
        out = generate_pb2.SchedulerStats()
        router = self.generation.router
        for rid, e in sorted((router.engines if router else {}).items()):
            st = e.stats
            out.replicas.add(
                replica=str(rid), healthy=e.accepting,
                num_waiting=len(e.scheduler.waiting), num_running=len(e.scheduler.running),
                num_blocks=e.blocks.num_blocks, num_free_blocks=e.blocks.num_free_blocks,
                num_preemptions=e.scheduler.num_preemptions, num_steps=int(st["steps"]),
                num_tokens=int(st["tokens"]), schedule_seconds=st["schedule_s"],
                wait_seconds=st["wait_s"], compute_seconds=st["compute_s"],
                postprocess_seconds=st["postprocess_s"],
                num_cached_blocks=e.blocks.num_cached_blocks, prefix_hit_tokens=e.blocks.hits,
                prefix_query_tokens=e.blocks.queries, max_num_seqs=e.scheduler.max_num_seqs,
                max_num_batched_tokens=e.scheduler.max_num_batched_tokens)
        return out

    async def Profile(self, request, context):
        try:
            return await self.profiler.profile(self.generation.router, request)
        except ProfileRunning as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))

    async def Generate(self, request, context):
        stream = await self.generation.open(request, tenant_of(context, self.api_keys),
                                            lambda: _cancelled_status(context))
        try:
            await context.send_initial_metadata(((REQUEST_ID_KEY, stream.request_id),))
            async for resp in stream:
                yield resp
        finally:
            stream.close(_cancelled_status(context))


def _cancelled_status(context) -> str:
    """How a stream that ended early ended: its deadline passed, or the client went away."""
    remaining = context.time_remaining() if hasattr(context, "time_remaining") else None
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
