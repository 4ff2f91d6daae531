"""Paged KV blocks for the sequences of one pipeline replica, with automatic prefix caching.

Block ids are the same on every stage of a pipeline, so one block table per sequence serves
them all. The manager answers with values (block ids, token counts); the scheduler writes
them into the Sequence (`block_table`, `num_computed_tokens`, `num_committed_blocks`). Under
it, the BlockPool (block_pool.py) holds the blocks, ref counts, free queue and hash map.

    seq.block_table = [7, 2, 9]        block_size = 4
    tokens          = [a b c d|e f g h|i j]     -> slot of token j = 9 * 4 + 1

Prefix caching: once a block is full and computed it gets a chained hash
h_i = H(h_{i-1}, tokens of block i, tenant salt) and is kept, reference-counted, after its
sequence ends; a later request whose prompt starts with the same blocks takes them instead
of recomputing, until allocation evicts them (least recently freed first).
"""
from __future__ import annotations

from typing import Optional

from shardline.scheduler.block_pool import BlockPool, CacheListener
from shardline.scheduler.request import Sequence


class BlockManager:
    """Verbs: match_prefix, allocate, commit_full_blocks, free, restore."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 listener: Optional[CacheListener] = None):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be > 0")
        self.pool = BlockPool(num_blocks, listener)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hits = 0          # prompt tokens served from cache (first admissions)
        self.queries = 0       # prompt tokens looked up (first admissions)

    # -- accounting --------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (some may still hold cached content)."""
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        """Blocks some sequence holds."""
        return self.pool.num_blocks - self.pool.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks, held or free, holding a hashed, reusable prefix."""
        return self.pool.num_cached_blocks

    # -- prefix cache ------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> tuple[list[int], int]:
        """seq's longest cached prefix: (its block ids, the number of tokens they hold), each
        block's tokens checked against seq's. At least one token is always left to compute,
        since sampling needs its logits.

        Writes nothing (routing calls it to price every replica): no ref counts, no free-queue
        order, no counters. allocate(seq, n, prefix=blocks) takes the blocks."""
        if not self.enable_prefix_caching:
            return [], 0
        bs = self.block_size
        hit: list[int] = []
        for i in range((seq.num_tokens - 1) // bs):
            bid = self.pool.lookup(seq.full_block_hash(i, bs),
                                   tuple(seq.token_ids(i * bs, (i + 1) * bs)))
            if bid is None:
                break
            hit.append(bid)
        return hit, len(hit) * bs

    def commit_full_blocks(self, seq: Sequence) -> int:
        """Hash and cache seq's blocks that are now full and computed (the pool reports them
        "stored"). Returns the number of leading blocks of seq's table now committed, for
        seq.num_committed_blocks."""
        done = seq.num_committed_blocks
        if not self.enable_prefix_caching:
            return done
        bs = self.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        if full <= done:
            return done
        self.pool.cache((seq.block_table[i], seq.full_block_hash(i, bs),
                         tuple(seq.token_ids(i * bs, (i + 1) * bs))) for i in range(done, full))
        return full

    # -- allocation --------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_new_tokens: int,
                 prefix: Optional[list[int]] = None) -> Optional[list[int]]:
        """The new block ids that extend seq's table so num_new_tokens more tokens fit after
        its computed ones, or None (nothing changed) if the pool has too few free blocks.

        On admission, prefix is the hit from match_prefix (maybe []): those blocks are taken
        first, as seq's leading blocks, and their tokens count as computed. The caller sets
        block_table = prefix + new and num_computed_tokens = len(prefix) * block_size.

            block_size 4, prompt of 14 tokens, prefix = [5, 2] (tokens 0..7), n = 6:
              tokens   [0 . . .|4 . . .|8 . . .|12 13]
              blocks   [   5   |   2   |  new  | new ]    -> allocate returns [0, 3]
            room: 2 new blocks <= free blocks - those of [5, 2] that are free now (taking
            them removes them from the free queue, so they can never be evicted for the new)
        """
        bs = self.block_size
        admission = prefix is not None
        assert not (admission and seq.block_table), "a prefix is taken by a fresh sequence only"
        prefix = prefix or []
        cached = len(prefix) * bs
        total = seq.num_computed_tokens + cached + num_new_tokens
        need = max(0, -(-total // bs) - len(seq.block_table) - len(prefix))
        if need > self.pool.num_free_blocks - self.pool.num_free_among(prefix):
            return None
        self.pool.touch(prefix)
        new = self.pool.allocate(need)
        if admission and seq.num_preemptions == 0:
            self.queries += seq.num_tokens       # usage reports the first admission's hits
            self.hits += cached
        return new

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks (the caller then empties its table); cached ones stay reusable
        until evicted. Tail blocks are released first, so a sequence's prefix is evicted
        after its tail."""
        self.pool.free(reversed(seq.block_table))

    def restore(self, entries: list[tuple[str, int]]) -> int:
        """Re-register cached (hash, block id) entries known from the prefix index after a
        scheduler restart (workers unchanged). Returns how many were taken."""
        return self.pool.restore(entries)
