"""Limits that the scheduler (validating requests) and the workers (checking plans) share."""
from __future__ import annotations

# The most alternatives a sampled token may report with its logprob (sampling.top_logprobs).
MAX_TOP_LOGPROBS = 20

# Profiling (ProfileRequest): the most steps one profile records, and its timeout's range.
MAX_PROFILE_STEPS = 1000
MAX_PROFILE_TIMEOUT_S = 600.0
DEFAULT_PROFILE_TIMEOUT_S = 60.0


def profile_request_error(steps: int, timeout_s: float) -> str:
    """Why a ProfileRequest is refused ('' when it is fine); timeout_s 0 means the default."""
    if not 1 <= steps <= MAX_PROFILE_STEPS:
        return f"steps must be in [1, {MAX_PROFILE_STEPS}], got {steps}"
    if not (timeout_s == 0 or 0 < timeout_s <= MAX_PROFILE_TIMEOUT_S):   # NaN fails both
        return f"timeout_s must be in (0, {MAX_PROFILE_TIMEOUT_S:g}] (0: the default " \
               f"{DEFAULT_PROFILE_TIMEOUT_S:g}), got {timeout_s}"
    return ""


def profile_timeout_s(timeout_s: float) -> float:
    """A valid request's timeout in seconds (0: the default)."""
    return timeout_s or DEFAULT_PROFILE_TIMEOUT_S
