"""Configuration of the scheduler service."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field


@dataclass
class SchedulerConfig:
    tokenizer: str                                   # tokenizer service address
    pipelines: list[list[str]] = field(default_factory=list)  # stage addresses per replica
    port: int = 50051
    host: str = "0.0.0.0"
    model: str = ""                                  # name reported by GetModelInfo
    max_tokens_cap: int = 4096                       # largest accepted max_tokens
    default_max_tokens: int = 256                    # when a request leaves it unset
    max_context: int = 0                             # 0 = the model's max positions
    max_num_seqs: int = 64                           # running sequences per replica
    max_num_batched_tokens: int = 512                # token budget per step (chunked prefill)
    connect_timeout_s: float = 600.0                 # wait for workers to load their model
    step_timeout_s: float = 120.0                    # a step slower than this breaks the replica
    rpc_timeout_s: float = 30.0                      # deadline of tokenizer calls
    unavailable_timeout_s: float = 10.0              # how long a request waits for a live replica
    discovery: str = "static"                       # static (--pipeline) or kubernetes (pod watch)
    k8s_namespace: str = "default"
    k8s_selector: str = ""                           # label selector of the worker pods
    worker_port: int = 50061                         # workers' gRPC port (kubernetes discovery)
    enable_prefix_caching: bool = True
    async_scheduling: bool = True                    # single-stage replicas: plan N + 1 during N
    routing: str = "cache-aware"                     # or "random" (a baseline for benchmarks)
    redis_url: str = ""                              # prefix-cache metadata; "" = in memory only
    redis_prefix: str = "shardline:"
    redis_ttl_s: int = 3600
    log_level: str = "INFO"
    metrics_port: int = 0                            # Prometheus /metrics; 0 = off

    def __post_init__(self):
        if not self.tokenizer:
            raise ValueError("--tokenizer address is required")
        if self.discovery not in ("static", "kubernetes"):
            raise ValueError(f"discovery must be static or kubernetes, got {self.discovery!r}")
        if self.discovery == "static" and (not self.pipelines or any(not p for p in self.pipelines)):
            raise ValueError("at least one pipeline (--pipeline addr0,addr1,...) is required")
        if self.discovery == "kubernetes" and not self.k8s_selector:
            raise ValueError("--k8s-selector is required with --discovery kubernetes")
        for name in ("max_tokens_cap", "default_max_tokens", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens_cap)

    @staticmethod
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tokenizer", required=True, help="tokenizer service address host:port")
        p.add_argument("--pipeline", action="append", default=[],
                       help="stage addresses of one pipeline replica, stage 0 first, comma separated; repeat per replica")
        p.add_argument("--port", type=int, default=50051)
        p.add_argument("--host", default="0.0.0.0")
        p.add_argument("--model", default="")
        p.add_argument("--max-tokens-cap", type=int, default=4096)
        p.add_argument("--default-max-tokens", type=int, default=256)
        p.add_argument("--max-context", type=int, default=0)
        p.add_argument("--max-num-seqs", type=int, default=64)
        p.add_argument("--max-num-batched-tokens", type=int, default=512)
        p.add_argument("--connect-timeout", type=float, default=600.0)
        p.add_argument("--step-timeout", type=float, default=120.0,
                       help="seconds without a step result before a replica counts as dead")
        p.add_argument("--unavailable-timeout", type=float, default=10.0,
                       help="seconds a request waits for a live replica before UNAVAILABLE")
        p.add_argument("--discovery", choices=["static", "kubernetes"], default="static",
                       help="static: the --pipeline lists; kubernetes: watch worker pods by label")
        p.add_argument("--k8s-namespace", default="default")
        p.add_argument("--k8s-selector", default="",
                       help="label selector of worker pods, e.g. app.kubernetes.io/component=worker")
        p.add_argument("--worker-port", type=int, default=50061)
        p.add_argument("--metrics-port", type=int, default=0,
                       help="serve Prometheus metrics on this port (0 = off)")
        p.add_argument("--no-prefix-caching", action="store_true",
                       help="disable automatic prefix caching (benchmark baseline)")
        p.add_argument("--no-async-scheduling", action="store_true",
                       help="plan each step after the previous one's result (by default a "
                            "single-stage replica's next step is planned while one runs)")
        p.add_argument("--routing", choices=["cache-aware", "random"], default="cache-aware")
        p.add_argument("--redis-url", default="",
                       help="Redis for prefix-cache metadata, e.g. redis://host:6379/0 (optional)")
        p.add_argument("--redis-prefix", default="shardline:")
        p.add_argument("--redis-ttl", type=int, default=3600, help="seconds; refreshed while cached")
        p.add_argument("--log-level", default="INFO")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "SchedulerConfig":
        return cls(tokenizer=ns.tokenizer, pipelines=[p.split(",") for p in ns.pipeline],
                   port=ns.port, host=ns.host, model=ns.model, max_tokens_cap=ns.max_tokens_cap,
                   default_max_tokens=ns.default_max_tokens, max_context=ns.max_context,
                   max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
                   connect_timeout_s=ns.connect_timeout, step_timeout_s=ns.step_timeout,
                   unavailable_timeout_s=ns.unavailable_timeout,
                   discovery=ns.discovery, k8s_namespace=ns.k8s_namespace,
                   k8s_selector=ns.k8s_selector, worker_port=ns.worker_port, metrics_port=ns.metrics_port,
                   enable_prefix_caching=not ns.no_prefix_caching,
                   async_scheduling=not ns.no_async_scheduling, routing=ns.routing,
                   redis_url=ns.redis_url, redis_prefix=ns.redis_prefix,
                   redis_ttl_s=ns.redis_ttl, log_level=ns.log_level)
