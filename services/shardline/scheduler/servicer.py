"""The public Generation service: validate, tokenize, queue, stream text deltas."""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from typing import Callable, Optional

import grpc
from opentelemetry import trace

from shardline.common import telemetry
from shardline.common.server import InvalidArgument, ResourceExhausted, Unavailable, status_for
from shardline.scheduler import metrics
from shardline.scheduler.router import Router
from shardline.scheduler.request import Sequence
from shardline.scheduler.tokenizer_client import DetokenizeState, TokenizerClient
from shardline.scheduler.stop_strings import StopStringFilter
from shardline.v1 import generate_pb2, generate_pb2_grpc
from shardline.protocol.limits import MAX_TOP_LOGPROBS
from shardline.protocol.plan import SamplingConfig

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 16
TENANT_KEY = "x-shardline-tenant"


def tenant_of(context) -> str:
    """The request's tenant (metadata x-shardline-tenant); '' is the shared default tenant."""
    for key, value in context.invocation_metadata() or ():
        if key == TENANT_KEY:
            return value
    return ""


class Limits:
    """What a request may ask for, fixed once the pipelines are known."""

    def __init__(self, max_context: int, max_tokens_cap: int, default_max_tokens: int,
                 vocab_size: int, capacity_tokens: Callable[[], int]):
        self.max_context = max_context
        self.max_tokens_cap = max_tokens_cap
        self.default_max_tokens = default_max_tokens
        self.vocab_size = vocab_size
        self.capacity_tokens = capacity_tokens


def validate_sampling(pb: generate_pb2.GenerateRequest) -> SamplingConfig:
    s = pb.sampling
    if math.isnan(s.temperature) or math.isinf(s.temperature) or s.temperature < 0:
        raise InvalidArgument(f"sampling.temperature must be a finite number >= 0, got {s.temperature}")
    if s.HasField("top_p") and not 0 < s.top_p <= 1:
        raise InvalidArgument(f"sampling.top_p must be in (0, 1], got {s.top_p}")
    if s.top_k < 0:
        raise InvalidArgument(f"sampling.top_k must be >= 0, got {s.top_k}")
    if s.HasField("repetition_penalty") and not 0 < s.repetition_penalty < math.inf:
        raise InvalidArgument(f"sampling.repetition_penalty must be > 0, got {s.repetition_penalty}")
    if s.top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"sampling.top_logprobs must be <= {MAX_TOP_LOGPROBS}, "
                              f"got {s.top_logprobs}")
    return SamplingConfig.from_pb(s)


class GenerationServicer(generate_pb2_grpc.GenerationServicer):
    def __init__(self, tokenizer: TokenizerClient):
        self.tokenizer = tokenizer
        self.router: Optional[Router] = None
        self.limits: Optional[Limits] = None
        self.model_info: Optional[generate_pb2.ModelInfo] = None
        self.eos_ids: frozenset = frozenset()
        self._seq_ids = itertools.count(1)

    def ready(self, router: Router, limits: Limits, model_info: generate_pb2.ModelInfo) -> None:
        """Called once the tokenizer and the first pipeline have answered."""
        self.router = router
        self.limits = limits
        self.model_info = model_info
        self.eos_ids = frozenset(self.tokenizer.info.eos_token_ids)

    async def GetModelInfo(self, request, context):
        if self.model_info is None:
            raise Unavailable("scheduler is still connecting to its workers")
        info = generate_pb2.ModelInfo()
        info.CopyFrom(self.model_info)
        info.num_replicas = len(self.router.live)
        return info

    async def GetStats(self, request, context):
        out = generate_pb2.SchedulerStats()
        for rid, e in sorted((self.router.engines if self.router else {}).items()):
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
                prefix_query_tokens=e.blocks.queries)
        return out

    async def _prompt_ids(self, request) -> list[int]:
        with telemetry.span("tokenize"):
            return await self._prompt_ids_inner(request)

    async def _prompt_ids_inner(self, request) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind == "text":
            if not request.text:
                raise InvalidArgument("prompt text is empty")
            ids = await self.tokenizer.tokenize(request.text)
        elif kind == "messages":
            if not request.messages.messages:
                raise InvalidArgument("messages is empty")
            ids = await self.tokenizer.apply_chat_template(list(request.messages.messages))
        elif kind == "token_ids":
            ids = list(request.token_ids.ids)
            bad = [t for t in ids if not 0 <= t < self.limits.vocab_size]
            if bad:
                raise InvalidArgument(f"token_ids must be in [0, {self.limits.vocab_size}), got {bad[0]}")
        else:
            raise InvalidArgument("prompt is empty: set text, messages or token_ids")
        if not ids:
            raise InvalidArgument("prompt is empty after tokenization")
        return ids

    def _max_tokens(self, request) -> int:
        lim = self.limits
        if request.max_tokens < 0:
            raise InvalidArgument(f"max_tokens must be >= 1, got {request.max_tokens}")
        n = request.max_tokens or lim.default_max_tokens
        if n > lim.max_tokens_cap:
            raise InvalidArgument(f"max_tokens must be <= {lim.max_tokens_cap}, got {n}")
        return n

    async def Generate(self, request, context):
        status = "CANCELLED"
        try:
            async for resp in self._generate(request, context):
                yield resp
            status = "OK"
        except (asyncio.CancelledError, GeneratorExit):
            status = "CANCELLED"
            raise
        except grpc.aio.AbortError:
            code = context.code() if hasattr(context, "code") else None
            status = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
            raise
        except Exception as exc:  # noqa: BLE001 - counted, then mapped by the error interceptor
            status = status_for(exc).name
            raise
        finally:
            metrics.REQUESTS.labels(status).inc()

    async def _generate(self, request, context):
        if self.limits is None:
            raise Unavailable("scheduler is still connecting to its workers")
        sampling = validate_sampling(request)
        max_tokens = self._max_tokens(request)
        stops = [s for s in request.stop if s]
        if len(stops) > MAX_STOP_STRINGS:
            raise InvalidArgument(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        ids = await self._prompt_ids(request)
        lim = self.limits
        if len(ids) >= lim.max_context:
            raise InvalidArgument(f"prompt has {len(ids)} tokens; the context holds {lim.max_context}")
        if len(ids) + max_tokens > lim.max_context:
            raise InvalidArgument(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                                  f"the context of {lim.max_context} tokens")
        capacity = lim.capacity_tokens()
        if capacity and len(ids) + max_tokens > capacity:
            raise ResourceExhausted(f"prompt ({len(ids)}) + max_tokens ({max_tokens}) exceeds the KV "
                                    f"cache capacity of {capacity} tokens per replica")
        seq = Sequence(seq_id=next(self._seq_ids), prompt_token_ids=ids, max_tokens=max_tokens,
                       sampling=sampling, eos_token_ids=self.eos_ids, ignore_eos=request.ignore_eos,
                       max_context=lim.max_context, cache_salt=tenant_of(context))
        if telemetry.tracing_enabled():
            seq.span_context = trace.get_current_span().get_span_context()
            seq.trace_context = telemetry.inject()
            seq.queue_span = telemetry.tracer.start_span(
                "queue", attributes={"shardline.seq_id": seq.seq_id,
                                     "shardline.prompt_tokens": len(ids)})
        queue = self.router.submit(seq)
        stream = _TextStream(self.tokenizer, stops)
        finished = False
        t_first = None
        try:
            while not finished:
                events = [await queue.get()]
                while not queue.empty():
                    events.append(queue.get_nowait())
                for ev in events:
                    if isinstance(ev, Unavailable):
                        raise ev
                    if isinstance(ev, BaseException):
                        raise Unavailable(f"pipeline failed: {ev}")
                toks = [ev.token for ev in events]
                if t_first is None:
                    t_first = time.monotonic()
                    metrics.TTFT.observe(t_first - seq.arrival_time)
                reason = events[-1].finish_reason
                text, hit_stop = await stream.push([t.token_id for t in toks], final=reason is not None)
                if hit_stop:
                    self.router.abort(seq, "stop")
                    reason = "stop"
                resp = generate_pb2.GenerateResponse(text=text, token_ids=[t.token_id for t in toks])
                if request.sampling.logprobs:
                    resp.logprobs.extend(generate_pb2.TokenLogprob(
                        token_id=t.token_id, logprob=t.logprob, top_token_ids=t.top_token_ids,
                        top_logprobs=t.top_logprobs) for t in toks)
                if reason is not None:
                    finished = True
                    resp.finish_reason = reason
                    resp.usage.CopyFrom(generate_pb2.Usage(
                        prompt_tokens=len(ids), completion_tokens=len(seq.output_token_ids),
                        cached_tokens=seq.num_cached_tokens))
                    self._observe_finished(seq, len(ids), t_first)
                yield resp
        finally:
            if seq.queue_span is not None:      # never admitted (cancelled, failed)
                seq.queue_span.end()
                seq.queue_span = None
            if finished:
                self.router.finished(seq)
            else:
                self.router.abort(seq, "abort")

    @staticmethod
    def _observe_finished(seq: Sequence, prompt_tokens: int, t_first: float) -> None:
        now = time.monotonic()
        n = len(seq.output_token_ids)
        metrics.E2E.observe(now - seq.arrival_time)
        if n > 1:
            metrics.TPOT.observe((now - t_first) / (n - 1))
        metrics.PROMPT_TOKENS.inc(prompt_tokens)
        metrics.GENERATION_TOKENS.inc(n)
        metrics.CACHED_TOKENS.inc(seq.num_cached_tokens)


class _TextStream:
    """A sequence's text deltas: incremental detokenization, then the stop-string filter."""

    def __init__(self, tokenizer: TokenizerClient, stops: list[str]):
        self.tokenizer = tokenizer
        self.state = DetokenizeState()
        self.filter = StopStringFilter(stops)

    async def push(self, ids: list[int], final: bool) -> tuple[str, bool]:
        """New text to send, and whether a stop string ended the sequence."""
        with telemetry.span("detokenize"):
            delta = await self.tokenizer.detokenize(self.state, ids)
        return self.filter.push(delta, final)
