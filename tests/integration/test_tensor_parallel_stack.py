"""Tensor parallelism through the real stack: workers with --tensor-parallel-size 2 (each starts
a second rank process; gloo over 127.0.0.1 on the CPU) give HF's float32 greedy ids on a tiny
random checkpoint, on 1 stage and on 2 stages; a rank SIGKILLed mid-stream takes its stage
down at once (the worker exits non-zero, its other rank with it) and the request finishes on
the other replica, or fails with UNAVAILABLE, in bounded time."""
from __future__ import annotations

import os
import shutil
import signal

import grpc
import pytest

from shardline.client import Client
from shardline.worker.rank_group import EXIT_RANK_FAILED, RANK_MODULE

from tests.integration.conftest import RunningStack
from tests.procs import child_processes
from tests.reliability.conftest import wait_for
from tests.unit.conftest import make_tiny_model
from tests.unit.test_model import hf_greedy

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PROMPTS = [list(range(10, 40)), [5, 9, 77, 3, 120, 64, 1, 2, 3, 4, 99]]   # ids < 128
NEW_TOKENS = 16
LONG = 400                  # tokens of the stream whose rank is killed (context: 512)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, model_dir) -> str:
    path = make_tiny_model(tmp_path_factory.mktemp("tp-llama"), "llama")
    for name in TOKENIZER_FILES:                  # the default model's: detokenizing only
        try:
            shutil.copy(f"{model_dir}/{name}", path / name)
        except FileNotFoundError:
            pass
    return str(path)


@pytest.fixture(scope="module")
def expected(tiny_dir) -> list[list[int]]:
    return hf_greedy(tiny_dir, PROMPTS, NEW_TOKENS)


def rank_pids(worker_pid: int) -> dict[int, int]:
    """rank -> pid of each rank process the worker worker_pid started."""
    return {int(argv[argv.index("--rank") + 1]): pid
            for pid, argv in child_processes(worker_pid).items() if RANK_MODULE in argv}


def alive(pid: int) -> bool:
    """Whether process pid runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def assert_greedy(c: Client, expected: list[list[int]]) -> None:
    for prompt, want in zip(PROMPTS, expected):
        out = c.generate(token_ids=prompt, max_tokens=NEW_TOKENS, ignore_eos=True)
        assert out.token_ids == want, prompt


def test_two_stages_of_two_ranks_give_hf_greedy_ids(tiny_dir, expected):
    with RunningStack(tiny_dir, stages=2, tensor_parallel_size=2, kv_cache_memory="8MiB",
                      threads=2) as s, Client(s.address, timeout=120) as c:
        ranks = [rank_pids(s.stack.child(name).proc.pid) for name in ("worker-0", "worker-1")]
        assert [set(r) for r in ranks] == [{1}, {1}]
        assert_greedy(c, expected)
    # stopped (SIGTERM): each worker told its rank to leave
    wait_for(lambda: not any(alive(r[1]) for r in ranks), 30, "the ranks to exit")


def test_a_killed_rank_takes_its_stage_down_and_the_stream_moves(tiny_dir, expected):
    with RunningStack(tiny_dir, stages=1, replicas=2, tensor_parallel_size=2,
                      kv_cache_memory="8MiB", threads=2) as s, \
            Client(s.address, timeout=120) as c:
        assert_greedy(c, expected)                # one stage of two ranks
        stream = c.stream(token_ids=PROMPTS[0], max_tokens=LONG, ignore_eos=True)
        ids = list(next(stream).token_ids)
        running = wait_for(lambda: [r for r in c.stats().replicas if r.num_running], 60,
                           "the stream's replica")
        worker = s.stack.child(f"worker-r{int(running[0].replica)}s0")
        ranks = rank_pids(worker.proc.pid)
        os.kill(ranks[1], signal.SIGKILL)
        try:
            for chunk in stream:
                ids += chunk.token_ids
        except grpc.RpcError as e:                # allowed: failed, never hung
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
        else:
            assert len(ids) == LONG and ids[:NEW_TOKENS] == expected[0]
        # the worker (rank 0) took its stage down: exited non-zero, no rank left behind
        wait_for(lambda: worker.proc.poll() is not None, 60, "the worker to exit")
        assert worker.proc.returncode == EXIT_RANK_FAILED
        assert_greedy(c, expected)                # the other replica serves on
        # and a rank whose rank 0 dies exits too
        other = s.stack.child(f"worker-r{1 - int(running[0].replica)}s0")
        orphan = rank_pids(other.proc.pid)[1]
        os.kill(other.proc.pid, signal.SIGKILL)
        wait_for(lambda: not alive(orphan), 30, "the rank of a killed worker to exit")
