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

Sliding windows: when every layer of the model attends only to its last `window` positions
(`window` the widest over the layers; 0 when some layer sees every position), a block whose
last position is <= p - window is read by no layer once p is the next position to compute.
Such leading blocks are released while the sequence runs (seq.num_released_blocks of them):
their reference is dropped (a full, hashed one stays cached and evictable, as a finished
sequence's blocks do) and their entries stay in the table as placeholders, so positions still
map to table indices. Nothing reads, writes, commits or frees a placeholder again.

    window 8, block_size 4, next position p = 13:  positions <= 5 are out of every window
    table    [ 7 | 2 | 9 | 4 ]        blocks 7 (positions 0..3) released: 1 placeholder
              ^ placeholder           block 2 (4..7) still holds positions 6, 7

A sequence then holds about window / block_size + 1 blocks however long it runs; a prompt
prefilled in chunks of n tokens, about (window + n) / block_size + 1 at a time.
"""
from __future__ import annotations

from typing import Optional

from shardline.scheduler.block_pool import BlockPool, CacheListener
from shardline.scheduler.request import Sequence

# The id in a table entry that stands for a block outside the window that the sequence never
# held (admitted after a cached prefix whose earliest blocks were evicted): any valid id does,
# since no layer reads the entry and no plan writes it.
PLACEHOLDER_BLOCK = 0
# seq_capacity_tokens when a sequence of any length fits (windowed attention)
UNBOUNDED = 1 << 62


class BlockManager:
    """Verbs: match_prefix, allocate, commit_full_blocks, release_outside_window, free,
    restore. window: the attention window of every layer (0: no release)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 listener: Optional[CacheListener] = None, window: int = 0):
        if num_blocks <= 0 or block_size <= 0 or window < 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be "
                             f"> 0, window ({window}) >= 0")
        self.pool = BlockPool(num_blocks, listener)
        self.block_size = block_size
        self.window = window
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

    # -- the window --------------------------------------------------------------------
    def num_outside_window(self, pos: int) -> int:
        """Leading blocks that no layer reads once position pos is the next to compute: those
        whose last position is <= pos - window. 0 without a window."""
        if not self.window:
            return 0
        return max(0, (pos - self.window + 1) // self.block_size)

    def seq_capacity_tokens(self, max_step_tokens: int) -> int:
        """The most tokens one sequence may reach with the whole pool to itself, prefilled in
        chunks of at most max_step_tokens: every block's worth; with a window, UNBOUNDED once
        the pool holds the blocks one step can need (the window before its first position, its
        tokens, and a block of misalignment)."""
        bs = self.block_size
        if self.window and -(-(self.window + max_step_tokens + bs - 2) // bs) <= self.num_blocks:
            return UNBOUNDED
        return self.num_blocks * bs

    # -- prefix cache ------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> tuple[list[int], int]:
        """seq's longest cached prefix: (its block ids, the number of tokens they hold), each
        block's tokens checked against seq's. At least one token is always left to compute,
        since sampling needs its logits.

        With a window, the prefix of k blocks counts when the blocks the window of position
        k * block_size reaches into are all cached (num_outside_window(k * block_size) of them
        need not be: they come back as PLACEHOLDER_BLOCK, never claimed), so only blocks whose
        data is still there are taken; without one, when all k are.

        Writes nothing (routing calls it to price every replica): no ref counts, no free-queue
        order, no counters. allocate(seq, n, prefix=blocks) takes the blocks."""
        if not self.enable_prefix_caching:
            return [], 0
        bs = self.block_size
        hits: list[Optional[int]] = []
        best, last_miss = 0, -1
        for i in range((seq.num_tokens - 1) // bs):
            bid = self.pool.lookup(seq.full_block_hash(i, bs),
                                   tuple(seq.token_ids(i * bs, (i + 1) * bs)))
            hits.append(bid)
            if bid is None:
                last_miss = i
                if not self.window:
                    break
            if last_miss < self.num_outside_window((i + 1) * bs):
                best = i + 1
        outside = self.num_outside_window(best * bs)
        return [PLACEHOLDER_BLOCK] * outside + hits[outside:best], best * bs

    def commit_full_blocks(self, seq: Sequence) -> int:
        """Hash and cache seq's blocks that are now full and computed (the pool reports them
        "stored"). Returns the number of leading blocks of seq's table now committed, for
        seq.num_committed_blocks. Placeholders (released blocks) are never committed: another
        sequence may hold their ids by now."""
        done = seq.num_committed_blocks
        if not self.enable_prefix_caching:
            return done
        bs = self.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        if full <= done:
            return done
        self.pool.cache((seq.block_table[i], seq.full_block_hash(i, bs),
                         tuple(seq.token_ids(i * bs, (i + 1) * bs)))
                        for i in range(max(done, seq.num_released_blocks), full))
        return full

    def release_outside_window(self, seq: Sequence) -> int:
        """Release seq's held blocks that no layer reads once seq.num_computed_tokens is its
        next position (call after commit_full_blocks: they are full and computed, so a hashed
        one stays cached, evictable, earliest first). Their table entries become
        placeholders. Returns the number of leading placeholders, for seq.num_released_blocks.

        Safe with steps in flight: a step already planned for seq starts at or after
        num_computed_tokens, so reads none of them, and another sequence gets them only in a
        later step, which every stage runs after the earlier ones."""
        done = seq.num_released_blocks
        upto = min(self.num_outside_window(seq.num_computed_tokens), len(seq.block_table))
        if upto <= done:
            return done
        self.pool.free(seq.block_table[done:upto])
        return upto

    # -- allocation --------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_new_tokens: int,
                 prefix: Optional[list[int]] = None) -> Optional[list[int]]:
        """The new block ids that extend seq's table so num_new_tokens more tokens fit after
        its computed ones, or None (nothing changed) if the pool has too few free blocks.

        On admission, prefix is the hit from match_prefix (maybe []): those blocks are taken
        first, as seq's leading blocks, and their tokens count as computed. The caller sets
        block_table = prefix + new, num_computed_tokens = len(prefix) * block_size and
        num_released_blocks = num_outside_window(that): the prefix's placeholders, not taken.

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
        held = prefix[self.num_outside_window(cached):]
        total = seq.num_computed_tokens + cached + num_new_tokens
        need = max(0, -(-total // bs) - len(seq.block_table) - len(prefix))
        if need > self.pool.num_free_blocks - self.pool.num_free_among(held):
            return None
        self.pool.touch(held)
        new = self.pool.allocate(need)
        if admission and seq.num_preemptions == 0:
            self.queries += seq.num_tokens       # usage reports the first admission's hits
            self.hits += cached
        return new

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks (the caller then empties its table); cached ones stay reusable
        until evicted. Tail blocks are released first, so a sequence's prefix is evicted
        after its tail. Placeholders (released already) are skipped."""
        self.pool.free(reversed(seq.block_table[seq.num_released_blocks:]))

    def restore(self, entries: list[tuple[str, int]]) -> int:
        """Re-register cached (hash, block id) entries known from the prefix index after a
        scheduler restart (workers unchanged). Returns how many were taken."""
        return self.pool.restore(entries)
