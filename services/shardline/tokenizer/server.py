"""`shardline tokenizer`: serve one model's tokenizer over gRPC."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Optional, Sequence

from shardline.common import auth, telemetry
from shardline.common.request_limits import BYTES_LIMIT_CONTEXT_TOKENS, prompt_chars
from shardline.common.server import Service, configure_logging
from shardline.tokenizer.config import TokenizerConfig
from shardline.tokenizer.core import TokenizerCore
from shardline.tokenizer.servicer import SERVICE_NAME, TokenizerServicer
from shardline.v1 import tokenizer_pb2_grpc

log = logging.getLogger(__name__)


async def serve(cfg: TokenizerConfig) -> None:
    """Load the tokenizer, serve until SIGTERM/SIGINT, then drain and stop."""
    telemetry.setup("tokenizer", cfg.metrics_port)
    core = TokenizerCore.load(cfg.model, cfg.cache_dir)
    auth.configure(cfg.security, "tokenizer")
    # Draining, the tokenizer goes on answering new calls too: its callers are schedulers whose
    # one connection stays with this pod until it stops (a refusal would fail their requests,
    # not move them), and its calls are short. It stops once idle or at the drain timeout.
    max_chars = cfg.max_text_chars or prompt_chars(core.max_positions or BYTES_LIMIT_CONTEXT_TOKENS)
    service = Service("tokenizer", cfg.port, cfg.host, drain_timeout_s=cfg.drain_timeout_s,
                      refuse_while_draining=False, max_receive_bytes=cfg.receive_bytes(max_chars))
    servicer = TokenizerServicer(core, max_chars)
    service.add(tokenizer_pb2_grpc.add_TokenizerServicer_to_server, servicer, [SERVICE_NAME])
    service.on_stop(servicer.close)
    await service.start()
    await service.set_serving(True)
    log.info("tokenizer for %s serving on %s:%d", cfg.model, cfg.host, service.port)
    await service.serve_until_stopped()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="shardline tokenizer", description=__doc__)
    TokenizerConfig.add_args(parser)
    cfg = TokenizerConfig.from_args(parser.parse_args(argv))
    configure_logging("tokenizer", cfg.log_level)
    asyncio.run(serve(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
