"""Fixtures shared by every test directory."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
import torch

# Triton reads this when a kernel is defined (at import): without CUDA every test process runs
# the GPU engine's Triton kernels in the interpreter (tests/gpu/)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from shardline.common.spawn import spawn


def _free_port() -> int:
    from shardline.launcher import free_port      # outside the ephemeral port range
    return free_port()


class RedisServer:
    """A real redis-server on a free port, nothing on disk. kill() / restart() / pause()."""

    def __init__(self, binary: str):
        self.binary = binary
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        self.proc = spawn(       # dies with the test run, even a killed one
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode} on port {self.port}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.01)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: connections drop, everything in it is lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        """A fresh, empty server on the same port."""
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a slow or hung Redis)."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


@pytest.fixture
def redis_server():
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (scripts/setup.sh installs it)")
    server = RedisServer(binary)
    server.start()
    try:
        yield server
    finally:
        server.kill()
