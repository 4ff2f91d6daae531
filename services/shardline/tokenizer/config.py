"""Configuration of the tokenizer service; its fields are `shardline tokenizer`'s flags
(common.config_args)."""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import Optional

from shardline.common.auth import SecurityConfig
from shardline.common.config_args import (LOG_LEVELS, add_config_args, config_from_args,
                                          drain_timeout_option, log_level_option, option)
from shardline.common.model_source import DEFAULT_MODEL
from shardline.common.request_limits import request_bytes
from shardline.common.units import parse_bytes

DEFAULT_PORT = 50052


@dataclass
class TokenizerConfig:
    model: str = option(DEFAULT_MODEL, help="model dir, hub id, .gguf, or the default alias")
    port: int = option(DEFAULT_PORT, help="gRPC port; 0 picks a free port")
    host: str = option("0.0.0.0", help="address to listen on")
    log_level: str = log_level_option()
    drain_timeout_s: float = drain_timeout_option()
    security: SecurityConfig = field(default_factory=SecurityConfig)   # no flags of its own
    metrics_port: int = option(0, help="serve Prometheus metrics on this port (0 = off)")
    cache_dir: Optional[str] = option(
        None, env="SHARDLINE_CACHE",
        help="where converted models are kept (default: $SHARDLINE_CACHE, else "
             "~/.cache/shardline/models)")
    max_text_chars: int = option(
        0, help="most characters of one call (Tokenize: its texts together; ApplyChatTemplate: "
                "its messages), refused before tokenizing; 0 = 8 per position of the model "
                "(config.json max_position_embeddings)")
    max_request_bytes: Optional[str] = option(
        None, metavar="SIZE",
        help="largest request message accepted (a longer one is refused unread); default: 4 "
             "bytes per character of --max-text-chars + 1MiB")

    def __post_init__(self):
        if self.max_text_chars < 0:
            raise ValueError(f"max_text_chars must be >= 0, got {self.max_text_chars}")
        if self.max_request_bytes is not None:
            parse_bytes(self.max_request_bytes)
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if not self.model:
            raise ValueError("model must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not self.host:
            raise ValueError("host must not be empty")
        self.log_level = self.log_level.upper()
        if self.log_level not in LOG_LEVELS or not isinstance(logging.getLevelName(self.log_level), int):
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")

    def receive_bytes(self, max_text_chars: int) -> int:
        """The gRPC receive limit: --max-request-bytes, else room for max_text_chars."""
        if self.max_request_bytes is not None:
            return parse_bytes(self.max_request_bytes)
        return request_bytes(max_text_chars)

    @classmethod
    def add_args(cls, p: argparse.ArgumentParser) -> None:
        add_config_args(cls, p)
        SecurityConfig.add_args(p.add_argument_group("security", "common/auth.py"))

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "TokenizerConfig":
        return config_from_args(cls, ns, security=SecurityConfig.from_args(ns))
