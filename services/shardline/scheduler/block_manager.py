"""Paged KV block allocation for one pipeline replica, with automatic prefix caching.

Block ids are the same on every stage of a pipeline, so one block table per sequence serves
them all. The scheduler is the only writer.

    seq.block_table = [7, 2, 9]        block_size = 4
    tokens          = [a b c d|e f g h|i j]     -> slot of token j = 9 * 4 + 1

Prefix caching: once a block is full and computed it gets a chained hash
h_i = H(h_{i-1}, tokens of block i, tenant salt) and is kept, reference-counted, after its
sequence ends. A free block keeps its hash until it is reused (least recently freed first),
so a later request whose prompt starts with the same blocks takes them instead of recomputing.

    free (LRU) queue:  [3] [8] [5:h_a] [6:h_b]   <- allocation pops from the left,
                        ^ evicted first            evicting h_a's mapping if it had one
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

from shardline.scheduler.request import Sequence

ROOT_HASH = ""


def block_hash(parent: str, token_ids: list[int], salt: str) -> str:
    """Chained content hash of one full block."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent.encode())
    h.update(b"\x00")
    h.update(salt.encode())
    h.update(b"\x00")
    h.update(array("i", token_ids).tobytes())
    return h.hexdigest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: Optional[str] = None
    token_ids: Optional[tuple[int, ...]] = None   # checked on a hash hit


# (event, [(hash, block_id)]) with event "stored" or "evicted"; feeds the Redis prefix index.
CacheListener = Callable[[str, list[tuple[str, int]]], None]


class BlockManager:
    """Verbs: match_prefix, can_allocate, allocate, commit_full_blocks, free."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 listener: Optional[CacheListener] = None):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.listener = listener
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[str, int] = {}
        self.hits = 0          # prompt tokens served from cache
        self.queries = 0       # prompt tokens looked up

    # -- accounting --------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (some may still hold cached content)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add to seq's table so that num_new_tokens more tokens fit."""
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self._free)

    # -- prefix cache ----------------------------------------------------------------------
    def prefix_hashes(self, seq: Sequence, num_blocks: int) -> list[str]:
        """Chained hashes of seq's first num_blocks full blocks (cached on the sequence)."""
        hashes = seq.block_hashes
        bs = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else ROOT_HASH,
                                     seq.token_ids(i * bs, (i + 1) * bs), seq.cache_salt))
        return hashes[:num_blocks]

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding seq's longest cached prefix (verified token by token). At least one
        token is always left to compute, since sampling needs its logits."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        hit: list[int] = []
        for i, h in enumerate(self.prefix_hashes(seq, max_blocks)):
            bid = self._cached.get(h)
            if bid is None:
                break
            tokens = tuple(seq.token_ids(i * bs, (i + 1) * bs))
            block = self.blocks[bid]
            if block.token_ids is None:           # restored from Redis: the hash vouches
                block.token_ids = tokens
            elif block.token_ids != tokens:
                break
            hit.append(bid)
        return hit

    def take_prefix(self, seq: Sequence, hit: list[int]) -> None:
        """Give a fresh sequence the cached blocks `hit` (from match_prefix) as its first blocks."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        for bid in hit:
            self._ref(bid)
        seq.block_table = list(hit)
        seq.num_computed_tokens = len(hit) * self.block_size
        if seq.num_preemptions == 0:               # usage reports the first admission's hits
            seq.num_cached_tokens = seq.num_computed_tokens
            self.queries += seq.num_tokens
            self.hits += seq.num_computed_tokens

    def free_blocks_after(self, hit: list[int]) -> int:
        """Free blocks left for new allocations once the cached blocks `hit` are taken."""
        return len(self._free) - sum(1 for b in hit if self.blocks[b].ref_count == 0)

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Hash and cache seq's blocks that are now full and computed."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        if full <= seq.num_committed_blocks:
            return
        stored = []
        hashes = self.prefix_hashes(seq, full)
        for i in range(seq.num_committed_blocks, full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None:            # taken from the cache already
                continue
            if hashes[i] in self._cached:         # computed twice concurrently: keep the first
                continue
            block.hash = hashes[i]
            block.token_ids = tuple(seq.token_ids(i * bs, (i + 1) * bs))
            self._cached[block.hash] = block.block_id
            stored.append((block.hash, block.block_id))
        seq.num_committed_blocks = full
        if stored and self.listener:
            self.listener("stored", stored)

    # -- allocation --------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_new_tokens: int) -> Optional[list[int]]:
        """Extend seq's block table for num_new_tokens; the new ids, or None if they don't fit."""
        n = self.blocks_needed(seq, num_new_tokens)
        if n > len(self._free):
            return None
        new = [self._pop_free() for _ in range(n)]
        seq.block_table.extend(new)
        return new

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks; cached ones stay reusable until evicted. Tail blocks go to the
        front of the eviction order (they are the least likely to be shared)."""
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[bid] = None
                if block.hash is None:             # nothing worth keeping: reuse it first
                    self._free.move_to_end(bid, last=False)
        seq.block_table = []
        seq.num_committed_blocks = 0

    def restore(self, entries: list[tuple[str, int]]) -> int:
        """Re-register cached blocks known from the prefix index (scheduler restart, workers
        unchanged); only blocks free and unhashed here are taken. Returns how many."""
        n = 0
        for h, bid in entries:
            if not 0 <= bid < self.num_blocks or h in self._cached:
                continue
            block = self.blocks[bid]
            if block.ref_count or block.hash is not None:
                continue
            block.hash, block.token_ids = h, None
            self._cached[h] = bid
            self._free.move_to_end(bid)
            n += 1
        return n

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (e.g. after the workers lost their KV)."""
        evicted = [(h, b) for h, b in self._cached.items()]
        for h, b in evicted:
            self.blocks[b].hash = self.blocks[b].token_ids = None
        self._cached.clear()
        if evicted and self.listener:
            self.listener("evicted", evicted)

    def _ref(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref_count == 0:
            del self._free[bid]
        block.ref_count += 1

    def _pop_free(self) -> int:
        bid, _ = self._free.popitem(last=False)
        block = self.blocks[bid]
        if block.hash is not None:
            del self._cached[block.hash]
            if self.listener:
                self.listener("evicted", [(block.hash, bid)])
            block.hash = block.token_ids = None
        block.ref_count = 1
        return bid
