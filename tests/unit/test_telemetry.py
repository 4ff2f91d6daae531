"""Telemetry configuration from OTEL_* (no SDK installed unless an exporter is asked for)."""
from __future__ import annotations

import pytest

from shardline.common import telemetry

OTEL_VARS = ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
             "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED")


@pytest.fixture
def clean_env(monkeypatch):
    for v in OTEL_VARS:
        monkeypatch.delenv(v, raising=False)
    return monkeypatch


def test_no_exporter_means_no_sdk(clean_env):
    assert telemetry._exporter_names() == []
    assert telemetry.setup_tracing("test") is False
    assert not telemetry.tracing_enabled()
    assert telemetry.inject() == {}
    assert telemetry.metadata() is None
    assert telemetry.metadata([("k", "v")]) == (("k", "v"),)


@pytest.mark.parametrize("env,names", [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, ["otlp"]),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}, ["otlp"]),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, []),
    ({"OTEL_TRACES_EXPORTER": "console,otlp"}, ["console", "otlp"]),
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, []),
])
def test_exporters_from_env(clean_env, env, names):
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert telemetry._exporter_names() == names


def test_span_context_round_trip():
    carrier = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    sc = telemetry.span_context_of(carrier)
    assert sc is not None and sc.trace_id == 0x0af7651916cd43dd8448eb211c80319c
    assert telemetry.span_context_of({}) is None
    assert len(telemetry.links([sc, None])) == 1
