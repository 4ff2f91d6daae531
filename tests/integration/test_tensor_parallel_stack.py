"""Tensor parallelism through the real stack: workers with --tensor-parallel-size 2 (each starts
a second rank process; gloo over 127.0.0.1 on the CPU) give HF's float32 greedy ids on a tiny
random checkpoint, on 1 stage and on 2 stages; a rank SIGKILLed mid-stream takes its stage
down at once (the worker exits non-zero, its other rank with it) and the request finishes on
the other replica, or fails with UNAVAILABLE, in bounded time. Every rank's step is a span
under rank 0's, and every rank serves its metrics (rank 1 on the worker's port + 1). A worker
(or rank) whose flags do not fit the model refuses to start: one log line naming the reason,
exit code 2, no traceback, no rank left behind."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

import grpc
import pytest

from shardline.client import Client
from shardline.worker.build import load_runner
from shardline.worker.rank_group import EXIT_RANK_FAILED, EXIT_REFUSED, RANK_MODULE

from tests.integration.conftest import RunningStack
from tests.integration.test_metrics import scrape, value
from tests.integration.test_tracing import collector  # noqa: F401 - a fixture
from tests.procs import child_processes
from tests.reliability.conftest import wait_for
from tests.unit.conftest import make_tiny_model
from tests.unit.test_model import Driver, hf_greedy

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PROMPTS = [list(range(10, 40)), [5, 9, 77, 3, 120, 64, 1, 2, 3, 4, 99]]   # ids < 128
NEW_TOKENS = 16
LONG = 400                  # tokens of the stream whose rank is killed (context: 512)


def tiny_with_tokenizer(tmp_path_factory, model_dir, family: str) -> str:
    path = make_tiny_model(tmp_path_factory.mktemp(f"tp-{family}"), family)
    for name in TOKENIZER_FILES:                  # the default model's: detokenizing only
        try:
            shutil.copy(f"{model_dir}/{name}", path / name)
        except FileNotFoundError:
            pass
    return str(path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, model_dir) -> str:
    return tiny_with_tokenizer(tmp_path_factory, model_dir, "llama")


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


def test_moe_stages_of_two_ranks_give_hf_greedy_ids_and_reuse_cached_prefixes(
        tmp_path_factory, model_dir):
    """Qwen3-MoE (experts split across the ranks, one dense layer), 2 stages x 2 ranks: HF's
    float32 greedy ids; the same prompt again hits the prefix cache (blocks every rank of
    each stage holds under the scheduler's ids) and gives the same ids."""
    moe = tiny_with_tokenizer(tmp_path_factory, model_dir, "qwen3-moe")
    want = hf_greedy(moe, PROMPTS, NEW_TOKENS)
    with RunningStack(moe, stages=2, tensor_parallel_size=2, kv_cache_memory="8MiB",
                      threads=2) as s, Client(s.address, timeout=120) as c:
        assert_greedy(c, want)
        again = c.generate(token_ids=PROMPTS[0], max_tokens=NEW_TOKENS, ignore_eos=True)
        assert again.token_ids == want[0]
        assert again.usage.cached_tokens >= 16     # PROMPTS[0]'s 30 tokens: whole blocks


def test_int8_stage_of_two_ranks_gives_the_ids_of_one_int8_stage(tiny_dir):
    """--quantize int8 on 2 ranks (row-parallel scales from whole rows): the greedy ids of
    the same model quantized on one unsharded stage."""
    one = load_runner(tiny_dir, 0, 4, dtype="float32", kv_cache_bytes=1 << 20, quantize="int8")
    want = Driver([one]).run(PROMPTS, NEW_TOKENS)
    with RunningStack(tiny_dir, stages=1, tensor_parallel_size=2, kv_cache_memory="8MiB",
                      threads=2, worker_extra=["--quantize", "int8"]) as s, \
            Client(s.address, timeout=120) as c:
        assert_greedy(c, want)


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


# -- per-rank spans and metrics ---------------------------------------------------------------

def int_attrs(span) -> dict[str, int]:
    return {a.key: a.value.int_value for a in span.attributes}


def test_every_rank_traces_its_steps_and_serves_its_metrics(tiny_dir, expected, collector):
    env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.port}",
               OTEL_TRACES_EXPORTER="otlp", OTEL_BSP_SCHEDULE_DELAY="100")
    env.pop("OTEL_SERVICE_NAME", None)
    with RunningStack(tiny_dir, stages=1, tensor_parallel_size=2, kv_cache_memory="8MiB",
                      threads=2, metrics=True, env=env) as s, \
            Client(s.address, timeout=120) as c:
        out = c.generate(token_ids=PROMPTS[0], max_tokens=NEW_TOKENS, ignore_eos=True)
        assert out.token_ids == expected[0]
        # metrics: rank 0 on the worker's port, rank 1 on the next, each labeled with its rank
        ports = s.stack.metrics_ports
        assert ports["worker-0-rank1"] == ports["worker-0"] + 1

        def counts(port: int, rank: str):
            m = scrape(port)
            return m, (value(m, "shardline_stage_step_seconds_count", stage="0", rank=rank),
                       value(m, "shardline_stage_tokens_total", stage="0", rank=rank))

        def agreed():
            # rank 1 counts a step once its own part ends (it may trail rank 0's answer), and
            # the scheduler may still send a step after the answer (freeing the sequence):
            # both ranks' counts, read together, until they agree
            (rank0, c0), (rank1, c1) = counts(ports["worker-0"], "0"), \
                counts(ports["worker-0-rank1"], "1")
            return (rank0, rank1, c0) if c0 == c1 and c0[0] >= NEW_TOKENS else None
        _, rank1, (steps, tokens) = wait_for(agreed, 60, "both ranks to count every step")
        assert tokens >= len(PROMPTS[0]) + NEW_TOKENS - 1
        assert not [k for k in rank1 if k[0].startswith("shardline_stage")
                    and ("rank", "1") not in k[1]]

        # spans: each of rank 1's steps under rank 0's, in the scheduler step's trace
        def pairs():
            spans = [sp for svc, sp in collector.snapshot()
                     if svc == "worker" and sp.name == "stage0.forward"]
            by_rank = {r: [sp for sp in spans if int_attrs(sp).get("shardline.tp_rank") == r]
                       for r in (0, 1)}
            rank0 = {sp.span_id: sp for sp in by_rank[0]}
            return [(rank0[sp.parent_span_id], sp) for sp in by_rank[1]
                    if sp.parent_span_id in rank0]
        found = wait_for(lambda: len(p := pairs()) >= steps and p, 60, "rank 1's step spans")
        sched_steps = {sp.span_id for svc, sp in collector.snapshot()
                       if svc == "scheduler" and sp.name == "scheduler.step"}
        for r0, r1 in found:
            assert r1.trace_id == r0.trace_id
            assert int_attrs(r1)["shardline.step_id"] == int_attrs(r0)["shardline.step_id"]
        assert any(r0.parent_span_id in sched_steps for r0, _ in found)


# -- start-up refusals ------------------------------------------------------------------------

def run_refused(argv: list[str]) -> str:
    """Run `python -m ARGV` to its end; assert it refused to start (EXIT_REFUSED, a reason,
    no traceback) and return its log (stderr)."""
    proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          timeout=300)                     # a bound on a hang, not a timing
    log = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_REFUSED, log
    assert "Traceback" not in log, log
    return log


def worker_argv(model: str, *flags: str) -> list[str]:
    return ["shardline", "worker", "--model", model, "--host", "127.0.0.1", "--port", "0",
            "--threads", "2", *flags]


def test_a_tp_that_does_not_split_the_default_model_is_refused_before_any_rank(model_dir):
    log = run_refused(worker_argv(model_dir, "--tp", "2"))     # SmolLM2: 9 heads, 3 KV heads
    (line,) = [ln for ln in log.splitlines() if "refused to start" in ln]
    assert " ERROR worker-0 " in line and "9 attention heads are not divisible by 2" in line \
        and "3 KV heads neither divide by 2 nor divide it" in line
    assert "started ranks" not in log


def test_a_kv_budget_that_holds_no_block_is_refused_by_every_rank(tiny_dir):
    log = run_refused(worker_argv(tiny_dir, "--tp", "2", "--kv-cache-memory", "1KiB"))
    # rank 0's reason, or rank 1's when it got there first (rank 0 then names rank 1)
    assert re.search(r"ERROR worker-0(-rank1)? \S+: (rank 1 )?refused to start: KV cache "
                     r"budget of 1024 bytes holds no block", log), log
    store_port = re.search(r"store on 127\.0\.0\.1:(\d+)", log).group(1)

    def ranks_left():
        return [pid for pid, argv in all_processes().items()
                if RANK_MODULE in argv and store_port in argv]
    wait_for(lambda: not ranks_left(), 30, "the refused worker's rank to exit")


def test_a_rank_refuses_bad_flags_without_a_traceback(tiny_dir):
    log = run_refused([RANK_MODULE, "--rank", "1", "--store-port", "1", "--seed", "0",
                       "--model", tiny_dir, "--tp", "2", "--block-size", "0"])
    assert "error: block_size must be > 0" in log


def all_processes() -> dict[int, list[str]]:
    """pid -> argv of every live (not zombie) process."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and alive(int(entry)):
            try:
                with open(f"/proc/{entry}/cmdline") as f:
                    out[int(entry)] = f.read().split("\0")
            except OSError:
                continue
    return out
