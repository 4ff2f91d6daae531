"""common/spawn.py: children started from a process with live gRPC threads, and dying with
their parent. Waits poll with generous timeouts; nothing is timed."""
from __future__ import annotations

import ast
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shardline.common.spawn import spawn, spawn_shardline

ROOT = pathlib.Path(__file__).resolve().parents[2]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the parent-death signal is Linux's prctl")

# a child that uses gRPC itself: starts a server on a free port and stops it
GRPC_CHILD = """
from concurrent import futures
import grpc
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
assert server.add_insecure_port("127.0.0.1:0") > 0
server.start()
server.stop(None).wait()
"""


def _alive(pid: int) -> bool:
    """Whether pid runs (an unreaped zombie counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def busy_grpc_server():
    """A gRPC server in this process with a thread calling it without pause, so that gRPC
    threads are live (and inside gRPC) while children are spawned."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()
    calls = []

    def call_forever():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while not stop.is_set():
                stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
                calls.append(1)

    caller = threading.Thread(target=call_forever, daemon=True)
    caller.start()
    deadline = time.monotonic() + 60
    while not calls and time.monotonic() < deadline:      # the RPCs are flowing
        time.sleep(0.01)
    assert calls, "the in-process gRPC server never answered"
    yield
    stop.set()
    caller.join(timeout=60)
    server.stop(None).wait()


def test_children_spawned_beside_grpc_threads_all_start(busy_grpc_server):
    procs = []
    for i in range(20):
        if i % 2:
            procs.append(spawn_shardline(["--help"], stdout=subprocess.DEVNULL,
                                         start_new_session=True))
        else:
            procs.append(spawn([sys.executable, "-c", GRPC_CHILD], start_new_session=True))
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0] * 20


@linux_only
def test_child_gets_sigterm_when_its_parent_is_killed():
    # the intermediate spawns a grandchild through the helper and waits; the grandchild says
    # "ready" once it runs (after the helper's prctl), then the intermediate is SIGKILLed
    intermediate = subprocess.Popen([sys.executable, "-c", """
import sys, time
from shardline.common.spawn import spawn
child = spawn([sys.executable, "-c", "print('ready', flush=True); import time; time.sleep(600)"])
print(child.pid, flush=True)
time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(intermediate.stdout.readline())
        assert intermediate.stdout.readline().strip() == "ready"
        assert _alive(grandchild)
    finally:
        intermediate.kill()
        intermediate.wait()
    try:
        assert _wait_gone(grandchild, timeout_s=120), "the grandchild outlived its parent"
    finally:
        if _alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)
        intermediate.stdout.close()


@linux_only
def test_child_whose_parent_died_before_it_started_terminates():
    # the helper's child checks its parent pid after the prctl: a wrong one (the parent
    # already gone) ends it by SIGTERM before the command runs
    out = subprocess.run([sys.executable, "-m", "shardline.common.spawn", "1", "--",
                          sys.executable, "-c", "print('ran')"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == -signal.SIGTERM and "ran" not in out.stdout


def test_no_preexec_fn_anywhere():
    bad = []
    for top in ("services", "tests", "benchmarks"):
        for path in (ROOT / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.keyword) and node.arg == "preexec_fn":
                    bad.append(f"{path.relative_to(ROOT)}:{node.value.lineno}")
    assert not bad, f"preexec_fn (unsafe with threads; use shardline.common.spawn): {bad}"
