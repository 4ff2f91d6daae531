"""The worker's tensor-parallel plumbing, without processes: the flags (--tensor-parallel-size,
--tp), each rank's device and threads, a rank's command line (the worker's flags back on the
other side), the plan that travels between ranks, `shardline up` passing the flag on, and
rank 0's failure handling over a fake wire (a failed step or send, a rank that exits), and
serve()'s start-up refusal (a ValueError: exit code 2, the ranks abandoned; any other error
raised).
(tests/integration/test_tensor_parallel_stack.py runs real ranks; test_tensor_parallel.py
the sharded stage itself.)"""
from __future__ import annotations

import argparse
import asyncio

import pytest
import torch
from prometheus_client import REGISTRY

from shardline import launcher
from shardline.common import auth, telemetry
from shardline.v1 import common_pb2, worker_pb2
from shardline.worker.config import WorkerConfig
from shardline.worker.rank import build_parser as rank_parser
from shardline.worker.rank import serve_commands as rank_serve_commands, step_span
from shardline.worker import rank_group, server
from shardline.worker.rank_group import rank_argv
from shardline.worker.servicer import StageWorkerServicer
from shardline.worker.step_broadcast import Command, Op, plan_bytes


def parse(argv: list[str]) -> WorkerConfig:
    p = argparse.ArgumentParser()
    WorkerConfig.add_args(p)
    return WorkerConfig.from_args(p.parse_args(argv))


def test_flags_and_validation():
    assert parse([]).tensor_parallel_size == 1
    assert parse(["--tensor-parallel-size", "4"]).tensor_parallel_size == 4
    assert parse(["--tp", "2", "--tp-timeout-s", "30"]) == \
        WorkerConfig(tensor_parallel_size=2, tp_timeout_s=30.0)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        WorkerConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="tp_timeout_s"):
        WorkerConfig(tp_timeout_s=0)


def test_rank_devices_and_threads():
    assert [WorkerConfig(tensor_parallel_size=2).rank_device(r) for r in (0, 1)] == ["cpu"] * 2
    cuda = WorkerConfig(device="cuda", tensor_parallel_size=2)
    assert [cuda.rank_device(r) for r in (0, 1)] == ["cuda:0", "cuda:1"]
    assert WorkerConfig(device="cuda:2", tensor_parallel_size=2).rank_device(1) == "cuda:3"
    assert WorkerConfig(device="cuda").rank_device(0) == "cuda"      # one rank: as given
    assert WorkerConfig().rank_threads(16) == 0                       # torch's default
    assert WorkerConfig(threads=8).rank_threads(16) == 8
    assert WorkerConfig(threads=8, tensor_parallel_size=2).rank_threads(16) == 4
    assert WorkerConfig(threads=1, tensor_parallel_size=2).rank_threads(16) == 1
    assert WorkerConfig(tensor_parallel_size=4).rank_threads(16) == 4


def test_a_rank_gets_the_workers_flags():
    cfg = WorkerConfig(model="smollm2", port=7, host="127.0.0.1", stage_index=1, num_stages=2,
                       next_stages=["127.0.0.1:9"], layers="10:30", dtype="float32",
                       kv_cache_memory="64MiB", block_size=32, threads=4, quantize="int8",
                       cpu_kernels=False, gpu_engine="off", tensor_parallel_size=2,
                       tp_timeout_s=20, metrics_port=9, log_level="DEBUG")
    ns = rank_parser().parse_args(rank_argv(cfg, "/models/m", 1, 1234, 99))
    assert (ns.rank, ns.store_port, ns.seed) == (1, 1234, 99)
    got = WorkerConfig.from_args(ns)
    # the rank serves no gRPC, forwards nothing, loads the directory rank 0 resolved and
    # serves its metrics on the worker's port + its rank
    assert got == WorkerConfig(**{**cfg.__dict__, "model": "/models/m", "port": 50061,
                                  "host": "0.0.0.0", "next_stages": [], "metrics_port": 10})
    plain = WorkerConfig(tensor_parallel_size=2)            # metrics off: off on every rank
    assert "--metrics-port" not in rank_argv(plain, "/models/m", 1, 1234, 99)


def test_the_plan_travels_with_rank_0s_trace_context_only():
    req = worker_pb2.StepRequest(step_id=5, trace_context={"traceparent": "the scheduler's"})
    plan = worker_pb2.StepRequest.FromString(plan_bytes(req, {"traceparent": "rank 0's"}))
    assert dict(plan.trace_context) == {"traceparent": "rank 0's"}


def test_the_plan_travels_without_hidden_states():
    req = worker_pb2.StepRequest(
        step_id=5, seqs=[worker_pb2.SeqPlan(seq_id=1, token_ids=[3, 4], start_pos=0)],
        free_seq_ids=[2], hidden=common_pb2.Tensor(dtype="float32", shape=[2, 1],
                                                   data=b"\0" * 8),
        trace_context={"traceparent": "x"})
    req.decode.seq_ids.append(9)
    plan = worker_pb2.StepRequest.FromString(plan_bytes(req))
    assert not plan.HasField("hidden") and not plan.trace_context
    assert (plan.step_id, list(plan.free_seq_ids), plan.seqs[0].token_ids[:],
            list(plan.decode.seq_ids)) == (5, [2], [3, 4], [9])


def test_up_passes_the_flag_to_every_worker():
    a = launcher.build_parser().parse_args(["--stages", "2", "--replicas", "2", "--tp", "2",
                                            "--threads", "4"])
    stack = launcher.stack_from_args(a, "/models/m")
    workers = [c for c in stack.children if c.argv[0] == "worker"]
    assert len(workers) == 4
    for c in workers:
        cfg = parse(c.argv[1:])
        assert (cfg.tensor_parallel_size, cfg.threads, cfg.rank_threads(64)) == (2, 4, 2)
    plain = launcher.stack_from_args(launcher.build_parser().parse_args([]), "/models/m")
    assert "--tensor-parallel-size" not in plain.child("worker-0").argv


def test_up_gives_each_cuda_workers_ranks_their_own_gpus():
    """2 replicas x 2 stages x T = 2 from cuda:1: workers on cuda:1-2, 3-4, 5-6, 7-8 (their
    ranks' devices); without TP every stage shares --device (stages on one GPU)."""
    def devices(args):
        stack = launcher.stack_from_args(launcher.build_parser().parse_args(args), "/models/m")
        cfgs = [parse(c.argv[1:]) for c in stack.children if c.argv[0] == "worker"]
        return [[cfg.rank_device(r) for r in range(cfg.tensor_parallel_size)] for cfg in cfgs]
    assert devices(["--stages", "2", "--replicas", "2", "--tp", "2", "--device", "cuda:1"]) == [
        ["cuda:1", "cuda:2"], ["cuda:3", "cuda:4"], ["cuda:5", "cuda:6"], ["cuda:7", "cuda:8"]]
    assert devices(["--stages", "2", "--device", "cuda"]) == [["cuda"], ["cuda"]]
    assert devices(["--stages", "2", "--tp", "2"]) == [["cpu", "cpu"], ["cpu", "cpu"]]


class FakeWire:
    def __init__(self, fail: bool = False):
        self.sent, self.fail, self.plans = [], fail, []

    def send(self, op, req=None, hidden=None, trace_context=None):
        if self.fail:
            raise RuntimeError("Connection closed by peer")
        self.sent.append(op)
        if req is not None:                      # what a rank's receive() would give
            self.plans.append(worker_pb2.StepRequest.FromString(plan_bytes(req, trace_context)))


class FakeProc:
    def __init__(self, rc=None):
        self.rc, self.pid, self.killed = rc, 42, False

    def wait(self, timeout=None):
        return self.rc

    def poll(self):
        return self.rc

    def kill(self):
        self.killed = True


@pytest.fixture
def group(monkeypatch):
    """A RankGroup over a fake wire and rank process; os._exit raises Exited instead."""
    class Exited(Exception):
        pass

    def exit_(code):
        raise Exited(code)
    monkeypatch.setattr(rank_group.os, "_exit", exit_)
    g = rank_group.RankGroup(WorkerConfig(tensor_parallel_size=2), None, {1: FakeProc()}, 0)
    g.wire = FakeWire()
    g.Exited = Exited
    return g


def test_a_step_is_sent_first_and_a_bad_plan_is_not_a_failure(group):
    req = worker_pb2.StepRequest(step_id=3)
    with group.step(req, None):
        assert group.wire.sent == [Op.STEP]          # the other ranks have it before rank 0 runs
    with pytest.raises(ValueError):                 # every rank refuses it alike: serve on
        with group.step(req, None):
            raise ValueError("bad plan")
    group.forget_all()
    assert group.wire.sent == [Op.STEP, Op.STEP, Op.FORGET_ALL]


def test_a_failed_step_or_send_takes_the_stage_down(group):
    with pytest.raises(group.Exited) as e:          # e.g. a collective past --tp-timeout-s
        with group.step(worker_pb2.StepRequest(step_id=3), None):
            raise RuntimeError("gloo timeout")
    assert e.value.args == (rank_group.EXIT_RANK_FAILED,) and group.procs[1].killed
    group._failing.release()
    group.wire = FakeWire(fail=True)                 # a rank gone: the send breaks
    with pytest.raises(group.Exited):
        group.forget_all()


def test_a_rank_that_exits_takes_the_stage_down_unless_stopping(group):
    with pytest.raises(group.Exited):
        group._watch(1, FakeProc(rc=-9))
    group._failing.release()
    group.stopping = True                            # after STOP the ranks exit: expected
    group._watch(1, FakeProc(rc=0))


class FakeRanks:
    abandoned = False

    def abandon(self):
        self.abandoned = True


@pytest.mark.parametrize("error", [ValueError("KV cache budget of 1024 bytes holds no block"),
                                   RuntimeError("CUDA error: out of memory")],
                         ids=["refusal", "unexpected"])
def test_serve_refuses_a_value_error_and_raises_the_rest(monkeypatch, caplog, tiny_model_dir,
                                                         error):
    ranks = FakeRanks()
    monkeypatch.setattr(server.RankGroup, "start", lambda cfg, model_dir: ranks)

    def load_stage(*args):
        raise error
    monkeypatch.setattr(server, "load_stage", load_stage)
    monkeypatch.setattr(auth, "_transport", auth.transport())      # serve() configures it
    cfg = WorkerConfig(model=str(tiny_model_dir()), host="127.0.0.1", port=0,
                       tensor_parallel_size=2)
    if isinstance(error, ValueError):
        assert asyncio.run(server.serve(cfg)) == rank_group.EXIT_REFUSED
        assert f"refused to start: {error}" in caplog.text
    else:
        with pytest.raises(RuntimeError, match="out of memory"):
            asyncio.run(server.serve(cfg))
        assert "refused to start" not in caplog.text
    assert ranks.abandoned                           # killed, not left to their parent's death


# -- every rank's step: a span under rank 0's, and metrics labeled with the rank --------------

class FakeRunner:
    def __init__(self):
        self.steps = []

    def step(self, seqs, free_seq_ids, hidden, decode):
        self.steps.append([s.seq_id for s in seqs])
        return torch.zeros(sum(len(s.token_ids) for s in seqs), 4), None


class ReplayWire:
    """A rank's end of the wire that receives the given plans, then STOP."""
    def __init__(self, plans):
        self.commands = [Command(Op.STEP, p) for p in plans] + [Command(Op.STOP)]

    def receive(self):
        return self.commands.pop(0)

    def close(self):
        pass


def sample(name: str, rank: str) -> float:
    return REGISTRY.get_sample_value(name, {"stage": "1", "rank": rank}) or 0.0


def test_each_ranks_step_is_a_span_under_rank_0s_and_counted_with_its_rank(group, spans):
    svc = StageWorkerServicer("m")
    svc.stage_index, svc.runner, svc.ranks = 1, FakeRunner(), group
    with telemetry.tracer.start_as_current_span("scheduler.step") as sched:
        carrier = telemetry.inject()
    req = worker_pb2.StepRequest(step_id=7, trace_context=carrier, seqs=[
        worker_pb2.SeqPlan(seq_id=1, token_ids=[3, 4, 5], start_pos=0, admit=True)])
    before = {r: (sample("shardline_stage_step_seconds_count", r),
                  sample("shardline_stage_tokens_total", r)) for r in ("0", "1")}
    out, _ = svc._compute_step(req, forward=True)
    rank1 = FakeRunner()
    assert rank_serve_commands(ReplayWire(group.wire.plans), rank1, 1, 1) == 0
    assert rank1.steps == [[1]]
    by_rank = {s.attributes.get("shardline.tp_rank"): s for s in spans.get_finished_spans()
               if s.name == "stage1.forward"}
    assert set(by_rank) == {0, 1}
    r0, r1 = by_rank[0], by_rank[1]
    assert r0.parent.span_id == sched.get_span_context().span_id
    assert r1.parent.span_id == r0.context.span_id                # rank 1's under rank 0's
    assert r1.context.trace_id == r0.context.trace_id == sched.get_span_context().trace_id
    assert r1.attributes["shardline.step_id"] == 7
    # the next stage gets rank 0's span too, as without tensor parallelism
    assert out.trace_context["traceparent"].split("-")[2] == format(r0.context.span_id, "016x")
    for r in ("0", "1"):                     # one step of 3 tokens on each rank, by its label
        assert (sample("shardline_stage_step_seconds_count", r),
                sample("shardline_stage_tokens_total", r)) == \
            (before[r][0] + 1, before[r][1] + 3)


def test_without_tracing_the_plan_carries_no_context_and_a_rank_no_span(group):
    svc = StageWorkerServicer("m")
    svc.runner, svc.ranks = FakeRunner(), group
    svc._compute_step(worker_pb2.StepRequest(step_id=1, seqs=[
        worker_pb2.SeqPlan(seq_id=1, token_ids=[3], start_pos=0, admit=True)]), forward=True)
    (plan,) = group.wire.plans
    assert not plan.trace_context and step_span(plan, 0, 1) is None
