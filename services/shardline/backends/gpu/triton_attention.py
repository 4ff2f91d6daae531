"""Paged attention in Triton, reading K/V through the block table (no gather on the host).

Layout (one layer; see models/kv_cache.py):

    k_cache, v_cache: [num_kv_heads, num_blocks * block_size, head_dim]
    position p of a sequence with block table B lives at slot
        B[p // block_size] * block_size + p % block_size

Query head h reads KV head h // (num_heads // num_kv_heads) (GQA). The kernels only read the
cache: the caller writes the step's new K/V into it first.

Both kernels walk a sequence's context in key tiles of TILE_N positions. Each key's block id is
gathered from the block table (keys of one block share an id, so these loads hit the same few
addresses), then its slot's K and V rows are loaded; keys outside the needed range (past the
context, before a sliding window) are masked off and never loaded, and whole tiles outside it
are not visited. Scores are kept in the log2 domain (log2(e) folded into the scale) for an
online softmax with a float32 running max, sum and accumulator:

    s = (q . k) * scale;  s = softcap * tanh(s / softcap) if softcap > 0
    key j is visible to the query at position i iff  i - window < j <= i  (window 0: j <= i)

paged_decode_attention (flash-decoding, split-K): grid (batch, kv_head, split). One program
takes the GQA group of query heads of one KV head as a [GROUP_PAD, D] tile (one K/V load
serves the whole group; GROUP_PAD >= 16 for tl.dot) and its share of the sequence's key tiles.
With one split it writes the output directly; otherwise it writes partial (max, sum, acc) to
float32 scratch and a second kernel (grid (batch, head)) merges the splits. The split count is
chosen on the host from tensor shapes only, and nothing reads tensor values on the host, so a
call can be captured in a CUDA graph.

paged_prefill_attention (varlen chunks over a cached prefix): grid (sequence, query tile,
head), BLOCK_M query rows per program; tiles past a sequence's rows exit at once (the grid is
sized from the total row count, not from any value on the device). Causal within the chunk.

Rows with no visible key (context length 0) are written as zeros.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

TILE_N = 64                  # keys per inner-loop step (spans several cache blocks)
_NO_WINDOW = 1 << 30         # "window" for sliding_window == 0: every earlier key is visible
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _tanh(x):
    # 1 - 2 / (e^2x + 1): exact at +-inf (e^2x -> inf or 0), no NaN for large |x|
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * _LOG2E)) + 1.0)


@triton.jit
def _attend(q, q_pos, k_base, v_base, bt_row, first_pos, last_pos, tile_lo, tile_hi,
            stride_ks, stride_vs, scale, softcap, window,
            BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
            D_PAD: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax of the query tile q [M, D_PAD] (positions q_pos [M]) over key tiles
    tile_lo..tile_hi-1; keys outside first_pos..last_pos are not loaded. Returns the running
    (max [M] in log2 units, sum [M], acc [M, D_PAD]), all float32."""
    offs = tl.arange(0, TILE)
    d = tl.arange(0, D_PAD)
    dmask = d < HEAD_DIM
    m = tl.full([q.shape[0]], float("-inf"), tl.float32)
    l = tl.zeros([q.shape[0]], tl.float32)
    acc = tl.zeros([q.shape[0], D_PAD], tl.float32)
    for t in range(tile_lo, tile_hi):
        kpos = t * TILE + offs
        kmask = (kpos >= first_pos) & (kpos <= last_pos)
        bid = tl.load(bt_row + kpos // BLOCK_SIZE, mask=kmask, other=0).to(tl.int64)
        slot = bid * BLOCK_SIZE + kpos % BLOCK_SIZE
        lmask = kmask[:, None] & dmask[None, :]
        k = tl.load(k_base + slot[:, None] * stride_ks + d[None, :], mask=lmask, other=0.0)
        v = tl.load(v_base + slot[:, None] * stride_vs + d[None, :], mask=lmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)                   # [M, TILE]
        if HAS_SOFTCAP:
            s = _tanh(s * (scale / softcap)) * (softcap * _LOG2E)
        else:
            s = s * (scale * _LOG2E)
        visible = ((kpos[None, :] <= q_pos[:, None]) & (kpos[None, :] > q_pos[:, None] - window)
                   & kmask[None, :])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)     # rows with nothing seen yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m = m_new
    return m, l, acc


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, m_ptr, l_ptr, acc_ptr,
                   stride_qb, stride_qh, stride_kh, stride_ks, stride_vh, stride_vs,
                   stride_bt, stride_ob, stride_oh, bt_cols, num_heads,
                   scale, softcap, window,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   TILE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                   NUM_SPLITS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, GROUP_PAD)
    heads = kvh * GROUP + g
    d = tl.arange(0, D_PAD)
    qmask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=qmask,
                other=0.0)
    length = tl.minimum(tl.load(lens_ptr + b), bt_cols * BLOCK_SIZE)
    last_pos = length - 1
    first_pos = tl.maximum(last_pos - window + 1, 0)
    # this split's share of the key tiles that hold first_pos..last_pos
    tile_first = first_pos // TILE
    n_tiles = tl.where(length > 0, last_pos // TILE + 1 - tile_first, 0)
    per_split = tl.cdiv(n_tiles, NUM_SPLITS)
    tile_lo = tile_first + split * per_split
    tile_hi = tl.minimum(tile_lo + per_split, tile_first + n_tiles)
    q_pos = tl.zeros([GROUP_PAD], tl.int32) + last_pos
    m, l, acc = _attend(q, q_pos, k_ptr + kvh * stride_kh, v_ptr + kvh * stride_vh,
                        bt_ptr + b * stride_bt, first_pos, last_pos, tile_lo, tile_hi,
                        stride_ks, stride_vs, scale, softcap, window,
                        BLOCK_SIZE, TILE, HEAD_DIM, D_PAD, HAS_SOFTCAP, DOT_PREC)
    if NUM_SPLITS == 1:
        o = acc / tl.where(l > 0.0, l, 1.0)[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=qmask)
    else:
        row = (b * num_heads + heads) * NUM_SPLITS + split                    # [GROUP_PAD]
        tl.store(m_ptr + row, m, mask=g < GROUP)
        tl.store(l_ptr + row, l, mask=g < GROUP)
        tl.store(acc_ptr + row[:, None] * D_PAD + d[None, :], acc, mask=qmask)


@triton.jit
def _merge_splits_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, stride_ob, stride_oh,
                         NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                         HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    num_heads = tl.num_programs(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D_PAD)
    smask = s < NUM_SPLITS
    row = (b * num_heads + h) * NUM_SPLITS + s
    m = tl.load(m_ptr + row, mask=smask, other=float("-inf"))
    l = tl.load(l_ptr + row, mask=smask, other=0.0)
    acc = tl.load(acc_ptr + row[:, None] * D_PAD + d[None, :], mask=smask[:, None], other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))    # empty splits weigh 0
    total = tl.sum(l * w, axis=0)
    o = tl.sum(acc * w[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, qsl_ptr, lens_ptr, out_ptr,
                    stride_qt, stride_qh, stride_kh, stride_ks, stride_vh, stride_vs,
                    stride_bt, stride_ot, stride_oh, bt_cols,
                    scale, softcap, window,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    TILE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    head = tl.program_id(2)
    row0 = tl.load(qsl_ptr + seq)
    n = tl.load(qsl_ptr + seq + 1) - row0
    if tile * BLOCK_M < n:
        length = tl.load(lens_ptr + seq)
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, D_PAD)
        mask = (rows < n)[:, None] & (d < HEAD_DIM)[None, :]
        q = tl.load(q_ptr + (row0 + rows)[:, None] * stride_qt + head * stride_qh + d[None, :],
                    mask=mask, other=0.0)
        q_pos = length - n + rows
        last_pos = tl.minimum(tl.minimum(length - n + tile * BLOCK_M + BLOCK_M, length) - 1,
                              bt_cols * BLOCK_SIZE - 1)
        first_pos = tl.maximum(length - n + tile * BLOCK_M - window + 1, 0)
        kvh = head // GROUP
        m, l, acc = _attend(q, q_pos, k_ptr + kvh * stride_kh, v_ptr + kvh * stride_vh,
                            bt_ptr + seq * stride_bt, first_pos, last_pos,
                            first_pos // TILE, last_pos // TILE + 1,
                            stride_ks, stride_vs, scale, softcap, window,
                            BLOCK_SIZE, TILE, HEAD_DIM, D_PAD, HAS_SOFTCAP, DOT_PREC)
        o = acc / tl.where(l > 0.0, l, 1.0)[:, None]
        tl.store(out_ptr + (row0 + rows)[:, None] * stride_ot + head * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=mask)


def _check(q, k_cache, v_cache, block_tables, block_size: int, out) -> torch.Tensor:
    """Validate shapes and dtypes (never values) and return the output tensor."""
    if k_cache.shape != v_cache.shape or k_cache.dim() != 3:
        raise ValueError(f"k/v caches must both be [kv_heads, slots, head_dim], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if q.shape[-2] % k_cache.shape[0] or q.shape[-1] != k_cache.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)}")
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"q, k_cache, v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32, got {block_tables.dtype}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q and the caches need a contiguous last (head_dim) dimension")
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be like q {tuple(q.shape)} {q.dtype}, got "
                         f"{tuple(out.shape)} {out.dtype}")
    return out


def _common_args(q, block_size: int, sliding_window: int, softcap: float) -> dict:
    """Constexprs and window/softcap arguments shared by both kernels."""
    return dict(window=sliding_window if sliding_window > 0 else _NO_WINDOW,
                softcap=float(softcap), HAS_SOFTCAP=softcap > 0, BLOCK_SIZE=block_size,
                TILE=max(TILE_N, block_size), HEAD_DIM=q.shape[-1],
                D_PAD=max(16, triton.next_power_of_2(q.shape[-1])),
                # fp32 models get exact fp32 products, not TF32 (16-bit inputs: the default)
                DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(batch: int, num_kv_heads: int, max_blocks: int, block_size: int,
                      sliding_window: int, device: torch.device) -> int:
    """Splits per sequence for decode, from shapes only: about 4 key tiles per split (at most
    16 splits), fewer when batch * kv_heads programs already fill the GPU's SMs twice."""
    tile = max(TILE_N, block_size)
    positions = max_blocks * block_size
    if sliding_window > 0:
        positions = min(positions, sliding_window + tile)
    splits = max(1, min(16, triton.cdiv(triton.cdiv(positions, tile), 4)))
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        splits = min(splits, max(1, triton.cdiv(2 * _sm_count(index), batch * num_kv_heads)))
    return splits


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, *, block_size: int,
                           scale: float, sliding_window: int = 0, softcap: float = 0.0,
                           num_splits: Optional[int] = None, out=None) -> torch.Tensor:
    """q: [B, H, D] (one query row per sequence); block_tables: int32 [B, max_blocks]
    (entries past a sequence's blocks are ignored); context_lens: int32 [B]: positions 0..L-1
    attended (the current token's own position L-1 included). Returns [B, H, D] in q's dtype
    (written into `out` when given)."""
    out = _check(q, k_cache, v_cache, block_tables, block_size, out)
    batch, num_heads, _ = q.shape
    num_kv_heads = k_cache.shape[0]
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, block_tables.shape[1], block_size,
                                       sliding_window, q.device)
    args = _common_args(q, block_size, sliding_window, softcap)
    if num_splits > 1:
        m = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty((batch, num_heads, num_splits, args["D_PAD"]), dtype=torch.float32,
                          device=q.device)
    else:
        m = l = acc = out                    # unused: the kernel writes `out` directly
    if batch == 0:
        return out
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, m, l, acc,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
        v_cache.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        block_tables.shape[1], num_heads, float(scale),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        NUM_SPLITS=num_splits, **args)
    if num_splits > 1:
        _merge_splits_kernel[(batch, num_heads)](
            m, l, acc, out, out.stride(0), out.stride(1), NUM_SPLITS=num_splits,
            SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=args["HEAD_DIM"],
            D_PAD=args["D_PAD"])
    return out


def paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, *,
                            block_size: int, scale: float, sliding_window: int = 0,
                            softcap: float = 0.0, out=None) -> torch.Tensor:
    """Varlen chunks with a cached prefix. q: [T, H, D], the rows of N sequences concatenated;
    query_start_loc: int32 [N + 1] (sequence i's rows are q[qsl[i]:qsl[i+1]]); context_lens:
    int32 [N]: positions of sequence i after this chunk (its chunk's last row is position
    context_lens[i] - 1, its first is context_lens[i] - n_i; the prefix before it is already in
    the cache, and so are the chunk's own K/V). Causal inside the chunk. Returns [T, H, D]."""
    out = _check(q, k_cache, v_cache, block_tables, block_size, out)
    total, num_heads, _ = q.shape
    num_seqs = query_start_loc.shape[0] - 1
    if total == 0 or num_seqs == 0:
        return out
    block_m = max(16, min(64, triton.next_power_of_2(total)))
    grid = (num_seqs, triton.cdiv(total, block_m), num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
        v_cache.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        block_tables.shape[1], float(scale),
        GROUP=num_heads // k_cache.shape[0], BLOCK_M=block_m,
        **_common_args(q, block_size, sliding_window, softcap))
    return out
