"""One Generate request is one trace across scheduler, tokenizer and every stage."""
from __future__ import annotations

import os
import threading
import time
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from shardline.client import Client
from shardline.launcher import free_port
from tests.integration.conftest import RunningStack


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A tiny in-process OTLP/gRPC trace collector: keeps every span with its service.name."""

    def __init__(self):
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                service = next((a.value.string_value for a in rs.resource.attributes
                                if a.key == "service.name"), "")
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        self.spans.append((service, span))
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self):
        with self.lock:
            return list(self.spans)


@pytest.fixture(scope="module")
def collector():
    col = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(col, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    col.port = port
    yield col
    server.stop(0)


def test_one_request_is_one_trace(model_dir, collector):
    env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.port}",
               OTEL_TRACES_EXPORTER="otlp", OTEL_BSP_SCHEDULE_DELAY="100")
    env.pop("OTEL_SERVICE_NAME", None)
    with RunningStack(model_dir, stages=2, env=env) as s:
        with Client(s.address) as c:
            out = c.generate("The capital of France is", max_tokens=4, temperature=0)
        assert out.usage.completion_tokens == 4
        want = {"tokenizer", "scheduler", "worker"}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            spans = collector.snapshot()
            gen = [sp for svc, sp in spans if svc == "scheduler"
                   and sp.name == "shardline.v1.Generation/Generate"]
            if gen:
                tid = gen[0].trace_id
                services = {svc for svc, sp in spans if sp.trace_id == tid}
                steps = [sp for svc, sp in spans if svc == "worker" and sp.name.endswith(".forward")
                         and any(l.span_id == gen[0].span_id for l in sp.links)]
                stages = {sp.name for sp in steps}
                if want <= services and {"stage0.forward", "stage1.forward"} <= stages:
                    break
            time.sleep(0.2)
        assert gen, "no Generate span exported"
        assert want <= services, f"trace {tid.hex()} has spans from {services}"
        names = {sp.name for _, sp in spans if sp.trace_id == tid}
        assert {"tokenize", "queue", "detokenize", "stage0.admit", "stage1.admit"} <= names, names
        assert {"stage0.forward", "stage1.forward"} <= stages, \
            "each stage's step span links to the request's span"
        # the stages' step spans hang under the scheduler's step span (trace context on the stream)
        sched_steps = {sp.span_id: sp for svc, sp in spans if svc == "scheduler"
                       and sp.name == "scheduler.step"}
        assert any(sp.parent_span_id in sched_steps for sp in steps if sp.name == "stage0.forward")
        # the client's context is carried in: a client-side trace id would be honoured
        assert all(not sp.parent_span_id for sp in gen)
        attrs = {a.key: a.value.string_value for a in gen[0].attributes}
        assert len(attrs["shardline.request_id"]) == 32           # made by the server
