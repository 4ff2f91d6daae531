"""`shardline up`: tokenizer, scheduler and S stage workers as local processes over gRPC.

Every child is a separate process started as a container would start it (`python -m
shardline <service> ...`, through common/spawn.py: it gets SIGTERM if this process dies);
its log lines are forwarded with its name. SIGINT/SIGTERM stop every child (SIGTERM, then
SIGKILL after a grace period). The services' flags are their config dataclasses' fields.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardline.client import Client
from shardline.common.config_args import add_config_args, config_argv
from shardline.common.model_source import resolve_model
from shardline.common.spawn import spawn_shardline
from shardline.scheduler.config import SchedulerConfig
from shardline.tokenizer.config import TokenizerConfig
from shardline.worker.config import WEIGHT_FIELDS, WorkerConfig


_given_ports: set[int] = set()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port that is free now, for a service started next. Taken below the kernel's ephemeral
    range, so that no outgoing connection can be given it before the service binds it (with
    bind(0) that happened: a service then failed to start), and never twice in this process."""
    low = _ephemeral_low()
    if low > 11000:
        rng = random.Random()
        for _ in range(500):
            port = rng.randrange(10000, low)
            if port in _given_ports:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("0.0.0.0", port))
                except OSError:
                    continue
            _given_ports.add(port)
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(address: str, timeout_s: float, alive=lambda: True) -> bool:
    """Poll grpc.health.v1 until SERVING; False on timeout or when alive() turns False."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline and alive():
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.25)
    return False


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: Optional[subprocess.Popen] = None
    thread: Optional[threading.Thread] = field(default=None, repr=False)
    # its last log lines, kept even when the stack is quiet (to say why a child died)
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=40),
                                    repr=False)


class Stack:
    """The local processes of one Shardline deployment."""

    def __init__(self, children: list[Child], scheduler_address: str, quiet: bool = False):
        self.children = children
        self.scheduler_address = scheduler_address
        self.quiet = quiet
        self.env: Optional[dict] = None       # the children's environment (None: ours)

    def start(self, env: Optional[dict] = None) -> None:
        """Start every child (from the thread that should outlive them: common/spawn.py)."""
        self.env = env
        for c in self.children:
            self._spawn(c)

    def _spawn(self, c: Child) -> None:
        c.proc = spawn_shardline(c.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 env=self.env, start_new_session=True, text=True, bufsize=1)
        c.thread = threading.Thread(target=self._forward, args=(c,), daemon=True)
        c.thread.start()

    def child(self, name: str) -> Child:
        (c,) = [c for c in self.children if c.name == name]
        return c

    def restart(self, name: str, grace_s: float = 10.0) -> None:
        """Stop one child (SIGTERM) and start it again with the same command line and
        environment."""
        c = self.child(name)
        if c.proc.poll() is None:
            c.proc.send_signal(signal.SIGTERM)
            try:
                c.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()
        self._spawn(c)

    def _forward(self, c: Child) -> None:
        for line in c.proc.stdout:
            c.tail.append(line)
            if not self.quiet:
                sys.stderr.write(f"[{c.name}] {line}")
                sys.stderr.flush()

    def dead(self) -> list[Child]:
        return [c for c in self.children if c.proc is not None and c.proc.poll() is not None]

    def wait_ready(self, timeout_s: float) -> bool:
        return wait_serving(self.scheduler_address, timeout_s, alive=lambda: not self.dead())

    def stop(self, grace_s: float = 10.0) -> int:
        """SIGTERM every child, SIGKILL what is left after grace_s; the worst exit code."""
        for c in reversed(self.children):
            if c.proc and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        worst = 0
        for c in self.children:
            if not c.proc:
                continue
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()
            if c.thread:
                c.thread.join(timeout=1.0)
            rc = c.proc.returncode
            if rc not in (0, -signal.SIGTERM):
                worst = worst or rc or 1
        return worst


def build_stack(model_dir: str, model_name: str, stages: int, port: int, device: str,
                dtype: Optional[str], kv_cache_memory: Optional[str], threads: int,
                extra_scheduler: list[str] = (), replicas: int = 1,
                log_level: str = "INFO", quiet: bool = False, metrics: bool = False,
                worker_extra: list[str] = (), http_port: int = 0) -> Stack:
    tok_port = free_port()
    children = [Child("tokenizer", ["tokenizer", "--model", model_dir, "--port", str(tok_port),
                                    "--log-level", log_level])]
    pipelines = []
    per_worker_threads = threads or max(1, (os.cpu_count() or 1) // (stages * replicas))
    for r in range(replicas):
        addrs = []
        for s in range(stages):
            p = free_port()
            addrs.append(f"127.0.0.1:{p}")
            argv = ["worker", "--model", model_dir, "--port", str(p), "--stage-index", str(s),
                    "--num-stages", str(stages), "--device", device,
                    "--threads", str(per_worker_threads), "--log-level", log_level,
                    *worker_extra]
            if dtype:
                argv += ["--dtype", dtype]
            if kv_cache_memory:
                argv += ["--kv-cache-memory", kv_cache_memory]
            name = f"worker-{s}" if replicas == 1 else f"worker-r{r}s{s}"
            children.append(Child(name, argv))
        pipelines.append(",".join(addrs))
    sched = ["scheduler", "--port", str(port), "--tokenizer", f"127.0.0.1:{tok_port}",
             "--model", model_name, "--log-level", log_level, *extra_scheduler]
    for p in pipelines:
        sched += ["--pipeline", p]
    if http_port:
        sched += ["--http-port", str(http_port)]
    children.append(Child("scheduler", sched))
    stack = Stack(children, f"127.0.0.1:{port}", quiet=quiet)
    stack.http_url = f"http://127.0.0.1:{http_port}" if http_port else None
    stack.metrics_ports = {}            # child name -> Prometheus port (metrics=True)
    if metrics:
        for c in children:
            stack.metrics_ports[c.name] = free_port()
            c.argv += ["--metrics-port", str(stack.metrics_ports[c.name])]
    return stack


DEMO_MESSAGES = [{"role": "user", "content": "In two sentences, what is pipeline parallelism?"}]


def run_demo(address: str) -> None:
    with Client(address) as c:
        print(f"\n>>> {DEMO_MESSAGES[0]['content']}\n", flush=True)
        last = None
        t0 = time.perf_counter()
        for chunk in c.stream(messages=DEMO_MESSAGES, max_tokens=96):
            print(chunk.text, end="", flush=True)
            last = chunk
        dt = time.perf_counter() - t0
        u = last.usage if last else None
        if u:
            print(f"\n\n[{u.completion_tokens} tokens in {dt:.2f}s, finish_reason={last.finish_reason}]",
                  flush=True)


UP_HTTP_PORT = 8000   # `shardline up` serves the OpenAI API here (the scheduler alone: off)

# flags of `shardline up` that are the services' own (their fields, defaults and help)
UP_SCHEDULER_FIELDS = ("max_num_seqs", "max_num_batched_tokens", "max_queued_requests",
                       "enable_prefix_caching",
                       "async_scheduling", "routing", "redis_url")
UP_WORKER_FIELDS = ("kv_cache_fraction", "block_size", *WEIGHT_FIELDS)


def build_parser() -> argparse.ArgumentParser:
    """`shardline up`'s flags: its own, then the services' (from their config dataclasses)."""
    p = argparse.ArgumentParser(prog="shardline up", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(TokenizerConfig, p, ["model"])
    p.add_argument("--stages", type=int, default=1,
                   help="pipeline stages per replica, one worker process each (default: %(default)s)")
    p.add_argument("--replicas", type=int, default=1,
                   help="pipeline replicas behind the scheduler (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per worker (default: cores / workers)")
    add_config_args(TokenizerConfig, p, ["log_level"])
    p.add_argument("--demo", action="store_true", help="run a demo generation once ready")
    p.add_argument("--exit-after-demo", action="store_true",
                   help="with --demo: stop the stack after the demo")
    sched = p.add_argument_group("scheduler", "passed on to `shardline scheduler`")
    add_config_args(SchedulerConfig, sched, ["port", *UP_SCHEDULER_FIELDS])
    sched.add_argument("--http-port", type=int, default=UP_HTTP_PORT,
                       help="port of the OpenAI-compatible HTTP API (0 = off; default: "
                            "%(default)s)")
    workers = p.add_argument_group("workers", "passed on to every `shardline worker`")
    add_config_args(WorkerConfig, workers, ["device", "dtype", "kv_cache_memory", *UP_WORKER_FIELDS])
    return p


def stack_from_args(a: argparse.Namespace, model_dir: str) -> Stack:
    """The stack build_parser's flags describe, for the model resolved into model_dir."""
    return build_stack(model_dir, a.model, a.stages, a.port, a.device, a.dtype,
                       a.kv_cache_memory, a.threads,
                       config_argv(SchedulerConfig, a, UP_SCHEDULER_FIELDS), a.replicas,
                       a.log_level, metrics=True,
                       worker_extra=config_argv(WorkerConfig, a, UP_WORKER_FIELDS),
                       http_port=a.http_port)


def main(argv: list[str]) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.stages < 1 or a.replicas < 1:
        p.error("--stages and --replicas must be >= 1")
    print(f"shardline up: resolving model {a.model}", file=sys.stderr, flush=True)
    stack = stack_from_args(a, str(resolve_model(a.model)))
    stopping = threading.Event()

    def on_signal(signum, frame):
        stopping.set()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    stack.start()
    t0 = time.monotonic()
    while not stack.wait_ready(1.0):
        if stopping.is_set() or stack.dead():
            for c in stack.dead():
                print(f"shardline up: {c.name} exited with {c.proc.returncode}", file=sys.stderr)
            stack.stop()
            return 1
    http = f", OpenAI API on {stack.http_url}/v1" if stack.http_url else ""
    print(f"shardline up: ready on {stack.scheduler_address}{http} after "
          f"{time.monotonic() - t0:.1f}s ({a.replicas} replica(s) x {a.stages} stage(s)); "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    print("shardline up: metrics " + ", ".join(f"{n} http://127.0.0.1:{p}/metrics"
                                               for n, p in stack.metrics_ports.items()),
          file=sys.stderr, flush=True)
    if a.demo:
        try:
            run_demo(stack.scheduler_address)
        except grpc.RpcError as e:
            print(f"demo failed: {e.code().name}: {e.details()}", file=sys.stderr)
            stack.stop()
            return 1
        if a.exit_after_demo:
            stopping.set()
    while not stopping.is_set():
        if stack.dead():
            for c in stack.dead():
                print(f"shardline up: {c.name} exited with {c.proc.returncode}; stopping",
                      file=sys.stderr)
            stack.stop()
            return 1
        stopping.wait(0.5)
    rc = stack.stop()
    print("shardline up: stopped", file=sys.stderr)
    return rc
