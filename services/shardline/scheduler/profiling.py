"""Generation.Profile: every stage of every replica records its next N steps (`shardline
profile`).

The request is checked before anything is armed; one profile runs at a time per scheduler.
Each stage's StageWorker.Profile is called at once over the replica's own channels (which
present the cluster token); a stage that fails is reported in its entry, the others still
answer. Traffic goes on meanwhile: the stages record the steps that run.
"""
from __future__ import annotations

import asyncio
import logging

import grpc

from shardline.common.server import InvalidArgument, Unavailable
from shardline.protocol.limits import profile_request_error, profile_timeout_s
from shardline.v1 import common_pb2, generate_pb2

log = logging.getLogger(__name__)

# Beyond the profile's own timeout, how long a stage may take to stop and export its trace.
EXPORT_MARGIN_S = 60.0


class ProfileRunning(RuntimeError):
    """A profile is already running on this scheduler."""


def _error(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


class ClusterProfiler:
    """Fans a ProfileRequest out to every stage the router knows."""

    def __init__(self):
        self._lock = asyncio.Lock()

    async def profile(self, router, request: common_pb2.ProfileRequest
                      ) -> generate_pb2.ClusterProfile:
        error = profile_request_error(request.steps, request.timeout_s)
        if error:
            raise InvalidArgument(error)
        if router is None:
            raise Unavailable("scheduler is still connecting to its workers")
        if self._lock.locked():
            raise ProfileRunning("a profile is already running on this scheduler; wait for "
                                 "it to end")
        async with self._lock:
            engines = sorted(router.engines.items())
            if not engines:
                raise Unavailable("no pipeline replica is known")
            timeout_s = profile_timeout_s(request.timeout_s)
            log.info("profiling %d step(s) on %d replica(s)", request.steps, len(engines))
            per_replica = await asyncio.gather(*(
                e.pipeline.profile(request, timeout_s + EXPORT_MARGIN_S) for _, e in engines))
            out = generate_pb2.ClusterProfile()
            for (rid, engine), results in zip(engines, per_replica):
                for k, (address, res) in enumerate(zip(engine.pipeline.addresses, results)):
                    entry = out.stages.add(replica=str(rid), stage=k, address=address)
                    if isinstance(res, Exception):
                        entry.error = _error(res)
                        log.warning("profile: replica %s stage %d (%s): %s", rid, k, address,
                                    entry.error)
                    else:
                        entry.result.CopyFrom(res)
            return out
