"""Python client for the Shardline Generate API.

    from shardline.client import Client
    c = Client("localhost:50051")
    out = c.generate("The capital of France is", max_tokens=16)
    print(out.text, out.finish_reason, out.usage.completion_tokens)
    for chunk in c.stream(messages=[{"role": "user", "content": "Hi"}]):
        print(chunk.text, end="", flush=True)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import grpc
from opentelemetry import propagate

from shardline.common.server import CHANNEL_OPTIONS
from shardline.v1 import common_pb2, generate_pb2, generate_pb2_grpc

TENANT_KEY = "x-shardline-tenant"


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class Chunk:
    """One streamed piece: text delta and token ids; the last carries finish_reason and usage."""
    text: str
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    finish_reason: Optional[str] = None
    usage: Optional[Usage] = None


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list[float] = field(default_factory=list)


def build_request(prompt: Optional[str] = None, *, messages: Optional[Sequence[dict]] = None,
                  token_ids: Optional[Sequence[int]] = None, max_tokens: int = 0,
                  temperature: float = 0.0, top_p: Optional[float] = None, top_k: int = 0,
                  repetition_penalty: Optional[float] = None, seed: Optional[int] = None,
                  stop: Optional[Sequence[str] | str] = None, logprobs: bool = False,
                  top_logprobs: int = 0, ignore_eos: bool = False,
                  request_id: str = "") -> generate_pb2.GenerateRequest:
    """The GenerateRequest for these arguments (exactly one of prompt, messages, token_ids)."""
    given = [x is not None for x in (prompt, messages, token_ids)]
    if sum(given) != 1:
        raise ValueError("pass exactly one of prompt, messages or token_ids")
    sp = common_pb2.SamplingParams(temperature=temperature, top_k=top_k, logprobs=logprobs,
                                   top_logprobs=top_logprobs)
    if top_p is not None:
        sp.top_p = top_p
    if repetition_penalty is not None:
        sp.repetition_penalty = repetition_penalty
    if seed is not None:
        sp.seed, sp.has_seed = seed, True
    if isinstance(stop, str):
        stop = [stop]
    req = generate_pb2.GenerateRequest(max_tokens=max_tokens, sampling=sp, stop=stop or [],
                                       ignore_eos=ignore_eos, request_id=request_id)
    if prompt is not None:
        req.text = prompt
    elif messages is not None:
        req.messages.messages.extend(
            generate_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    else:
        req.token_ids.ids.extend(token_ids)
    return req


def chunk_from_pb(pb: generate_pb2.GenerateResponse) -> Chunk:
    usage = None
    if pb.HasField("usage"):
        usage = Usage(pb.usage.prompt_tokens, pb.usage.completion_tokens, pb.usage.cached_tokens)
    return Chunk(text=pb.text, token_ids=list(pb.token_ids),
                 logprobs=[lp.logprob for lp in pb.logprobs],
                 finish_reason=pb.finish_reason or None, usage=usage)


API_KEY_ENV = "SHARDLINE_API_KEY"


def api_key_metadata(api_key: Optional[str] = None) -> tuple[tuple[str, str], ...]:
    """gRPC metadata presenting a public API key (default: $SHARDLINE_API_KEY), if any."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    return (("authorization", f"Bearer {key}"),) if key else ()


class Client:
    """Blocking client; one channel, reused. Usable as a context manager."""

    def __init__(self, address: str = "localhost:50051", timeout: Optional[float] = None,
                 tenant: Optional[str] = None, api_key: Optional[str] = None):
        """api_key: the server's public API key (default: $SHARDLINE_API_KEY), if it wants one."""
        self.address = address
        self.timeout = timeout
        self.tenant = tenant
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = generate_pb2_grpc.GenerationStub(self._channel)

    def _metadata(self):
        md = [(TENANT_KEY, self.tenant)] if self.tenant else []
        md.extend(api_key_metadata(self.api_key))
        carrier: dict = {}
        propagate.inject(carrier)       # the caller's trace context (W3C traceparent), if any
        md.extend(carrier.items())
        return tuple(md)

    def stream(self, prompt: Optional[str] = None, **kwargs) -> Iterator[Chunk]:
        """Yield chunks as they are generated; raises grpc.RpcError on failure."""
        req = build_request(prompt, **kwargs)
        call = self._stub.Generate(req, timeout=self.timeout, metadata=self._metadata())
        try:
            for pb in call:
                yield chunk_from_pb(pb)
        finally:
            call.cancel()

    def generate(self, prompt: Optional[str] = None, **kwargs) -> Completion:
        """Generate to completion and return the whole result."""
        text, ids, lps, reason, usage = [], [], [], "", Usage()
        for c in self.stream(prompt, **kwargs):
            text.append(c.text)
            ids.extend(c.token_ids)
            lps.extend(c.logprobs)
            if c.finish_reason:
                reason, usage = c.finish_reason, c.usage or usage
        return Completion("".join(text), ids, reason, usage, lps)

    def model_info(self) -> generate_pb2.ModelInfo:
        return self._stub.GetModelInfo(generate_pb2.ModelInfoRequest(), timeout=self.timeout or 10,
                                       metadata=api_key_metadata(self.api_key))

    def stats(self) -> generate_pb2.SchedulerStats:
        """Live scheduler state per replica (queues, KV blocks, step timing)."""
        return self._stub.GetStats(generate_pb2.StatsRequest(), timeout=self.timeout or 10,
                                   metadata=api_key_metadata(self.api_key))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
