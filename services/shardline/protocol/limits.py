"""Limits that the scheduler (validating requests) and the workers (checking plans) share."""
from __future__ import annotations

# The most alternatives a sampled token may report with its logprob (sampling.top_logprobs).
MAX_TOP_LOGPROBS = 20
