"""Self-attention over a paged KV cache.

Tokens of all sequences in a step are flattened into one batch of T rows. Each layer writes
its new K/V at the rows' cache slots, then attends:

  * decode rows (one token per sequence) together: one SDPA call over their gathered,
    right-padded contexts, the query heads sharing a KV head acting as its "query positions"
    ([kv_heads, D, group, head_dim] against [kv_heads, D, L, head_dim]), so GQA needs no
    repeated K/V;
  * prefill chunks (several tokens, maybe after earlier chunks already in the cache) one by
    one: causal SDPA, with the mask shifted by the chunk's start position.

Slots: slot = block_id * block_size + offset; a sequence's block table lists its block ids.

    block table [7, 2, 9], block_size 4:  positions 0..3 -> slots 28..31,
                                          positions 4..7 -> slots 8..11, 8.. -> 36..

Everything that depends only on the step's plan (slots, gather indices, masks, positions)
is computed once per step in `AttentionMetadata.build` and shared by all layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from shardline.models.layers import Linear, RMSNorm, apply_rope
from shardline.models.config import ModelConfig


@dataclass
class PrefillChunk:
    """A sequence computing several tokens this step: rows [row_start, row_end) of the batch."""
    row_start: int
    row_end: int
    gather: Optional[torch.Tensor]   # [context] slots of positions 0..end; None if start_pos 0
    mask: Optional[torch.Tensor]     # [tokens, context] bool, True = attend; None = plain causal


@dataclass
class DecodeBatch:
    """Sequences computing one token each, attended together."""
    rows: Optional[torch.Tensor]     # [D] their rows in the batch; None when they are all rows
    gather: torch.Tensor             # [D, L] cache slots of each context, right-padded
    mask: Optional[torch.Tensor]     # [1, D, 1, L] bool; None when all contexts have length L
    block_table: torch.Tensor        # [D, blocks] int64, zero-padded (for the CPU kernels)
    lengths: torch.Tensor            # [D] int64: positions attended, the current one included
    block_size: int


@dataclass
class AttentionMetadata:
    """The step's cache addressing, shared by every layer."""
    num_tokens: int
    positions: torch.Tensor          # [T] absolute position of each row
    slot_mapping: torch.Tensor       # [T] cache slot each row's K/V is written to
    decode: Optional[DecodeBatch]
    prefills: list[PrefillChunk]
    # (start positions, token counts, block tables, block size), for per_row
    plan: Optional[tuple] = field(default=None, repr=False)
    # [T] the row of the RoPE tables each row reads, where it differs from its position
    # (LongRoPE: position + max_pos for sequences on the long factors; layers.RotaryEmbedding)
    rope_positions: Optional[torch.Tensor] = None
    _per_row: Optional[tuple[torch.Tensor, torch.Tensor]] = field(default=None, repr=False)

    @property
    def block_size(self) -> int:
        return self.plan[3]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, scale: float, window: int = 0,
               softcap: float = 0.0) -> torch.Tensor:
        """Write k, v at the rows' slots and attend (see paged_attention), to the last
        `window` positions only when window > 0, scores soft-capped when softcap > 0. Every step's metadata has this method: a
        backend's own metadata brings its own kernels."""
        return paged_attention(q, k, v, k_cache, v_cache, self, scale, window, softcap)

    def per_row(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(block tables [T, blocks] int64, lengths [T] int64): each row's sequence's block
        table (zero-padded) and the positions the row attends, its own included. Every row,
        decode or prefill, as one query against its own context: causal attention in one
        call of the CPU kernels' paged_attention. Built on first use, once per step."""
        if self._per_row is None:
            d = self.decode
            if d is not None and d.rows is None:
                self._per_row = (d.block_table, d.lengths)
            else:
                starts, counts, tables, bs = self.plan
                nblocks = max((s + n + bs - 1) // bs for s, n in zip(starts, counts))
                dev = self.positions.device
                table = _padded_tables(tables, nblocks, dev).repeat_interleave(
                    torch.tensor(counts, dtype=torch.long, device=dev), dim=0)
                self._per_row = (table.contiguous(), self.positions + 1)
        return self._per_row

    @classmethod
    def build(cls, start_positions: Sequence[int], num_tokens: Sequence[int],
              block_tables: Sequence[Sequence[int]], block_size: int,
              device: torch.device) -> "AttentionMetadata":
        """Addressing for sequences computing `num_tokens[i]` tokens from `start_positions[i]`,
        whose blocks are `block_tables[i]` (which must cover every position computed)."""
        bs = block_size
        total = sum(num_tokens)
        long = dict(dtype=torch.long, device=device)
        plan = (start_positions, num_tokens, block_tables, bs)
        if all(n == 1 for n in num_tokens):       # the common pure-decode step: no torch loops
            positions = torch.tensor(start_positions, **long)
            slots = [t[p // bs] * bs + p % bs for p, t in zip(start_positions, block_tables)]
            decode = _decode_batch(None, list(start_positions), block_tables, bs, device)
            return cls(total, positions, torch.tensor(slots, **long), decode, [], plan)

        positions, slots, prefills = [], [], []
        dec_rows, dec_starts, dec_tables = [], [], []
        row = 0
        for start, n, table in zip(start_positions, num_tokens, block_tables):
            end = start + n
            nblocks = (end + bs - 1) // bs
            # cache slots of positions 0..end: [nblocks, bs] -> flat
            ctx_slots = (torch.tensor(table[:nblocks], **long)[:, None] * bs
                         + torch.arange(bs, **long)).view(-1)[:end]
            positions.append(torch.arange(start, end, **long))
            slots.append(ctx_slots[start:])
            if n == 1:
                dec_rows.append(row)
                dec_starts.append(start)
                dec_tables.append(table)
            elif start == 0:
                prefills.append(PrefillChunk(row, row + n, None, None))
            else:
                q_pos = torch.arange(start, end, **long)
                mask = torch.arange(end, **long)[None, :] <= q_pos[:, None]   # [n, end]
                prefills.append(PrefillChunk(row, row + n, ctx_slots, mask))
            row += n
        decode = None
        if dec_rows:
            decode = _decode_batch(torch.tensor(dec_rows, **long), dec_starts, dec_tables, bs,
                                   device)
        return cls(total, torch.cat(positions), torch.cat(slots), decode, prefills, plan)


def _padded_tables(tables: Sequence[Sequence[int]], nblocks: int, device) -> torch.Tensor:
    """int64 [len(tables), nblocks]: each block table cut or zero-padded to nblocks."""
    padded = [list(t[:nblocks]) + [0] * (nblocks - min(len(t), nblocks)) for t in tables]
    return torch.tensor(padded, dtype=torch.long, device=device)


def _decode_batch(rows: Optional[torch.Tensor], starts: list[int],
                  tables: Sequence[Sequence[int]], bs: int, device) -> DecodeBatch:
    lengths = [s + 1 for s in starts]
    max_len = max(lengths)
    nblocks = (max_len + bs - 1) // bs
    table = _padded_tables(tables, nblocks, device)                            # [D, nblocks]
    offsets = torch.arange(bs, dtype=torch.long, device=device)
    gather = (table[:, :, None] * bs + offsets).view(len(tables), -1)[:, :max_len].contiguous()
    mask = None
    lens = torch.tensor(lengths, dtype=torch.long, device=device)
    if min(lengths) != max_len:
        mask = (torch.arange(max_len, dtype=torch.long, device=device)[None, :]
                < lens[:, None])[None, :, None, :]                             # [1, D, 1, L]
    return DecodeBatch(rows, gather, mask, table, lens, bs)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, window: int = 0,
                    softcap: float = 0.0) -> torch.Tensor:
    """Write k, v into the cache and attend (window > 0: each row to its last `window`
    positions only, itself included, as HF's sliding-window masks; softcap > 0: scores s
    become softcap * tanh(s / softcap) before the softmax, Gemma 2's soft-capping).

    q: [T, heads, head_dim]; k, v: [T, kv_heads, head_dim]
    k_cache, v_cache: [kv_heads, slots, head_dim] (this layer's)
    returns [T, heads, head_dim]
    """
    k_cache.index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
    v_cache.index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads

    dec_out = None
    if meta.decode is not None:
        d = meta.decode
        qd = q if d.rows is None else q.index_select(0, d.rows)                # [D, H, hd]
        n, length = d.gather.shape
        flat = d.gather.view(-1)
        kd = k_cache.index_select(1, flat).view(num_kv_heads, n, length, head_dim)  # [KV, D, L, hd]
        vd = v_cache.index_select(1, flat).view(num_kv_heads, n, length, head_dim)
        # KV heads as the outer batch dim keeps the gathered K/V contiguous; the query heads of
        # each KV head act as its "query positions": [KV, D, group, hd] against [KV, D, L, hd]
        qd = qd.view(n, num_kv_heads, group, head_dim).transpose(0, 1)
        mask = d.mask
        if 0 < window < length:
            keys = torch.arange(length, device=q.device)
            inside = (keys[None, :] >= (d.lengths - window)[:, None])[None, :, None, :]
            mask = inside if mask is None else mask & inside                   # [1, D, 1, L]
        dec_out = _sdpa(qd, kd, vd, mask, scale, softcap)
        dec_out = dec_out.transpose(0, 1).reshape(n, num_heads, head_dim)
        if d.rows is None:
            return dec_out

    if len(meta.prefills) == 1 and dec_out is None:
        return _prefill(q, k, v, k_cache, v_cache, meta.prefills[0], scale, window, softcap)
    out = torch.empty_like(q)
    if dec_out is not None:
        out.index_copy_(0, meta.decode.rows, dec_out)
    for p in meta.prefills:
        out[p.row_start:p.row_end] = _prefill(q, k, v, k_cache, v_cache, p, scale, window,
                                              softcap)
    return out


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
          scale: float, softcap: float = 0.0, causal: bool = False) -> torch.Tensor:
    """SDPA over [B, H, n, hd] queries and [B, KV, L, hd] keys / values (KV divides H: grouped
    heads), with an optional bool mask (True = attend) or causal mask; soft-capped scores
    (which SDPA has no option for) computed explicitly in float32."""
    if softcap <= 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale        # [B, H, n, L]
    s = torch.tanh(s / softcap) * softcap
    if causal:
        n, length = s.shape[-2:]
        mask = torch.ones(n, length, dtype=torch.bool, device=s.device).tril(length - n)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v.float()).to(q.dtype)


def _prefill(q, k, v, k_cache, v_cache, p: PrefillChunk, scale: float,
             window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    n = p.row_end - p.row_start
    qp = q[p.row_start:p.row_end].transpose(0, 1)                                # [H, n, hd]
    if p.gather is None:                 # the chunk is the whole context: no cache read
        kp = k[p.row_start:p.row_end].transpose(0, 1)                            # [KV, n, hd]
        vp = v[p.row_start:p.row_end].transpose(0, 1)
    else:
        kp = k_cache.index_select(1, p.gather)                                   # [KV, ctx, hd]
        vp = v_cache.index_select(1, p.gather)
    mask = p.mask
    end = kp.shape[1]
    if 0 < window < end:                 # keys j of query position i: i - window < j <= i
        q_pos = torch.arange(end - n, end, device=q.device)[:, None]
        keys = torch.arange(end, device=q.device)[None, :]
        mask = (keys <= q_pos) & (keys > q_pos - window)                          # [n, ctx]
    out = _sdpa(qp[None], kp[None], vp[None], mask, scale, softcap, causal=mask is None)
    return out[0].transpose(0, 1)                                                # [n, H, hd]


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads, rotary positions and a paged cache."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.sliding_window = config.window(layer)     # 0: every position
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = hd = config.head_dim
        self.scale = config.scale
        self.softcap = config.attn_softcap                # 0: none
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, self.num_heads * hd, bias=bias)
        self.k_proj = Linear(config.hidden_size, self.num_kv_heads * hd, bias=bias)
        self.v_proj = Linear(config.hidden_size, self.num_kv_heads * hd, bias=bias)
        self.o_proj = Linear(self.num_heads * hd, config.hidden_size, bias=False)
        self.qkv_proj: Optional[nn.Module] = None    # q, k, v in one (see fuse.fuse_stage)
        # Qwen3: each head's q and k RMS-normalized (weights [head_dim]) before RoPE
        self.q_norm = RMSNorm(hd, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(hd, config.rms_norm_eps) if config.qk_norm else None

    def _qk_norm(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """[T, H, hd], [T, KV, hd] -> [T, H + KV, hd], normalized per head where the model
        does (Qwen3), ready for RoPE."""
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return torch.cat([q, k], dim=1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        # x: [T, hidden]; cos, sin: [T, 1, head_dim]
        t = x.shape[0]
        if self.qkv_proj is not None:
            h, kv = self.num_heads, self.num_kv_heads
            qkv = self.qkv_proj(x).view(t, h + 2 * kv, self.head_dim)   # [T, H + 2KV, hd]
            qk = qkv[:, :h + kv]
            if self.q_norm is not None:
                qk = self._qk_norm(qk[:, :h], qk[:, h:])
            qk = apply_rope(qk, cos, sin)                                  # [T, H + KV, hd]
            o = meta.attend(qk[:, :h], qk[:, h:], qkv[:, h + kv:], k_cache, v_cache,
                            self.scale, self.sliding_window, self.softcap)  # [T, H, hd]
            return self.o_proj(o.reshape(t, h * self.head_dim))
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)      # [T, H, hd]
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)   # [T, KV, hd]
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)   # [T, KV, hd]
        qk = apply_rope(self._qk_norm(q, k), cos, sin)                # [T, H + KV, hd]
        q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        o = meta.attend(q, k, v, k_cache, v_cache, self.scale, self.sliding_window,
                        self.softcap)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))
