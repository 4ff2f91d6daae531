"""Router over real PipelineEngines on FakePipelines (in-process stand-ins for the stage
workers, see fake_pipeline.py): routing by longest cached prefix and load, failover, drain."""
import asyncio
from types import SimpleNamespace

import pytest

from shardline.common.server import ResourceExhausted, Unavailable
from shardline.scheduler.generation import Generation, Limits
from shardline.scheduler.engine import PipelineEngine
from shardline.scheduler.request import Sequence
from shardline.scheduler.router import TOKENS_PER_QUEUED_SEQ, Router, routing_cost
from shardline.v1 import generate_pb2
from tests.unit.fake_pipeline import STEP_TIMEOUT_S, FakePipeline, token_for

BLOCK = 16
# A shared prefix whose cached blocks save more than the price of one queued sequence.
SHARED = list(range(1, TOKENS_PER_QUEUED_SEQ + 2 * BLOCK + 1))


def make_engine(pipeline, on_failure, listener) -> PipelineEngine:
    return PipelineEngine(pipeline, max_num_seqs=16, max_num_batched_tokens=4096,
                          step_timeout_s=STEP_TIMEOUT_S, listener=listener,
                          on_failure=on_failure, async_scheduling=False)


class Replicas:
    """make_pipeline for the Router: hands out prepared fakes by replica id (a fresh one,
    refusing connections, once a replica's fake is used up: it stays down)."""

    def __init__(self, **fakes: FakePipeline):
        self.fakes = fakes

    def __call__(self, replica_id: str, addresses: list[str]) -> FakePipeline:
        fake = self.fakes.pop(replica_id, None)
        return fake or FakePipeline(replica_id, addresses, connect_error=Unavailable("down"))


async def make_router(**fakes) -> Router:
    router = Router(make_engine, connect_timeout_s=1.0, make_pipeline=Replicas(**fakes))
    for rid in fakes:
        assert await router.add_pipeline(rid, [f"{rid}:0"]) is not None
    return router


async def finish(q: asyncio.Queue) -> list:
    out = []
    while True:
        ev = await asyncio.wait_for(q.get(), STEP_TIMEOUT_S)
        if isinstance(ev, BaseException):
            raise ev
        out.append(ev)
        if ev.finish_reason is not None:
            return out


def holder(router: Router, seq: Sequence) -> str:
    (rid,) = [rid for rid, e in router.engines.items()
              if seq in e.scheduler.waiting or seq in e.scheduler.running]
    return rid


def pool_state(engine: PipelineEngine):
    b = engine.blocks
    return [(x.ref_count, x.hash) for x in b.pool.blocks], b.pool.free_queue(), b.hits, b.queries


def test_routes_by_longest_cached_prefix_then_by_load():
    async def body():
        fa = FakePipeline("a", num_blocks=128, block_size=BLOCK)
        fb = FakePipeline("b", num_blocks=128, block_size=BLOCK)
        router = await make_router(a=fa, b=fb)
        a, b = router.engines["a"], router.engines["b"]
        warm = Sequence(1, SHARED + [7], max_tokens=1)          # leaves SHARED cached on b
        qw = asyncio.Queue()
        b.add(warm, qw)
        await finish(qw)
        fa.gate.clear()                                          # steps stall: load stays put
        fb.gate.clear()
        s1, s2, s3 = (Sequence(i, SHARED + [i], max_tokens=4) for i in (2, 3, 4))
        s4 = Sequence(5, [9] * 10, max_tokens=4)
        assert routing_cost(b, s1) == 1 and routing_cost(a, s1) == len(SHARED) + 1
        router.submit(s1)
        assert holder(router, s1) == "b"                         # only b has the prefix
        router.submit(s2)                                        # b's prefix beats one queued seq
        assert holder(router, s2) == "b"
        assert routing_cost(b, s3) == 1 + 2 * TOKENS_PER_QUEUED_SEQ > routing_cost(a, s3)
        before = pool_state(b)
        q3 = router.submit(s3)                                   # two queued on b: a is cheaper
        assert holder(router, s3) == "a"
        assert pool_state(b) == before                           # pricing b wrote nothing there
        router.submit(s4)                                        # no prefix anywhere: less load
        assert holder(router, s4) == "a"
        fa.gate.set()
        fb.gate.set()
        assert [e.token.token_id for e in await finish(q3)] == [token_for(4, i) for i in range(4)]
        await router.close()
        assert fa.closed and fb.closed

    asyncio.run(body())


def test_a_failed_replica_moves_its_sequences_and_the_stream_goes_on():
    async def body():
        fa = FakePipeline("a", fail_at_step=2)
        fb = FakePipeline("b")
        router = await make_router(a=fa, b=fb)
        seq = Sequence(1, list(range(10, 15)), max_tokens=6)
        q = router.submit(seq)
        assert holder(router, seq) == "a"                        # both idle: the first
        events = await finish(q)
        assert [e.token.token_id for e in events] == [token_for(1, i) for i in range(6)]
        assert not router.engines["a"].accepting and [e.replica_id for e in router.live] == ["b"]
        (admit,) = [p for r in fb.requests for p in r.seqs if p.admit]
        assert list(admit.token_ids) == seq.prompt_token_ids + seq.output_token_ids[:2]
        await router.close()

    asyncio.run(body())


def test_with_no_replica_submit_says_unavailable():
    async def body():
        router = await make_router()
        with pytest.raises(Unavailable):
            router.submit(Sequence(1, [1, 2], max_tokens=1))
        assert await router.add_pipeline("x", ["x:0"], retry=False) is None   # refuses: down
        assert router.capacity_tokens() == 0
        await router.close()

    asyncio.run(body())


def test_drain_waits_for_the_replicas_sequences_then_removes_it():
    async def body():
        fa = FakePipeline("a")
        router = await make_router(a=fa)
        fa.gate.clear()
        seq = Sequence(1, [1, 2, 3], max_tokens=3)
        q = router.submit(seq)
        removal = asyncio.create_task(router.remove_pipeline("a", drain=True))
        await asyncio.sleep(0)                                   # let the removal start
        assert not router.engines["a"].accepting and not removal.done()
        with pytest.raises(Unavailable):                         # draining takes nothing new
            router.submit(Sequence(2, [1], max_tokens=1))
        fa.gate.set()
        assert len(await finish(q)) == 3
        await asyncio.wait_for(removal, STEP_TIMEOUT_S)
        assert "a" not in router.engines and fa.closed
        await router.close()

    asyncio.run(body())


def test_a_full_queue_refuses_new_requests_at_once():
    async def body():
        fa = FakePipeline("a")
        router = await make_router(a=fa)
        fa.gate.clear()
        queued = [Sequence(i, [1, 2], max_tokens=1) for i in range(1, 6)]
        for seq in queued:                   # no await between: none has started yet
            router.submit(seq)
        assert router.num_waiting() == 5
        gen = Generation(SimpleNamespace(info=SimpleNamespace(eos_token_ids=[])))
        gen.ready(router, Limits(max_context=64, max_tokens_cap=8, default_max_tokens=4,
                                 vocab_size=100, capacity_tokens=lambda: 0, max_queued=5), None)
        with pytest.raises(ResourceExhausted, match="5 requests are waiting"):
            await gen.open(generate_pb2.GenerateRequest(
                token_ids=generate_pb2.TokenIds(ids=[1, 2]), max_tokens=1), "")
        assert router.num_waiting() == 5    # refused before anything was queued
        gen.limits.max_queued = 6
        stream = await gen.open(generate_pb2.GenerateRequest(
            token_ids=generate_pb2.TokenIds(ids=[1, 2]), max_tokens=1), "")
        assert router.num_waiting() == 6
        stream.close()
        fa.gate.set()
        await router.close()

    asyncio.run(body())
