"""Metadata that travels beside the step stream between the scheduler and the stages."""
from __future__ import annotations

# gRPC metadata key of a Step stream: the comma-separated addresses of the stages behind the
# one being called, so each stage knows where to forward and the scheduler alone knows the
# topology.
ROUTE_KEY = "x-shardline-route"

# gRPC metadata key of a Step stream: the scheduler's id (one per scheduler process). A stage
# serves one Step stream at a time, since its sequences and KV cache are the scheduler's: a new
# stream from the same scheduler (its reconnect) supersedes the old one, another is refused.
SESSION_KEY = "x-shardline-session"
