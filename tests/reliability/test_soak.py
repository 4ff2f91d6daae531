"""A soak on a real stack: 16 clients mixing gRPC and HTTP, streamed and whole answers, text
and chat prompts of 1 to 160 words, 16 to 64 tokens each (tests/reliability/load.py), for
$SHARDLINE_SOAK_S seconds (60 by default; benchmarks/soak.py runs it longer). Every answer
is complete, nothing fails, and no process's memory grows by 10% between the end of a warm-up
(every client's first requests) and the end of the soak, both measured idle."""
from __future__ import annotations

import os
import threading

import pytest

from shardline.client import Client
from tests.reliability.conftest import RunningStack, wait_for
from tests.reliability.load import KINDS, MixedLoad, rss_bytes

pytestmark = pytest.mark.slow

CLIENTS = 16
WARMUP_REQUESTS = 5                 # per client: every kind once
SOAK_S = float(os.environ.get("SHARDLINE_SOAK_S", "60"))
GROWTH = 0.10
PROCESSES = ("scheduler", "tokenizer", "worker-0")


@pytest.fixture(scope="module")
def stack(model_dir):
    with RunningStack(model_dir, stages=1, threads=2, dtype="bfloat16", http=True,
                      kv_cache_memory="128MiB") as s:
        yield s


def idle(stack) -> bool:
    with Client(stack.address, timeout=30) as c:
        (r,) = c.stats().replicas
    return r.num_running == 0 and r.num_waiting == 0 and r.num_free_blocks == r.num_blocks


def memory(stack) -> dict[str, int]:
    wait_for(lambda: idle(stack), 120, "the stack to be idle")
    return {name: rss_bytes(stack.stack.child(name).proc.pid) for name in PROCESSES}


def test_soak_mixed_clients(stack):
    warm = MixedLoad(stack.address, stack.stack.http_url, clients=CLIENTS, seed=1)
    tally = warm.run(requests_per_client=WARMUP_REQUESTS)
    assert tally.num_errors == 0, tally.errors
    assert tally.total == CLIENTS * WARMUP_REQUESTS
    after_warmup = memory(stack)

    soak = MixedLoad(stack.address, stack.stack.http_url, clients=CLIENTS, seed=2)
    stop = threading.Event()
    timer = threading.Timer(SOAK_S, stop.set)       # bounds the soak; nothing waits on it
    timer.start()
    try:
        tally = soak.run(stop=stop)
    finally:
        timer.cancel()
    after_soak = memory(stack)
    print(f"soak: {tally.total} requests in {SOAK_S:.0f} s ({tally.done}), RSS MiB "
          + ", ".join(f"{n} {after_warmup[n] / 2**20:.1f} -> {after_soak[n] / 2**20:.1f}"
                      for n in PROCESSES))
    assert tally.num_errors == 0, tally.errors
    assert all(tally.done[k] > 0 for k in KINDS), tally.done
    for name in PROCESSES:
        assert after_soak[name] < (1 + GROWTH) * after_warmup[name], \
            (name, after_warmup[name], after_soak[name])
    assert not stack.stack.dead()
