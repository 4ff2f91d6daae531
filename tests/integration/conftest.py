"""Real stacks for integration tests: every service a separate process over real gRPC."""
from __future__ import annotations

import os

import pytest

from shardline.launcher import build_stack, free_port
from shardline.common.model_source import DEFAULT_MODEL, resolve_model


@pytest.fixture(scope="session")
def model_dir() -> str:
    return str(resolve_model(DEFAULT_MODEL, os.environ.get("SHARDLINE_CACHE")))


class RunningStack:
    def __init__(self, model_dir: str, stages: int, dtype: str = "float32", **kw):
        self.port = free_port()
        self.stack = build_stack(model_dir, DEFAULT_MODEL, stages, self.port, "cpu", dtype,
                                 kw.pop("kv_cache_memory", "64MiB"), kw.pop("threads", 1),
                                 kw.pop("extra_scheduler", []), replicas=kw.pop("replicas", 1),
                                 quiet=not os.environ.get("SHARDLINE_TEST_LOGS"),
                                 metrics=kw.pop("metrics", False),
                                 http_port=free_port() if kw.pop("http", False) else 0,
                                 worker_extra=kw.pop("worker_extra", []),
                                 tensor_parallel_size=kw.pop("tensor_parallel_size", 1))
        self.env = kw.pop("env", None)
        self.address = f"127.0.0.1:{self.port}"

    def __enter__(self):
        self.stack.start(self.env)
        if not self.stack.wait_ready(180):
            dead = [(c.name, c.proc.returncode) for c in self.stack.dead()]
            logs = "".join(f"[{c.name}] {line}" for c in self.stack.dead() for line in c.tail)
            self.stack.stop()
            raise RuntimeError(f"stack did not become ready; dead children: {dead}\n{logs}")
        return self

    def __exit__(self, *exc):
        self.rc = self.stack.stop()


@pytest.fixture(scope="session")
def stack1(model_dir):
    with RunningStack(model_dir, stages=1, threads=2, http=True) as s:
        yield s


@pytest.fixture(scope="session")
def stack3(model_dir):
    with RunningStack(model_dir, stages=3) as s:
        yield s
