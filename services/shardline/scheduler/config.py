"""Configuration of the scheduler service; its fields are `shardline scheduler`'s flags
(common.config_args)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Optional

from shardline.common.auth import SecurityConfig
from shardline.common.config_args import (add_config_args, config_from_args,
                                          drain_timeout_option, log_level_option, option)
from shardline.common.request_limits import (BYTES_LIMIT_CONTEXT_TOKENS, prompt_chars,
                                             request_bytes)
from shardline.common.units import parse_bytes

DISCOVERIES = ("static", "kubernetes")
ROUTINGS = ("cache-aware", "random")


def _pipeline(text: str) -> list[str]:
    return text.split(",")


@dataclass
class SchedulerConfig:
    tokenizer: str = option(help="tokenizer service address host:port")
    pipelines: list[list[str]] = option(
        default_factory=list, flag="--pipeline", parse=_pipeline, metavar="ADDR0,ADDR1,...",
        help="stage addresses of one pipeline replica, stage 0 first, comma separated; "
             "repeat per replica")
    port: int = option(50051, help="gRPC port of the public Generate API")
    host: str = option("0.0.0.0", help="address to listen on")
    http_port: int = option(0, help="port of the OpenAI-compatible HTTP API (0 = off)")
    api_keys_file: str = option("", metavar="PATH",
                                help="public API keys, one `KEY [TENANT]` per line: gRPC and HTTP "
                                     "calls must present one (authorization: Bearer KEY); empty = "
                                     "no keys needed")
    model: str = option("", help="model name reported by GetModelInfo")
    max_tokens_cap: int = option(4096, help="largest accepted max_tokens")
    default_max_tokens: int = option(256, help="max_tokens of a request that leaves it unset")
    max_context: int = option(0, help="largest prompt + output in tokens; 0 = the model's "
                                      "max positions")
    max_prompt_chars: int = option(
        0, help="longest prompt in characters (a text, or a chat's messages together), "
                "refused before it is tokenized; 0 = 8 per token of the context")
    max_request_bytes: Optional[str] = option(
        None, metavar="SIZE",
        help="largest request accepted, a gRPC message or an HTTP body (refused unread); "
             "default: 4 bytes per prompt character + 1MiB (with the prompt characters of a "
             "131072-token context when neither --max-prompt-chars nor --max-context is set)")
    max_num_seqs: int = option(
        0, help="running sequences per replica; 0 = what the replica's workers report for "
                "their device (the least over its stages: worker/config.py)")
    max_queued_requests: int = option(
        4096, help="requests waiting to run (all replicas) beyond which new ones get "
                   "RESOURCE_EXHAUSTED (HTTP 429) at once; 0 = no limit")
    max_queue_wait_s: float = option(
        0.0, help="seconds a request may wait for admission before RESOURCE_EXHAUSTED (HTTP "
                  "429); while every replica's queue is shedding such requests, new ones are "
                  "refused at once; 0 = no limit")
    priority_aging_s: float = option(
        10.0, help="seconds of waiting that raise a queued request's priority by one, so "
                   "lower priorities are delayed, never starved; 0 = no aging")
    max_num_batched_tokens: int = option(
        0, help="token budget of one step (chunked prefill); 0 = what the replica's workers "
                "report for their device (the least over its stages); at most their "
                "--max-step-tokens either way")
    connect_timeout_s: float = option(600.0, flag="--connect-timeout",
                                      help="seconds to wait for the workers to load their model")
    step_timeout_s: float = option(120.0, flag="--step-timeout",
                                   help="seconds without a step result before a replica counts "
                                        "as dead")
    rpc_timeout_s: float = option(30.0, flag="--rpc-timeout",
                                  help="deadline of tokenizer calls, seconds")
    unavailable_timeout_s: float = option(10.0, flag="--unavailable-timeout",
                                          help="seconds a request waits for a live replica "
                                               "before UNAVAILABLE")
    discovery: str = option("static", choices=DISCOVERIES,
                            help="static: the --pipeline lists; kubernetes: watch worker pods by "
                                 "label")
    k8s_namespace: str = option("default", help="namespace of the worker pods (kubernetes "
                                                "discovery)")
    k8s_selector: str = option("", help="label selector of the worker pods, e.g. "
                                        "app.kubernetes.io/component=worker")
    worker_port: int = option(50061, help="the workers' gRPC port (kubernetes discovery)")
    enable_prefix_caching: bool = option(True, flag="--prefix-caching",
                                         help="automatic prefix caching (off: a benchmark "
                                              "baseline)")
    async_scheduling: bool = option(True, help="single-stage replicas: plan step N + 1 while "
                                               "step N runs")
    routing: str = option("cache-aware", choices=ROUTINGS,
                          help="how requests pick a replica (random: a benchmark baseline)")
    redis_url: str = option("", help="Redis for prefix-cache metadata, e.g. "
                                     "redis://host:6379/0; empty = in memory only")
    redis_prefix: str = option("shardline:", help="prefix of the Redis keys")
    redis_ttl_s: int = option(3600, flag="--redis-ttl",
                              help="seconds a prefix entry lives in Redis; refreshed while cached")
    log_level: str = log_level_option()
    drain_timeout_s: float = drain_timeout_option()
    security: SecurityConfig = field(default_factory=SecurityConfig)   # no flags of its own
    metrics_port: int = option(0, help="serve Prometheus metrics on this port (0 = off)")

    def __post_init__(self):
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if not self.tokenizer:
            raise ValueError("--tokenizer address is required")
        if self.discovery not in DISCOVERIES:
            raise ValueError(f"discovery must be static or kubernetes, got {self.discovery!r}")
        if self.discovery == "static" and (not self.pipelines or any(not p for p in self.pipelines)):
            raise ValueError("at least one pipeline (--pipeline addr0,addr1,...) is required")
        if self.discovery == "kubernetes" and not self.k8s_selector:
            raise ValueError("--k8s-selector is required with --discovery kubernetes")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.max_queued_requests < 0:
            raise ValueError("max_queued_requests must be >= 0")
        if self.max_prompt_chars < 0:
            raise ValueError("max_prompt_chars must be >= 0")
        if self.max_request_bytes is not None:
            parse_bytes(self.max_request_bytes)
        for name in ("max_queue_wait_s", "priority_aging_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("max_tokens_cap", "default_max_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        for name in ("max_num_seqs", "max_num_batched_tokens"):     # 0: the workers' defaults
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: the workers' default)")
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens_cap)

    def prompt_chars(self, max_context: int) -> int:
        """The longest prompt in characters, for a context of max_context tokens."""
        return self.max_prompt_chars or prompt_chars(max_context)

    def receive_bytes(self) -> int:
        """The largest request (gRPC message, HTTP body): fixed before the context is known."""
        if self.max_request_bytes is not None:
            return parse_bytes(self.max_request_bytes)
        return request_bytes(self.prompt_chars(self.max_context or BYTES_LIMIT_CONTEXT_TOKENS))

    @classmethod
    def add_args(cls, p: argparse.ArgumentParser) -> None:
        add_config_args(cls, p)
        SecurityConfig.add_args(p.add_argument_group("security", "common/auth.py"))

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "SchedulerConfig":
        return config_from_args(cls, ns, security=SecurityConfig.from_args(ns))
