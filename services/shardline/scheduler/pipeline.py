"""Connection to one pipeline replica: stage discovery and the Step stream to stage 0."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc

from shardline.common.server import Unavailable, channel
from shardline.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from shardline.protocol.route import ROUTE_KEY, SESSION_KEY

log = logging.getLogger(__name__)

# this scheduler's id on its step streams: its reconnects supersede its old streams, and a
# stage refuses a second scheduler (protocol/route.py)
SESSION_ID = uuid.uuid4().hex


class PipelineClient:
    """Stages [0..S) of one replica. send() a StepRequest to stage 0, recv() its StepResult."""

    def __init__(self, replica_id: str, addresses: list[str]):
        self.replica_id = replica_id
        self.addresses = addresses
        self.infos: list[worker_pb2.StageInfo] = []
        self._channels = [channel(a) for a in addresses]
        self._call = None

    @property
    def num_stages(self) -> int:
        return len(self.addresses)

    @property
    def num_blocks(self) -> int:
        return min(i.num_blocks for i in self.infos)

    @property
    def block_size(self) -> int:
        return self.infos[0].block_size

    @property
    def attention_window(self) -> int:
        """The window every layer of the model attends within: the largest of the stages'
        (StageInfo.attention_window), 0 if any stage has a layer that sees every position or
        does not say (a worker from before the field): then no block is released early."""
        windows = [i.attention_window for i in self.infos]
        return 0 if not windows or 0 in windows else max(windows)

    @property
    def rope_long_after(self) -> int:
        """LongRoPE: the length past which sequences take the long factors (0: not such a
        model); every stage of a pipeline serves the same model."""
        return max((i.rope_long_after for i in self.infos), default=0)

    @property
    def max_step_tokens(self) -> int:
        """The most tokens a step may carry to every stage (0: no stage says)."""
        caps = [i.max_step_tokens for i in self.infos if i.max_step_tokens > 0]
        return min(caps) if caps else 0

    async def profile(self, request: common_pb2.ProfileRequest, timeout_s: float
                      ) -> list[common_pb2.ProfileResult | Exception]:
        """Every stage's StageWorker.Profile at once; each stage's result, or its error."""
        async def one(ch):
            try:
                return await worker_pb2_grpc.StageWorkerStub(ch).Profile(request, timeout=timeout_s)
            except Exception as e:  # noqa: BLE001 - reported per stage
                return e
        return list(await asyncio.gather(*(one(ch) for ch in self._channels)))

    async def connect(self, timeout_s: float) -> None:
        """Wait until every stage answers GetInfo, check they cover the model, open the stream."""
        deadline = time.monotonic() + timeout_s
        self.infos = [await self._wait_info(i, deadline) for i in range(self.num_stages)]
        expect = 0
        for i, info in enumerate(self.infos):
            if info.layer_start != expect:
                raise Unavailable(f"replica {self.replica_id}: stage {i} starts at layer "
                                  f"{info.layer_start}, expected {expect}")
            expect = info.layer_end
        if expect != self.infos[0].num_layers or not self.infos[0].is_first or not self.infos[-1].is_last:
            raise Unavailable(f"replica {self.replica_id}: stages do not cover all layers")
        if len({i.block_size for i in self.infos}) != 1:
            raise Unavailable(f"replica {self.replica_id}: stages disagree on block size")
        stub = worker_pb2_grpc.StageWorkerStub(self._channels[0])
        self._call = stub.Step(metadata=((ROUTE_KEY, ",".join(self.addresses[1:])),
                                         (SESSION_KEY, SESSION_ID)))
        log.info("replica %s: %d stages, %d KV blocks of %d, attention window %s",
                 self.replica_id, self.num_stages, self.num_blocks, self.block_size,
                 self.attention_window or "none (every position)")

    async def _wait_info(self, i: int, deadline: float) -> worker_pb2.StageInfo:
        stub = worker_pb2_grpc.StageWorkerStub(self._channels[i])
        while True:
            try:
                return await stub.GetInfo(worker_pb2.StageInfoRequest(), timeout=5.0)
            except grpc.aio.AioRpcError as e:
                if time.monotonic() > deadline:
                    raise Unavailable(f"stage {i} at {self.addresses[i]}: {e.code().name}") from e
                await asyncio.sleep(0.5)

    async def send(self, req: worker_pb2.StepRequest) -> None:
        await self._call.write(req)

    async def recv(self, timeout_s: float) -> worker_pb2.StepResult:
        res = await asyncio.wait_for(self._call.read(), timeout_s)
        if res is grpc.aio.EOF:
            raise Unavailable(f"replica {self.replica_id}: step stream closed")
        return res

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        for ch in self._channels:
            await ch.close()
