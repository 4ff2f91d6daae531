"""Prefix caching and pipeline replicas over real processes: cached-token usage, tenant
isolation, a worker SIGKILLed mid-stream, and no replica left."""
from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from shardline.client import Client
from tests.integration.conftest import RunningStack

SYSTEM = ("You are a helpful assistant for a company that sells garden tools. Answer briefly, "
          "politely, and only about gardening. ") * 4


def test_prefix_cache_hits_and_tenant_isolation(stack1):
    msgs = lambda q: [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
    with Client(stack1.address) as c:
        cold = c.generate(messages=msgs("How do I sharpen shears?"), max_tokens=16, ignore_eos=True)
        warm = c.generate(messages=msgs("How do I sharpen shears?"), max_tokens=16, ignore_eos=True)
        other = c.generate(messages=msgs("When should I prune roses?"), max_tokens=8, ignore_eos=True)
    p = cold.usage.prompt_tokens
    assert cold.usage.cached_tokens == 0
    # Everything but the last token is served from cache, in whole 16-token blocks.
    assert warm.usage.cached_tokens == (p - 1) // 16 * 16 and warm.usage.cached_tokens > 0
    assert warm.token_ids == cold.token_ids
    assert 0 < other.usage.cached_tokens < p      # shares the system prompt only
    with Client(stack1.address, tenant="tenant-b") as c:
        b = c.generate(messages=msgs("How do I sharpen shears?"), max_tokens=16, ignore_eos=True)
    assert b.usage.cached_tokens == 0 and b.token_ids == cold.token_ids


@pytest.fixture(scope="module")
def two_replicas(model_dir):
    with RunningStack(model_dir, stages=1, replicas=2,
                      extra_scheduler=["--step-timeout", "10", "--unavailable-timeout", "3"]) as s:
        yield s


def worker_of(stack, replica: int):
    (child,) = [c for c in stack.stack.children if c.name == f"worker-r{replica}s0"]
    return child


def test_worker_killed_mid_stream_loses_nothing(two_replicas):
    prompt = "Write a long list of fruits, one per line:\n1."
    with Client(two_replicas.address) as c:
        ref = c.generate(prompt, max_tokens=48, ignore_eos=True)
        stream = c.stream(prompt, max_tokens=48, ignore_eos=True)
        got = list(next(stream).token_ids)
        while len(got) < 8:
            got += next(stream).token_ids
        busy = [int(r.replica) for r in c.stats().replicas if r.num_running]
        assert len(busy) == 1
        victim = worker_of(two_replicas, busy[0])
        os.kill(victim.proc.pid, signal.SIGKILL)
        last = None
        for chunk in stream:
            got += chunk.token_ids
            last = chunk
        assert got == ref.token_ids                 # no loss, no repetition
        assert last.finish_reason == "length" and last.usage.completion_tokens == 48
        healthy = [r for r in c.stats().replicas if r.healthy]
        assert [int(r.replica) for r in healthy] == [1 - busy[0]]
        # The survivor serves new requests identically.
        assert c.generate(prompt, max_tokens=48, ignore_eos=True).token_ids == ref.token_ids
        # No replica left: UNAVAILABLE, quickly, never a hang.
        os.kill(worker_of(two_replicas, 1 - busy[0]).proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while any(r.healthy for r in c.stats().replicas) and time.monotonic() < deadline:
            try:
                c.generate("hello", max_tokens=2)
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        with Client(two_replicas.address, timeout=60) as guarded:   # a hang ends as DEADLINE_EXCEEDED
            with pytest.raises(grpc.RpcError) as e:
                guarded.generate("hello", max_tokens=4)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
