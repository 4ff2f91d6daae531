"""Graceful drain: what a service does between SIGTERM and its stop.

`Drain` counts the calls in flight on every front door of a process (gRPC through
`DrainInterceptor`, HTTP through the scheduler's ASGI wrapper) and, once started, says so:
new calls are refused with UNAVAILABLE and `Drain.message` ("scheduler is draining; retry
on another replica"), calls already running go on, and `wait_idle` returns when the last
one has ended. Health checks (and reflection) are never counted nor refused: probes must
keep seeing NOT_SERVING. common/server.py's Service owns one and bounds the wait by its
drain timeout.
"""
from __future__ import annotations

import asyncio
import inspect

import grpc

from shardline.common import telemetry

# methods that neither count as work in flight nor are refused while draining
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class Drain:
    """Calls in flight, and whether new ones are still taken."""

    def __init__(self, name: str, refuse_new: bool = True):
        self.name = name
        self.refuse_new = refuse_new        # False: serve new calls too while draining
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def message(self) -> str:
        return f"{self.name} is draining; retry on another replica"

    @property
    def refusing(self) -> bool:
        """True once new calls are to be refused."""
        return self.draining and self.refuse_new

    def start(self) -> None:
        """From now on refuse new calls (if refuse_new); those in flight go on."""
        self.draining = True

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def exit(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no call is in flight."""
        while self.in_flight:
            await self._idle.wait()


def refusing_handler(handler, code: grpc.StatusCode, message: str):
    """A handler of the same kind as handler that ends the call with (code, message) without
    running it."""
    async def unary(request, context):
        await context.abort(code, message)

    async def stream(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    return _same_kind(handler, unary, stream)


def _same_kind(handler, unary, stream):
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer,
                                                   handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer,
                                                    handler.response_serializer)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(stream, handler.request_deserializer,
                                                     handler.response_serializer)
    return grpc.stream_unary_rpc_method_handler(unary, handler.request_deserializer,
                                                handler.response_serializer)


class DrainInterceptor(grpc.aio.ServerInterceptor):
    """Counts every call's handler as work in flight of `drain`; while it drains, refuses new
    calls (UNAVAILABLE, drain.message) before anything else runs. Goes first in a server's
    interceptors."""

    def __init__(self, drain: Drain):
        self.drain = drain

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(EXEMPT_PREFIXES):
            return handler
        if self.drain.refusing:
            telemetry.rejected("draining")
            return refusing_handler(handler, grpc.StatusCode.UNAVAILABLE, self.drain.message)
        fn = (handler.unary_unary or handler.unary_stream or handler.stream_stream
              or handler.stream_unary)
        return _same_kind(handler, self._unary(fn), self._stream(fn))

    def _unary(self, fn):
        drain = self.drain

        async def call(request, context):
            drain.enter()
            try:
                res = fn(request, context)
                return await res if inspect.isawaitable(res) else res
            finally:
                drain.exit()
        return call

    def _stream(self, fn):
        drain = self.drain

        async def call(request, context):
            drain.enter()
            try:
                res = fn(request, context)
                if hasattr(res, "__aiter__"):
                    async for item in res:
                        yield item
                elif inspect.isawaitable(res):      # a handler writing with context.write()
                    await res
            finally:
                drain.exit()
        return call
