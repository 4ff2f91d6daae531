"""`shardline tokenizer`: serve one model's tokenizer over gRPC."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Optional, Sequence

from shardline.common import telemetry
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
    service = Service("tokenizer", cfg.port, cfg.host)
    servicer = TokenizerServicer(core)
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
