"""gRPC server bootstrap shared by every service.

One place for: health (grpc.health.v1), reflection, the error interceptor, and the one
shutdown path (SIGTERM/SIGINT -> NOT_SERVING -> drain -> stop(grace)).
"""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shardline.common.telemetry import TracingInterceptor, shutdown_tracing

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


class InvalidArgument(ValueError):
    """Raised by core code for bad client input; mapped to INVALID_ARGUMENT."""


class ResourceExhausted(RuntimeError):
    """Raised when a request can never fit; mapped to RESOURCE_EXHAUSTED."""


class Unavailable(RuntimeError):
    """Raised when no backend can serve; mapped to UNAVAILABLE."""


_STATUS_BY_ERROR = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
]


def status_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in _STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns domain exceptions escaping a handler into gRPC status codes, never a crash."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def wrap_unary(fn):
            async def call(request, context):
                try:
                    return await fn(request, context)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:  # noqa: BLE001 - the boundary of the service
                    await _abort(context, method, exc)
            return call

        def wrap_stream(fn):
            async def call(request, context):
                try:
                    async for item in fn(request, context):
                        yield item
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:  # noqa: BLE001
                    await _abort(context, method, exc)
            return call

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                wrap_stream(handler.stream_stream), handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap_unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer)
        return handler


async def _abort(context, method: str, exc: BaseException) -> None:
    code = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method)
    await context.abort(code, str(exc) or type(exc).__name__)


class Service:
    """A running gRPC server with health and reflection, and one graceful stop path."""

    def __init__(self, name: str, port: int, host: str = "0.0.0.0", grace_s: float = 5.0):
        self.name = name
        self.grace_s = grace_s
        self.server = grpc.aio.server(interceptors=[TracingInterceptor(), ErrorInterceptor()],
                                      options=CHANNEL_OPTIONS)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = [health.SERVICE_NAME, reflection.SERVICE_NAME]
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise RuntimeError(f"{name}: cannot bind {host}:{port}")
        self._stopping = asyncio.Event()
        self._on_drain: list[Callable] = []
        self._on_stop: list[Callable] = []
        self.serving = False

    def add(self, add_fn: Callable, servicer, full_names: Iterable[str]) -> None:
        """Register a servicer (add_XServicer_to_server, servicer, [service full names])."""
        add_fn(servicer, self.server)
        self._service_names.extend(full_names)

    def on_drain(self, fn: Callable) -> None:
        """Await fn() while the gRPC server drains (another server of the process drains too)."""
        self._on_drain.append(fn)

    def on_stop(self, fn: Callable) -> None:
        """Call fn (sync or async) after the server has drained."""
        self._on_stop.append(fn)

    async def start(self) -> None:
        reflection.enable_server_reflection(self._service_names, self.server)
        await self.server.start()

    async def set_serving(self, serving: bool = True) -> None:
        self.serving = serving
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set("", status)
        for name in self._service_names:
            await self.health.set(name, status)

    def request_stop(self) -> None:
        self._stopping.set()

    async def serve_until_stopped(self) -> None:
        """Serve until SIGTERM/SIGINT, then NOT_SERVING, drain, stop(grace)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):
                pass
        await self._stopping.wait()
        log.info("%s: stopping (grace %.1fs)", self.name, self.grace_s)
        await self.set_serving(False)
        await asyncio.gather(self.server.stop(self.grace_s), *(fn() for fn in self._on_drain))
        for fn in self._on_stop:
            res = fn()
            if asyncio.iscoroutine(res):
                await res
        shutdown_tracing()
        log.info("%s: stopped", self.name)


def configure_logging(name: str, level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s",
    )


def channel(address: str) -> grpc.aio.Channel:
    """An insecure aio channel with Shardline's message limits."""
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
