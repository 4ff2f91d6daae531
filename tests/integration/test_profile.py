"""`shardline profile` over real processes: every stage records the steps a generation runs
meanwhile, one Chrome trace per stage and a table of time per category; bad input is refused
before anything is armed; one profile at a time; no traffic means no steps, said so. The
batch limits a CPU stack takes from its workers (GetStats)."""
from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from shardline.client import Client
from shardline.v1 import common_pb2, generate_pb2_grpc
from shardline.worker.config import CPU_MAX_NUM_BATCHED_TOKENS, CPU_MAX_NUM_SEQS
from shardline.worker.profile_summary import CATEGORIES

pytestmark = pytest.mark.slow

STEPS = 3


def profile_cmd(address: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shardline", "profile", "--address", address,
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("name", ["stack1", "stack3"])
def test_profile_records_the_steps_of_every_stage(name, request, tmp_path):
    s = request.getfixturevalue(name)
    with Client(s.address) as c:
        num_stages = c.model_info().num_stages
        proc = profile_cmd(s.address, "--steps", str(STEPS), "--out", str(tmp_path),
                           "--timeout", "300")
        # traffic until the profile has ended: it records steps that run, whenever it arms
        generations = 0
        while proc.poll() is None:
            out = c.generate("Tell me a story about a lighthouse.", max_tokens=24,
                             ignore_eos=True)
            assert out.usage.completion_tokens == 24
            generations += 1
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stdout + stderr
    assert generations >= 1
    for k in range(num_stages):
        path = tmp_path / f"replica0-stage{k}.json"
        trace = json.loads(path.read_text())
        assert trace["traceEvents"], path
        assert any(e.get("name") == "shardline::step" for e in trace["traceEvents"])
        assert f"replica 0 stage {k} " in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"replica0-stage{k}.json" for k in range(num_stages))
    assert stdout.count(f"{STEPS}/{STEPS} steps recorded") == num_stages, stdout
    for cat in CATEGORIES:
        assert stdout.count(f"  {cat} ") == num_stages, (cat, stdout)


def test_bad_input_is_refused_before_anything_is_armed(stack1):
    proc = profile_cmd(stack1.address, "--steps", "0")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "INVALID_ARGUMENT" in stderr and "steps" in stderr, stderr
    with grpc.insecure_channel(stack1.address) as ch:
        stub = generate_pb2_grpc.GenerationStub(ch)
        for steps, timeout_s in ((0, 10), (-3, 10), (1001, 10), (3, -1), (3, 601),
                                 (3, float("nan"))):
            with pytest.raises(grpc.RpcError) as err:
                stub.Profile(common_pb2.ProfileRequest(steps=steps, timeout_s=timeout_s),
                             timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (steps, timeout_s)
        # nothing was left armed: a good profile arms, and ends (no traffic: no steps)
        res = stub.Profile(common_pb2.ProfileRequest(steps=1, timeout_s=1), timeout=120)
        (stage,) = res.stages
        assert not stage.error and stage.result.steps_recorded == 0


def test_one_profile_at_a_time_and_none_without_traffic(stack1):
    """Two profiles at once: one is refused with FAILED_PRECONDITION; the other, with no
    traffic, ends at its timeout with zero steps, and the command says so."""
    with grpc.insecure_channel(stack1.address) as ch:
        stub = generate_pb2_grpc.GenerationStub(ch)

        def call():
            try:
                return stub.Profile(common_pb2.ProfileRequest(steps=2, timeout_s=10), timeout=120)
            except grpc.RpcError as e:
                return e
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda _: call(), range(2)))
    refused = [r for r in results if isinstance(r, grpc.RpcError)]
    answered = [r for r in results if not isinstance(r, grpc.RpcError)]
    assert len(refused) == len(answered) == 1, results
    assert refused[0].code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already running" in refused[0].details()
    (stage,) = answered[0].stages
    assert stage.result.steps_recorded == 0 and "no step ran" in stage.result.note

    proc = profile_cmd(stack1.address, "--steps", "2", "--timeout", "1")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "no step ran within the timeout" in stderr, stderr
    assert "0/2 steps recorded" in stdout


def test_a_cpu_stack_takes_its_workers_batch_limits(stack1):
    """No --max-num-seqs / --max-num-batched-tokens: the workers' CPU defaults."""
    with Client(stack1.address) as c:
        (rep,) = c.stats().replicas
    assert (rep.max_num_seqs, rep.max_num_batched_tokens) == (CPU_MAX_NUM_SEQS,
                                                              CPU_MAX_NUM_BATCHED_TOKENS)
    assert (rep.max_num_seqs, rep.max_num_batched_tokens) == (64, 512)
