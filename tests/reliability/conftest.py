"""Reliability tests: real stacks whose processes are signalled and killed mid-stream.

`model_dir` and `RunningStack` are the integration tests'; `UpProcess` runs the real
`shardline up` (its supervision loop included) as a child process and reads its log.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardline.common.spawn import spawn
from shardline.v1 import generate_pb2
from shardline.launcher import free_port
from tests.integration.conftest import RunningStack, model_dir  # noqa: F401 - fixtures
from tests.procs import child_processes

__all__ = ["RunningStack", "UpProcess", "wait_for", "health_status", "model_dir",
           "raw_generate"]


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.1):
    """condition()'s first truthy value, polled until timeout_s (generous: never a timing
    assertion, only a bound on a hang)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)


def health_status(address: str) -> Optional[int]:
    """The server's grpc.health.v1 status, None when it does not answer."""
    with grpc.insecure_channel(address) as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=5.0).status
        except grpc.RpcError:
            return None


def raw_generate(ch: grpc.Channel, payload: bytes,
                 timeout_s: float = 120.0) -> tuple[grpc.StatusCode, str, list]:
    """(code, details, responses) of one Generate call whose request is the raw payload."""
    call = ch.unary_stream("/shardline.v1.Generation/Generate",
                           response_deserializer=generate_pb2.GenerateResponse.FromString)
    out = []
    try:
        for resp in call(payload, timeout=timeout_s):
            out.append(resp)
    except grpc.RpcError as e:
        return e.code(), e.details() or "", out
    return grpc.StatusCode.OK, "", out


class UpProcess:
    """`python -m shardline up ARGS` on a free port, its log lines collected."""

    def __init__(self, args: list[str]):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.argv = [sys.executable, "-m", "shardline", "up", "--port", str(self.port),
                     "--http-port", "0", *args]
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False                   # the log has ended (up exited)
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self):
        self.proc = spawn(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1)
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_line("shardline up: ready", 300)
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            if os.environ.get("SHARDLINE_TEST_LOGS"):
                sys.stderr.write(line)
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_line(self, text: str, timeout_s: float) -> str:
        """The first log line containing text, waiting up to timeout_s for it."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    tail = "".join(self.lines[-40:])
                    raise AssertionError(f"no log line {text!r} (rc {self.proc.poll()}):\n{tail}")
                self._cond.wait(min(left, 1.0))

    def children(self) -> dict[int, list[str]]:
        """pid -> command line of each process `up` started."""
        return child_processes(self.proc.pid)

    def worker_pid(self, replica: int, stage: int = 0) -> int:
        """The pid of stage `stage` of replica `replica` (the scheduler's --pipeline order)."""
        kids = self.children()
        (sched,) = [argv for argv in kids.values() if "scheduler" in argv]
        pipelines = [sched[i + 1] for i, a in enumerate(sched) if a == "--pipeline"]
        port = pipelines[replica].split(",")[stage].rpartition(":")[2]
        (pid,) = [p for p, argv in kids.items()
                  if "worker" in argv and argv[argv.index("--port") + 1] == port]
        return pid

    def stop(self, timeout_s: float = 120) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
