"""The KV blocks of one pipeline replica: ref counts, the free queue, the hash -> block map,
and the stored / evicted events that feed the prefix index.

The pool knows blocks by id and hashes as opaque keys; which blocks a sequence holds and what
its hashes are is the manager's business (block_manager.py).

A block is in exactly one of three states:

    held      ref_count > 0, not in the free queue (maybe hashed: shared prefix)
    cached    ref_count == 0, hashed: in the free queue, reusable by a prefix hit until evicted
    empty     ref_count == 0, no hash: in the free queue

    free queue:  [3] [8] [5:h_a] [6:h_b]     allocate() pops from the left (evicting h_a's
                  ^ reused first               mapping when it reaches block 5); free() puts
                                               empty blocks on the left, cached ones on the right
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

ROOT_HASH = ""

# (event, [(hash, block_id)]) with event "stored" or "evicted"; feeds the Redis prefix index.
CacheListener = Callable[[str, list[tuple[str, int]]], None]


def block_hash(parent: str, token_ids: list[int], salt: str) -> str:
    """Chained content hash of one full block: H(parent hash, tenant salt, token ids)."""
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
    token_ids: Optional[tuple[int, ...]] = None   # checked on a hash hit; None: restored


class BlockPool:
    """Verbs: lookup, num_free_among, touch, allocate, free, cache, restore."""

    def __init__(self, num_blocks: int, listener: Optional[CacheListener] = None):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self.listener = listener
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[str, int] = {}

    # -- reading (writes nothing) ---------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (some may still hold cached content)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks, held or free, whose content is hashed and reusable."""
        return len(self._cached)

    def free_queue(self) -> list[int]:
        """Free block ids in reuse order (the first is allocated next); a copy."""
        return list(self._free)

    def lookup(self, h: str, token_ids: tuple[int, ...]) -> Optional[int]:
        """The block caching content h, if its tokens are token_ids (a restored block, whose
        tokens are unknown, is vouched for by its hash); else None."""
        bid = self._cached.get(h)
        if bid is None:
            return None
        known = self.blocks[bid].token_ids
        return bid if known is None or known == token_ids else None

    def num_free_among(self, block_ids: Iterable[int]) -> int:
        """How many of block_ids are in the free queue (touching them would take them out)."""
        return sum(1 for b in block_ids if self.blocks[b].ref_count == 0)

    # -- writing ------------------------------------------------------------------------
    def touch(self, block_ids: Iterable[int]) -> None:
        """Hold cached blocks once more (a prefix hit); free ones leave the free queue."""
        for bid in block_ids:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self._free[bid]
            block.ref_count += 1

    def allocate(self, n: int) -> Optional[list[int]]:
        """n blocks from the front of the free queue, each held once; their cached content is
        evicted (one "evicted" event for all). None, changing nothing, if fewer are free."""
        if n > len(self._free):
            return None
        new, evicted = [], []
        for _ in range(n):
            bid, _ = self._free.popitem(last=False)
            block = self.blocks[bid]
            if block.hash is not None:
                del self._cached[block.hash]
                evicted.append((block.hash, bid))
                block.hash = block.token_ids = None
            block.ref_count = 1
            new.append(bid)
        if evicted and self.listener is not None:
            self.listener("evicted", evicted)
        return new

    def free(self, block_ids: Iterable[int]) -> None:
        """Release one hold on each block, in the order given. A block nobody holds joins the
        free queue: at the back if cached (evicted last, least recently freed first), at the
        front if empty (nothing worth keeping: reused first)."""
        for bid in block_ids:
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[bid] = None
                if block.hash is None:
                    self._free.move_to_end(bid, last=False)

    def cache(self, entries: Iterable[tuple[int, str, tuple[int, ...]]]) -> None:
        """Record that each held block (block_id, hash, token ids) now holds that full content;
        one "stored" event for the newly cached. A block cached already keeps its hash (a
        restored one learns its tokens); a hash cached in another block keeps that block."""
        stored = []
        for bid, h, tokens in entries:
            block = self.blocks[bid]
            if block.hash is not None:
                if block.hash == h and block.token_ids is None:
                    block.token_ids = tokens
                continue
            if h in self._cached:                 # computed twice concurrently: keep the first
                continue
            block.hash, block.token_ids = h, tokens
            self._cached[h] = bid
            stored.append((h, bid))
        if stored and self.listener is not None:
            self.listener("stored", stored)

    def restore(self, entries: Iterable[tuple[str, int]]) -> int:
        """Re-register cached blocks known from the prefix index (scheduler restart, workers
        unchanged); only blocks free and empty here are taken, as the most recently freed.
        No events (the index has them). Returns how many."""
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
