"""Prefix-cache metadata: block hash -> (pipeline id, block id), in memory and mirrored to Redis.

Each replica's BlockManager is the authority on which full blocks it keeps (routing asks the
managers themselves); it reports them here with publish()/remove(). The in-memory mirror is
what Redis must hold; Redis lets a restarted scheduler adopt a pipeline's entries
(load_pipeline) and lets readers outside this scheduler see the same picture. Redis is an
accelerator, never a dependency: while it is away the mirror serves, and when it is back
(or was restarted empty) the whole mirror is written again ("resync").

Redis keys (every one with a TTL, refreshed while the entry lives):

    {prefix}blk:{hash}            hash  pipeline_id -> block id     (who caches a block)
    {prefix}pipe:{pipeline_id}    hash  block hash  -> block id     (restart: one HGETALL)
    {prefix}pipe-meta:{pipeline}  str   JSON of the pipeline's meta (e.g. worker instance ids)

Writes never wait: publish()/remove() change the mirror and mark the change dirty; a
background task sends all dirty changes in one pipelined round trip per flush.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Callable, Optional

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

# What Redis trouble looks like from redis-py: its own errors, socket errors, our timeouts.
REDIS_TROUBLE = (RedisError, OSError, asyncio.TimeoutError)


class PrefixIndex:
    """Where each block hash is cached: an in-memory mirror, written behind to Redis."""

    def __init__(self, redis_url: Optional[str], key_prefix: str = "shardline:", ttl_s: int = 3600,
                 op_timeout_s: float = 0.2, *, flush_interval_s: float = 0.01,
                 heartbeat_s: float = 1.0, max_backoff_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        """clock decides when a heartbeat and a TTL refresh are due (tests inject a fake one);
        the writer wakes at least every heartbeat_s of real time to consult it."""
        if ttl_s <= 0 or op_timeout_s <= 0:
            raise ValueError(f"ttl_s ({ttl_s}) and op_timeout_s ({op_timeout_s}) must be > 0")
        self.redis_url = redis_url
        self.key_prefix = key_prefix
        self.ttl_s = int(ttl_s)
        self.op_timeout_s = op_timeout_s
        self.flush_interval_s = flush_interval_s
        self.heartbeat_s = heartbeat_s
        self.max_backoff_s = max_backoff_s
        self._clock = clock
        # The mirror: pipeline -> {hash: block}, and the same facts by hash for lookups.
        self._pipes: dict[str, dict[str, int]] = {}
        self._by_hash: dict[str, dict[str, int]] = {}
        self._meta: dict[str, dict] = {}
        # Changes not yet in Redis: pipeline -> {hash: block, or None for removed}; metas.
        self._dirty: dict[str, dict[str, Optional[int]]] = {}
        self._dirty_meta: set[str] = set()
        self._client: Optional[aioredis.Redis] = None
        self._task: Optional[asyncio.Task] = None
        self._wake = asyncio.Event()
        self._write_lock = asyncio.Lock()   # one background write at a time, in order
        self._healthy = False
        self._closing = False
        self._run_id: Optional[str] = None

    # -- keys -------------------------------------------------------------------------------
    def blk_key(self, block_hash: str) -> str:
        return f"{self.key_prefix}blk:{block_hash}"

    def pipe_key(self, pipeline_id: str) -> str:
        return f"{self.key_prefix}pipe:{pipeline_id}"

    def meta_key(self, pipeline_id: str) -> str:
        return f"{self.key_prefix}pipe-meta:{pipeline_id}"

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """True while Redis answers and holds everything the mirror held at the last flush."""
        return self._healthy

    async def start(self) -> None:
        """Connect (one bounded try; failing is fine) and start the background writer."""
        if self.redis_url is None:
            return
        self._client = aioredis.Redis.from_url(
            self.redis_url, decode_responses=True, socket_timeout=max(1.0, 5 * self.op_timeout_s),
            socket_connect_timeout=self.op_timeout_s, retry=Retry(NoBackoff(), 0))
        try:
            await self._resync()
            self._set_healthy(True, "connected")
        except REDIS_TROUBLE as e:
            self._set_healthy(False, e)
        self._task = asyncio.create_task(self._run(), name="prefix-index")

    async def close(self, timeout_s: float = 1.0) -> None:
        """Stop the writer after a last flush of pending writes (bounded by timeout_s)."""
        self._closing = True
        if self._task is not None:
            self._wake.set()
            # The loop ends by itself at its next turn; cancel only if it does not.
            done, _ = await asyncio.wait({self._task}, timeout=timeout_s)
            if not done:
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=timeout_s)
            self._task = None
        if self._client is not None:
            if self._healthy and self._has_dirty():
                try:
                    await asyncio.wait_for(self._flush(), timeout_s)
                except REDIS_TROUBLE as e:
                    log.warning("prefix index: final flush failed: %r", e)
            await self._client.aclose()
            self._client = None

    # -- writes (never wait) ----------------------------------------------------------------
    def publish(self, pipeline_id: str, entries: list[tuple[str, int]]) -> None:
        """Record that pipeline_id caches these (block hash, block id); Redis follows later."""
        pipe = self._pipes.setdefault(pipeline_id, {})
        dirty = self._dirty.setdefault(pipeline_id, {})
        for h, block in entries:
            block = int(block)
            pipe[h] = block
            self._by_hash.setdefault(h, {})[pipeline_id] = block
            dirty[h] = block
        self._wake.set()

    def remove(self, pipeline_id: str, hashes: list[str]) -> None:
        """Record that pipeline_id no longer caches these block hashes (evicted)."""
        pipe = self._pipes.get(pipeline_id, {})
        dirty = self._dirty.setdefault(pipeline_id, {})
        for h in hashes:
            if pipe.pop(h, None) is None:
                continue
            where = self._by_hash[h]
            del where[pipeline_id]
            if not where:
                del self._by_hash[h]
            dirty[h] = None
        self._wake.set()

    def drop_pipeline(self, pipeline_id: str) -> None:
        """Forget every entry of pipeline_id (its workers are gone or restarted)."""
        self.remove(pipeline_id, list(self._pipes.get(pipeline_id, ())))

    def set_pipeline_meta(self, pipeline_id: str, meta: dict) -> None:
        """Store facts that identify the KV a pipeline holds (e.g. its workers' instance ids)."""
        self._meta[pipeline_id] = _normal(meta)
        self._pipes.setdefault(pipeline_id, {})
        self._dirty_meta.add(pipeline_id)
        self._wake.set()

    def entries(self, pipeline_id: str) -> dict[str, int]:
        """The mirror's entries of one pipeline: {block hash: block id} (a copy)."""
        return dict(self._pipes.get(pipeline_id, {}))

    async def flush(self, timeout_s: float = 2.0) -> bool:
        """Wait until the changes made so far are in Redis; False if that took over timeout_s
        (Redis away: they will reach it with the resync) or there is no Redis."""
        if self._client is None:
            return False
        try:
            await asyncio.wait_for(self._flush_when_healthy(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def _flush_when_healthy(self) -> None:
        while True:
            if self._healthy:
                try:
                    await self._flush()   # after any write in flight (the lock), ours
                    if self._healthy:
                        return
                except REDIS_TROUBLE as e:
                    self._set_healthy(False, e)
            await asyncio.sleep(self.flush_interval_s)   # the writer reconnects and resyncs

    # -- restart ----------------------------------------------------------------------------
    async def load_pipeline(self, pipeline_id: str, expect_meta: dict) -> list[tuple[str, int]]:
        """After a scheduler restart: adopt pipeline_id's entries from Redis if still valid.

        Returns the stored (hash, block id) entries, now also in the mirror, when the stored
        meta equals expect_meta (the workers still hold the same KV). Otherwise (workers
        restarted, no meta, or Redis unreachable) the stored entries are dropped and [] is
        returned. Either way the pipeline's meta becomes expect_meta.
        """
        self.set_pipeline_meta(pipeline_id, expect_meta)
        if self._client is None:
            return []
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.get(self.meta_key(pipeline_id))
            pipe.hgetall(self.pipe_key(pipeline_id))
            raw_meta, stored = await asyncio.wait_for(pipe.execute(), self.op_timeout_s * 5)
        except REDIS_TROUBLE as e:
            self._set_healthy(False, e)
            return []   # the resync on reconnect deletes what Redis still holds for it
        entries = [(h, int(b)) for h, b in stored.items()]
        if raw_meta is not None and json.loads(raw_meta) == self._meta[pipeline_id]:
            self.publish(pipeline_id, entries)   # rewrite, so blk: keys agree and TTLs restart
            return entries
        log.info("prefix index: pipeline %s changed (meta %s -> %s); dropping %d entries",
                 pipeline_id, raw_meta, self._meta[pipeline_id], len(entries))
        dirty = self._dirty.setdefault(pipeline_id, {})
        for h, _ in entries:
            if h not in self._pipes[pipeline_id]:
                dirty[h] = None
        self._wake.set()
        return []

    # -- background writer ------------------------------------------------------------------
    async def _run(self) -> None:
        backoff = self.flush_interval_s
        next_beat = self._clock() + self.heartbeat_s
        next_refresh = self._clock() + self.ttl_s / 3
        while not self._closing:
            try:
                if not self._healthy:
                    await self._resync()
                    self._set_healthy(True, "resynced")
                    backoff = self.flush_interval_s
                try:
                    await asyncio.wait_for(self._wake.wait(), self.heartbeat_s)
                except asyncio.TimeoutError:
                    pass
                await asyncio.sleep(self.flush_interval_s)   # let a burst of writes coalesce
                self._wake.clear()
                if self._closing:
                    break
                if self._has_dirty():
                    await self._flush()
                now = self._clock()
                if now >= next_beat:
                    next_beat = now + self.heartbeat_s
                    if await self._server_run_id() != self._run_id:
                        self._set_healthy(False, "Redis restarted (run_id changed)")
                if now >= next_refresh:
                    next_refresh = now + self.ttl_s / 3
                    await self._refresh_ttls()
            except REDIS_TROUBLE as e:
                self._set_healthy(False, e)
                await asyncio.sleep(backoff)
                backoff = min(self.max_backoff_s, backoff * 2)

    def _set_healthy(self, healthy: bool, why) -> None:
        if healthy == self._healthy:
            return
        self._healthy = healthy
        if not healthy:
            self._wake.set()   # the writer resyncs at its next turn, not at the next heartbeat
        if healthy:
            log.info("prefix index: Redis at %s is back (%s)", self.redis_url, why)
        else:
            log.warning("prefix index: Redis at %s unavailable (%r); serving from memory",
                        self.redis_url, why)

    def _has_dirty(self) -> bool:
        return bool(self._dirty_meta) or any(self._dirty.values())

    async def _execute(self, pipe):
        """Run a background pipeline; its time limit grows with its size (nobody waits on it)."""
        budget_s = max(1.0, 5 * self.op_timeout_s) + 1e-5 * len(pipe)
        return await asyncio.wait_for(pipe.execute(), budget_s)

    async def _server_run_id(self) -> str:
        info = await asyncio.wait_for(self._client.info("server"), self.op_timeout_s)
        return info["run_id"]

    async def _flush(self) -> None:
        """Send the dirty changes in one pipelined round trip (no MULTI)."""
        async with self._write_lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        if not self._has_dirty():
            return
        dirty, self._dirty = self._dirty, {}
        metas, self._dirty_meta = self._dirty_meta, set()
        pipe = self._client.pipeline(transaction=False)
        for pid, changes in dirty.items():
            self._write_changes(pipe, pid, changes)
        for pid in metas:
            self._write_meta(pipe, pid)
        try:
            await self._execute(pipe)
        except BaseException:
            # Not sent (or half sent): keep the changes, newer ones first. A resync follows
            # trouble anyway; this matters when close() cancels a flush in flight.
            for pid, changes in dirty.items():
                newer = self._dirty.setdefault(pid, {})
                for h, b in changes.items():
                    newer.setdefault(h, b)
            self._dirty_meta |= metas
            raise

    async def _resync(self) -> None:
        """Make Redis equal the mirror for our pipelines: drop stale entries, rewrite the rest."""
        async with self._write_lock:
            await self._resync_locked()

    async def _resync_locked(self) -> None:
        run_id = await self._server_run_id()
        pids = list(self._pipes)
        # Everything dirty now is in the snapshot below; later changes flush after us.
        self._dirty, self._dirty_meta = {}, set()
        snapshot = {pid: dict(self._pipes[pid]) for pid in pids}
        stored: list[list[str]] = []
        if pids:
            pipe = self._client.pipeline(transaction=False)
            for pid in pids:
                pipe.hkeys(self.pipe_key(pid))
            stored = await self._execute(pipe)
        pipe = self._client.pipeline(transaction=False)
        for pid, in_redis in zip(pids, stored):
            changes: dict[str, Optional[int]] = {h: None for h in in_redis if h not in snapshot[pid]}
            changes.update(snapshot[pid])
            self._write_changes(pipe, pid, changes)
            self._write_meta(pipe, pid)
        if pids:
            await self._execute(pipe)
        self._run_id = run_id

    async def _refresh_ttls(self) -> None:
        """Restart the TTL of every key we own (entries live as long as the mirror keeps them)."""
        pipe = self._client.pipeline(transaction=False)
        for pid, entries in self._pipes.items():
            pipe.expire(self.pipe_key(pid), self.ttl_s)
            pipe.expire(self.meta_key(pid), self.ttl_s)
            for h in entries:
                pipe.expire(self.blk_key(h), self.ttl_s)
            if len(pipe) >= 5000:
                await self._execute(pipe)
                pipe = self._client.pipeline(transaction=False)
        if len(pipe):
            await self._execute(pipe)

    def _write_changes(self, pipe, pid: str, changes: dict[str, Optional[int]]) -> None:
        sets = {h: b for h, b in changes.items() if b is not None}
        dels = [h for h, b in changes.items() if b is None]
        key = self.pipe_key(pid)
        if dels:
            pipe.hdel(key, *dels)
            for h in dels:
                pipe.hdel(self.blk_key(h), pid)
        if sets:
            pipe.hset(key, mapping=sets)
            pipe.expire(key, self.ttl_s)
            for h, b in sets.items():
                pipe.hset(self.blk_key(h), pid, b)
                pipe.expire(self.blk_key(h), self.ttl_s)

    def _write_meta(self, pipe, pid: str) -> None:
        if pid in self._meta:
            pipe.set(self.meta_key(pid), json.dumps(self._meta[pid], sort_keys=True), ex=self.ttl_s)


def _normal(meta: dict) -> dict:
    """meta as it reads back from JSON, so stored and expected metas compare equal."""
    return json.loads(json.dumps(meta, sort_keys=True))

