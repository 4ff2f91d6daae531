"""Paged attention in plain PyTorch on the engine's metadata: the GPU engine's attention on
the CPU (and wherever Triton is missing), with the same interface and masks as the Triton
kernels (triton_attention.py).

Every row attends to its own sequence's context through the block table:

    slots [N, W * block_size] = block_tables[:, :W] * block_size + offset     (W blocks wide)
    row r (of sequence s, at position p) attends to key j of s when
        j <= p  and  (no window, or j > p - window)

One gather of every row's context keeps the shapes fixed for a given (rows, W), which is all a
step needs; it is meant for correctness and small batches, not speed.
"""
from __future__ import annotations

import torch


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_tables: torch.Tensor, row_seq: torch.Tensor,
                          positions: torch.Tensor, *, width_blocks: int, block_size: int,
                          scale: float, sliding_window: int = 0,
                          softcap: float = 0.0) -> torch.Tensor:
    """q: [T, H, D]; k_cache, v_cache: [KV, slots, D] (K/V of the step already written);
    block_tables: int [N, >= width_blocks]; row_seq: [T] int64 sequence of each row;
    positions: [T] int64. Returns [T, H, D] in q's dtype."""
    t, num_heads, head_dim = q.shape
    num_kv = k_cache.shape[0]
    group = num_heads // num_kv
    offsets = torch.arange(block_size, device=q.device, dtype=torch.int64)
    tables = block_tables[:, :width_blocks].to(torch.int64)
    slots = (tables[:, :, None] * block_size + offsets).reshape(tables.shape[0], -1)
    row_slots = slots.index_select(0, row_seq)                              # [T, L]
    keys = torch.arange(row_slots.shape[1], device=q.device, dtype=torch.int64)[None, :]
    allowed = keys <= positions[:, None]                                    # [T, L]
    if sliding_window > 0:
        allowed &= keys > positions[:, None] - sliding_window
    flat = row_slots.reshape(-1)
    k = k_cache.index_select(1, flat).view(num_kv, t, -1, head_dim).float()  # [KV, T, L, D]
    v = v_cache.index_select(1, flat).view(num_kv, t, -1, head_dim).float()
    qf = q.float().view(t, num_kv, group, head_dim).transpose(0, 1)          # [KV, T, G, D]
    scores = torch.matmul(qf, k.transpose(-1, -2)) * scale                  # [KV, T, G, L]
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed[None, :, None, :], float("-inf"))
    out = torch.matmul(scores.softmax(dim=-1), v)                           # [KV, T, G, D]
    return out.transpose(0, 1).reshape(t, num_heads, head_dim).to(q.dtype)
