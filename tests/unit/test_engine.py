"""PipelineEngine's step loop against FakePipeline (an in-process stand-in for the stage
workers, see fake_pipeline.py): tokens reach the request, blocks are freed at the finish,
and a failed pipeline hands its sequences back to be recomputed elsewhere."""
import asyncio

from shardline.common.server import Unavailable
from shardline.protocol.decode_rows import all_plans
from shardline.scheduler.engine import PipelineEngine
from shardline.scheduler.request import Sequence, SeqStatus
from shardline.scheduler.scheduler import TokenEvent
from tests.unit.fake_pipeline import STEP_TIMEOUT_S, FakePipeline, token_for, until


def make_engine(pipeline, **kw) -> PipelineEngine:
    return PipelineEngine(pipeline, max_num_seqs=8, max_num_batched_tokens=64,
                          step_timeout_s=STEP_TIMEOUT_S, **kw)


async def drain(q: asyncio.Queue) -> list:
    """A request's events up to (and with) the one that finishes it, or an exception."""
    out = []
    while True:
        ev = await asyncio.wait_for(q.get(), STEP_TIMEOUT_S)
        out.append(ev)
        if isinstance(ev, BaseException) or ev.finish_reason is not None:
            return out


def test_tokens_flow_to_the_request_and_blocks_are_freed_at_the_finish():
    async def body(async_scheduling):
        fake = FakePipeline(num_blocks=8, block_size=4)
        engine = make_engine(fake, async_scheduling=async_scheduling)
        engine.start()
        a = Sequence(1, list(range(10, 16)), max_tokens=5)
        b = Sequence(2, list(range(20, 23)), max_tokens=3)
        qa, qb = asyncio.Queue(), asyncio.Queue()
        engine.add(a, qa)
        engine.add(b, qb)
        ev_a, ev_b = await drain(qa), await drain(qb)
        assert all(isinstance(e, TokenEvent) for e in ev_a + ev_b)
        assert [e.token.token_id for e in ev_a] == [token_for(1, i) for i in range(5)]
        assert [e.token.token_id for e in ev_b] == [token_for(2, i) for i in range(3)]
        assert ev_a[-1].finish_reason == ev_b[-1].finish_reason == "length"
        assert a.output_token_ids == [token_for(1, i) for i in range(5)]
        # the worker computed the prompt, then each sampled token but the last
        assert fake.computed(1) == a.prompt_token_ids + a.output_token_ids[:4]
        assert engine.blocks.num_free_blocks == 8 and a.block_table == b.block_table == []
        await engine.wait_idle()
        await until(fake.sent, lambda: sorted(fake.freed) == [1, 2])   # the worker forgets them
        assert engine.idle and engine.stats["steps"] >= 3
        await engine.stop()
        assert fake.closed
        return [p.last_sampled for r in fake.requests for p in all_plans(r)]

    assert not any(asyncio.run(body(async_scheduling=False)))
    assert any(asyncio.run(body(async_scheduling=True)))      # lookahead steps were planned


def test_abort_frees_the_blocks_and_tells_the_worker():
    async def body():
        fake = FakePipeline(num_blocks=8, block_size=4)
        engine = make_engine(fake, async_scheduling=False)
        engine.start()
        fake.gate.clear()                               # the first step does not finish yet
        a = Sequence(1, list(range(9)), max_tokens=50)
        q = asyncio.Queue()
        engine.add(a, q)
        await until(fake.sent, lambda: len(fake.requests) == 1)
        assert engine.blocks.num_free_blocks == 8 - 3
        engine.abort(a, "stop")
        assert a.finish_reason == "stop" and engine.blocks.num_free_blocks == 8
        await engine.wait_idle()
        fake.gate.set()
        await until(fake.sent, lambda: fake.freed == [1])
        assert q.empty()                                # no token after the abort
        await engine.stop()

    asyncio.run(body())


def test_a_failed_pipeline_hands_its_sequences_back_for_recompute():
    async def body():
        broken = FakePipeline("a", num_blocks=8, block_size=4, fail_at_step=2)
        moved_out = []
        engine = make_engine(broken, async_scheduling=False,
                             on_failure=lambda e, moved: moved_out.append((e, moved)))
        engine.start()
        a = Sequence(1, list(range(10, 16)), max_tokens=6)
        q = asyncio.Queue()
        engine.add(a, q)
        first = [await asyncio.wait_for(q.get(), STEP_TIMEOUT_S) for _ in range(2)]
        await engine.wait_idle()                        # returns once the replica failed
        assert isinstance(engine.failed, Unavailable) and not engine.accepting
        (failed_engine, moved), = moved_out
        assert failed_engine is engine and moved == [(a, q)]
        # a keeps what it generated and is reset to be recomputed from all its tokens
        assert a.output_token_ids == [e.token.token_id for e in first] == [token_for(1, 0),
                                                                          token_for(1, 1)]
        assert a.status is SeqStatus.WAITING and a.num_computed_tokens == 0
        assert a.block_table == [] and not a.admitted and a.num_preemptions == 1
        # requeued on another replica, it admits with prompt + generated and finishes there
        healthy = FakePipeline("b", num_blocks=8, block_size=4)
        other = make_engine(healthy, async_scheduling=False)
        other.start()
        other.add(a, q)
        rest = await drain(q)
        assert a.output_token_ids == [token_for(1, i) for i in range(6)]
        assert [e.token.token_id for e in rest] == a.output_token_ids[2:]
        admit = healthy.requests[0].seqs[0]
        assert admit.admit and admit.start_pos == 0
        assert list(admit.token_ids) == a.prompt_token_ids + a.output_token_ids[:2]
        await engine.stop()
        await other.stop()

    asyncio.run(body())


def test_without_a_failure_handler_the_requests_get_the_error():
    async def body():
        engine = make_engine(FakePipeline(fail_at_step=0), async_scheduling=False)
        engine.start()
        q = asyncio.Queue()
        engine.add(Sequence(1, [1, 2, 3], max_tokens=4), q)
        (err,) = await drain(q)
        assert isinstance(err, Unavailable)
        await engine.stop()

    asyncio.run(body())


def test_steps_stay_within_what_the_stages_take():
    """A stage refuses a StepRequest over its --max-step-tokens unread: the engine plans no
    larger steps than the smallest cap its stages report, whatever --max-num-batched-tokens."""
    async def body():
        fake = FakePipeline(num_blocks=16, block_size=4, max_step_tokens=8)
        engine = make_engine(fake)                 # max_num_batched_tokens=64
        engine.start()
        seq = Sequence(1, list(range(100, 130)), max_tokens=3)
        q = asyncio.Queue()
        engine.add(seq, q)
        events = await drain(q)
        assert [e.token.token_id for e in events] == [token_for(1, i) for i in range(3)]
        sizes = [sum(len(p.token_ids) or p.last_sampled for p in all_plans(r)) for r in fake.requests]
        assert max(sizes) == 8 and sum(sizes[:4]) == 30     # the prompt in chunks of <= 8
        await engine.stop()
    asyncio.run(body())
