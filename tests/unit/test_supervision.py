"""`shardline up`'s supervision on an injected clock: the restart policy's backoff sequence,
its cap and reset, crash-loop detection (5 restarts within 60 s), and the Supervisor that
applies it to a stack's children (and never to a child that refused to start)."""
from __future__ import annotations

import copy

from shardline.launcher import EXIT_REFUSED, Child, RestartPolicy, Supervisor
from shardline.worker import rank_group


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def crash_after(policy: RestartPolicy, clock: FakeClock, up_s: float):
    """The child runs up_s seconds and exits; if it is restarted, after the delay."""
    clock.advance(up_s)
    delay = policy.on_exit()
    if delay is not None:
        clock.advance(delay)
        policy.started()
    return delay


def test_backoff_doubles_then_a_crash_loop_stops_restarts():
    clock = FakeClock()
    policy = RestartPolicy(clock)
    delays = [crash_after(policy, clock, 0.5) for _ in range(6)]
    # five restarts within 60 s (1 + 2 + 4 + 8 + 16 s of backoff): the sixth exit is a crash loop
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, None]
    assert policy.restarts == 5


def test_backoff_is_capped_and_a_slow_crasher_is_not_a_crash_loop():
    clock = FakeClock()
    policy = RestartPolicy(clock)
    # up 25 s each time: never 5 restarts within 60 s, never up long enough for a reset
    delays = [crash_after(policy, clock, 25.0) for _ in range(8)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_backoff_resets_after_the_child_stayed_up():
    clock = FakeClock()
    policy = RestartPolicy(clock)
    assert [crash_after(policy, clock, 1.0) for _ in range(3)] == [1.0, 2.0, 4.0]
    assert crash_after(policy, clock, 59.0) == 8.0      # not up long enough
    assert crash_after(policy, clock, 60.0) == 1.0      # up 60 s: back to the first delay
    assert crash_after(policy, clock, 1.0) == 2.0
    assert policy.restarts == 6


def test_only_restarts_within_the_window_count():
    clock = FakeClock()
    policy = RestartPolicy(clock, initial_delay_s=1.0, max_delay_s=1.0, reset_after_s=1e9)
    for _ in range(5):
        assert crash_after(policy, clock, 10.0) == 1.0    # exits at +10, +21, +32, +43, +54
    # 5 restarts, the oldest 46 s ago (window 60 s): a crash loop ...
    clock.advance(1.0)
    assert copy.deepcopy(policy).on_exit() is None
    # ... but once the oldest is more than 60 s old, only four count
    clock.advance(16.0)
    assert policy.on_exit() == 1.0


class FakeProc:
    def __init__(self):
        self.returncode = None

    def poll(self):
        return self.returncode


class FakeStack:
    """Children whose processes exit when told; restart() gives a child a new process."""

    def __init__(self, *names: str):
        self.children = [Child(n, []) for n in names]
        for c in self.children:
            c.proc = FakeProc()
        self.restarted: list[str] = []

    def restart(self, name: str) -> None:
        self.restarted.append(name)
        (c,) = [c for c in self.children if c.name == name]
        c.proc = FakeProc()

    def kill(self, name: str, rc: int) -> None:
        (c,) = [c for c in self.children if c.name == name]
        c.proc.returncode = rc


def test_supervisor_restarts_after_the_delay_and_stops_on_a_crash_loop(capsys):
    clock = FakeClock()
    stack = FakeStack("tokenizer", "worker-r1s0", "scheduler")
    sup = Supervisor(stack, clock)
    assert sup.poll() is None and stack.restarted == []
    stack.kill("worker-r1s0", -9)
    assert sup.poll() is None
    assert "worker-r1s0 exited with -9; restarting in 1.0s (restart 1)" in capsys.readouterr().err
    clock.advance(0.5)
    assert sup.poll() is None and stack.restarted == []          # still waiting
    clock.advance(0.5)
    assert sup.poll() is None and stack.restarted == ["worker-r1s0"]
    # the others were left alone; now the worker crash-loops
    for delay in (2.0, 4.0, 8.0, 16.0):
        stack.kill("worker-r1s0", 1)
        assert sup.poll() is None
        clock.advance(delay)
        assert sup.poll() is None
    assert stack.restarted == ["worker-r1s0"] * 5
    stack.kill("worker-r1s0", 1)
    crash = sup.poll()
    assert crash == "worker-r1s0 exited with 1: crash loop (5 restarts within 60s)"


def test_a_child_that_refused_to_start_stops_the_stack_without_a_restart(capsys):
    assert EXIT_REFUSED == rank_group.EXIT_REFUSED          # the worker's and its ranks' code
    clock = FakeClock()
    stack = FakeStack("tokenizer", "worker-0", "scheduler")
    sup = Supervisor(stack, clock)
    stack.kill("worker-0", EXIT_REFUSED)                   # e.g. --tp 2 on a 9-head model
    assert sup.poll() == "worker-0 refused to start (exit 2; its log line says why): not restarted"
    clock.advance(60)
    assert sup.poll() is not None and stack.restarted == []
    assert "restarting" not in capsys.readouterr().err
