"""The step loop of one pipeline replica: schedule -> run -> postprocess.

Up to S micro-batches (S = stages) are in flight so that every stage has work; with one
stage, two: the next step is planned and sent while one runs (async scheduling, see
Scheduler.lookahead). Admission and cancellation never wait on a step: they
touch the Scheduler between steps (all on the event loop, so no locks are needed).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time

from opentelemetry import trace

from shardline.common import telemetry
from shardline.scheduler.batch_limits import choose_batch_limits
from shardline.scheduler.block_manager import BlockManager
from shardline.scheduler.pipeline import PipelineClient
from shardline.scheduler.request import Sequence
from shardline.scheduler.scheduler import Scheduler, StepBatch, TokenEvent
from shardline.scheduler.waiting_queue import QueueWaitExceeded
from shardline.v1 import worker_pb2
from shardline.protocol.decode_rows import DecodeColumnsBuilder, decode_result

log = logging.getLogger(__name__)

# Steps planned ahead of the one running, with async scheduling: one (Scheduler's lookahead
# plans a sequence's next step only while exactly one of its steps is in flight).
LOOKAHEAD_STEPS = 1


class PipelineEngine:
    """One replica's scheduler and step loop. When the replica breaks, its unfinished
    sequences go to `on_failure` (the router moves them to another replica)."""

    def __init__(self, pipeline: PipelineClient, max_num_seqs: int, max_num_batched_tokens: int,
                 step_timeout_s: float, listener=None, on_failure=None,
                 enable_prefix_caching: bool = True, async_scheduling: bool = True,
                 max_queue_wait_s: float = 0.0, priority_aging_s: float = 0.0,
                 clock=time.monotonic):
        self.pipeline = pipeline
        self.replica_id = pipeline.replica_id
        # a sliding window on every layer: blocks a sequence's window has passed are released
        self.blocks = BlockManager(pipeline.num_blocks, pipeline.block_size,
                                   enable_prefix_caching=enable_prefix_caching, listener=listener,
                                   window=pipeline.attention_window)
        # async scheduling (one stage): step N + 1 is planned and sent while step N runs, its
        # decodes computing the tokens N samples (the worker substitutes them), so the worker
        # never waits for the scheduler between steps
        lookahead = async_scheduling and pipeline.num_stages == 1
        # 0: the workers' device defaults; a step over the stages' cap would be refused unread
        self.limits = choose_batch_limits(max_num_seqs, max_num_batched_tokens, pipeline.infos,
                                          pipeline.max_step_tokens)
        if self.limits.tokens_from == "max_step_tokens" and max_num_batched_tokens > 0:
            log.warning("replica %s: its stages take at most %d tokens per step "
                        "(--max-step-tokens); planning steps of %d, not %d", self.replica_id,
                        self.limits.max_num_batched_tokens, self.limits.max_num_batched_tokens,
                        max_num_batched_tokens)
        log.info("replica %s: batch limits %s", self.replica_id, self.limits.describe())
        self.scheduler = Scheduler(self.blocks, self.limits.max_num_seqs,
                                   self.limits.max_num_batched_tokens,
                                   lookahead=lookahead, max_queue_wait_s=max_queue_wait_s,
                                   priority_aging_s=priority_aging_s, clock=clock,
                                   rope_long_after=pipeline.rope_long_after)
        self.max_in_flight = pipeline.num_stages + (LOOKAHEAD_STEPS if lookahead else 0)
        self.step_timeout_s = step_timeout_s
        self.on_failure = on_failure
        self._queues: dict[int, asyncio.Queue] = {}
        self._wake = asyncio.Event()          # set: there may be work to schedule
        self._progress = asyncio.Event()      # set: a sequence finished or left, or we failed
        self._task: asyncio.Task | None = None
        self.failed: BaseException | None = None
        self.draining = False
        # Profiling counters (seconds), read by GetStats / bench.
        self.stats = collections.Counter()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"engine-{self.replica_id}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        await self.pipeline.close()

    # -- called by the router ---------------------------------------------------------
    def add(self, seq: Sequence, queue: asyncio.Queue) -> None:
        """Queue seq; its TokenEvents (or an exception) go to queue."""
        self._queues[seq.seq_id] = queue
        self.scheduler.add(seq)
        self._wake.set()

    def abort(self, seq: Sequence, reason: str = "abort") -> None:
        """Stop seq (client gone, stop string); its blocks are freed before the next step."""
        self._queues.pop(seq.seq_id, None)
        self.scheduler.abort(seq, reason)
        self._wake.set()
        self._progress.set()

    @property
    def capacity_tokens(self) -> int:
        """The most tokens one sequence may reach on this replica (BlockManager.
        seq_capacity_tokens: the pool's, or unbounded with a window the pool can hold)."""
        return self.blocks.seq_capacity_tokens(self.scheduler.max_num_batched_tokens)

    @property
    def accepting(self) -> bool:
        return self.failed is None and not self.draining

    @property
    def idle(self) -> bool:
        return self.scheduler.num_unfinished == 0

    async def wait_idle(self) -> None:
        """Return once no sequence is left here, or the replica has failed."""
        while not self.idle and self.failed is None:
            self._progress.clear()
            await self._progress.wait()

    # -- the loop -------------------------------------------------------------------------
    async def _run(self) -> None:
        inflight: collections.deque[StepBatch] = collections.deque()
        spans: collections.deque = collections.deque()
        try:
            while True:
                self._reject_expired()
                while len(inflight) < self.max_in_flight:
                    t0 = time.perf_counter()
                    batch = self.scheduler.schedule()
                    if batch is None:
                        break
                    pb = self._to_pb(batch)
                    span = self._step_span(batch, pb) if telemetry.tracing_enabled() else None
                    await self.pipeline.send(pb)
                    spans.append(span)
                    self.stats["schedule_s"] += time.perf_counter() - t0
                    inflight.append(batch)
                if not inflight:
                    self._wake.clear()
                    if not self.scheduler.has_work:
                        await self._wake.wait()
                    continue
                t0 = time.perf_counter()
                result = await self.pipeline.recv(self.step_timeout_s)
                t1 = time.perf_counter()
                batch = inflight.popleft()
                span = spans.popleft()
                if span is not None:
                    span.end()
                tokens = decode_result(result)
                self._deliver(self.scheduler.postprocess(batch, tokens))
                self.stats["steps"] += 1
                self.stats["tokens"] += batch.num_tokens
                self.stats["wait_s"] += t1 - t0
                self.stats["compute_s"] += sum(result.stage_seconds)
                self.stats["postprocess_s"] += time.perf_counter() - t1
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - the replica is broken
            log.error("replica %s failed: %r", self.replica_id, exc)
            self._fail(exc)

    def fail(self, exc: BaseException) -> None:
        """Take the replica out of service now (it is gone); its sequences move elsewhere."""
        if self.failed is None:
            if self._task is not None:
                self._task.cancel()
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self.failed = exc
        moved = [(seq, self._queues.pop(seq.seq_id)) for seq in self.scheduler.evict_all()
                 if seq.seq_id in self._queues]
        if self.on_failure is not None:
            self.on_failure(self, moved)
        else:
            for _, q in moved:
                q.put_nowait(exc)
        self._progress.set()

    def _reject_expired(self) -> None:
        """Tell the requests that waited too long for admission (RESOURCE_EXHAUSTED)."""
        for seq in self.scheduler.expire_waiting():
            q = self._queues.pop(seq.seq_id, None)
            if q is not None:
                q.put_nowait(QueueWaitExceeded(self.scheduler.max_queue_wait_s))
            log.info("replica %s: seq %d rejected after %.1f s in the queue", self.replica_id,
                     seq.seq_id, self.scheduler.clock() - seq.queued_at,
                     extra={"request_id": seq.request_id})
            self._progress.set()

    def _deliver(self, events: list[TokenEvent]) -> None:
        for ev in events:
            q = self._queues.get(ev.seq.seq_id)
            if q is not None:
                q.put_nowait(ev)
                if ev.finish_reason is not None:
                    del self._queues[ev.seq.seq_id]
            if ev.finish_reason is not None:
                self._progress.set()

    def _step_span(self, batch: StepBatch, pb: worker_pb2.StepRequest):
        """A span per step (its own trace), linked to the requests it serves; the stages'
        forward spans are its children (trace context in the StepRequest)."""
        span = telemetry.tracer.start_span(
            "scheduler.step", context=trace.set_span_in_context(trace.INVALID_SPAN),
            links=telemetry.links(seq.span_context for seq, _ in batch.items),
            attributes={"shardline.replica": str(self.replica_id), "shardline.step_id": batch.step_id,
                        "shardline.num_seqs": len(batch.items),
                        "shardline.num_tokens": batch.num_tokens})
        pb.trace_context.update(telemetry.inject(trace.set_span_in_context(span)))
        return span

    @staticmethod
    def _to_pb(batch: StepBatch) -> worker_pb2.StepRequest:
        """The plan: plain one-token decodes as DecodeColumns, every other row a SeqPlan."""
        plans = []
        decode = DecodeColumnsBuilder()
        for seq, step in batch.items:
            if (not step.admit and step.sample and not step.prefix_token_ids
                    and (step.last_sampled or len(step.token_ids) == 1)):
                decode.add(step.seq_id, step.token_ids[0] if step.token_ids else 0,
                           step.start_pos, step.num_generated, step.last_sampled,
                           step.new_block_ids)
                continue
            pb = step.to_pb()
            if step.admit:
                if seq.trace_context:
                    pb.trace_context.update(seq.trace_context)
                if seq.queue_span is not None:
                    seq.queue_span.end()
                    seq.queue_span = None
            plans.append(pb)
        req = worker_pb2.StepRequest(step_id=batch.step_id, seqs=plans,
                                     free_seq_ids=batch.free_seq_ids)
        if len(decode):
            req.decode.CopyFrom(decode.pb())
        return req
