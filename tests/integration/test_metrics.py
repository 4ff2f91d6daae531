"""Every service serves Prometheus metrics; a request moves the scheduler's counters."""
from __future__ import annotations

import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from shardline.client import Client
from tests.integration.conftest import RunningStack


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for_scrape(port: int, cond, timeout_s: float = 60.0) -> dict:
    """Scrape until cond(metrics) holds (a generous guard, not a timing)."""
    deadline = time.monotonic() + timeout_s
    while not cond(m := scrape(port)):
        assert time.monotonic() < deadline, "metrics never moved"
        time.sleep(0.05)
    return m


def test_metrics_move(model_dir):
    with RunningStack(model_dir, stages=2, metrics=True) as s:
        ports = s.stack.metrics_ports
        assert set(ports) == {"tokenizer", "worker-0", "worker-1", "scheduler"}
        sp = ports["scheduler"]
        before = scrape(sp)
        with Client(s.address) as c:
            out = c.generate("Hello there", max_tokens=5, temperature=0, ignore_eos=True)
        assert out.usage.completion_tokens == 5
        # The request is counted in the servicer's finally, just after the last chunk is sent.
        after = wait_for_scrape(sp, lambda m: value(m, "shardline_requests_total", status="OK")
                                > value(before, "shardline_requests_total", status="OK"))
        assert value(after, "shardline_requests_total", status="OK") == \
            value(before, "shardline_requests_total", status="OK") + 1
        assert value(after, "shardline_time_to_first_token_seconds_count") == \
            value(before, "shardline_time_to_first_token_seconds_count") + 1
        assert value(after, "shardline_time_per_output_token_seconds_count") >= 1
        assert value(after, "shardline_queue_time_seconds_count") == \
            value(before, "shardline_queue_time_seconds_count") + 1
        assert value(after, "shardline_tenant_requests_total", tenant="default", status="OK") == \
            value(before, "shardline_tenant_requests_total", tenant="default", status="OK") + 1
        assert ("shardline_rejected_requests_total", (("reason", "queue_wait"),)) in after
        assert value(after, "shardline_generation_tokens_total") >= 5
        assert value(after, "shardline_prompt_tokens_total") >= 1
        total = value(after, "shardline_kv_blocks_total", replica="0")
        assert total > 0
        assert value(after, "shardline_kv_blocks_free", replica="0") == total
        assert value(after, "shardline_queue_depth", replica="0") == 0
        assert value(after, "shardline_running_sequences", replica="0") == 0
        assert value(after, "shardline_prefix_cache_query_tokens_total", replica="0") > 0
        assert value(after, "shardline_steps_total", replica="0") >= 5
        for stage in ("0", "1"):
            w = scrape(ports[f"worker-{stage}"])
            # rank 0 of each stage (the worker itself; tensor-parallel ranks: rank="1", ...)
            assert value(w, "shardline_stage_step_seconds_count", stage=stage, rank="0") >= 5
        assert scrape(ports["tokenizer"])       # process metrics at least
