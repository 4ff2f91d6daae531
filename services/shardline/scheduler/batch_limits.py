"""A replica's batch limits: the scheduler's flags where given, else what its workers report.

    max_num_seqs            --max-num-seqs, else the least StageInfo.default_max_num_seqs of
                            the replica's stages (the worker's device default, worker/config.py)
    max_num_batched_tokens  --max-num-batched-tokens, else the least
                            StageInfo.default_max_num_batched_tokens of its stages;
                            either way at most the least StageInfo.max_step_tokens (a larger
                            step would be refused unread)

Workers that report no default (older ones) get FALLBACK_* (a CPU's sizes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

# the limits of a replica whose workers report no default (they predate the fields)
FALLBACK_MAX_NUM_SEQS = 64
FALLBACK_MAX_NUM_BATCHED_TOKENS = 512


@dataclass(frozen=True)
class BatchLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    seqs_from: str           # "flag", "workers" or "fallback"
    tokens_from: str         # the same, or "max_step_tokens" when the stages' cap won
    requested_tokens: int    # the budget before the stages' cap

    def describe(self) -> str:
        """For the log: each limit and where it came from."""
        tokens = f"max_num_batched_tokens={self.max_num_batched_tokens} ({self.tokens_from}"
        if self.tokens_from == "max_step_tokens":
            tokens += f", not {self.requested_tokens}"
        return f"max_num_seqs={self.max_num_seqs} ({self.seqs_from}), {tokens})"


def _least(values: Sequence[int]) -> int:
    values = [v for v in values if v > 0]
    return min(values) if values else 0


def choose_batch_limits(max_num_seqs: int, max_num_batched_tokens: int, stages: Sequence,
                        max_step_tokens: int = 0) -> BatchLimits:
    """The limits of a replica. max_num_seqs, max_num_batched_tokens: the flags (0: not
    given); stages: its StageInfos (default_max_num_seqs, default_max_num_batched_tokens);
    max_step_tokens: the least of its stages' caps (0: none)."""
    if max_num_seqs > 0:
        seqs, seqs_from = max_num_seqs, "flag"
    else:
        seqs = _least([getattr(s, "default_max_num_seqs", 0) for s in stages])
        seqs, seqs_from = (seqs, "workers") if seqs else (FALLBACK_MAX_NUM_SEQS, "fallback")
    if max_num_batched_tokens > 0:
        tokens, tokens_from = max_num_batched_tokens, "flag"
    else:
        tokens = _least([getattr(s, "default_max_num_batched_tokens", 0) for s in stages])
        tokens, tokens_from = ((tokens, "workers") if tokens
                               else (FALLBACK_MAX_NUM_BATCHED_TOKENS, "fallback"))
    requested = tokens
    if 0 < max_step_tokens < tokens:
        tokens, tokens_from = max_step_tokens, "max_step_tokens"
    return BatchLimits(seqs, tokens, seqs_from, tokens_from, requested)
