"""The Triton paged attention kernels against a dense float32 reference.

On a machine without CUDA the kernels run under TRITON_INTERPRET=1 (set before Triton is
imported). Block ids are shuffled, block-table rows are padded with the id of a block full of
NaN, and every cache slot a kernel must not read (past a context, before a sliding window)
holds NaN too, so a stray load shows up as NaN in the output.
"""
from __future__ import annotations

import math

import pytest
import torch

from shardline.backends.gpu.triton_attention import (paged_decode_attention,
                                                     paged_prefill_attention)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


KV_HEADS = 2
F32, BF16 = torch.float32, torch.bfloat16


def _tol(dtype):
    return dict(atol=1e-4, rtol=1e-4) if dtype == F32 else dict(atol=2e-2, rtol=2e-2)


class Cache:
    """A paged cache holding `lengths[i]` positions of sequence i under shuffled block ids;
    every other slot (and the padding block, id `poison`) is NaN."""

    def __init__(self, lengths, head_dim, dtype, block_size=16, pad_cols=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.block_size = bs = block_size
        nblocks = [math.ceil(n / bs) for n in lengths]
        total = sum(nblocks) + 3
        ids = torch.randperm(total, generator=g)
        self.poison = int(ids[-1])
        cols = max(nblocks + [1]) + pad_cols
        table = torch.full((len(lengths), cols), self.poison, dtype=torch.int32)
        start = 0
        for i, n in enumerate(nblocks):
            table[i, :n] = ids[start:start + n].to(torch.int32)
            start += n
        self.tables = table
        shape = (KV_HEADS, total * bs, head_dim)
        self.k = torch.full(shape, float("nan"))
        self.v = torch.full(shape, float("nan"))
        for i, n in enumerate(lengths):
            slots = self.slots(i, 0, n)
            self.k[:, slots] = torch.randn(KV_HEADS, n, head_dim, generator=g)
            self.v[:, slots] = torch.randn(KV_HEADS, n, head_dim, generator=g)
        self.k, self.v = self.k.to(dtype), self.v.to(dtype)

    def slots(self, seq: int, lo: int, hi: int) -> torch.Tensor:
        pos = torch.arange(lo, hi)
        return self.tables[seq, pos // self.block_size].long() * self.block_size \
            + pos % self.block_size

    def poison_before(self, seq: int, pos: int) -> None:
        """NaN at positions 0..pos-1 of sequence seq (a window must skip them)."""
        if pos > 0:
            slots = self.slots(seq, 0, pos)
            self.k[:, slots] = float("nan")
            self.v[:, slots] = float("nan")

    def device_args(self):
        return (self.k.to(DEVICE), self.v.to(DEVICE), self.tables.to(DEVICE))


def reference(q, cache: Cache, seq: int, positions, scale, window=0, softcap=0.0):
    """Dense float32 attention of q [n, H, D] (at `positions`) over sequence seq's context."""
    n, heads, _ = q.shape
    if n == 0:
        return q.float().clone()
    length = int(max(positions)) + 1
    slots = cache.slots(seq, 0, length)
    group = heads // KV_HEADS
    # poisoned (NaN) slots are all invisible: zero them so that 0-weights keep them out
    k = cache.k[:, slots].float().nan_to_num(0.0).repeat_interleave(group, 0)  # [H, L, D]
    v = cache.v[:, slots].float().nan_to_num(0.0).repeat_interleave(group, 0)
    s = torch.einsum("nhd,hld->hnl", q.float(), k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.as_tensor(positions)[:, None]
    j = torch.arange(length)[None, :]
    visible = j <= i
    if window > 0:
        visible &= j > i - window
    s = s.masked_fill(~visible, float("-inf"))
    return torch.einsum("hnl,hld->nhd", torch.softmax(s, dim=-1), v)


def _query(rows, heads, head_dim, dtype, seed, gain=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, heads, head_dim, generator=g) * gain).to(dtype)


def _decode_case(lengths, head_dim, group, dtype, window=0, softcap=0.0, block_size=16,
                 num_splits=None, seed=0):
    cache = Cache(lengths, head_dim, dtype, block_size, seed=seed)
    if window > 0:
        for i, n in enumerate(lengths):
            cache.poison_before(i, n - window)
    heads = KV_HEADS * group
    q = _query(len(lengths), heads, head_dim, dtype, seed + 1, gain=20.0 if softcap else 1.0)
    scale = head_dim ** -0.5
    k, v, tables = cache.device_args()
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    out = paged_decode_attention(q.to(DEVICE), k, v, tables, lens, block_size=block_size,
                                 scale=scale, sliding_window=window, softcap=softcap,
                                 num_splits=num_splits)
    ref = torch.cat([reference(q[i:i + 1], cache, i, [n - 1], scale, window, softcap)
                     if n > 0 else torch.zeros(1, heads, head_dim) for i, n in enumerate(lengths)])
    return out, ref


DECODE_CASES = [
    # (lengths, head_dim, group, dtype, window, softcap, block_size)
    ([1], 64, 1, F32, 0, 0.0, 16),
    ([15], 128, 4, BF16, 0, 0.0, 16),
    ([16], 64, 8, F32, 0, 0.0, 16),
    ([17], 128, 1, BF16, 0, 0.0, 16),
    ([100], 64, 4, BF16, 0, 0.0, 32),
    ([1000], 128, 8, F32, 0, 0.0, 16),
    ([1, 17, 100], 64, 4, F32, 0, 0.0, 16),
    ([100], 64, 4, F32, 7, 0.0, 16),
    ([1000, 100], 128, 1, BF16, 64, 50.0, 16),
    ([100, 17], 64, 8, F32, 0, 30.0, 128),
    ([0, 15], 64, 4, F32, 0, 0.0, 16),
]


@pytest.mark.parametrize("lengths,head_dim,group,dtype,window,softcap,block_size", DECODE_CASES)
def test_decode_matches_reference(lengths, head_dim, group, dtype, window, softcap, block_size):
    out, ref = _decode_case(lengths, head_dim, group, dtype, window, softcap, block_size)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float().cpu(), ref, **_tol(dtype))


def test_decode_split_counts_agree():
    one, ref = _decode_case([100, 33], 64, 4, F32, num_splits=1)
    four, _ = _decode_case([100, 33], 64, 4, F32, num_splits=4)
    torch.testing.assert_close(one.cpu(), ref, **_tol(F32))
    torch.testing.assert_close(four, one, atol=1e-5, rtol=1e-5)


def _prefill_case(prefixes, chunks, head_dim, group, dtype, window=0, softcap=0.0,
                  block_size=16, out=None, seed=0):
    lengths = [p + c for p, c in zip(prefixes, chunks)]
    cache = Cache(lengths, head_dim, dtype, block_size, seed=seed)
    if window > 0:
        for i, (p, n) in enumerate(zip(prefixes, lengths)):
            if n > p:
                cache.poison_before(i, p - window + 1)
    heads = KV_HEADS * group
    q = _query(sum(chunks), heads, head_dim, dtype, seed + 1, gain=20.0 if softcap else 1.0)
    scale = head_dim ** -0.5
    qsl = torch.tensor([0] + list(torch.tensor(chunks).cumsum(0)), dtype=torch.int32)
    k, v, tables = cache.device_args()
    got = paged_prefill_attention(q.to(DEVICE), k, v, tables, qsl.to(DEVICE),
                                  torch.tensor(lengths, dtype=torch.int32, device=DEVICE),
                                  block_size=block_size, scale=scale, sliding_window=window,
                                  softcap=softcap, out=out)
    ref = torch.cat([reference(q[qsl[i]:qsl[i + 1]], cache, i, list(range(p, p + c)), scale,
                               window, softcap) for i, (p, c) in enumerate(zip(prefixes, chunks))])
    return got, ref


PREFILL_CASES = [
    # (prefixes, chunks, head_dim, group, dtype, window, softcap, block_size)
    ([0], [15], 64, 4, F32, 0, 0.0, 16),
    ([17], [15], 128, 1, BF16, 0, 0.0, 16),
    ([100], [33], 64, 8, F32, 0, 0.0, 32),
    ([0, 17, 100, 5], [16, 15, 33, 0], 64, 4, F32, 0, 0.0, 16),
    ([100], [33], 64, 4, F32, 7, 0.0, 16),
    ([0, 60], [100, 40], 128, 1, BF16, 64, 30.0, 16),
    ([17], [15], 64, 1, F32, 0, 50.0, 16),
    ([900], [100], 64, 4, BF16, 0, 0.0, 16),
]


@pytest.mark.parametrize("prefixes,chunks,head_dim,group,dtype,window,softcap,block_size",
                         PREFILL_CASES)
def test_prefill_matches_reference(prefixes, chunks, head_dim, group, dtype, window, softcap,
                                   block_size):
    got, ref = _prefill_case(prefixes, chunks, head_dim, group, dtype, window, softcap,
                             block_size)
    assert got.dtype == dtype and got.shape == ref.shape
    torch.testing.assert_close(got.float().cpu(), ref, **_tol(dtype))


def test_out_is_written_in_place():
    out = torch.empty(32, 2 * KV_HEADS, 64, device=DEVICE)
    got, ref = _prefill_case([17, 0], [15, 17], 64, 2, F32, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out.cpu(), ref, **_tol(F32))

    cache = Cache([40, 9], 64, F32)
    k, v, tables = cache.device_args()
    q = _query(2, 2 * KV_HEADS, 64, F32, 5).to(DEVICE)
    lens = torch.tensor([40, 9], dtype=torch.int32, device=DEVICE)
    for splits in (1, 3):
        dec_out = torch.empty_like(q)
        got = paged_decode_attention(q, k, v, tables, lens, block_size=16, scale=0.125,
                                     num_splits=splits, out=dec_out)
        assert got.data_ptr() == dec_out.data_ptr()
        ref = torch.cat([reference(q[i:i + 1].cpu(), cache, i, [n - 1], 0.125)
                         for i, n in enumerate([40, 9])])
        torch.testing.assert_close(dec_out.cpu(), ref, **_tol(F32))
