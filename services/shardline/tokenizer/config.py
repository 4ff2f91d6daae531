"""Configuration of the tokenizer service; its fields are `shardline tokenizer`'s flags
(common.config_args)."""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Optional

from shardline.common.config_args import (LOG_LEVELS, add_config_args, config_from_args,
                                          log_level_option, option)
from shardline.common.model_source import DEFAULT_MODEL

DEFAULT_PORT = 50052


@dataclass
class TokenizerConfig:
    model: str = option(DEFAULT_MODEL, help="model dir, hub id, .gguf, or the default alias")
    port: int = option(DEFAULT_PORT, help="gRPC port; 0 picks a free port")
    host: str = option("0.0.0.0", help="address to listen on")
    log_level: str = log_level_option()
    metrics_port: int = option(0, help="serve Prometheus metrics on this port (0 = off)")
    cache_dir: Optional[str] = option(
        None, env="SHARDLINE_CACHE",
        help="where converted models are kept (default: $SHARDLINE_CACHE, else "
             "~/.cache/shardline/models)")

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

    @classmethod
    def add_args(cls, p: argparse.ArgumentParser) -> None:
        add_config_args(cls, p)

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "TokenizerConfig":
        return config_from_args(cls, ns)
