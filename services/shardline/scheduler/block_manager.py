"""Paged KV block allocation for one pipeline replica.

Block ids are the same on every stage of a pipeline, so one block table per sequence
serves them all. The scheduler is the only writer.

    seq.block_table = [7, 2, 9]        block_size = 4
    tokens          = [a b c d|e f g h|i j]     -> slot of token j = 9 * 4 + 1
"""
from __future__ import annotations

from collections import deque
from typing import Optional

from shardline.scheduler.request import Sequence


class BlockManager:
    """Free list of block ids; verbs: can_allocate, allocate, free."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add to seq's table so that num_new_tokens more tokens fit."""
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> Optional[list[int]]:
        """Extend seq's block table for num_new_tokens; the new ids, or None if they don't fit."""
        n = self.blocks_needed(seq, num_new_tokens)
        if n > len(self._free):
            return None
        new = [self._free.popleft() for _ in range(n)]
        seq.block_table.extend(new)
        return new

    def free(self, seq: Sequence) -> None:
        """Return all of seq's blocks to the pool."""
        self._free.extend(seq.block_table)
        seq.block_table = []
