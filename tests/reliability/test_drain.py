"""Graceful drain over real processes: a SIGTERMed scheduler finishes the stream it is
serving, refuses new requests on both front doors with the draining message, and exits 0."""
from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2

from shardline.client import Client
from tests.reliability.conftest import RunningStack, health_status, wait_for

DRAINING = "scheduler is draining; retry on another replica"
MAX_TOKENS = 200            # about 10 s of decoding on a 2-core CPU (float32, one thread)


def post_json(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_sigterm_drains_a_long_stream_and_refuses_new_requests(model_dir):
    with RunningStack(model_dir, stages=1, threads=1, http=True,
                      extra_scheduler=["--drain-timeout-s", "300"]) as s:
        scheduler = s.stack.child("scheduler").proc
        with Client(s.address) as c:
            stream = c.stream("Count from one to a thousand: one, two,", max_tokens=MAX_TOKENS,
                              ignore_eos=True)
            # a second stream holds the drain open until the refusals are checked
            holder = c.stream("A long list of animals:", max_tokens=1000, ignore_eos=True)
            got = list(next(stream).token_ids)
            next(holder)
            os.kill(scheduler.pid, signal.SIGTERM)
            # health still answers, NOT_SERVING (the drain has begun)
            wait_for(lambda: health_status(s.address) == health_pb2.HealthCheckResponse.NOT_SERVING,
                     60, "the scheduler to report NOT_SERVING")
            with pytest.raises(grpc.RpcError) as e:
                c.generate("Hello", max_tokens=2)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert e.value.details() == DRAINING
            status, body = post_json(f"{s.stack.http_url}/v1/completions",
                                     {"prompt": "Hello", "max_tokens": 2})
            assert status == 503
            assert body["error"]["message"] == DRAINING
            assert body["error"]["type"] == "service_unavailable"
            holder.close()                  # the client gives up on it; the drain goes on
            last = None
            for chunk in stream:
                got += chunk.token_ids
                last = chunk
        assert len(got) == MAX_TOKENS
        assert last.finish_reason == "length" and last.usage.completion_tokens == MAX_TOKENS
        assert scheduler.wait(timeout=120) == 0
