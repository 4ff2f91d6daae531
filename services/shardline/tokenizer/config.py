"""Configuration of the tokenizer service."""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Optional

DEFAULT_PORT = 50052
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass
class TokenizerConfig:
    model: str                      # model dir, hub id, .gguf, or the default alias (resolve_model)
    port: int = DEFAULT_PORT        # 0 picks a free port
    host: str = "0.0.0.0"
    log_level: str = "INFO"
    metrics_port: int = 0           # Prometheus /metrics; 0 = off
    cache_dir: Optional[str] = None # where resolve_model keeps converted models ($SHARDLINE_CACHE)

    def __post_init__(self):
        if not self.model:
            raise ValueError("model must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not self.host:
            raise ValueError("host must not be empty")
        self.log_level = self.log_level.upper()
        if self.log_level not in LOG_LEVELS or not isinstance(logging.getLevelName(self.log_level), int):
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")

    @staticmethod
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=None,
                       help="model dir, hub id, .gguf, or the default alias (default: the default model)")
        p.add_argument("--port", type=int, default=DEFAULT_PORT)
        p.add_argument("--host", default="0.0.0.0")
        p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)
        p.add_argument("--metrics-port", type=int, default=0,
                       help="serve Prometheus metrics on this port (0 = off)")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "TokenizerConfig":
        from shardline.common.model_source import DEFAULT_MODEL
        return cls(model=ns.model or DEFAULT_MODEL, port=ns.port, host=ns.host, log_level=ns.log_level,
                   metrics_port=ns.metrics_port, cache_dir=os.environ.get("SHARDLINE_CACHE"))
