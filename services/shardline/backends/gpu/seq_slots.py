"""SeqSlots: what the GPU engine keeps per live sequence, as rows of host numpy arrays.

A sequence gets a slot (a row) when it is admitted and gives it back when it is forgotten.
Its row holds its block table and its sampling parameters, written when blocks arrive or it is
admitted; a step then gathers the rows of its sequences in one vectorized index instead of
rebuilding every table from Python lists (256 tables of 64 blocks took ~1 ms that way).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


class SeqSlots:
    def __init__(self, max_blocks: int, capacity: int = 64):
        self.max_blocks = max_blocks
        self.slot_of: dict[int, int] = {}
        self._free: list[int] = []
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        old = getattr(self, "tables", None)
        n_old = 0 if old is None else old.shape[0]
        tables = np.zeros((capacity, self.max_blocks), dtype=np.int32)
        lens = np.zeros(capacity, dtype=np.int64)
        params = np.zeros((capacity, len(PARAMS)), dtype=np.float64)
        if old is not None:
            tables[:n_old], lens[:n_old], params[:n_old] = old, self.lens, self.params
        self.tables, self.lens, self.params = tables, lens, params
        self._free.extend(range(capacity - 1, n_old - 1, -1))

    def update(self, seq_ids: Sequence[int], admitted: Sequence[bool],
               new_block_ids: Sequence[Sequence[int]], configs) -> np.ndarray:
        """Slots of the step's sequences (int64 [N]), admitting (fresh row, its configs'
        sampling parameters: configs(seq_id) -> SamplingConfig or None) and appending new
        blocks. Raises ValueError for a table longer than max_blocks."""
        slots = np.empty(len(seq_ids), dtype=np.int64)
        for i, (seq_id, admit, new) in enumerate(zip(seq_ids, admitted, new_block_ids)):
            slot = self.slot_of.get(seq_id)
            if admit:
                if slot is None:
                    if not self._free:
                        self._alloc(2 * self.tables.shape[0])
                    slot = self.slot_of[seq_id] = self._free.pop()
                self.lens[slot] = 0
                self.params[slot] = _params(configs(seq_id))
            if new:
                n = int(self.lens[slot])
                if n + len(new) > self.max_blocks:
                    raise ValueError(f"seq {seq_id}: {n + len(new)} blocks, the engine holds "
                                     f"tables of at most {self.max_blocks}")
                self.tables[slot, n:n + len(new)] = new
                self.lens[slot] = n + len(new)
            slots[i] = slot
        return slots

    def forget(self, seq_ids: Sequence[int]) -> None:
        for seq_id in seq_ids:
            slot = self.slot_of.pop(seq_id, None)
            if slot is not None:
                self._free.append(slot)

    def forget_all(self) -> None:
        self.forget(list(self.slot_of))


# sampling parameters of a slot, columns of SeqSlots.params
PARAMS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "has_seed",
          "logprobs", "top_logprobs")
COL = {name: i for i, name in enumerate(PARAMS)}


def _params(config) -> list[float]:
    """A SamplingConfig (duck-typed; None = greedy) as a params row. The seed is kept below
    2**53 so float64 holds it exactly (it is mixed into 64-bit keys anyway)."""
    if config is None:
        return [0.0, 1.0, 0, 1.0, 0, 0, 0, 0]
    seed = config.seed
    return [config.temperature, config.top_p, config.top_k, config.repetition_penalty,
            0 if seed is None else seed % (1 << 53), seed is not None, config.logprobs,
            config.top_logprobs]
