"""`shardline up`: tokenizer, scheduler and S stage workers as local processes over gRPC.
(With --tensor-parallel-size T each worker starts T - 1 rank processes of its own.)

Every child is a separate process started as a container would start it (`python -m
shardline <service> ...`, through common/spawn.py: it gets SIGTERM if this process dies);
its log lines are forwarded with its name. A child that exits on its own is started again,
as a kubelet restarts a container (`Supervisor`, `RestartPolicy`: backoff from 1 s doubling
to 30 s; a child restarted 5 times within 60 s is crash-looping and stops the stack).
SIGINT/SIGTERM stop the stack: the scheduler first (it drains its streams, which need the
others), then the rest, each SIGKILLed if still there after its drain timeout plus a margin.
The services' flags are their config dataclasses' fields.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardline.client import Client
from shardline.common.auth import TOKEN_ENV
from shardline.common.config_args import DEFAULT_DRAIN_TIMEOUT_S, add_config_args, config_argv
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


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port(count: int = 1) -> int:
    """A port that is free now, for a service started next; with count, the first of that many
    consecutive free ports (a worker's tensor-parallel ranks serve metrics on port + rank).
    Taken below the kernel's ephemeral range, so that no outgoing connection can be given it
    before the service binds it (with bind(0) that happened: a service then failed to start),
    and never twice in this process."""
    low = _ephemeral_low()
    if low > 11000 + count:
        rng = random.Random()
        for _ in range(500):
            port = rng.randrange(10000, low - count + 1)
            ports = range(port, port + count)
            if any(p in _given_ports for p in ports) or not all(map(_bindable, ports)):
                continue
            _given_ports.update(ports)
            return port
    for _ in range(500):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if all(map(_bindable, range(port + 1, port + count))):
            return port
    raise RuntimeError(f"no {count} consecutive free ports")


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


# Stack.stop: seconds past the children's drain timeout before they are SIGKILLed
STOP_MARGIN_S = 10.0


class Stack:
    """The local processes of one Shardline deployment."""

    def __init__(self, children: list[Child], scheduler_address: str, quiet: bool = False,
                 cluster_token: Optional[str] = None,
                 drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S):
        self.children = children
        self.drain_timeout_s = drain_timeout_s    # the children's --drain-timeout-s
        self.cluster_token = cluster_token    # handed to the children in $SHARDLINE_CLUSTER_TOKEN
        self.scheduler_address = scheduler_address
        self.quiet = quiet
        self.env: Optional[dict] = None       # the children's environment (None: ours)

    def start(self, env: Optional[dict] = None) -> None:
        """Start every child (from the thread that should outlive them: common/spawn.py)."""
        self.env = env
        for c in self.children:
            self._spawn(c)

    def _spawn(self, c: Child) -> None:
        env = self.env
        if self.cluster_token:
            env = {**(os.environ if env is None else env), TOKEN_ENV: self.cluster_token}
        c.proc = spawn_shardline(c.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 env=env, start_new_session=True, text=True, bufsize=1)
        c.thread = threading.Thread(target=self._forward, args=(c,), daemon=True)
        c.thread.start()

    def child(self, name: str) -> Child:
        (c,) = [c for c in self.children if c.name == name]
        return c

    def restart(self, name: str, grace_s: Optional[float] = None) -> None:
        """Stop one child (SIGTERM; SIGKILL after grace_s, default its drain timeout plus
        STOP_MARGIN_S) unless it has exited, and start it again with the same command line
        and environment."""
        c = self.child(name)
        if c.proc.poll() is None:
            c.proc.send_signal(signal.SIGTERM)
            try:
                c.proc.wait(self._grace(grace_s))
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

    def _grace(self, grace_s: Optional[float]) -> float:
        return self.drain_timeout_s + STOP_MARGIN_S if grace_s is None else grace_s

    def stop(self, grace_s: Optional[float] = None) -> int:
        """SIGTERM the scheduler and wait for it (its drain needs the tokenizer and workers),
        then SIGTERM the others; SIGKILL what is left of each after grace_s (default: the
        drain timeout plus STOP_MARGIN_S). The worst exit code."""
        worst = 0
        first = [c for c in self.children if c.name == "scheduler"]
        for group in (first, [c for c in self.children if c not in first]):
            for c in group:
                if c.proc and c.proc.poll() is None:
                    c.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self._grace(grace_s)
            for c in group:
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


# a child that refused to start (argparse's usage error; a worker's flags that do not fit its
# model: worker/rank_group.py EXIT_REFUSED) would refuse again: never restarted
EXIT_REFUSED = 2


class RestartPolicy:
    """When a child that exited on its own starts again, as a kubelet restarts a container:
    after a delay that doubles from initial_delay_s up to max_delay_s and falls back to
    initial_delay_s once the child has stayed up reset_after_s; never once it has been
    restarted max_restarts times within the last window_s (it crash-loops). clock: seconds,
    monotonic (injected by tests)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 initial_delay_s: float = 1.0, max_delay_s: float = 30.0,
                 reset_after_s: float = 60.0, max_restarts: int = 5, window_s: float = 60.0):
        self.clock = clock
        self.initial_delay_s = initial_delay_s
        self.max_delay_s = max_delay_s
        self.reset_after_s = reset_after_s
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.restarts = 0                                # restarts so far
        self._recent: collections.deque[float] = collections.deque()   # when, within window_s
        self._next_delay = initial_delay_s
        self._started_at = clock()

    def started(self) -> None:
        """The child has just been (re)started."""
        self._started_at = self.clock()

    def on_exit(self) -> Optional[float]:
        """The child has just exited: seconds to wait before starting it again, or None when
        it crash-loops (already restarted max_restarts times within window_s)."""
        now = self.clock()
        if now - self._started_at >= self.reset_after_s:
            self._next_delay = self.initial_delay_s
        while self._recent and now - self._recent[0] > self.window_s:
            self._recent.popleft()
        if len(self._recent) >= self.max_restarts:
            return None
        delay = self._next_delay
        self._next_delay = min(self.max_delay_s, delay * 2)
        self._recent.append(now)
        self.restarts += 1
        return delay


class Supervisor:
    """Restarts the children of a started stack that exit on their own, each under its own
    RestartPolicy, except one that refused to start (EXIT_REFUSED): the stack stops. Call
    poll() from the thread that started the stack (common/spawn.py)."""

    def __init__(self, stack: Stack, clock: Callable[[], float] = time.monotonic,
                 policy: Callable[[Callable[[], float]], RestartPolicy] = RestartPolicy):
        self.stack = stack
        self.clock = clock
        self.policies = {c.name: policy(clock) for c in stack.children}
        self._due: dict[str, float] = {}     # child name -> when to start it again

    def poll(self) -> Optional[str]:
        """Start the children whose delay is over; schedule a restart of each child that has
        exited. Returns why the stack must stop (a child crash-loops), else None."""
        now = self.clock()
        for c in self.stack.children:
            if c.name in self._due:
                if now >= self._due[c.name]:
                    del self._due[c.name]
                    self.stack.restart(c.name)
                    self.policies[c.name].started()
                continue
            if c.proc is None or c.proc.poll() is None:
                continue
            if c.proc.returncode == EXIT_REFUSED:
                return (f"{c.name} refused to start (exit {EXIT_REFUSED}; its log line says "
                        f"why): not restarted")
            policy = self.policies[c.name]
            delay = policy.on_exit()
            if delay is None:
                return (f"{c.name} exited with {c.proc.returncode}: crash loop "
                        f"({policy.max_restarts} restarts within {policy.window_s:.0f}s)")
            self._due[c.name] = now + delay
            print(f"shardline up: {c.name} exited with {c.proc.returncode}; restarting in "
                  f"{delay:.1f}s (restart {policy.restarts})", file=sys.stderr, flush=True)
        return None


def worker_device(device: str, worker: int, tensor_parallel_size: int) -> str:
    """The --device of the worker-th worker of a stack (replica-major): with T > 1 on CUDA
    each worker's ranks get their own T GPUs (cuda:0-3 for the first of T = 4, cuda:4-7 for
    the next, from --device's index); otherwise every worker shares `device` (several stages
    on one GPU)."""
    if tensor_parallel_size == 1 or not device.startswith("cuda"):
        return device
    _, _, index = device.partition(":")
    return f"cuda:{int(index or 0) + worker * tensor_parallel_size}"


def build_stack(model_dir: str, model_name: str, stages: int, port: int, device: str,
                dtype: Optional[str], kv_cache_memory: Optional[str], threads: int,
                extra_scheduler: list[str] = (), replicas: int = 1,
                log_level: str = "INFO", quiet: bool = False, metrics: bool = False,
                worker_extra: list[str] = (), http_port: int = 0,
                drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
                tensor_parallel_size: int = 1) -> Stack:
    """The children of one local deployment: a tokenizer, `replicas` pipelines of `stages`
    workers (each worker starts tensor_parallel_size rank processes of its own and splits
    its `threads`, by default cores / workers, over them), and the scheduler."""
    # internal services listen on loopback only and take calls presenting the stack's
    # generated cluster token (common/auth.py); the scheduler is the public door
    tok_port = free_port()
    children = [Child("tokenizer", ["tokenizer", "--model", model_dir, "--port", str(tok_port),
                                    "--host", "127.0.0.1", "--log-level", log_level])]
    pipelines = []
    per_worker_threads = threads or max(1, (os.cpu_count() or 1) // (stages * replicas))
    for r in range(replicas):
        addrs = [f"127.0.0.1:{free_port()}" for _ in range(stages)]
        for s, addr in enumerate(addrs):
            p = addr.rpartition(":")[2]
            argv = ["worker", "--model", model_dir, "--port", p, "--host", "127.0.0.1",
                    "--stage-index", str(s), "--num-stages", str(stages),
                    "--device", worker_device(device, r * stages + s, tensor_parallel_size),
                    "--threads", str(per_worker_threads), "--log-level", log_level,
                    *worker_extra]
            if tensor_parallel_size > 1:
                argv += ["--tensor-parallel-size", str(tensor_parallel_size)]
            if s + 1 < stages:
                argv += ["--next-stage", addrs[s + 1]]
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
    if drain_timeout_s != DEFAULT_DRAIN_TIMEOUT_S:
        for c in children:
            c.argv += ["--drain-timeout-s", str(drain_timeout_s)]
    stack = Stack(children, f"127.0.0.1:{port}", quiet=quiet,
                  cluster_token=secrets.token_urlsafe(32), drain_timeout_s=drain_timeout_s)
    stack.http_url = f"http://127.0.0.1:{http_port}" if http_port else None
    # child name (a worker's rank r > 0: "<worker>-rank<r>") -> Prometheus port (metrics=True)
    stack.metrics_ports = {}
    if metrics:
        for c in children:
            ranks = tensor_parallel_size if c.argv[0] == "worker" else 1
            port = stack.metrics_ports[c.name] = free_port(ranks)
            c.argv += ["--metrics-port", str(port)]
            for r in range(1, ranks):       # worker/rank_group.py: rank_metrics_port
                stack.metrics_ports[f"{c.name}-rank{r}"] = port + r
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
                       "max_queue_wait_s", "priority_aging_s", "enable_prefix_caching",
                       "async_scheduling", "routing", "redis_url", "api_keys_file")
UP_WORKER_FIELDS = ("kv_cache_fraction", "block_size", "gpu_engine", *WEIGHT_FIELDS)


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
                   help="torch threads per worker, split over its tensor-parallel ranks "
                        "(default: cores / workers)")
    add_config_args(TokenizerConfig, p, ["log_level", "drain_timeout_s"])
    p.add_argument("--demo", action="store_true", help="run a demo generation once ready")
    p.add_argument("--exit-after-demo", action="store_true",
                   help="with --demo: stop the stack after the demo")
    sched = p.add_argument_group("scheduler", "passed on to `shardline scheduler`")
    add_config_args(SchedulerConfig, sched, ["port", *UP_SCHEDULER_FIELDS])
    sched.add_argument("--http-port", type=int, default=UP_HTTP_PORT,
                       help="port of the OpenAI-compatible HTTP API (0 = off; default: "
                            "%(default)s)")
    workers = p.add_argument_group("workers", "passed on to every `shardline worker`")
    add_config_args(WorkerConfig, workers, ["device", "dtype", "kv_cache_memory",
                                            "tensor_parallel_size", *UP_WORKER_FIELDS])
    return p


def stack_from_args(a: argparse.Namespace, model_dir: str) -> Stack:
    """The stack build_parser's flags describe, for the model resolved into model_dir."""
    worker_extra = config_argv(WorkerConfig, a, UP_WORKER_FIELDS)
    if a.max_num_batched_tokens > WorkerConfig.max_step_tokens:   # workers take such steps
        worker_extra += ["--max-step-tokens", str(a.max_num_batched_tokens)]
    return build_stack(model_dir, a.model, a.stages, a.port, a.device, a.dtype,
                       a.kv_cache_memory, a.threads,
                       config_argv(SchedulerConfig, a, UP_SCHEDULER_FIELDS), a.replicas,
                       a.log_level, metrics=True, worker_extra=worker_extra,
                       http_port=a.http_port, drain_timeout_s=a.drain_timeout_s,
                       tensor_parallel_size=a.tensor_parallel_size)


def main(argv: list[str]) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.stages < 1 or a.replicas < 1 or a.tensor_parallel_size < 1:
        p.error("--stages, --replicas and --tensor-parallel-size must be >= 1")
    print(f"shardline up: resolving model {a.model}", file=sys.stderr, flush=True)
    stack = stack_from_args(a, str(resolve_model(a.model)))
    stopping = threading.Event()

    def on_signal(signum, frame):
        stopping.set()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    stack.start()
    supervisor = Supervisor(stack)
    t0 = time.monotonic()
    while not stack.wait_ready(1.0):
        crash = supervisor.poll()
        if stopping.is_set() or crash:
            return _stop(stack, crash)
        stopping.wait(0.25)
    http = f", OpenAI API on {stack.http_url}/v1" if stack.http_url else ""
    ranks = f" x {a.tensor_parallel_size} ranks" if a.tensor_parallel_size > 1 else ""
    print(f"shardline up: ready on {stack.scheduler_address}{http} after "
          f"{time.monotonic() - t0:.1f}s ({a.replicas} replica(s) x {a.stages} stage(s)"
          f"{ranks}); "
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
        crash = supervisor.poll()
        if crash:
            return _stop(stack, crash)
        stopping.wait(0.25)
    return _stop(stack, None)


def _stop(stack: Stack, crash: Optional[str]) -> int:
    """Stop the stack; non-zero when a child crash-looped (crash says which, and why)."""
    if crash:
        print(f"shardline up: {crash}; stopping", file=sys.stderr, flush=True)
    print(f"shardline up: stopping (drain timeout {stack.drain_timeout_s:.0f}s)",
          file=sys.stderr, flush=True)
    rc = stack.stop()
    print("shardline up: stopped", file=sys.stderr, flush=True)
    return 1 if crash else rc
