"""A checked plan -> the step's arrays in the staging buffer, vectorized with numpy.

    counts [N], starts [N]      -> query_start_loc [N + 1], row_seq [T], positions [T]
    slot tables (SeqSlots) [N]  -> block_tables [N, W] (W: the step's widest table)
                                -> slot_mapping [T] = table[row_seq, pos // bs] * bs + pos % bs
    sampling rows [S]           -> sample_rows, temperature, top_k, top_p, keys, penalty

A pure-decode step is padded to its batch-size bucket: padding rows are sequences of one
token at position 0 whose block table is the scratch block, so they write K/V only there and
attend to that one slot. `StepShape` tells the engine the step's host-side numbers (rows,
bucket, widths, what sampling needs): nothing the device computes is read back to plan.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shardline.backends.gpu.sampling import mix_keys
from shardline.backends.gpu.seq_slots import COL, SeqSlots
from shardline.backends.gpu.staging import StepBuffers

DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# the staging buffer's fields per (max tokens T, max sequences N, table width B)
ROW_FIELDS = ("token_ids", "positions", "slot_mapping", "row_seq", "row_slot", "row_fed")
SEQ_INT64 = ("sample_rows", "sample_slot", "top_k", "keys")
SEQ_FLOAT = ("temperature", "top_p", "penalty")
SEQ_INT32 = ("context_lens",)


def staging_fields(max_tokens: int, max_seqs: int, max_blocks: int) -> list:
    fields = [(name, torch.int64, max_tokens, 1) for name in ROW_FIELDS]
    fields += [(name, torch.int64, max_seqs, 1) for name in SEQ_INT64]
    fields += [(name, torch.float32, max_seqs, 1) for name in SEQ_FLOAT]
    fields += [(name, torch.int32, max_seqs, 1) for name in SEQ_INT32]
    fields += [("query_start_loc", torch.int32, max_seqs + 1, 1),
               ("block_tables", torch.int32, max_seqs * max_blocks, max_blocks)]
    return fields


@dataclass
class StepShape:
    num_seqs: int                 # sequences of the plan
    num_tokens: int               # their rows
    rows: int                     # rows computed: num_tokens, or the decode bucket
    seqs: int                     # sequences in the metadata (padding rows included)
    decode: bool                  # every sequence computes one token
    decode_bucket: int            # 0 unless a padded pure-decode step (graph-capturable)
    width_blocks: int             # blocks of the widest table (at least 1)
    fresh_prefill: bool           # one sequence, from position 0: plain causal attention
    num_sampled: int
    max_top_k: int
    use_top_p: bool
    all_greedy: bool
    penalized: list               # indices (in the plan) of sequences with a penalty
    top_logprobs: int             # widest top_logprobs asked (-1: no logprobs at all)
    nbytes: int                   # staging bytes to upload


def bucket_for(n: int, buckets) -> int:
    for b in buckets:
        if b >= n:
            return b
    return 0


def fill_plan(buf: StepBuffers, inputs, slots: np.ndarray, seq_slots: SeqSlots,
              scratch_block: int, buckets, rng: np.random.Generator) -> StepShape:
    """Write the plan's arrays into buf's host views; return the step's shape."""
    h, bs = buf.host, inputs.block_size
    n = len(inputs.seq_ids)
    counts = np.asarray(inputs.num_tokens, dtype=np.int64)
    starts = np.asarray(inputs.start_positions, dtype=np.int64)
    t = int(counts.sum())
    decode = t == n
    bucket = bucket_for(n, buckets) if decode else 0
    rows = bucket or t
    seqs = bucket or n

    qsl = h["query_start_loc"]
    qsl[0] = 0
    np.cumsum(counts, out=qsl[1:n + 1])
    row_seq = np.repeat(np.arange(n, dtype=np.int64), counts)
    pos = starts[row_seq] + np.arange(t, dtype=np.int64) - qsl[:n].astype(np.int64)[row_seq]
    ctx = starts + counts
    width = max(1, int(-(-ctx.max() // bs)))
    tables = seq_slots.tables[slots, :width]                             # [N, W]
    h["token_ids"][:t] = inputs.token_ids
    h["positions"][:t] = pos
    h["slot_mapping"][:t] = tables[row_seq, pos // bs] * bs + pos % bs
    h["row_seq"][:t] = row_seq
    h["row_slot"][:t] = slots[row_seq]
    h["row_fed"][:t] = np.repeat(np.asarray(getattr(inputs, "fed_back", None) or [0] * n,
                                            dtype=np.int64), counts)
    h["context_lens"][:n] = ctx
    h["block_tables"][:n, :width] = tables
    if seqs > n:                                        # decode padding: the scratch block
        _pad(h, n, seqs, scratch_block, bs)

    sample = np.asarray(inputs.sample, dtype=bool)
    s_idx = np.flatnonzero(sample)
    s = len(s_idx)
    params = seq_slots.params[slots[s_idx]]                              # [S, PARAMS]
    h["sample_rows"][:s] = qsl[1:n + 1][s_idx] - 1
    h["sample_slot"][:s] = slots[s_idx]
    temp = params[:, COL["temperature"]]
    top_k = params[:, COL["top_k"]].astype(np.int64)
    top_p = params[:, COL["top_p"]]
    penalty = params[:, COL["repetition_penalty"]]
    h["temperature"][:s] = temp
    h["top_k"][:s] = top_k
    h["top_p"][:s] = top_p
    h["penalty"][:s] = penalty
    seeded = params[:, COL["has_seed"]] > 0
    gen = np.asarray(inputs.num_generated, dtype=np.int64)[s_idx]
    keys = rng.integers(0, 1 << 63, size=s, dtype=np.int64)
    if seeded.any():
        keys[seeded] = mix_keys(params[seeded, COL["seed"]].astype(np.uint64), gen[seeded])
    h["keys"][:s] = keys
    want_lp = (params[:, COL["logprobs"]] > 0) | (params[:, COL["top_logprobs"]] > 0)
    pen_all = seq_slots.params[slots, COL["repetition_penalty"]] != 1.0
    return StepShape(
        num_seqs=n, num_tokens=t, rows=rows, seqs=seqs, decode=decode, decode_bucket=bucket,
        width_blocks=width, fresh_prefill=n == 1 and starts[0] == 0 and t > 1,
        num_sampled=s, max_top_k=int(top_k.max(initial=0)), use_top_p=bool((top_p < 1).any()),
        all_greedy=bool((temp <= 0).all()), penalized=np.flatnonzero(pen_all).tolist(),
        top_logprobs=(int(params[want_lp, COL["top_logprobs"]].max()) if want_lp.any() else -1),
        nbytes=buf.end_of("block_tables", seqs))


def fill_padding(buf: StepBuffers, bucket: int, scratch_block: int,
                 block_size: int) -> StepShape:
    """A decode step of `bucket` padding rows only (every row in the scratch block): what the
    engine captures each bucket's CUDA graph on before serving."""
    buf.host["query_start_loc"][0] = 0
    _pad(buf.host, 0, bucket, scratch_block, block_size)
    return StepShape(num_seqs=0, num_tokens=0, rows=bucket, seqs=bucket, decode=True,
                     decode_bucket=bucket, width_blocks=1, fresh_prefill=False, num_sampled=0,
                     max_top_k=0, use_top_p=False, all_greedy=True, penalized=[],
                     top_logprobs=-1, nbytes=buf.end_of("block_tables", bucket))


def _pad(h: dict, start: int, end: int, scratch_block: int, block_size: int) -> None:
    """Rows (and sequences) start..end-1 as padding: one token at position 0 each, in the
    scratch block, attending to that one slot."""
    pad = slice(start, end)
    h["token_ids"][pad] = 0
    h["positions"][pad] = 0
    h["slot_mapping"][pad] = scratch_block * block_size
    h["row_seq"][pad] = np.arange(start, end)
    h["row_slot"][pad] = 0
    h["row_fed"][pad] = 0
    h["context_lens"][pad] = 1
    h["block_tables"][pad, 0] = scratch_block
    h["query_start_loc"][start + 1:end + 1] = np.arange(start + 1, end + 1)
