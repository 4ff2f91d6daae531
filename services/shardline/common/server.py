"""gRPC server bootstrap shared by every service.

One place for: health (grpc.health.v1), reflection, the error interceptor, and the one
shutdown path (SIGTERM/SIGINT -> NOT_SERVING -> drain -> stop): new calls are refused
(common/drain.py), calls in flight get up to the drain timeout, then the rest are cancelled.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import Callable, Iterable, Optional

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shardline.common import auth
from shardline.common.drain import Drain, DrainInterceptor
from shardline.common.request_limits import CHANNEL_RECEIVE_BYTES
from shardline.common.telemetry import RequestIdFilter, TracingInterceptor, shutdown_tracing

log = logging.getLogger(__name__)


def channel_options(max_receive_bytes: int) -> list[tuple[str, int]]:
    """gRPC options: messages received up to max_receive_bytes (a longer one is refused with
    RESOURCE_EXHAUSTED from its length prefix, before it is read); sending is not limited (the
    receiver's limit is the one that counts)."""
    return [("grpc.max_receive_message_length", max_receive_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0)]


# the options of a client of the deployment's services (responses are small)
CHANNEL_OPTIONS = channel_options(CHANNEL_RECEIVE_BYTES)


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
    """Turns what escapes a handler into a status, never a crash: domain exceptions into their
    codes (one WARNING line each), anything else into INTERNAL (ERROR with its traceback).

    Requests are parsed here rather than by gRPC (the handlers it registers take the raw
    bytes), so a message that does not parse (corrupt bytes, invalid UTF-8 in a string field)
    is INVALID_ARGUMENT, where gRPC's own deserializer would end the call UNKNOWN."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        parse = _parser(handler.request_deserializer)

        def wrap_unary(fn, stream_in):
            async def call(raw, context):
                request = None
                try:
                    request = _parse_each(raw, parse) if stream_in else parse(raw)
                    return await fn(request, context)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:  # noqa: BLE001 - the boundary of the service
                    await _abort(context, method, exc, request)
            return call

        def wrap_stream(fn, stream_in):
            async def call(raw, context):
                request = None
                try:
                    request = _parse_each(raw, parse) if stream_in else parse(raw)
                    async for item in fn(request, context):
                        yield item
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:  # noqa: BLE001
                    await _abort(context, method, exc, request)
            return call

        out = handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary, False), None, out)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream, False), None, out)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                wrap_stream(handler.stream_stream, True), None, out)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap_unary(handler.stream_unary, True), None, out)
        return handler


def _parser(deserializer: Optional[Callable]) -> Callable:
    """raw bytes -> the request; a message that does not parse raises InvalidArgument."""
    if deserializer is None:
        return lambda raw: raw

    def parse(raw):
        try:
            return deserializer(raw)
        except DecodeError as exc:
            raise InvalidArgument(f"malformed request: {exc}") from None
    return parse


async def _parse_each(raw_requests, parse):
    async for raw in raw_requests:
        yield parse(raw)


async def _abort(context, method: str, exc: BaseException, request=None) -> None:
    if isinstance(exc, grpc.aio.AioRpcError):
        # a call to another service failed: its code and details, never its debug string
        code, message = exc.code(), exc.details() or exc.code().name
    else:
        code, message = status_for(exc), str(exc) or type(exc).__name__
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        log.error("%s failed", method, exc_info=exc)
    else:
        log.warning("%s refused: %s: %s", method, code.name, message,
                    extra={"request_id": getattr(request, "request_id", "")})
    await context.abort(code, message)


class Service:
    """A running gRPC server with health and reflection, and one graceful stop path."""

    def __init__(self, name: str, port: int, host: str = "0.0.0.0",
                 public_auth: Optional[list] = None, drain_timeout_s: float = 30.0,
                 refuse_while_draining: bool = True, max_receive_bytes: int = 4 << 20):
        """public_auth: None for an internal service (the cluster token and mTLS of
        auth.configure()); else the public API's interceptors (API keys, maybe none).
        drain_timeout_s: how long calls in flight at SIGTERM may go on; refuse_while_draining:
        False serves new calls too until then (see the tokenizer). max_receive_bytes: the
        largest request message accepted, sized by each service from the limits it enforces
        (common/request_limits.py); a longer one gets RESOURCE_EXHAUSTED unread."""
        self.name = name
        self.drain_timeout_s = drain_timeout_s
        self.drain = Drain(name, refuse_new=refuse_while_draining)
        security = auth.cluster_interceptors() if public_auth is None else public_auth
        self.server = grpc.aio.server(
            interceptors=[DrainInterceptor(self.drain), TracingInterceptor(), *security,
                          ErrorInterceptor()],
            options=channel_options(max_receive_bytes))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = [health.SERVICE_NAME, reflection.SERVICE_NAME]
        creds = auth.transport().server_credentials() if public_auth is None else None
        self.port = (self.server.add_secure_port(f"{host}:{port}", creds) if creds is not None
                     else self.server.add_insecure_port(f"{host}:{port}"))
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
        """Await fn() during the drain, beside the wait for calls in flight (another server of
        the process drains too); cancelled at the drain timeout."""
        self._on_drain.append(fn)

    def on_stop(self, fn: Callable) -> None:
        """Call fn (sync or async) after the drain, once the gRPC server has stopped."""
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
        """Serve until SIGTERM/SIGINT; then NOT_SERVING, refuse new calls, let those in
        flight finish for up to drain_timeout_s, cancel the rest and stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):
                pass
        await self._stopping.wait()
        self.drain.start()
        await self.set_serving(False)
        log.info("%s: draining %d call(s) in flight (up to %.1fs)", self.name,
                 self.drain.in_flight, self.drain_timeout_s)
        try:
            await asyncio.wait_for(
                asyncio.gather(self.drain.wait_idle(), *(fn() for fn in self._on_drain)),
                self.drain_timeout_s)
        except asyncio.TimeoutError:
            log.warning("%s: drain timeout (%.1fs): cancelling %d call(s) still in flight",
                        self.name, self.drain_timeout_s, self.drain.in_flight)
        await self.server.stop(0)
        for fn in self._on_stop:
            res = fn()
            if asyncio.iscoroutine(res):
                await res
        shutdown_tracing()
        log.info("%s: stopped", self.name)


def configure_logging(name: str, level: str = "INFO") -> None:
    """Log lines to stderr; those about a request end with request_id=<id>."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s%(request_tag)s",
    )
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())


def channel(address: str, max_receive_bytes: int = CHANNEL_RECEIVE_BYTES) -> grpc.aio.Channel:
    """An aio channel to another service of the deployment, receiving responses of up to
    max_receive_bytes, with the cluster token and mTLS when configured (common/auth.py)."""
    return auth.aio_channel(address, channel_options(max_receive_bytes))
