"""PrefixIndex against a real redis-server (the `redis_server` fixture in tests/conftest.py):
the mirror, key layout and TTLs, round trips, Redis killed / paused / restarted, and a
scheduler restart that reloads (or drops) a pipeline's entries. Nothing here is timed: tests
wait on outcomes (with generous caps), and heartbeats and TTL refreshes follow a fake clock."""
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
    """Run a test body with a 120 s cap, so a hung background task fails the test, not CI."""
    return asyncio.run(asyncio.wait_for(coro, 120))


class FakeClock:
    """What PrefixIndex consults for heartbeats and TTL refreshes; moves only when told."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


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


async def flushed(idx: PrefixIndex) -> bool:
    return await idx.flush(timeout_s=60)


async def wait_for(cond, timeout_s=60.0):
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


def test_mirror_without_redis():
    async def body():
        idx = PrefixIndex(None)
        await idx.start()
        idx.publish("p1", [("a", 1), ("c", 3)])
        idx.publish("p2", [("a", 7), ("b", 8), ("c", 9)])
        idx.remove("p2", ["b", "never-published"])
        assert idx.entries("p1") == {"a": 1, "c": 3} and idx.entries("p2") == {"a": 7, "c": 9}
        idx.drop_pipeline("p1")
        assert idx.entries("p1") == {} and idx.entries("p2") == {"a": 7, "c": 9}
        assert idx.entries("unknown") == {}
        assert not idx.healthy
        assert not await idx.flush()            # no Redis: nothing to wait for
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
        assert await flushed(idx)
        assert dump(redis_server.url) == expected(
            {"p1": {"a": 1, "c": 3}, "p2": {"a": 7}}, {"p1": {"workers": ["w0-111", "w1-222"]}})
        r = redis.Redis.from_url(redis_server.url)
        for key in r.keys("*"):
            assert key.decode().startswith(PREFIX)
            assert 0 < r.ttl(key) <= 120, key
        r.close()
        await idx.close()
    run(body())


def test_writes_are_batched_one_round_trip_per_flush(redis_server, count_pipelines):
    async def body():
        idx = make_index(redis_server.url)
        await idx.start()
        count_pipelines.clear()
        for i in range(5):                      # five calls, one flush
            idx.publish("p1", [(f"h{i}", i)])
        idx.remove("p1", ["h4"])
        assert await flushed(idx)
        assert len(count_pipelines) == 1
        assert dump(redis_server.url) == expected({"p1": {f"h{i}": i for i in range(4)}}, {})
        assert await flushed(idx) and len(count_pipelines) == 1   # nothing dirty: no round trip
        await idx.close()
    run(body())


def test_redis_killed_writes_go_on_in_memory(redis_server):
    async def body():
        idx = make_index(redis_server.url, op_timeout_s=0.2)
        await idx.start()
        idx.publish("p1", [("a", 1), ("b", 2)])
        assert await flushed(idx)
        redis_server.kill()

        idx.publish("p1", [("c", 3)])            # the writer's flush fails: unhealthy
        idx.remove("p1", ["a"])
        idx.publish("p2", [("b", 9)])
        await wait_for(lambda: not idx.healthy)
        assert idx.entries("p1") == {"b": 2, "c": 3} and idx.entries("p2") == {"b": 9}
        assert not await idx.flush(timeout_s=0.3)   # Redis away: False, not an exception
        await idx.close()                        # does not hang or raise with Redis gone
    run(body())


def test_redis_paused_writer_turns_unhealthy_then_resyncs(redis_server):
    async def body():
        idx = make_index(redis_server.url, op_timeout_s=0.15)
        await idx.start()
        idx.publish("p1", [("a", 1)])
        assert await flushed(idx)
        redis_server.pause()
        try:
            idx.publish("p1", [("z", 26)])      # its flush (or a heartbeat) times out
            await wait_for(lambda: not idx.healthy)
            idx.remove("p1", ["a", "z"])        # Redis keeps a stale "a" meanwhile
            idx.publish("p1", [("b", 2)])
            assert idx.entries("p1") == {"b": 2}
        finally:
            redis_server.resume()
        # Same server, same data (a partition, not a restart): the resync deletes the stale entry.
        await wait_for(lambda: idx.healthy)
        assert await flushed(idx)
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
        assert await flushed(idx)

        redis_server.kill()
        idx.remove("p1", ["b"])
        idx.publish("p2", [("d", 6)])
        assert idx.entries("p1") == {"a": 1, "c": 3} and idx.entries("p2") == {"a": 5, "d": 6}
        await wait_for(lambda: not idx.healthy)
        redis_server.restart()
        await wait_for(lambda: idx.healthy)
        assert await flushed(idx)
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


def test_restart_hidden_by_a_proxy_is_noticed_by_run_id(redis_server, caplog):
    """No command fails across the restart, so only the heartbeat's run_id can tell. The fake
    clock holds the heartbeat back until Redis has restarted, then lets one happen."""
    async def body():
        proxy = ReconnectingProxy(redis_server.port)
        clock = FakeClock()
        idx = make_index(await proxy.start(), clock=clock)
        await idx.start()
        idx.publish("p1", [("a", 1)])
        assert await flushed(idx)
        redis_server.restart()                   # idle index: no command in flight, none due
        assert dump(redis_server.url) == {}
        assert idx.healthy
        clock.now += 1.0                         # a heartbeat is due
        await wait_for(lambda: idx.healthy and dump(redis_server.url) == expected({"p1": {"a": 1}}, {}))
        assert "run_id changed" in caplog.text
        await idx.close()
        await proxy.close()
    run(body())


def test_ttls_are_refreshed_while_entries_live(redis_server):
    async def body():
        clock = FakeClock()
        idx = make_index(redis_server.url, ttl_s=60, clock=clock)   # refreshed every ttl/3
        await idx.start()
        idx.publish("p1", [("a", 1)])
        idx.set_pipeline_meta("p1", {"w": 1})
        assert await flushed(idx)
        want = expected({"p1": {"a": 1}}, {"p1": {"w": 1}})
        assert dump(redis_server.url) == want
        r = redis.Redis.from_url(redis_server.url)
        for key in want:                         # as if 55 s had passed in Redis
            r.expire(key, 5)
        assert all(r.ttl(key) <= 5 for key in want)
        clock.now += 21                          # ... and past ttl/3 for the index
        await wait_for(lambda: all(r.ttl(key) > 5 for key in want))
        assert dump(redis_server.url) == want
        r.close()
        idx.remove("p1", ["a"])
        await idx.close()
    run(body())
