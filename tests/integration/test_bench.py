"""`shardline bench` against the session's stack, tiny numbers: gRPC, HTTP and both in one run;
each prints its measurements, `--both` the HTTP/gRPC ratios too."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REQUESTS, MAX_TOKENS = 3, 4
MEASURED = ("requests", "concurrency", "output_tokens", "wall_s", "output_tok_s", "ttft_p50_ms",
            "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "step_profile")


def bench(stack, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shardline", "bench", "--address", stack.address,
         "--requests", str(REQUESTS), "--concurrency", "2", "--prompt-tokens", "8",
         "--max-tokens", str(MAX_TOKENS), *args],
        capture_output=True, text=True, timeout=300, env=env)


def check_run(res: dict, api: str) -> None:
    assert res["api"] == api
    assert all(k in res for k in MEASURED), res
    assert (res["requests"], res["output_tokens"]) == (REQUESTS, REQUESTS * MAX_TOKENS)
    for k in ("output_tok_s", "ttft_p50_ms", "tpot_p50_ms"):
        assert math.isfinite(res[k]) and res[k] > 0, (k, res)
    assert res["step_profile"]["steps"] > 0


def test_bench_http_and_both(stack1):
    out = bench(stack1, "--http", stack1.stack.http_url)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    check_run(res["shardline"], "http")
    assert stack1.stack.http_url in out.stderr

    out = bench(stack1, "--http", stack1.stack.http_url, "--both")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    check_run(res["shardline"], "grpc")
    check_run(res["shardline_http"], "http")
    ratios = res["http_vs_grpc"]
    assert set(ratios) == {"output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms",
                           "tpot_p99_ms"}
    assert all(math.isfinite(v) and v > 0 for v in ratios.values()), ratios


def test_bench_both_needs_http(stack1):
    out = bench(stack1, "--both")
    assert out.returncode == 2 and "--both needs --http URL" in out.stderr
