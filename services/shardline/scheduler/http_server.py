"""The HTTP server (uvicorn) of the OpenAI API, run on the scheduler's own event loop.

uvicorn serves on a socket bound here, so a taken port fails the scheduler's start, and it
installs no signal handlers: the scheduler's one shutdown path (common.server) stops it.
Its requests count in that path's drain (`DrainMiddleware`): while the scheduler drains, the
server keeps listening and answers new requests 503, so keep-alive clients learn why.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Optional

import uvicorn
from starlette.responses import JSONResponse

from shardline.common import telemetry
from shardline.common.drain import Drain
from shardline.scheduler.openai_api import error_body

# once drained: how long uvicorn waits for responses still being written before cancelling them
STOP_GRACE_S = 1.0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield                           # the scheduler owns SIGTERM / SIGINT


class DrainMiddleware:
    """Plain ASGI middleware: every request but /health is a call in flight of drain; while it
    drains, new ones get 503 and an OpenAI error object (and the connection is closed)."""

    def __init__(self, app, drain: Drain):
        self.app = app
        self.drain = drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        if self.drain.refusing:
            telemetry.rejected("draining")
            body = error_body(self.drain.message, 503, "service_unavailable")
            return await JSONResponse(body, 503, headers={"connection": "close"})(
                scope, receive, send)
        self.drain.enter()
        try:
            return await self.app(scope, receive, send)
        finally:
            self.drain.exit()


class HttpServer:
    def __init__(self, app, host: str, port: int, drain: Drain):
        self.sock = socket.create_server((host, port), backlog=1024)
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(DrainMiddleware(app, drain), log_level="warning",
                                access_log=False, lifespan="off",
                                timeout_graceful_shutdown=STOP_GRACE_S, timeout_keep_alive=30)
        self._server = _Server(config)
        self._task: Optional[asyncio.Task] = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self.sock]), name="http")

    async def stop(self) -> None:
        """Stop (after the drain): close the socket, cancel responses still in flight after
        STOP_GRACE_S."""
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._task = None
        self.sock.close()
