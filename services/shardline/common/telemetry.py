"""Tracing (OpenTelemetry) and metrics (Prometheus) for every service, configured in one place.

`setup(service_name, metrics_port)` is called from each service's serve(); nothing here reads the
environment at import time. Tracing follows the standard variables:

- OTEL_TRACES_EXPORTER: comma-separated `otlp`, `console`, `none` (default: `otlp` when
  OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set, else `none`);
- OTEL_EXPORTER_OTLP_ENDPOINT (gRPC OTLP, e.g. http://otel-collector:4317), OTEL_SERVICE_NAME
  (overrides the service's own name), OTEL_RESOURCE_ATTRIBUTES, OTEL_BSP_*, OTEL_SDK_DISABLED.

With no exporter no SDK is installed: the API's no-op tracer is used, spans cost a function call,
and nothing is injected into metadata. Trace context travels as W3C `traceparent` in gRPC metadata
on unary calls, and inside StepRequest / SeqPlan (`trace_context`) on the worker stream.

Also shared by every service: `rejected(reason)`, the counter of requests refused before any
work, and the current request's id (`set_request_id`), which `RequestIdFilter` puts on every
log line made while that request is handled.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from typing import Iterable, Mapping, Optional

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from prometheus_client import Counter

log = logging.getLogger(__name__)

tracer = trace.get_tracer("shardline")
_enabled = False
_provider = None


def tracing_enabled() -> bool:
    return _enabled


_NO_SPAN = contextlib.nullcontext()


def span(name: str):
    """A child span of the current one, as a context manager; a shared no-op while tracing is
    off (OpenTelemetry's no-op tracer still costs ~20 us per span, once per token here)."""
    return tracer.start_as_current_span(name) if _enabled else _NO_SPAN


def _exporter_names() -> list[str]:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    raw = os.environ.get("OTEL_TRACES_EXPORTER")
    if raw is None:
        endpoint = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                    or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
        return ["otlp"] if endpoint else []
    return [n.strip().lower() for n in raw.split(",") if n.strip() and n.strip().lower() != "none"]


def setup_tracing(service_name: str, **attributes) -> bool:
    """Install the SDK when an exporter is configured; True when tracing is on."""
    global _enabled, _provider
    names = _exporter_names()
    if not names:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    attrs = {"service.name": service_name, **{k: v for k, v in attributes.items() if v is not None}}
    provider = TracerProvider(resource=Resource.create(attrs))   # OTEL_SERVICE_NAME wins
    for name in names:
        if name == "otlp":
            exporter = _otlp_exporter()
        elif name == "console":
            exporter = ConsoleSpanExporter(service_name=service_name)
        else:
            log.warning("OTEL_TRACES_EXPORTER: unknown exporter %r ignored", name)
            continue
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    _enabled = True
    log.info("tracing on: exporters %s", ",".join(names))
    return True


def _otlp_exporter():
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip().lower()
    if protocol.startswith("http"):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            return OTLPSpanExporter()
        except ImportError:
            log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s needs opentelemetry-exporter-otlp-proto-http;"
                        " exporting over gRPC instead", protocol)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()


def shutdown_tracing() -> None:
    """Flush and stop exporters (called after the server drained)."""
    global _enabled
    if _provider is not None:
        try:
            _provider.shutdown()
        except Exception:  # noqa: BLE001 - never fail a shutdown on telemetry
            log.exception("tracing shutdown failed")
    _enabled = False


def start_metrics(port: int) -> Optional[int]:
    """Serve Prometheus metrics on :port (0 = off). Returns the port, or None."""
    if not port:
        return None
    from prometheus_client import start_http_server
    start_http_server(port)
    log.info("metrics on :%d/metrics", port)
    return port


def setup(service_name: str, metrics_port: int = 0, **attributes) -> None:
    """Tracing from OTEL_* plus the metrics endpoint: the one call each serve() makes."""
    setup_tracing(service_name, **attributes)
    start_metrics(metrics_port)


# -- rejections -------------------------------------------------------------------------------
# Reasons a request is refused before any work; counted from zero so dashboards see them all.
REJECT_REASONS = ("queue_full", "queue_wait", "invalid_argument", "resource_exhausted",
                  "unavailable", "unauthenticated", "draining")
REJECTED = Counter("shardline_rejected_requests", "Requests refused before any work, by reason "
                   "(" + ", ".join(REJECT_REASONS) + ")", ["reason"])
for _reason in REJECT_REASONS:
    REJECTED.labels(_reason)


def rejected(reason: str) -> None:
    """Count one request refused for reason (one of REJECT_REASONS: a fixed, small set)."""
    REJECTED.labels(reason).inc()


# -- the current request's id in log lines -----------------------------------------------------
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("shardline_request_id",
                                                                  default="")


def set_request_id(request_id: str) -> None:
    """Name the request the current task handles (its log lines carry request_id=...)."""
    _request_id.set(request_id)


def current_request_id() -> str:
    return _request_id.get()


class RequestIdFilter(logging.Filter):
    """Sets record.request_id (from `extra`, else the current request's, else "") and
    record.request_tag (" request_id=<id>", or "" outside a request) for the log format. An
    id that is not short printable ASCII (a client's, unchecked) is logged escaped."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = str(getattr(record, "request_id", "") or _request_id.get())
        if len(rid) > 128 or not all("!" <= c <= "~" for c in rid):
            rid = ascii(rid[:128])
        record.request_id = rid
        record.request_tag = f" request_id={rid}" if rid else ""
        return True


# -- propagation ------------------------------------------------------------------------------
def inject(ctx=None) -> dict:
    """The current (or ctx's) trace context as a carrier dict ({} when not traced)."""
    carrier: dict = {}
    if _enabled:
        propagate.inject(carrier, context=ctx)
    return carrier


def metadata(extra: Iterable = ()) -> Optional[tuple]:
    """gRPC metadata for an outgoing call: extra pairs plus the current trace context."""
    pairs = tuple(extra) + tuple(inject().items())
    return pairs or None


def extract(carrier: Mapping[str, str]):
    """A Context from a carrier dict (or the current context when empty)."""
    return propagate.extract(carrier) if carrier else otel_context.get_current()


def extract_metadata(invocation_metadata) -> otel_context.Context:
    return propagate.extract({k: v for k, v in (invocation_metadata or ()) if isinstance(v, str)})


def span_context_of(carrier: Mapping[str, str]) -> Optional[trace.SpanContext]:
    """The remote SpanContext in a carrier dict, or None."""
    if not carrier:
        return None
    sc = trace.get_current_span(propagate.extract(carrier)).get_span_context()
    return sc if sc.is_valid else None


def links(span_contexts: Iterable[Optional[trace.SpanContext]]) -> list[trace.Link]:
    return [trace.Link(sc) for sc in span_contexts if sc is not None]


class TracingInterceptor:
    """Server side: a SERVER span per unary call, child of the caller's context (metadata).
    Streams are left to the servicers (the worker's Step stream spans are per step)."""

    def __new__(cls):
        import grpc

        class _Interceptor(grpc.aio.ServerInterceptor):
            async def intercept_service(self, continuation, details):
                handler = await continuation(details)
                method = details.method
                if handler is None or not _enabled or method.startswith("/grpc."):
                    return handler
                name = method.lstrip("/")

                def wrap_unary(fn):
                    async def call(request, context):
                        parent = extract_metadata(context.invocation_metadata())
                        with tracer.start_as_current_span(name, context=parent,
                                                          kind=trace.SpanKind.SERVER):
                            return await fn(request, context)
                    return call

                def wrap_stream(fn):
                    async def call(request, context):
                        parent = extract_metadata(context.invocation_metadata())
                        span = tracer.start_span(name, context=parent, kind=trace.SpanKind.SERVER)
                        token = otel_context.attach(trace.set_span_in_context(span, parent))
                        try:
                            async for item in fn(request, context):
                                yield item
                        except BaseException as exc:
                            span.record_exception(exc)
                            span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
                            raise
                        finally:
                            span.end()
                            try:
                                otel_context.detach(token)
                            except Exception:  # noqa: BLE001 - generator closed elsewhere
                                pass
                    return call

                if handler.unary_unary:
                    return grpc.unary_unary_rpc_method_handler(
                        wrap_unary(handler.unary_unary), handler.request_deserializer,
                        handler.response_serializer)
                if handler.unary_stream:
                    return grpc.unary_stream_rpc_method_handler(
                        wrap_stream(handler.unary_stream), handler.request_deserializer,
                        handler.response_serializer)
                return handler

        return _Interceptor()
