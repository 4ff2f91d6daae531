"""PrefixIndex against a real redis-server (the `redis_server` fixture in tests/conftest.py):
exact lookups, key layout and TTLs, round trips, Redis killed / paused / restarted, and a
scheduler restart that reloads (or drops) a pipeline's entries."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis
import redis.asyncio.client

from shardline.scheduler.prefix_index import PrefixIndex

PREFIX = "t-shardline:"


def run(coro):
    """Run a test body with a 10 s cap, so a hung background task fails the test, not CI."""
    return asyncio.run(asyncio.wait_for(coro, 10))


def make_index(url, **kw) -> PrefixIndex:
    kw = {"key_prefix": PREFIX, "ttl_s": 600, "op_timeout_s": 0.2, "heartbeat_s": 0.05,
          "max_backoff_s": 0.1, **kw}
    return PrefixIndex(url, **kw)


def dump(url: str) -> dict:
    """Every key in Redis -> its value (dict for hashes, str for strings)."""
    r = redis.Redis.from_url(url, decode_responses=True)
    out = {}
    for k in r.keys("*"):
        out[k] = r.hgetall(k) if r.type(k) == "hash" else r.get(k)
    r.close()
    return out


def expected(pipes: dict[str, dict[str, int]], metas: dict[str, dict]) -> dict:
    """The Redis content that mirrors these pipelines, in the documented layout."""
    out: dict = {}
    for pid, entries in pipes.items():
        if entries:
            out[f"{PREFIX}pipe:{pid}"] = {h: str(b) for h, b in entries.items()}
        for h, b in entries.items():
            out.setdefault(f"{PREFIX}blk:{h}", {})[pid] = str(b)
    for pid, meta in metas.items():
        out[f"{PREFIX}pipe-meta:{pid}"] = json.dumps(meta, sort_keys=True)
    return out


async def wait_for(cond, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.fixture
def count_pipelines(monkeypatch):
    """Counts executions of redis.asyncio pipelines (one execution = one round trip)."""
    calls = []
    real = redis.asyncio.client.Pipeline.execute

    async def counted(self, *a, **kw):
        calls.append(len(self))
        return await real(self, *a, **kw)

    monkeypatch.setattr(redis.asyncio.client.Pipeline, "execute", counted)
    return calls


def test_lookup_counts_leading_hashes_in_memory():
    async def body():
        idx = PrefixIndex(None)
        await idx.start()
        idx.publish("p1", [("a", 1), ("c", 3)])
        idx.publish("p2", [("a", 7), ("b", 8), ("c", 9)])
        assert await idx.lookup(["a", "b", "c"]) == {"p1": 1, "p2": 3}
        assert await idx.lookup(["b", "c"]) == {"p2": 2}
        assert await idx.lookup(["x", "a"]) == {}
        assert await idx.lookup([]) == {}
        idx.remove("p2", ["b"])
        assert await idx.lookup(["a", "b", "c"]) == {"p1": 1, "p2": 1}
        idx.drop_pipeline("p1")
        assert await idx.lookup(["a"]) == {"p2": 1}
        assert idx.entries("p2") == {"a": 7, "c": 9}
        assert not idx.healthy
        await idx.close()
    run(body())


def test_redis_layout_ttl_and_prefix(redis_server):
    async def body():
        idx = make_index(redis_server.url, ttl_s=120)
        await idx.start()
        await wait_for(lambda: idx.healthy)
        idx.publish("p1", [("a", 1), ("c", 3)])
        idx.publish("p2", [("a", 7), ("b", 8)])
        idx.set_pipeline_meta("p1", {"workers": ["w0-111", "w1-222"]})
        idx.remove("p2", ["b"])
        assert await idx.flush()
        assert dump(redis_server.url) == expected(
            {"p1": {"a": 1, "c": 3}, "p2": {"a": 7}}, {"p1": {"workers": ["w0-111", "w1-222"]}})
        r = redis.Redis.from_url(redis_server.url)
        for key in r.keys("*"):
            assert key.decode().startswith(PREFIX)
            assert 0 < r.ttl(key) <= 120, key
        r.close()
        assert await idx.lookup(["a", "b", "c"]) == {"p1": 1, "p2": 1}
        await idx.close()
    run(body())


def test_writes_are_batched_and_lookup_is_one_round_trip(redis_server, count_pipelines):
    async def body():
        idx = make_index(redis_server.url)
        await idx.start()
        count_pipelines.clear()
        for i in range(5):                      # five calls, one flush
            idx.publish("p1", [(f"h{i}", i)])
        idx.remove("p1", ["h4"])
        assert await idx.flush()
        assert len(count_pipelines) == 1
        assert dump(redis_server.url)[f"{PREFIX}pipe:p1"] == {f"h{i}": str(i) for i in range(4)}

        # Another scheduler's pipeline, only in Redis: found through Redis, exactly.
        r = redis.Redis.from_url(redis_server.url)
        r.hset(f"{PREFIX}blk:h0", "other", 5)
        r.hset(f"{PREFIX}blk:h2", "other", 6)
        r.config_resetstat()
        count_pipelines.clear()
        assert await idx.lookup(["h0", "h1", "h2", "h3", "zz"]) == {"p1": 4, "other": 1}
        assert len(count_pipelines) == 1
        assert int(r.info("commandstats")["cmdstat_hkeys"]["calls"]) == 5
        r.close()
        await idx.close()
    run(body())


def test_redis_killed_serving_goes_on_from_memory(redis_server):
    async def body():
        idx = make_index(redis_server.url, op_timeout_s=0.2)
        await idx.start()
        idx.publish("p1", [("a", 1), ("b", 2)])
        assert await idx.flush()
        redis_server.kill()

        t0 = time.monotonic()
        idx.publish("p1", [("c", 3)])
        idx.remove("p1", ["a"])
        idx.publish("p2", [("b", 9)])
        assert time.monotonic() - t0 < 0.05
        t0 = time.monotonic()
        assert await idx.lookup(["b", "c"]) == {"p1": 2, "p2": 1}
        assert time.monotonic() - t0 < 0.2 + 0.15
        await wait_for(lambda: not idx.healthy)
        for _ in range(3):
            t0 = time.monotonic()
            assert await idx.lookup(["a", "b"]) == {}
            assert await idx.lookup(["b"]) == {"p1": 1, "p2": 1}
            assert time.monotonic() - t0 < 0.2 + 0.15
            await asyncio.sleep(0.1)
        await idx.close()                        # does not hang or raise with Redis gone
    run(body())


def test_redis_paused_lookup_bounded_by_op_timeout(redis_server):
    async def body():
        idx = make_index(redis_server.url, op_timeout_s=0.15)
        await idx.start()
        idx.publish("p1", [("a", 1)])
        assert await idx.flush()
        redis_server.pause()
        try:
            t0 = time.monotonic()
            assert await idx.lookup(["a"]) == {"p1": 1}
            assert time.monotonic() - t0 < 0.15 + 0.15
            assert not idx.healthy
            t0 = time.monotonic()
            assert await idx.lookup(["a"]) == {"p1": 1}   # now straight from memory
            assert time.monotonic() - t0 < 0.02
            idx.remove("p1", ["a"])                       # Redis keeps a stale "a" meanwhile
            idx.publish("p1", [("b", 2)])
        finally:
            redis_server.resume()
        # Same server, same data (a partition, not a restart): the resync deletes the stale entry.
        await wait_for(lambda: idx.healthy)
        assert dump(redis_server.url) == expected({"p1": {"b": 2}}, {})
        await idx.close()
    run(body())


def test_redis_restarted_empty_gets_the_whole_mirror_back(redis_server):
    async def body():
        idx = make_index(redis_server.url)
        await idx.start()
        idx.publish("p1", [("a", 1), ("b", 2), ("c", 3)])
        idx.publish("p2", [("a", 5)])
        idx.set_pipeline_meta("p1", {"workers": ["x"]})
        assert await idx.flush()

        redis_server.kill()
        idx.remove("p1", ["b"])
        idx.publish("p2", [("d", 6)])
        assert await idx.lookup(["a", "b"]) == {"p1": 1, "p2": 1}
        await wait_for(lambda: not idx.healthy)
        redis_server.restart()
        await wait_for(lambda: idx.healthy)
        assert await idx.flush()
        want = expected({"p1": {"a": 1, "c": 3}, "p2": {"a": 5, "d": 6}}, {"p1": {"workers": ["x"]}})
        assert dump(redis_server.url) == want

        # Restarted while the index is idle and healthy: the heartbeat notices (run_id).
        redis_server.restart()
        await wait_for(lambda: idx.healthy and dump(redis_server.url) == want)
        idx.publish("p1", [("e", 4)])                    # and writes flow again
        await wait_for(lambda: dump(redis_server.url).get(f"{PREFIX}blk:e") == {"p1": "4"})
        await idx.close()
    run(body())


def test_restarted_scheduler_loads_or_drops_pipelines(redis_server):
    meta1 = {"workers": ["stage0-aaa", "stage1-bbb"]}
    meta2 = {"workers": ["stage0-ccc"]}

    async def body():
        old = make_index(redis_server.url)
        await old.start()
        old.set_pipeline_meta("p1", meta1)
        old.set_pipeline_meta("p2", meta2)
        old.publish("p1", [("a", 1), ("b", 2)])
        old.publish("p2", [("a", 3), ("c", 4)])
        await old.close()                                 # close() flushes what is pending

        new = make_index(redis_server.url)
        await new.start()
        assert sorted(await new.load_pipeline("p1", meta1)) == [("a", 1), ("b", 2)]
        # p2's worker restarted: a new instance id, the KV it held is gone.
        assert await new.load_pipeline("p2", {"workers": ["stage0-ddd"]}) == []
        assert new.entries("p1") == {"a": 1, "b": 2} and new.entries("p2") == {}
        assert await new.lookup(["a", "b"]) == {"p1": 2}
        assert await new.flush()
        assert dump(redis_server.url) == expected(
            {"p1": {"a": 1, "b": 2}}, {"p1": meta1, "p2": {"workers": ["stage0-ddd"]}})
        # A pipeline Redis never heard of: nothing to load.
        assert await new.load_pipeline("p3", {"workers": []}) == []
        await new.close()
    run(body())


class ReconnectingProxy:
    """A TCP proxy that hides a server restart: it reconnects upstream and keeps the client's
    connection open (as a Redis proxy or a failover would), so no client command fails."""

    def __init__(self, target_port: int):
        self.target_port = target_port

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def close(self):
        self._server.close()

    async def _serve(self, reader, writer):
        link = {"up": None}
        up = asyncio.create_task(self._upstream(link, writer))
        try:
            while data := await reader.read(65536):
                while link["up"] is None:
                    await asyncio.sleep(0.005)
                link["up"].write(data)
        finally:
            up.cancel()
            writer.close()

    async def _upstream(self, link, writer):
        while True:
            try:
                ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                await asyncio.sleep(0.01)
                continue
            link["up"] = uw
            try:
                while data := await ur.read(65536):
                    writer.write(data)
            except OSError:
                pass
            link["up"] = None
            uw.close()


def test_restart_hidden_by_a_proxy_is_noticed_by_run_id(redis_server):
    """No command fails across the restart, so only the heartbeat's run_id can tell."""
    async def body():
        proxy = ReconnectingProxy(redis_server.port)
        idx = make_index(await proxy.start(), heartbeat_s=0.3)
        await idx.start()
        idx.publish("p1", [("a", 1)])
        assert await idx.flush()
        await asyncio.sleep(0.35)                    # just after a heartbeat
        redis_server.restart()
        assert dump(redis_server.url) == {}
        await wait_for(lambda: idx.healthy and dump(redis_server.url) == expected({"p1": {"a": 1}}, {}))
        await idx.close()
        await proxy.close()
    run(body())


def test_ttls_are_refreshed_while_entries_live(redis_server):
    async def body():
        idx = make_index(redis_server.url, ttl_s=1)  # refreshed every ttl/3
        await idx.start()
        idx.publish("p1", [("a", 1)])
        idx.set_pipeline_meta("p1", {"w": 1})
        assert await idx.flush()
        await asyncio.sleep(1.5)
        assert dump(redis_server.url) == expected({"p1": {"a": 1}}, {"p1": {"w": 1}})
        idx.remove("p1", ["a"])
        await idx.close()
    run(body())
