"""Domain objects of one pipeline step, as a stage worker sees them.

The servicer converts protobuf <-> these; the runner and model only see these.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from shardline.protocol.limits import MAX_TOP_LOGPROBS
from shardline.v1 import common_pb2, worker_pb2


@dataclass
class SamplingConfig:
    """Per-sequence sampling parameters (validated by the scheduler)."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check(self) -> None:
        """ValueError naming the first parameter out of range (a worker checks every
        admission: its port may be reached by more than the scheduler that validated it)."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:                      # NaN fails too
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be finite and > 0, got "
                             f"{self.repetition_penalty}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got "
                             f"{self.top_logprobs}")

    @classmethod
    def from_pb(cls, pb: common_pb2.SamplingParams) -> "SamplingConfig":
        return cls(
            temperature=pb.temperature,
            top_p=pb.top_p if pb.HasField("top_p") else 1.0,
            top_k=max(pb.top_k, 0),
            repetition_penalty=pb.repetition_penalty if pb.HasField("repetition_penalty") else 1.0,
            seed=pb.seed if pb.has_seed else None,
            logprobs=pb.logprobs,
            top_logprobs=max(pb.top_logprobs, 0),
        )

    def to_pb(self) -> common_pb2.SamplingParams:
        return common_pb2.SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            repetition_penalty=self.repetition_penalty, seed=self.seed or 0,
            has_seed=self.seed is not None, logprobs=self.logprobs, top_logprobs=self.top_logprobs)


@dataclass
class SeqStep:
    """One sequence's share of a step: compute token_ids at positions start_pos.. ."""
    seq_id: int
    token_ids: list[int]
    start_pos: int
    new_block_ids: list[int]
    sample: bool
    admit: bool = False
    sampling: Optional[SamplingConfig] = None
    num_generated: int = 0
    prefix_token_ids: list[int] = field(default_factory=list)
    # token_ids is empty: the token is the one the worker sampled for this sequence last step
    last_sampled: bool = False
    # on admission, LongRoPE models: the sequence is longer than original_max_position_embeddings
    # and takes the long factors (the scheduler recomputes a sequence that grows past it)
    rope_long: bool = False

    @property
    def num_tokens(self) -> int:
        """Tokens this step computes (one for a last_sampled step)."""
        return 1 if self.last_sampled else len(self.token_ids)

    @classmethod
    def from_pb(cls, pb: worker_pb2.SeqPlan) -> "SeqStep":
        return cls(seq_id=pb.seq_id, token_ids=list(pb.token_ids), start_pos=pb.start_pos,
                   new_block_ids=list(pb.new_block_ids), sample=pb.sample, admit=pb.admit,
                   sampling=SamplingConfig.from_pb(pb.sampling) if pb.admit else None,
                   num_generated=pb.num_generated, prefix_token_ids=list(pb.prefix_token_ids),
                   last_sampled=pb.last_sampled, rope_long=pb.admit and pb.rope_long)

    def to_pb(self) -> worker_pb2.SeqPlan:
        pb = worker_pb2.SeqPlan(seq_id=self.seq_id, token_ids=self.token_ids,
                                start_pos=self.start_pos, new_block_ids=self.new_block_ids,
                                sample=self.sample, admit=self.admit,
                                num_generated=self.num_generated,
                                prefix_token_ids=self.prefix_token_ids,
                                last_sampled=self.last_sampled,
                                rope_long=self.admit and self.rope_long)
        if self.admit and self.sampling is not None:
            pb.sampling.CopyFrom(self.sampling.to_pb())
        return pb


@dataclass
class SampledToken:
    """A token sampled for one sequence on the last stage."""
    seq_id: int
    token_id: int
    logprob: float = 0.0
    top_token_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)

    def to_pb(self) -> worker_pb2.SampledToken:
        return worker_pb2.SampledToken(seq_id=self.seq_id, token_id=self.token_id,
                                       logprob=self.logprob, top_token_ids=self.top_token_ids,
                                       top_logprobs=self.top_logprobs)

    @classmethod
    def from_pb(cls, pb: worker_pb2.SampledToken) -> "SampledToken":
        return cls(pb.seq_id, pb.token_id, pb.logprob, list(pb.top_token_ids), list(pb.top_logprobs))
