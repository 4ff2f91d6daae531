"""One request's admission and stream, for every front door (gRPC Generate, the OpenAI HTTP API).

`Generation.open` checks a `GenerateRequest` (sampling, max_tokens, stop strings, prompt,
lengths, capacity, load), tokenizes it and queues one sequence; everything it refuses is
refused before any work is queued (and counted by reason, `metrics.rejected`). The
`RequestStream` it returns yields `GenerateResponse` chunks (text deltas, token ids, logprobs,
finish reason and usage on the last) and, however it ends, frees the sequence and counts the
request once by status and tenant. The request's id (its own, or one made here) is set for
the task's log lines (`telemetry.set_request_id`) and put on its spans.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import uuid
from typing import AsyncIterator, Callable, Optional

from opentelemetry import trace

from shardline.common import telemetry
from shardline.common.request_limits import (MAX_CHAT_MESSAGES, MAX_STOP_STRING_CHARS,
                                             MAX_STOP_STRINGS)
from shardline.common.server import InvalidArgument, ResourceExhausted, Unavailable, status_for
from shardline.protocol.limits import MAX_TOP_LOGPROBS
from shardline.protocol.plan import SamplingConfig
from shardline.scheduler import metrics
from shardline.scheduler.request import Sequence
from shardline.scheduler.router import Router
from shardline.scheduler.stop_strings import StopStringFilter
from shardline.scheduler.tokenizer_client import DetokenizeState, TokenizerClient
from shardline.scheduler.waiting_queue import MAX_PRIORITY, QueueWaitExceeded
from shardline.v1 import generate_pb2

log = logging.getLogger(__name__)

TENANT_KEY = "x-shardline-tenant"   # gRPC metadata / HTTP header naming the request's tenant
REQUEST_ID_KEY = "x-shardline-request-id"   # response metadata returning the request's id
MAX_REQUEST_ID_CHARS = 128


def valid_request_id(request_id: str) -> bool:
    """1 to 128 printable ASCII characters without spaces (safe in a log line)."""
    return 0 < len(request_id) <= MAX_REQUEST_ID_CHARS and \
        all("!" <= c <= "~" for c in request_id)


class QueueFull(ResourceExhausted):
    """--max-queued-requests requests are waiting already."""


class Limits:
    """What a request may ask for, fixed once the pipelines are known."""

    def __init__(self, max_context: int, max_tokens_cap: int, default_max_tokens: int,
                 vocab_size: int, capacity_tokens: Callable[[], int], max_queued: int = 0,
                 max_queue_wait_s: float = 0.0, max_prompt_chars: int = 0):
        self.max_context = max_context
        self.max_prompt_chars = max_prompt_chars   # 0: no limit before tokenizing
        self.max_queued = max_queued        # waiting requests beyond which new ones are refused
        self.max_queue_wait_s = max_queue_wait_s   # refused while queues shed older requests
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


def check_sizes(pb: generate_pb2.GenerateRequest, max_prompt_chars: int) -> list[str]:
    """The request's stop strings, once they (count, length) and its prompt's characters are
    checked: before it is tokenized, so an oversized prompt costs no tokenizer time."""
    stops = [s for s in pb.stop if s]
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    longest = max(map(len, stops), default=0)
    if longest > MAX_STOP_STRING_CHARS:
        raise InvalidArgument(f"a stop string may have at most {MAX_STOP_STRING_CHARS} "
                              f"characters, got one of {longest}")
    kind = pb.WhichOneof("prompt")
    if kind == "text":
        chars = len(pb.text)
    elif kind == "messages":
        messages = pb.messages.messages
        if len(messages) > MAX_CHAT_MESSAGES:
            raise InvalidArgument(f"at most {MAX_CHAT_MESSAGES} messages, got {len(messages)}")
        chars = sum(len(m.role) + len(m.content) for m in messages)
    else:
        chars = 0
    if max_prompt_chars and chars > max_prompt_chars:
        raise InvalidArgument(f"prompt has {chars} characters; at most {max_prompt_chars} are "
                              "accepted")
    return stops


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

    async def open(self, request: generate_pb2.GenerateRequest, tenant: str,
                   cancelled_status: Optional[Callable[[], str]] = None) -> "RequestStream":
        """Check, tokenize and queue the request; raises InvalidArgument, ResourceExhausted or
        Unavailable (counted) before anything is queued. cancelled_status() names how a call
        cancelled meanwhile ended (default CANCELLED; gRPC's may say DEADLINE_EXCEEDED)."""
        rid = request.request_id if valid_request_id(request.request_id) else uuid.uuid4().hex
        telemetry.set_request_id(rid)
        try:
            return await self._open(request, tenant, rid)
        except BaseException as exc:
            status = _status_name(exc)
            if status == "CANCELLED" and cancelled_status is not None:
                status = cancelled_status()
            reason = reject_reason(exc)
            if reason is not None:
                metrics.rejected(reason)
                log.debug("refused (%s): %s", reason, exc)
            metrics.request_ended(tenant, status)
            raise

    def _check_load(self) -> None:
        """Refuse at once while the queues are full or shedding (cheapest checks first)."""
        waiting = self.router.num_waiting()
        if self.limits.max_queued and waiting >= self.limits.max_queued:
            raise QueueFull(f"the server is overloaded: {waiting} requests are waiting "
                            f"(--max-queued-requests {self.limits.max_queued}); retry later")
        if self.limits.max_queue_wait_s and self.router.overloaded():
            raise QueueWaitExceeded(self.limits.max_queue_wait_s)

    async def _open(self, request: generate_pb2.GenerateRequest, tenant: str,
                    rid: str) -> "RequestStream":
        if self.limits is None:
            raise Unavailable("scheduler is still connecting to its workers")
        self._check_load()
        if request.request_id and request.request_id != rid:
            raise InvalidArgument(f"request_id must be 1 to {MAX_REQUEST_ID_CHARS} printable "
                                  "ASCII characters without spaces")
        if abs(request.priority) > MAX_PRIORITY:
            raise InvalidArgument(f"priority must be in [-{MAX_PRIORITY}, {MAX_PRIORITY}], "
                                  f"got {request.priority}")
        sampling = validate_sampling(request)
        max_tokens = self._max_tokens(request)
        stops = check_sizes(request, self.limits.max_prompt_chars)
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
        # again: concurrent requests passed the first check while they were being tokenized;
        # from here to submit() nothing awaits, so the queue never holds more than the cap
        self._check_load()
        seq = Sequence(seq_id=next(self._seq_ids), prompt_token_ids=ids, max_tokens=max_tokens,
                       sampling=sampling, eos_token_ids=self.eos_ids, ignore_eos=request.ignore_eos,
                       max_context=lim.max_context, cache_salt=tenant, tenant=tenant,
                       priority=request.priority, request_id=rid)
        if telemetry.tracing_enabled():
            request_span = trace.get_current_span()
            request_span.set_attribute("shardline.request_id", rid)
            seq.span_context = request_span.get_span_context()
            seq.trace_context = telemetry.inject()
            seq.queue_span = telemetry.tracer.start_span(
                "queue", attributes={"shardline.seq_id": seq.seq_id, "shardline.request_id": rid,
                                     "shardline.prompt_tokens": len(ids)})
        queue = self.router.submit(seq)
        log.debug("queued seq %d: %d prompt tokens, max_tokens %d, priority %d", seq.seq_id,
                  len(ids), max_tokens, seq.priority)
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
        else:
            raise InvalidArgument("prompt is empty: set text, messages or token_ids")
        if not ids:
            raise InvalidArgument("prompt is empty after tokenization")
        # token_ids as sent, or a tokenizer with more tokens than the model has rows: refused
        # here, before a worker would refuse the whole step (and break the replica)
        bad = [t for t in ids if not 0 <= t < self.limits.vocab_size]
        if bad:
            what = "token_ids" if kind == "token_ids" else "the prompt's token ids"
            raise InvalidArgument(f"{what} must be in [0, {self.limits.vocab_size}) (the "
                                  f"model's vocabulary), got {bad[0]}")
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
    request is counted once: OK when its last chunk was produced, else by how it ended. A
    request that waited too long in a queue ends with QueueWaitExceeded (RESOURCE_EXHAUSTED)."""

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

    @property
    def request_id(self) -> str:
        return self.seq.request_id

    async def __aiter__(self) -> AsyncIterator[generate_pb2.GenerateResponse]:
        try:
            async for resp in self._chunks():
                yield resp
        except Exception as exc:  # noqa: BLE001 - counted, then raised to the front door
            if isinstance(exc, QueueWaitExceeded):
                metrics.rejected("queue_wait")
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
        if seq.first_admitted_at is not None:
            metrics.QUEUE_TIME.observe(seq.first_admitted_at - seq.queued_at)
        metrics.request_ended(seq.tenant, status)
        log.debug("seq %d ended: %s, %d tokens generated", seq.seq_id, status,
                  len(seq.output_token_ids))

    async def _chunks(self) -> AsyncIterator[generate_pb2.GenerateResponse]:
        seq, queue, router = self.seq, self._queue, self._gen.router
        t_first = None
        while not self._finished:
            events = [await queue.get()]
            while not queue.empty():
                events.append(queue.get_nowait())
            for ev in events:
                if isinstance(ev, (Unavailable, QueueWaitExceeded)):
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


_REJECT_REASONS = [(QueueFull, "queue_full"), (QueueWaitExceeded, "queue_wait"),
                   (InvalidArgument, "invalid_argument"),
                   (ResourceExhausted, "resource_exhausted"), (Unavailable, "unavailable")]


def reject_reason(exc: BaseException) -> Optional[str]:
    """The rejected-requests reason of an exception refusing a request, or None (not one)."""
    for cls, reason in _REJECT_REASONS:
        if isinstance(exc, cls):
            return reason
    return None


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
