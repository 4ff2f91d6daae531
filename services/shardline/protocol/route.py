"""Metadata that travels beside the step stream between the scheduler and the stages."""
from __future__ import annotations

# gRPC metadata key of a Step stream: the comma-separated addresses of the stages behind the
# one being called, so each stage knows where to forward and the scheduler alone knows the
# topology.
ROUTE_KEY = "x-shardline-route"
