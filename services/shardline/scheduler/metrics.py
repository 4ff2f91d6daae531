"""The scheduler's Prometheus metrics.

Per-request metrics (status, TTFT, TPOT, token counts) are recorded once per request, when it
ends. Per-replica state (queue depth, running sequences, KV blocks, prefix-cache counters,
preemptions, steps) is read from the engines at scrape time, so the step loop pays nothing.
"""
from __future__ import annotations

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY

_LATENCY_BUCKETS = (.005, .01, .025, .05, .075, .1, .15, .2, .3, .5, .75, 1, 1.5, 2, 3, 5, 10,
                    20, 60)
_TPOT_BUCKETS = (.001, .0025, .005, .01, .02, .03, .05, .075, .1, .15, .2, .3, .5, 1, 2.5)

REQUESTS = Counter("shardline_requests", "Generate requests by final gRPC status "
                   "(OK, CANCELLED, INVALID_ARGUMENT, ...)", ["status"])
TTFT = Histogram("shardline_time_to_first_token_seconds",
                 "Arrival (after tokenization) to the first generated token", buckets=_LATENCY_BUCKETS)
TPOT = Histogram("shardline_time_per_output_token_seconds",
                 "Mean time between generated tokens after the first, per request",
                 buckets=_TPOT_BUCKETS)
E2E = Histogram("shardline_request_duration_seconds", "Arrival to the last token",
                buckets=_LATENCY_BUCKETS)
PROMPT_TOKENS = Counter("shardline_prompt_tokens", "Prompt tokens of finished requests")
GENERATION_TOKENS = Counter("shardline_generation_tokens", "Tokens generated for finished requests")
CACHED_TOKENS = Counter("shardline_cached_prompt_tokens",
                        "Prompt tokens of finished requests served from the prefix cache")


class ReplicaCollector:
    """Reads every pipeline replica's scheduler and block manager when scraped."""

    def __init__(self, router):
        self.router = router

    def describe(self):
        return []

    def collect(self):
        lbl = ["replica"]
        g = {name: GaugeMetricFamily(name, doc, labels=lbl) for name, doc in (
            ("shardline_queue_depth", "Sequences waiting to be scheduled"),
            ("shardline_running_sequences", "Sequences admitted and running"),
            ("shardline_kv_blocks_total", "KV cache blocks of the replica (least of its stages)"),
            ("shardline_kv_blocks_used", "KV blocks held by sequences"),
            ("shardline_kv_blocks_free", "KV blocks no sequence holds (may hold cached prefixes)"),
            ("shardline_kv_blocks_cached", "Free or used blocks holding a hashed, reusable prefix"),
            ("shardline_replica_healthy", "1 while the replica accepts requests"),
        )}
        c = {name: CounterMetricFamily(name, doc, labels=lbl) for name, doc in (
            ("shardline_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache"),
            ("shardline_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache"),
            ("shardline_preemptions", "Sequences preempted (recomputed later) for lack of KV blocks"),
            ("shardline_steps", "Steps (micro-batches) completed"),
            ("shardline_step_tokens", "Tokens computed by completed steps"),
        )}
        for rid, e in sorted(self.router.engines.items()):
            r = [str(rid)]
            s, b = e.scheduler, e.blocks
            g["shardline_queue_depth"].add_metric(r, len(s.waiting))
            g["shardline_running_sequences"].add_metric(r, len(s.running))
            g["shardline_kv_blocks_total"].add_metric(r, b.num_blocks)
            g["shardline_kv_blocks_used"].add_metric(r, b.num_used_blocks)
            g["shardline_kv_blocks_free"].add_metric(r, b.num_free_blocks)
            g["shardline_kv_blocks_cached"].add_metric(r, b.num_cached_blocks)
            g["shardline_replica_healthy"].add_metric(r, 1 if e.accepting else 0)
            c["shardline_prefix_cache_hit_tokens"].add_metric(r, b.hits)
            c["shardline_prefix_cache_query_tokens"].add_metric(r, b.queries)
            c["shardline_preemptions"].add_metric(r, s.num_preemptions)
            c["shardline_steps"].add_metric(r, e.stats["steps"])
            c["shardline_step_tokens"].add_metric(r, e.stats["tokens"])
        yield from g.values()
        yield from c.values()


def register_replicas(router, registry=REGISTRY) -> ReplicaCollector:
    col = ReplicaCollector(router)
    registry.register(col)
    return col
