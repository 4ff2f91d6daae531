"""The stage's paged KV cache: one preallocated K tensor and one V tensor for all its layers.

    k, v: [num_local_layers, num_kv_heads, num_blocks * block_size, head_dim]

A token at position p of a sequence with block table B lives in slot
B[p // block_size] * block_size + p % block_size of every layer. Block ids are chosen by the
scheduler and are the same on every stage of a pipeline; this class only holds the memory.
KV heads lead so that gathering a context gives contiguous [kv_heads, tokens, head_dim]
tensors, which CPU SDPA kernels read much faster than strided ones.
"""
from __future__ import annotations

from typing import Optional, Union

import torch


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: Union[str, torch.device],
                 scratch_blocks: int = 0):
        """num_blocks blocks for the scheduler's sequences, ids 0..num_blocks-1, plus
        scratch_blocks after them that only the backend uses (the GPU engine's padded rows
        write there); the first scratch block's id is `scratch_block`."""
        if num_blocks <= 0:
            raise ValueError(f"a KV cache needs at least one block, got {num_blocks}")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.scratch_block = num_blocks if scratch_blocks else None
        total = num_blocks + scratch_blocks
        shape = (num_layers, num_kv_heads, total * block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # per-layer views, made once: layers index these every step
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = list(zip(self.k.unbind(0),
                                                                         self.v.unbind(0)))

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        """Bytes one block takes across the stage's layers, K and V."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize

    @classmethod
    def num_blocks_for_budget(cls, budget_bytes: int, num_layers: int, block_size: int,
                              num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                              max_blocks: Optional[int] = None) -> int:
        """How many whole blocks fit in budget_bytes (at most max_blocks)."""
        n = int(budget_bytes) // cls.bytes_per_block(num_layers, block_size, num_kv_heads,
                                                     head_dim, dtype)
        return min(n, max_blocks) if max_blocks is not None else n
