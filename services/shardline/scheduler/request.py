"""A request as the scheduler tracks it: one sequence with one counting model.

`num_computed_tokens` catches up with `num_tokens`: prefill chunks, decode steps and
recompute after preemption are all the same motion.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from shardline.protocol.plan import SamplingConfig
from shardline.scheduler.block_pool import ROOT_HASH, block_hash


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    prompt_token_ids: list[int]
    max_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eos_token_ids: frozenset = frozenset()
    ignore_eos: bool = False
    max_context: int = 1 << 30
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    admitted: bool = False        # workers hold state for it (else the next plan admits it)
    in_flight: int = 0            # its steps in micro-batches not yet answered (at most 2)
    in_flight_tokens: int = 0     # tokens those steps compute
    in_flight_samples: int = 0    # of those steps, the ones that sample a token
    finish_reason: Optional[str] = None
    num_cached_tokens: int = 0    # prompt tokens served from the prefix cache
    cache_salt: str = ""          # tenant: hashes of different tenants never match
    block_hashes: list[str] = field(default_factory=list)   # memo of full_block_hash
    hash_key: Any = 0      # (block size, rope_long) block_hashes were computed for
    num_committed_blocks: int = 0 # leading blocks of block_table already hashed into the cache
    num_released_blocks: int = 0  # leading blocks of block_table released, outside every
                                  # layer's window: placeholders, not held (block_manager.py)
    num_preemptions: int = 0
    # LongRoPE models: admitted longer than the model's original length, on the long factors
    # (scheduler.py decides; its blocks hash under their own salt)
    rope_long: bool = False
    arrival_time: float = field(default_factory=time.monotonic)
    # Admission (waiting_queue.py): higher priority first, turns between tenants; the times
    # are the replica scheduler's clock: first queued, first admitted into a batch.
    priority: int = 0
    tenant: str = ""
    queued_at: Optional[float] = None
    first_admitted_at: Optional[float] = None
    request_id: str = ""          # on its log lines and spans
    # Tracing (empty / None when not traced): the request span's W3C context, sent to workers on
    # admission; its SpanContext (step spans link to it); the open "queue" span until admission.
    trace_context: dict = field(default_factory=dict)
    span_context: Any = None
    queue_span: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Token ids in [start, end) of prompt + output."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    def full_block_hash(self, i: int, block_size: int) -> str:
        """Chained hash of full block i (tokens [i * block_size, (i + 1) * block_size)) under
        this tenant's salt. Memoized here: a full block's tokens never change. A sequence moved
        to a replica with another block size starts a new memo."""
        key = (block_size, self.rope_long)
        if key != self.hash_key:
            self.block_hashes, self.hash_key = [], key
        hashes = self.block_hashes
        # blocks computed on LongRoPE's long factors never match those on its short ones
        salt = self.cache_salt + ("\x00rope-long" if self.rope_long else "")
        while len(hashes) <= i:
            j = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else ROOT_HASH,
                                     self.token_ids(j * block_size, (j + 1) * block_size),
                                     salt))
        return hashes[i]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def reset_for_recompute(self) -> None:
        """Forget KV state (preempted, or its replica died): recompute from all tokens."""
        self.block_table = []
        self.num_computed_tokens = 0
        self.num_committed_blocks = 0
        self.num_released_blocks = 0
        self.admitted = False
        self.in_flight = self.in_flight_tokens = self.in_flight_samples = 0
        self.status = SeqStatus.WAITING
        self.num_preemptions += 1

    def check_stop(self, token_id: int) -> Optional[str]:
        """Finish reason after appending token_id, or None to continue."""
        if not self.ignore_eos and token_id in self.eos_token_ids:
            return "stop"
        if len(self.output_token_ids) >= self.max_tokens or self.num_tokens >= self.max_context:
            return "length"
        return None
