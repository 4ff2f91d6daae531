"""An in-process stand-in for a replica's stage workers, for engine and router tests.

FakePipeline has PipelineClient's interface (connect, send, recv, close and the replica's
shape). It is a fake on purpose: it stands for the worker processes, which have their own
tests over real gRPC. It answers each step as a last stage would, one token per sequence
that samples, and checks that the plans it gets are coherent (positions follow on, a
last_sampled step computes the token sampled before). Token values are a pure function of
(seq_id, tokens generated before it), so tests know what a sequence must produce.
"""
from __future__ import annotations

import asyncio

from shardline.common.server import Unavailable
from shardline.protocol.decode_rows import all_plans
from shardline.v1 import worker_pb2

STEP_TIMEOUT_S = 60.0    # generous: a test waits on events, this only bounds a hang


def token_for(seq_id: int, num_generated: int) -> int:
    """The token the fake samples for seq_id's output position num_generated."""
    return 1000 * seq_id + num_generated


async def until(event: asyncio.Event, predicate, timeout_s: float = STEP_TIMEOUT_S) -> None:
    """Wait until predicate() holds, re-checking each time event is set."""
    async def wait():
        while not predicate():
            event.clear()
            await event.wait()
    await asyncio.wait_for(wait(), timeout_s)


class FakePipeline:
    def __init__(self, replica_id: str = "0", addresses=("fake:0",), num_blocks: int = 16,
                 block_size: int = 4, num_stages: int = 1, fail_at_step: int | None = None,
                 connect_error: Exception | None = None, max_step_tokens: int = 0,
                 attention_window: int = 0):
        self.replica_id = replica_id
        self.attention_window = attention_window # the stages' window (0: none)
        self.rope_long_after = 0                # not a LongRoPE model
        self.max_step_tokens = max_step_tokens   # what the stages' GetInfo says (0: nothing)
        self.addresses = list(addresses)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_stages = num_stages
        self.infos: list = []
        self.fail_at_step = fail_at_step       # recv of this step (0-based) raises Unavailable
        self.connect_error = connect_error
        self.requests: list[worker_pb2.StepRequest] = []
        self.gate = asyncio.Event()            # cleared: steps do not finish until set again
        self.gate.set()
        self.sent = asyncio.Event()            # set on every send
        self.closed = False
        self._results: asyncio.Queue = asyncio.Queue()
        self._computed: dict[int, list[int]] = {}   # seq_id -> token ids whose KV it holds
        self._forgotten: dict[int, list[int]] = {}  # the same, of sequences freed since
        self._last: dict[int, int] = {}             # seq_id -> last token sampled for it

    async def connect(self, timeout_s: float) -> None:
        if self.connect_error is not None:
            raise self.connect_error

    async def send(self, req: worker_pb2.StepRequest) -> None:
        self.requests.append(req)
        for sid in req.free_seq_ids:
            self._forgotten[sid] = self._computed.pop(sid)
            self._last.pop(sid, None)
        res = worker_pb2.StepResult(step_id=req.step_id)
        for plan in all_plans(req):
            if plan.admit:                      # positions before start_pos: prefix cache
                self._computed[plan.seq_id] = [-1] * plan.start_pos
            done = self._computed[plan.seq_id]  # (a KeyError: a step for a seq not admitted)
            assert plan.start_pos == len(done), (plan, done)
            done.extend([self._last[plan.seq_id]] if plan.last_sampled else plan.token_ids)
            if plan.sample:
                tok = token_for(plan.seq_id, plan.num_generated)
                self._last[plan.seq_id] = tok
                res.tokens.add(seq_id=plan.seq_id, token_id=tok)
        self._results.put_nowait(res)
        self.sent.set()

    async def recv(self, timeout_s: float) -> worker_pb2.StepResult:
        await self.gate.wait()
        res = await self._results.get()
        if self.fail_at_step is not None and res.step_id >= self.fail_at_step:
            raise Unavailable(f"replica {self.replica_id}: step stream closed")
        return res

    async def close(self) -> None:
        self.closed = True

    def computed(self, seq_id: int) -> list[int]:
        """The token ids whose KV this fake holds, or held until told to forget it, for
        seq_id (-1: from the prefix cache)."""
        return list(self._computed.get(seq_id, self._forgotten.get(seq_id, [])))

    @property
    def freed(self) -> list[int]:
        """Every seq id the scheduler told this replica to forget, in order."""
        return [sid for r in self.requests for sid in r.free_seq_ids]
