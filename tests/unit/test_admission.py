"""Admission over real engines on FakePipelines with an injected clock: requests that waited
too long are refused (queued ones and, while the queues shed, new ones at the door), full
queues refuse at once, and priority reaches the queue from both front doors."""
import asyncio
import logging
from types import SimpleNamespace

import pydantic
import pytest
from prometheus_client import REGISTRY

from shardline.common.server import InvalidArgument, ResourceExhausted
from shardline.common.telemetry import RequestIdFilter
from shardline.scheduler.engine import PipelineEngine
from shardline.scheduler.generation import Generation, Limits, QueueFull
from shardline.scheduler.openai_schemas import ChatCompletionRequest, CompletionRequest
from shardline.scheduler.request import Sequence
from shardline.scheduler.router import Router
from shardline.scheduler.waiting_queue import QueueWaitExceeded
from shardline.v1 import generate_pb2
from tests.unit.fake_pipeline import STEP_TIMEOUT_S, FakePipeline, until


class Clock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeTokenizer:
    info = SimpleNamespace(eos_token_ids=[])

    async def detokenize(self, state, ids):
        return "".join(f"<{i}>" for i in ids)


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def request(max_tokens: int = 2, **kw) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(token_ids=generate_pb2.TokenIds(ids=[1, 2, 3]),
                                        max_tokens=max_tokens, **kw)


async def make_router(clock, max_queue_wait_s: float, max_num_seqs: int, *rids: str):
    fakes = {rid: FakePipeline(rid, num_blocks=64, block_size=4) for rid in rids}

    def make_engine(pipeline, on_failure, listener) -> PipelineEngine:
        return PipelineEngine(pipeline, max_num_seqs=max_num_seqs, max_num_batched_tokens=4096,
                              step_timeout_s=STEP_TIMEOUT_S, listener=listener,
                              on_failure=on_failure, async_scheduling=False,
                              max_queue_wait_s=max_queue_wait_s, clock=clock)

    router = Router(make_engine, connect_timeout_s=1.0,
                    make_pipeline=lambda rid, addresses: fakes[rid])
    for rid in rids:
        assert await router.add_pipeline(rid, [f"{rid}:0"]) is not None
    return router, fakes


def make_generation(router, **limits) -> Generation:
    gen = Generation(FakeTokenizer())
    gen.ready(router, Limits(max_context=256, max_tokens_cap=64, default_max_tokens=4,
                             vocab_size=100, capacity_tokens=router.capacity_tokens, **limits),
              generate_pb2.ModelInfo())
    return gen


def test_a_request_queued_too_long_is_refused_and_so_are_new_ones_meanwhile(caplog):
    caplog.set_level(logging.INFO, logger="shardline.scheduler.engine")
    caplog.handler.addFilter(RequestIdFilter())

    async def body():
        clock = Clock()
        router, fakes = await make_router(clock, 5.0, 1, "a")
        gen = make_generation(router, max_queue_wait_s=5.0)
        fakes["a"].gate.clear()                          # steps do not finish for now
        running = await gen.open(request(max_tokens=50), "")
        late = await gen.open(request(request_id="late-1"), "t1")
        await until(fakes["a"].sent, lambda: running.seq.first_admitted_at is not None)
        assert late.seq in router.engines["a"].scheduler.waiting   # the only slot is taken
        assert not router.overloaded()
        clock.now = 10.0                                 # late has waited 10 s > 5 s
        assert router.overloaded()
        with pytest.raises(ResourceExhausted, match="queued for more than 5 s; the server is "
                                                    "overloaded"):
            await gen.open(request(), "t1")              # refused at the door
        fakes["a"].gate.set()                            # the next step expires late
        with pytest.raises(QueueWaitExceeded):
            async for _ in late:
                pass
        assert late.seq.finish_reason == "queue_wait" and late.seq.first_admitted_at is None
        running.close()
        await router.close()

    before = {r: sample("shardline_rejected_requests_total", reason=r)
              for r in ("queue_wait", "queue_full")}
    exhausted = sample("shardline_tenant_requests_total", tenant="t1", status="RESOURCE_EXHAUSTED")
    asyncio.run(body())
    assert sample("shardline_rejected_requests_total", reason="queue_wait") == \
        before["queue_wait"] + 2                         # at the door, then in the queue
    assert sample("shardline_rejected_requests_total", reason="queue_full") == before["queue_full"]
    assert sample("shardline_tenant_requests_total", tenant="t1",
                  status="RESOURCE_EXHAUSTED") == exhausted + 2
    (line,) = [r for r in caplog.records if "rejected after" in r.getMessage()]
    assert line.request_id == "late-1" and "10.0 s in the queue" in line.getMessage()


def test_the_door_sheds_only_when_every_replica_is_overloaded():
    async def body():
        clock = Clock()
        router, fakes = await make_router(clock, 5.0, 1, "a", "b")
        a, b = router.engines["a"], router.engines["b"]
        for f in fakes.values():
            f.gate.clear()
        a.add(first := Sequence(1, [1, 2], max_tokens=50), asyncio.Queue())
        a.add(Sequence(2, [1, 2], max_tokens=1), asyncio.Queue())
        await until(fakes["a"].sent, lambda: first.first_admitted_at is not None)
        clock.now = 10.0
        assert a.scheduler.overloaded and not b.scheduler.overloaded
        assert not router.overloaded()                   # b would take a new request at once
        b.add(other := Sequence(3, [1, 2], max_tokens=50), asyncio.Queue())
        b.add(Sequence(4, [1, 2], max_tokens=1), asyncio.Queue())
        await until(fakes["b"].sent, lambda: other.first_admitted_at is not None)
        clock.now = 16.0                                 # seq 4 queued at 10 s
        assert router.overloaded()
        await router.close()

    asyncio.run(body())


def test_a_full_queue_is_counted_as_queue_full():
    async def body():
        router, fakes = await make_router(Clock(), 0.0, 1, "a")
        gen = make_generation(router, max_queued=1)
        fakes["a"].gate.clear()
        first = await gen.open(request(), "")            # waiting: the engine has not run
        with pytest.raises(QueueFull, match="1 requests are waiting"):
            await gen.open(request(), "")
        first.close()
        await router.close()

    before = sample("shardline_rejected_requests_total", reason="queue_full")
    asyncio.run(body())
    assert sample("shardline_rejected_requests_total", reason="queue_full") == before + 1


def test_priority_reaches_the_sequence_from_both_front_doors():
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], priority=7)
    assert [r.priority for r in chat.requests()] == [7]
    assert CompletionRequest(prompt="x", n=2).requests()[1].priority == 0
    with pytest.raises(pydantic.ValidationError):
        CompletionRequest(prompt="x", priority=1001)

    async def body():
        router, _ = await make_router(Clock(), 0.0, 4, "a")
        gen = make_generation(router)
        stream = await gen.open(request(priority=-3), "acme")
        assert (stream.seq.priority, stream.seq.tenant, stream.seq.cache_salt) == (-3, "acme", "acme")
        stream.close()
        with pytest.raises(InvalidArgument, match=r"priority must be in \[-1000, 1000\]"):
            await gen.open(request(priority=1001), "")
        await router.close()

    before = sample("shardline_rejected_requests_total", reason="invalid_argument")
    asyncio.run(body())
    assert sample("shardline_rejected_requests_total", reason="invalid_argument") == before + 1
