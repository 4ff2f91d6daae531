"""A step's plain decode rows as columns (`DecodeRows`, the StepRequest's `decode` field), and
its sampled tokens as columns where they carry nothing else (`encode_result`, `decode_result`).

Most rows of a busy step are sequences decoding one token: not admitted, sampling, nothing
else to say but (seq id, token or last_sampled, start position, tokens generated, new blocks).
Carried as packed repeated fields and read into numpy arrays, 256 of them cost a few
microseconds to encode and decode instead of a SeqPlan message and a SeqStep object each
(1.2 ms for 256 on this CPU). They follow the `seqs` rows in the batch (and in `hidden`).

    new blocks: new_block_counts[i] ids of new_block_ids belong to row i, in row order
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shardline.protocol.plan import SampledToken
from shardline.v1 import worker_pb2


@dataclass
class DecodeRows:
    seq_ids: np.ndarray           # int64 [D]
    token_ids: np.ndarray         # int64 [D]; ignored (0) where last_sampled
    start_pos: np.ndarray         # int64 [D]
    num_generated: np.ndarray     # int64 [D]
    last_sampled: np.ndarray      # bool [D]: the token is the one this stage sampled last
    new_block_counts: np.ndarray  # int64 [D]
    new_block_ids: np.ndarray     # int64 [sum(new_block_counts)]

    def __len__(self) -> int:
        return len(self.seq_ids)

    @classmethod
    def from_pb(cls, pb: worker_pb2.DecodeColumns) -> "DecodeRows":
        n = len(pb.seq_ids)
        cols = [np.array(pb.token_ids, dtype=np.int64), np.array(pb.start_pos, dtype=np.int64),
                np.array(pb.num_generated, dtype=np.int64)]
        last = np.array(pb.last_sampled, dtype=bool)
        counts = np.array(pb.new_block_counts, dtype=np.int64)
        if any(len(c) != n for c in cols) or len(last) not in (0, n) or len(counts) not in (0, n):
            raise ValueError(f"decode columns of unequal lengths ({n} seq_ids)")
        if not len(last):
            last = np.zeros(n, dtype=bool)
        if not len(counts):
            counts = np.zeros(n, dtype=np.int64)
        blocks = np.array(pb.new_block_ids, dtype=np.int64)
        if (counts < 0).any() or int(counts.sum()) != len(blocks):
            raise ValueError(f"decode columns: new_block_counts sum to {int(counts.sum())}, "
                             f"{len(blocks)} new_block_ids")
        return cls(np.array(pb.seq_ids, dtype=np.int64), *cols, last, counts, blocks)

    def new_blocks(self) -> list:
        """Each row's new block ids (a list; empty for most rows)."""
        if not len(self.new_block_ids):
            return [()] * len(self)
        ends = np.cumsum(self.new_block_counts).tolist()
        flat = self.new_block_ids.tolist()
        return [flat[e - c:e] if c else () for e, c in zip(ends, self.new_block_counts.tolist())]


class DecodeColumnsBuilder:
    """Collects decode rows on the scheduler's side; `pb()` is the StepRequest's field."""

    def __init__(self):
        self.seq_ids, self.token_ids, self.start_pos, self.num_generated = [], [], [], []
        self.last_sampled, self.counts, self.blocks = [], [], []

    def __len__(self) -> int:
        return len(self.seq_ids)

    def add(self, seq_id: int, token_id: int, start_pos: int, num_generated: int,
            last_sampled: bool, new_block_ids) -> None:
        self.seq_ids.append(seq_id)
        self.token_ids.append(token_id)
        self.start_pos.append(start_pos)
        self.num_generated.append(num_generated)
        self.last_sampled.append(last_sampled)
        self.counts.append(len(new_block_ids))
        self.blocks.extend(new_block_ids)

    def pb(self) -> worker_pb2.DecodeColumns:
        return worker_pb2.DecodeColumns(
            seq_ids=self.seq_ids, token_ids=self.token_ids, start_pos=self.start_pos,
            num_generated=self.num_generated, last_sampled=self.last_sampled,
            new_block_counts=self.counts, new_block_ids=self.blocks)


def encode_result(step_id: int, tokens: list[SampledToken]) -> worker_pb2.StepResult:
    """A StepResult: tokens with logprobs as SampledToken messages, the others as the
    sampled_seq_ids / sampled_token_ids columns."""
    plain = [t for t in tokens if not (t.logprob or t.top_token_ids)]
    rich = [t.to_pb() for t in tokens if t.logprob or t.top_token_ids]
    return worker_pb2.StepResult(step_id=step_id, tokens=rich,
                                 sampled_seq_ids=[t.seq_id for t in plain],
                                 sampled_token_ids=[t.token_id for t in plain])


def decode_result(res: worker_pb2.StepResult) -> list[SampledToken]:
    """Every sampled token of a StepResult (messages, then columns)."""
    if len(res.sampled_seq_ids) != len(res.sampled_token_ids):
        raise ValueError("StepResult: sampled columns of unequal lengths")
    return [SampledToken.from_pb(t) for t in res.tokens] + [
        SampledToken(s, t) for s, t in zip(res.sampled_seq_ids, res.sampled_token_ids)]


def all_plans(req: worker_pb2.StepRequest) -> list[worker_pb2.SeqPlan]:
    """Every row of a StepRequest as a SeqPlan, in batch order (its decode columns expanded):
    for tests and tools that look at a plan row by row."""
    rows = DecodeRows.from_pb(req.decode) if req.HasField("decode") else None
    plans = list(req.seqs)
    if rows is not None:
        for i, new in enumerate(rows.new_blocks()):
            plans.append(worker_pb2.SeqPlan(
                seq_id=int(rows.seq_ids[i]), start_pos=int(rows.start_pos[i]),
                token_ids=[] if rows.last_sampled[i] else [int(rows.token_ids[i])],
                new_block_ids=list(new), sample=True, num_generated=int(rows.num_generated[i]),
                last_sampled=bool(rows.last_sampled[i])))
    return plans
