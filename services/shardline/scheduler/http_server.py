"""The HTTP server (uvicorn) of the OpenAI API, run on the scheduler's own event loop.

uvicorn serves on a socket bound here, so a taken port fails the scheduler's start, and it
installs no signal handlers: the scheduler's one shutdown path (common.server) stops it.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Optional

import uvicorn


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield                           # the scheduler owns SIGTERM / SIGINT


class HttpServer:
    def __init__(self, app, host: str, port: int, grace_s: float):
        self.sock = socket.create_server((host, port), backlog=1024)
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=grace_s, timeout_keep_alive=30)
        self._server = _Server(config)
        self._task: Optional[asyncio.Task] = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self.sock]), name="http")

    async def stop(self) -> None:
        """Stop accepting, let in-flight responses finish (up to the grace), then close."""
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._task = None
        self.sock.close()
