"""One request's admission and stream, for every front door (gRPC Generate, the OpenAI HTTP API).

`Generation.open` checks a `GenerateRequest` (sampling, max_tokens, stop strings, prompt,
lengths, capacity), tokenizes it and queues one sequence; everything it refuses is refused
before any work is queued. The `RequestStream` it returns yields `GenerateResponse` chunks
(text deltas, token ids, logprobs, finish reason and usage on the last) and, however it ends,
frees the sequence and counts the request once by status.
"""
from __future__ import annotations

import asyncio
import itertools
import math
import time
from typing import AsyncIterator, Callable, Optional

from opentelemetry import trace

from shardline.common import telemetry
from shardline.common.server import InvalidArgument, ResourceExhausted, Unavailable, status_for
from shardline.protocol.limits import MAX_TOP_LOGPROBS
from shardline.protocol.plan import SamplingConfig
from shardline.scheduler import metrics
from shardline.scheduler.request import Sequence
from shardline.scheduler.router import Router
from shardline.scheduler.stop_strings import StopStringFilter
from shardline.scheduler.tokenizer_client import DetokenizeState, TokenizerClient
from shardline.v1 import generate_pb2

MAX_STOP_STRINGS = 16
TENANT_KEY = "x-shardline-tenant"   # gRPC metadata / HTTP header naming the request's tenant


class Limits:
    """What a request may ask for, fixed once the pipelines are known."""

    def __init__(self, max_context: int, max_tokens_cap: int, default_max_tokens: int,
                 vocab_size: int, capacity_tokens: Callable[[], int], max_queued: int = 0):
        self.max_context = max_context
        self.max_queued = max_queued        # waiting requests beyond which new ones are refused
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


class Generation:
    """Admission and streaming shared by the front doors; ready() once the pipelines answer."""

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

    async def open(self, request: generate_pb2.GenerateRequest, tenant: str) -> "RequestStream":
        """Check, tokenize and queue the request; raises InvalidArgument, ResourceExhausted or
        Unavailable (counted) before anything is queued."""
        try:
            return await self._open(request, tenant)
        except BaseException as exc:
            metrics.REQUESTS.labels(_status_name(exc)).inc()
            raise

    async def _open(self, request: generate_pb2.GenerateRequest, tenant: str) -> "RequestStream":
        if self.limits is None:
            raise Unavailable("scheduler is still connecting to its workers")
        waiting = self.router.num_waiting()
        if self.limits.max_queued and waiting >= self.limits.max_queued:
            raise ResourceExhausted(f"the server is overloaded: {waiting} requests are waiting "
                                    f"(--max-queued-requests {self.limits.max_queued}); retry later")
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
                       max_context=lim.max_context, cache_salt=tenant)
        if telemetry.tracing_enabled():
            seq.span_context = trace.get_current_span().get_span_context()
            seq.trace_context = telemetry.inject()
            seq.queue_span = telemetry.tracer.start_span(
                "queue", attributes={"shardline.seq_id": seq.seq_id,
                                     "shardline.prompt_tokens": len(ids)})
        queue = self.router.submit(seq)
        return RequestStream(self, seq, queue, _TextStream(self.tokenizer, stops),
                             logprobs=request.sampling.logprobs)

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


class RequestStream:
    """A queued request's chunks. Iterate it once; close() (idempotent) ends it early. The
    request is counted once: OK when its last chunk was produced, else by how it ended."""

    def __init__(self, gen: Generation, seq: Sequence, queue: asyncio.Queue, text: "_TextStream",
                 logprobs: bool):
        self.seq = seq
        self.prompt_tokens = len(seq.prompt_token_ids)
        self._gen = gen
        self._queue = queue
        self._text = text
        self._logprobs = logprobs
        self._finished = False
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[generate_pb2.GenerateResponse]:
        try:
            async for resp in self._chunks():
                yield resp
        except Exception as exc:  # noqa: BLE001 - counted, then raised to the front door
            self.close(status_for(exc).name)
            raise

    def close(self, status: str = "CANCELLED") -> None:
        """Free the sequence (abort it unless it finished) and count the request."""
        if self._closed:
            return
        self._closed = True
        seq, router = self.seq, self._gen.router
        if seq.queue_span is not None:          # never admitted (cancelled, failed)
            seq.queue_span.end()
            seq.queue_span = None
        if self._finished:
            router.finished(seq)
            status = "OK"
        else:
            router.abort(seq, "abort")
        metrics.REQUESTS.labels(status).inc()

    async def _chunks(self) -> AsyncIterator[generate_pb2.GenerateResponse]:
        seq, queue, router = self.seq, self._queue, self._gen.router
        t_first = None
        while not self._finished:
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
            text, hit_stop = await self._text.push([t.token_id for t in toks], final=reason is not None)
            if hit_stop:
                router.abort(seq, "stop")
                reason = "stop"
            resp = generate_pb2.GenerateResponse(text=text, token_ids=[t.token_id for t in toks])
            if self._logprobs:
                resp.logprobs.extend(generate_pb2.TokenLogprob(
                    token_id=t.token_id, logprob=t.logprob, top_token_ids=t.top_token_ids,
                    top_logprobs=t.top_logprobs) for t in toks)
            if reason is not None:
                self._finished = True
                resp.finish_reason = reason
                resp.usage.CopyFrom(generate_pb2.Usage(
                    prompt_tokens=self.prompt_tokens, completion_tokens=len(seq.output_token_ids),
                    cached_tokens=seq.num_cached_tokens))
                _observe_finished(seq, self.prompt_tokens, t_first)
            yield resp
        self.close("OK")


def _status_name(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"
    return status_for(exc).name


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
