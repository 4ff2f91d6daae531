"""Pipeline replicas behind one front door: routing, failover, reconnection, draining.

A request goes to the replica with the least work for it (uncached prompt tokens plus a
price per sequence already there). When a replica breaks, its unfinished sequences move to
another live replica and are recomputed from prompt + generated tokens; the client's stream
goes on. With no replica left they wait up to `unavailable_timeout_s` for one, then fail
with UNAVAILABLE.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Callable, Optional

from shardline.common.server import Unavailable
from shardline.scheduler.discovery import PipelineDown, PipelineUp
from shardline.scheduler.engine import PipelineEngine
from shardline.scheduler.pipeline import PipelineClient
from shardline.scheduler.prefix_index import PrefixIndex
from shardline.scheduler.request import Sequence

log = logging.getLogger(__name__)

# The price, in prompt tokens to compute, of one sequence already on a replica: how much a
# cached prefix must save to route a request to a busier replica.
TOKENS_PER_QUEUED_SEQ = 256
# How often orphaned sequences (no live replica) retry placement and check their deadline.
ORPHAN_POLL_INTERVAL_S = 0.2
# wait_for_replica's shortest wait, so that a deadline just reached still yields once.
MIN_WAIT_S = 0.01

# (pipeline, on_failure, cache listener) -> engine
EngineFactory = Callable[[PipelineClient, Callable, Optional[Callable]], PipelineEngine]
# (replica id, stage addresses) -> an unconnected pipeline client
PipelineFactory = Callable[[str, list[str]], PipelineClient]


def routing_cost(engine: PipelineEngine, seq: Sequence) -> int:
    """Prompt tokens seq would compute on engine's replica (those past its longest cached
    prefix there) plus TOKENS_PER_QUEUED_SEQ per sequence already there. Writes nothing."""
    _, cached = engine.blocks.match_prefix(seq)
    return seq.num_tokens - cached + TOKENS_PER_QUEUED_SEQ * engine.scheduler.num_unfinished


class Router:
    def __init__(self, make_engine: EngineFactory, connect_timeout_s: float,
                 unavailable_timeout_s: float = 10.0, reconnect_interval_s: float = 2.0,
                 index: Optional[PrefixIndex] = None, routing: str = "cache-aware",
                 make_pipeline: PipelineFactory = PipelineClient):
        if routing not in ("cache-aware", "random"):
            raise ValueError(f"routing must be cache-aware or random, got {routing!r}")
        self.routing = routing
        self.make_engine = make_engine
        self.make_pipeline = make_pipeline
        self.index = index
        self.connect_timeout_s = connect_timeout_s
        self.unavailable_timeout_s = unavailable_timeout_s
        self.reconnect_interval_s = reconnect_interval_s
        self.engines: dict[str, PipelineEngine] = {}
        self._addresses: dict[str, list[str]] = {}
        self._where: dict[int, PipelineEngine] = {}          # seq_id -> engine
        self._orphans: list[tuple[Sequence, asyncio.Queue, float]] = []
        self._tasks: set[asyncio.Task] = set()
        self._changed = asyncio.Event()
        self._closed = False

    # -- replicas -----------------------------------------------------------------------
    async def add_pipeline(self, replica_id: str, addresses: list[str],
                           retry: bool = True) -> Optional[PipelineEngine]:
        """Connect to a replica's stages and start serving on it."""
        self._addresses[replica_id] = addresses
        pipeline = self.make_pipeline(replica_id, addresses)
        try:
            await pipeline.connect(self.connect_timeout_s)
        except Exception as exc:  # noqa: BLE001
            await pipeline.close()
            log.warning("replica %s not connected: %s", replica_id, exc)
            if retry:
                self._spawn(self._reconnect(replica_id))
            return None
        engine = self.make_engine(pipeline, self._on_failure, self._cache_listener(replica_id))
        if self.index is not None:
            meta = {"instances": [i.instance_id for i in pipeline.infos],
                    "num_blocks": pipeline.num_blocks, "block_size": pipeline.block_size}
            restored = engine.blocks.restore(await self.index.load_pipeline(replica_id, meta))
            if restored:
                log.info("replica %s: %d cached blocks restored from the prefix index",
                         replica_id, restored)
        old = self.engines.get(replica_id)
        self.engines[replica_id] = engine
        engine.start()
        if old is not None:
            self._spawn(old.stop())
        self._changed.set()
        self._adopt_orphans()
        return engine

    async def remove_pipeline(self, replica_id: str, drain: bool = True) -> None:
        """Stop routing to a replica; with drain, let its sequences finish first."""
        self._addresses.pop(replica_id, None)
        engine = self.engines.get(replica_id)
        if engine is None:
            return
        engine.draining = True
        if drain:
            await engine.wait_idle()
        else:
            engine.fail(Unavailable(f"replica {replica_id} removed"))
        if self.engines.get(replica_id) is engine:
            del self.engines[replica_id]
        await engine.stop()

    async def follow(self, discovery) -> None:
        """Apply discovery events (replicas up, draining, gone) until discovery closes."""
        async for ev in discovery:
            if isinstance(ev, PipelineUp):
                cur = self.engines.get(ev.replica_id)
                if cur is not None and cur.accepting and cur.pipeline.addresses == ev.addresses:
                    continue
                self._spawn(self.add_pipeline(ev.replica_id, ev.addresses))
            elif isinstance(ev, PipelineDown):
                self._spawn(self.remove_pipeline(ev.replica_id, drain=ev.drain))

    def capacity_tokens(self) -> int:
        """Tokens one sequence may reach: the least over live replicas (their KV blocks'
        worth, or unbounded on a sliding-window model; PipelineEngine.capacity_tokens)."""
        return min((e.capacity_tokens for e in self.live), default=0)

    async def wait_for_replica(self, timeout_s: float) -> Optional[PipelineEngine]:
        """The first live replica, waiting up to timeout_s for one."""
        deadline = time.monotonic() + timeout_s
        while not self.live and time.monotonic() < deadline:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(),
                                       max(MIN_WAIT_S, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
        return self.live[0] if self.live else None

    async def _reconnect(self, replica_id: str) -> None:
        while not self._closed and replica_id in self._addresses:
            await asyncio.sleep(self.reconnect_interval_s)
            cur = self.engines.get(replica_id)
            if cur is not None and cur.failed is None:
                return
            addrs = self._addresses.get(replica_id)
            if addrs is None:
                return
            pipeline = self.make_pipeline(replica_id, addrs)
            try:
                await pipeline.connect(self.reconnect_interval_s)
            except Exception:  # noqa: BLE001 - still down
                await pipeline.close()
                continue
            await pipeline.close()
            if await self.add_pipeline(replica_id, addrs, retry=False) is not None:
                log.info("replica %s reconnected", replica_id)
                return

    def _cache_listener(self, replica_id: str) -> Optional[Callable]:
        index = self.index
        if index is None:
            return None

        def on_cache_event(event: str, items: list[tuple[str, int]]) -> None:
            if event == "stored":
                index.publish(replica_id, items)
            else:
                index.remove(replica_id, [h for h, _ in items])
        return on_cache_event

    def _on_failure(self, engine: PipelineEngine, moved: list[tuple[Sequence, asyncio.Queue]]) -> None:
        log.warning("replica %s lost: moving %d sequence(s)", engine.replica_id, len(moved))
        if self.index is not None and self.engines.get(engine.replica_id) is engine:
            self.index.drop_pipeline(engine.replica_id)   # its KV may be gone
        now = time.monotonic()
        for seq, q in moved:
            self._where.pop(seq.seq_id, None)
            self._orphans.append((seq, q, now))
        self._adopt_orphans()
        if self._orphans:
            self._spawn(self._expire_orphans())
        if engine.replica_id in self._addresses:
            self._spawn(self._reconnect(engine.replica_id))

    def _adopt_orphans(self) -> None:
        orphans, self._orphans = self._orphans, []
        for seq, q, since in orphans:
            if seq.is_finished:
                continue
            try:
                self._place(seq, q)
            except Unavailable:
                self._orphans.append((seq, q, since))

    async def _expire_orphans(self) -> None:
        while self._orphans and not self._closed:
            await asyncio.sleep(ORPHAN_POLL_INTERVAL_S)
            self._adopt_orphans()
            now = time.monotonic()
            keep = []
            for seq, q, since in self._orphans:
                if now - since > self.unavailable_timeout_s:
                    q.put_nowait(Unavailable("no pipeline replica is serving"))
                else:
                    keep.append((seq, q, since))
            self._orphans = keep

    # -- requests --------------------------------------------------------------------------
    @property
    def live(self) -> list[PipelineEngine]:
        return [e for e in self.engines.values() if e.accepting]

    def num_waiting(self) -> int:
        """Sequences queued and not yet running, on every replica or waiting for one."""
        return sum(len(e.scheduler.waiting) for e in self.engines.values()) + len(self._orphans)

    def overloaded(self) -> bool:
        """Whether every live replica's queue is shedding requests that waited too long
        (Scheduler.overloaded): a new request would wait too long wherever it went."""
        live = self.live
        return bool(live) and all(e.scheduler.overloaded for e in live)

    def submit(self, seq: Sequence) -> asyncio.Queue:
        """Route seq to a replica; its TokenEvents (or an exception) arrive on the queue."""
        q: asyncio.Queue = asyncio.Queue()
        self._place(seq, q)
        return q

    def _place(self, seq: Sequence, q: asyncio.Queue) -> None:
        live = self.live
        if not live:
            raise Unavailable("no pipeline replica is serving")
        if self.routing == "random":             # baseline for benchmarks
            engine = random.choice(live)
        else:
            engine = min(live, key=lambda e: routing_cost(e, seq))
        self._where[seq.seq_id] = engine
        engine.add(seq, q)

    def abort(self, seq: Sequence, reason: str = "abort") -> None:
        engine = self._where.pop(seq.seq_id, None)
        if engine is not None:
            engine.abort(seq, reason)
        else:
            self._orphans = [o for o in self._orphans if o[0] is not seq]
            seq.finish_reason = seq.finish_reason or reason

    def finished(self, seq: Sequence) -> None:
        self._where.pop(seq.seq_id, None)

    # -- lifecycle ---------------------------------------------------------------------------
    def _spawn(self, coro) -> None:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        self._closed = True
        for t in list(self._tasks):
            t.cancel()
        for e in list(self.engines.values()):
            await e.stop()
        if self.index is not None:
            await self.index.close()
