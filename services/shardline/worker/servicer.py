"""StageWorker gRPC servicer: converts protobuf <-> plan objects and chains stages.

Step stream of stage k:  upstream --StepRequest--> [run layers] --StepRequest(hidden)--> stage k+1
                         upstream <--StepResult--  [relay]     <--StepResult--         stage k+1
The last stage samples and answers directly. Requests are processed strictly in order, so
micro-batches pipeline across stages while each stage sees them one at a time. With tensor
parallelism the other ranks of the stage (`ranks`, worker/rank_group.py) get every step first.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Sequence

import grpc
from opentelemetry import trace
from prometheus_client import Counter, Histogram

from shardline.common import telemetry
from shardline.common.server import InvalidArgument, Unavailable, channel
from shardline.common.tensors import pb_to_tensor, tensor_to_pb
from shardline.protocol.limits import profile_request_error, profile_timeout_s
from shardline.protocol.decode_rows import DecodeRows, encode_result
from shardline.protocol.plan import SeqStep
from shardline.protocol.route import ROUTE_KEY, SESSION_KEY
from shardline.v1 import worker_pb2, worker_pb2_grpc
from shardline.worker.config import batch_defaults
from shardline.worker.profile_summary import DECODE_RANGE, ENCODE_RANGE
from shardline.worker.profiler import ProfileArmed, StageProfiler

log = logging.getLogger(__name__)

# every tensor-parallel rank of a stage has them, labeled with its rank: rank 0 (the worker) here,
# ranks 1..T-1 in worker/rank.py, each on its own metrics port (rank_group.rank_metrics_port)
STEP_SECONDS = Histogram(
    "shardline_stage_step_seconds", "Compute time of one step on this stage (rank 0: decode plan, "
    "layers, encode output; other tensor-parallel ranks: layers)", ["stage", "rank"],
    buckets=(.001, .0025, .005, .01, .025, .05, .075, .1, .15, .25, .5, 1, 2.5, 5, 10))
STEP_TOKENS = Counter("shardline_stage_tokens_total", "Tokens computed by this stage",
                      ["stage", "rank"])


def step_tokens(req: worker_pb2.StepRequest) -> int:
    """The tokens a step computes (its shardline_stage_tokens_total)."""
    return (sum(len(s.token_ids) or s.last_sampled for s in req.seqs)
            + len(req.decode.seq_ids))


def step_span_name(stage_index: int) -> str:
    """The span of one step on a stage (every tensor-parallel rank's, told apart by
    shardline.tp_rank)."""
    return f"stage{stage_index}.forward"


class Superseded(Exception):
    """The scheduler opened a new Step stream; this one ends."""


@dataclass
class _Stream:
    """The Step stream a stage serves: its scheduler's session, how to end it, and an event
    set once the stream is over and its sequences forgotten."""
    session: str
    out: asyncio.Queue
    done: asyncio.Event = field(default_factory=asyncio.Event)


def stage_attention_window(config, layer_start: int, layer_end: int) -> int:
    """StageInfo.attention_window: the widest sliding window of layers [layer_start,
    layer_end) of config (a ModelConfig) when every one has a window, else 0."""
    windows = [config.window(i) for i in range(layer_start, layer_end)]
    return max(windows) if windows and all(w > 0 for w in windows) else 0


def step_args(req: worker_pb2.StepRequest) -> tuple[list[SeqStep], list[int],
                                                  Optional[DecodeRows]]:
    """(seqs, free_seq_ids, decode) of StageRunner.step from a StepRequest's plan."""
    seqs = [SeqStep.from_pb(s) for s in req.seqs]
    decode = DecodeRows.from_pb(req.decode) if req.HasField("decode") else None
    return seqs, list(req.free_seq_ids), decode


def _host_port(address: str) -> tuple[str, str]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port:
        raise ValueError(f"not host:port: {address!r}")
    return host.strip("[]"), port


class StageWorkerServicer(worker_pb2_grpc.StageWorkerServicer):
    def __init__(self, model_name: str, next_stages: Sequence[str] = ()):
        self.model_name = model_name
        self.next_stages = list(next_stages)    # --next-stage: where this stage may forward
        self._stream: Optional[_Stream] = None
        self.max_step_tokens = 0                # --max-step-tokens (0: not said)
        self.runner = None                      # set once the model is loaded
        self.ranks = None                       # the other tensor-parallel ranks (RankGroup)
        self.instance_id = uuid.uuid4().hex
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self.stage_index = 0
        self._seq_span_ctx: dict[int, trace.SpanContext] = {}   # request span per sequence
        self.profiler = StageProfiler()         # Profile: records steps on the compute thread

    def _trace_step(self, req: worker_pb2.StepRequest):
        """(step span, admit spans) when tracing is on: the step span is the scheduler step's
        child, linked to every request it serves; admitted sequences get a span in their trace."""
        for sid in req.free_seq_ids:
            self._seq_span_ctx.pop(sid, None)
        admitted = []
        for s in req.seqs:
            if s.admit:
                sc = telemetry.span_context_of(s.trace_context)
                if sc is None:
                    self._seq_span_ctx.pop(s.seq_id, None)
                else:
                    self._seq_span_ctx[s.seq_id] = sc
                    admitted.append(s)
        seq_ids = [s.seq_id for s in req.seqs] + list(req.decode.seq_ids)
        ctxs = [self._seq_span_ctx.get(sid) for sid in seq_ids]
        attributes = {"shardline.stage": self.stage_index, "shardline.step_id": req.step_id,
                      "shardline.num_seqs": len(seq_ids)}
        if self.ranks is not None:
            attributes["shardline.tp_rank"] = 0
        span = telemetry.tracer.start_span(
            step_span_name(self.stage_index), context=telemetry.extract(req.trace_context),
            links=telemetry.links(ctxs), attributes=attributes)
        step_link = [trace.Link(span.get_span_context())]
        admits = [telemetry.tracer.start_span(
            f"stage{self.stage_index}.admit", context=telemetry.extract(s.trace_context),
            links=step_link, attributes={"shardline.seq_id": s.seq_id,
                                         "shardline.start_pos": s.start_pos,
                                         "shardline.num_tokens": len(s.token_ids)})
            for s in admitted]
        return span, admits

    def _require_runner(self):
        if self.runner is None:
            raise Unavailable("stage worker is still loading its model")
        return self.runner

    async def GetInfo(self, request, context):
        r = self._require_runner()
        max_num_seqs, max_num_batched_tokens = batch_defaults(r.device_name)
        return worker_pb2.StageInfo(
            model=self.model_name, layer_start=r.layer_start, layer_end=r.layer_end,
            num_layers=r.num_layers, is_first=r.is_first, is_last=r.is_last,
            num_blocks=r.num_blocks, block_size=r.block_size, max_position=r.max_position,
            vocab_size=r.vocab_size, dtype=r.dtype_name, device=r.device_name,
            quantization=r.quantization, instance_id=self.instance_id,
            max_step_tokens=self.max_step_tokens, default_max_num_seqs=max_num_seqs,
            default_max_num_batched_tokens=max_num_batched_tokens,
            attention_window=stage_attention_window(r.config, r.layer_start, r.layer_end),
            rope_long_after=r.config.rope_long_after)

    async def Profile(self, request, context):
        """Record the next request.steps steps (worker/profiler.py) and return them."""
        runner = self._require_runner()
        error = profile_request_error(request.steps, request.timeout_s)
        if error:
            raise InvalidArgument(error)
        loop = asyncio.get_running_loop()
        try:
            session = self.profiler.arm(request.steps, runner.device, loop)
        except ProfileArmed as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        timeout_s = profile_timeout_s(request.timeout_s)
        log.info("profiling the next %d step(s) (timeout %.0fs)", request.steps, timeout_s)
        try:
            try:                             # start and stop on the compute thread
                await asyncio.wait_for(self._record(session, runner), timeout_s)
            except asyncio.TimeoutError:     # after the step in progress, with what it has
                await loop.run_in_executor(self.executor, session.stop)
            result = await loop.run_in_executor(None, session.result, self.stage_index)
        finally:
            if not session.stopped:          # the caller went away: stop recording anyway
                loop.run_in_executor(self.executor, session.stop)
            self.profiler.disarm(session)
        log.info("profile: %d of %d step(s) recorded", result.steps_recorded, request.steps)
        return result

    async def _record(self, session, runner) -> None:
        await asyncio.get_running_loop().run_in_executor(self.executor, session.start, runner)
        await asyncio.shield(session.done)

    def _compute(self, req: worker_pb2.StepRequest, forward: bool):
        """Runs on the compute thread: one step, recorded when a profile is armed."""
        with self.profiler.step(self.runner):
            return self._compute_step(req, forward)

    def _compute_step(self, req: worker_pb2.StepRequest, forward: bool):
        """Decode the plan, run layers, encode the output."""
        runner = self.runner
        t0 = time.perf_counter()
        span, admits = self._trace_step(req) if telemetry.tracing_enabled() else (None, ())
        try:
            with StageProfiler.range(DECODE_RANGE):
                seqs, free_seq_ids, decode = step_args(req)
                # host memory: the backend moves it (the GPU engine: pinned, non-blocking)
                hidden = pb_to_tensor(req.hidden) if req.HasField("hidden") else None
            span_context = (telemetry.inject(trace.set_span_in_context(span))
                            if span is not None else None)
            # tensor parallel: the other ranks get the same step first (and its span's context)
            with (self.ranks.step(req, hidden, span_context)
                  if self.ranks is not None else contextlib.nullcontext()):
                hidden_out, tokens = runner.step(seqs, free_seq_ids, hidden, decode)
            if forward:
                with StageProfiler.range(ENCODE_RANGE):
                    out = worker_pb2.StepRequest(step_id=req.step_id, seqs=req.seqs,
                                                 free_seq_ids=req.free_seq_ids)
                    if decode is not None:
                        out.decode.CopyFrom(req.decode)
                    if hidden_out is not None:
                        out.hidden.CopyFrom(tensor_to_pb(hidden_out))
                if span_context:
                    out.trace_context.update(span_context)
                dt = time.perf_counter() - t0
                return out, dt
            with StageProfiler.range(ENCODE_RANGE):
                res = encode_result(req.step_id, tokens)
            dt = time.perf_counter() - t0
            res.stage_seconds.append(dt)
            return res, 0.0
        finally:
            stage = str(self.stage_index)
            STEP_SECONDS.labels(stage, "0").observe(time.perf_counter() - t0)
            STEP_TOKENS.labels(stage, "0").inc(step_tokens(req))
            for s in admits:
                s.end()
            if span is not None:
                span.end()

    def _forget_all(self) -> None:
        """Compute thread: every sequence forgotten, on every rank."""
        if self.ranks is not None:
            self.ranks.forget_all()
        self.runner.forget_all()

    async def _may_forward_to(self, address: str) -> bool:
        """Whether address is a configured next stage: equal to a --next-stage entry, or
        resolving only to addresses that entry's DNS name resolves to (the next stage's
        headless Service: the scheduler routes by pod IP with Kubernetes discovery, by pod DNS
        name with static lists)."""
        try:
            host, port = _host_port(address)
        except ValueError:
            return False
        if any(_host_port(a) == (host, port) for a in self.next_stages):
            return True
        loop = asyncio.get_running_loop()

        async def resolve(name: str) -> set[str]:
            try:
                return {str(ipaddress.ip_address(name))}
            except ValueError:
                pass
            try:
                return {info[4][0] for info in await loop.getaddrinfo(name, int(port))}
            except (OSError, UnicodeError):
                return set()
        targets = await resolve(host)
        if not targets:
            return False
        for allowed in self.next_stages:
            a_host, a_port = _host_port(allowed)
            if a_port == port and targets <= await resolve(a_host):
                return True
        return False

    async def _take_over(self, session: str, context) -> _Stream:
        """Become the stage's one Step stream: supersede the same scheduler's old stream (and
        wait until its sequences are forgotten), refuse another scheduler's."""
        old = self._stream
        if old is not None and not old.done.is_set():
            if old.session != session:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    "this stage already serves another scheduler's step stream")
            log.info("a new step stream of the scheduler supersedes its old one")
            old.out.put_nowait(Superseded())
            await old.done.wait()
        stream = self._stream = _Stream(session, asyncio.Queue())
        return stream

    async def Step(self, request_iterator, context):
        runner = self._require_runner()
        md = dict(context.invocation_metadata())
        route = [a for a in md.get(ROUTE_KEY, "").split(",") if a]
        session = md.get(SESSION_KEY, "")
        if not session:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"a step stream needs its scheduler's id in {SESSION_KEY}")
        if runner.is_last and route:
            raise InvalidArgument(f"last stage was given a route beyond it: {route}")
        if not runner.is_last and not route:
            raise InvalidArgument(f"a non-last stage needs the next stage's address in {ROUTE_KEY}")
        if route and not await self._may_forward_to(route[0]):
            log.warning("refused a step stream routed to %s: not a --next-stage of this stage "
                        "(%s)", route[0], ", ".join(self.next_stages) or "none configured")
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"this stage forwards only to its configured next stages "
                                f"(--next-stage), not to {route[0]}")
        stream = await self._take_over(session, context)
        loop = asyncio.get_running_loop()
        out = stream.out
        seconds: collections.deque[float] = collections.deque()
        downstream_call = None
        chan = None
        if route:
            chan = channel(route[0])
            stub = worker_pb2_grpc.StageWorkerStub(chan)
            downstream_call = stub.Step(metadata=((ROUTE_KEY, ",".join(route[1:])),
                                                  (SESSION_KEY, session)))

        async def pump():
            try:
                async for req in request_iterator:
                    msg, dt = await loop.run_in_executor(
                        self.executor, self._compute, req, downstream_call is not None)
                    if downstream_call is not None:
                        seconds.append(dt)
                        await downstream_call.write(msg)
                    else:
                        await out.put(msg)
                if downstream_call is not None:
                    await downstream_call.done_writing()
                else:
                    await out.put(None)
            except Exception as exc:  # noqa: BLE001 - surfaces as the stream's error
                await out.put(exc)

        async def relay():
            try:
                async for res in downstream_call:
                    res.stage_seconds.insert(0, seconds.popleft())
                    await out.put(res)
                await out.put(None)
            except Exception as exc:  # noqa: BLE001
                await out.put(exc)

        tasks = [asyncio.create_task(pump())]
        if downstream_call is not None:
            tasks.append(asyncio.create_task(relay()))
        try:
            while True:
                item = await out.get()
                if item is None:
                    return
                if isinstance(item, grpc.aio.AioRpcError):
                    raise Unavailable(f"next stage {route[0]}: {item.code().name} {item.details()}")
                if isinstance(item, ValueError):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad step plan: {item}")
                if isinstance(item, Superseded):
                    await context.abort(grpc.StatusCode.ABORTED,
                                        "superseded by a new step stream of the same scheduler")
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for t in tasks:
                t.cancel()
            # the stream's sequences go with it; `done` once they are gone (the compute thread
            # runs this after the stream's last step), so a successor starts from a clean stage
            forget = loop.run_in_executor(self.executor, self._forget_all)
            forget.add_done_callback(lambda _: stream.done.set())
            if downstream_call is not None:
                downstream_call.cancel()
            if chan is not None:
                await chan.close()
