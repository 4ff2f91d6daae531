"""The scheduler's Redis prefix index with real processes and a real redis-server: entries
published and evicted, Redis killed mid-run, and a restarted scheduler keeping prefixes warm."""
from __future__ import annotations

import time

import redis

from shardline.client import Client
from tests.integration.conftest import RunningStack

SYSTEM = "You are the support assistant of a bicycle shop. Be brief and concrete. " * 5


def chat(q):
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]


def wait_until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_redis_index_outage_and_scheduler_restart(model_dir, redis_server):
    r = redis.Redis.from_url(redis_server.url)
    with RunningStack(model_dir, stages=1, threads=2,
                      extra_scheduler=["--redis-url", redis_server.url]) as s, Client(s.address) as c:
        first = c.generate(messages=chat("How do I fix a flat tyre?"), max_tokens=8, ignore_eos=True)
        cached = lambda: c.stats().replicas[0].num_cached_blocks
        assert cached() > 0
        # Every cached block is published under the key prefix, with a TTL.
        assert wait_until(lambda: r.hlen("shardline:pipe:0") == cached())
        key = next(iter(r.scan_iter("shardline:blk:*")))
        assert 0 < r.ttl(key) <= 3600

        # Redis goes away: serving and prefix hits go on from memory.
        redis_server.kill()
        out = c.generate(messages=chat("How do I fix a flat tyre?"), max_tokens=8, ignore_eos=True)
        assert out.token_ids == first.token_ids and out.usage.cached_tokens > 0
        c.generate(messages=chat("Which chain oil should I use?"), max_tokens=8, ignore_eos=True)
        n_now = cached()
        # Redis returns empty: the index resyncs to the scheduler's view.
        redis_server.restart()
        r = redis.Redis.from_url(redis_server.url)
        assert wait_until(lambda: r.hlen("shardline:pipe:0") == n_now, timeout=15)

        # A restarted scheduler rebuilds its cache view from Redis (workers kept their KV).
        s.stack.restart("scheduler")
        assert s.stack.wait_ready(60)
        with Client(s.address) as c2:
            assert c2.stats().replicas[0].num_cached_blocks == n_now
            warm = c2.generate(messages=chat("How do I fix a flat tyre?"), max_tokens=8, ignore_eos=True)
        assert warm.usage.cached_tokens > 0 and warm.token_ids == first.token_ids
