"""The scheduler's Prometheus metrics.

Per-request metrics (status, tenant, queue time, TTFT, TPOT, token counts) are recorded once per
request: TTFT at its first token, the rest when it ends (`request_ended`). Refusals before any
work are counted by reason with `rejected(reason)` (common.telemetry's, shared by every
service). Per-replica state (queue depth, running sequences, KV blocks, prefix-cache counters,
preemptions, steps) is read from the engines at scrape time, so the step loop pays nothing.
"""
from __future__ import annotations

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY

from shardline.common.telemetry import REJECTED, rejected  # noqa: F401 - the scheduler's too

_LATENCY_BUCKETS = (.005, .01, .025, .05, .075, .1, .15, .2, .3, .5, .75, 1, 1.5, 2, 3, 5, 10,
                    20, 60)
_TPOT_BUCKETS = (.001, .0025, .005, .01, .02, .03, .05, .075, .1, .15, .2, .3, .5, 1, 2.5)
_QUEUE_BUCKETS = (.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
MAX_TENANT_LABELS = 64        # tenants named in shardline_tenant_requests; later ones: "other"
MAX_TENANT_LABEL_CHARS = 64

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
QUEUE_TIME = Histogram("shardline_queue_time_seconds",
                       "Queued (after tokenization) to first admission into a batch, per "
                       "admitted request", buckets=_QUEUE_BUCKETS)
TENANT_REQUESTS = Counter(
    "shardline_tenant_requests",
    f"Generate requests by tenant and final gRPC status: the first {MAX_TENANT_LABELS} tenants "
    "seen keep their name (cut to 64 characters), later ones count as 'other', requests "
    "without a tenant as 'default'", ["tenant", "status"])


class TenantLabels:
    """Bounded label values for tenants: the first `limit` distinct tenants keep their name."""

    def __init__(self, limit: int = MAX_TENANT_LABELS):
        self.limit = limit
        self._named: set[str] = set()

    def label(self, tenant: str) -> str:
        if not tenant:
            return "default"
        name = tenant[:MAX_TENANT_LABEL_CHARS]
        if name in self._named:
            return name
        if len(self._named) < self.limit:
            self._named.add(name)
            return name
        return "other"


_tenant_labels = TenantLabels()


def request_ended(tenant: str, status: str) -> None:
    """Count a request once, by its final status, overall and for its tenant."""
    REQUESTS.labels(status).inc()
    TENANT_REQUESTS.labels(_tenant_labels.label(tenant), status).inc()


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
