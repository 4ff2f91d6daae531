"""Profiling on demand, in process: the request checks both sides share, the category rule of
the summary (profile_summary.py) on stand-in events, and a ProfileSession recording real torch
ops on a step thread (worker/profiler.py). Over real processes: tests/integration/test_profile.py."""
import asyncio
import gzip
import json
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from shardline.protocol.limits import (DEFAULT_PROFILE_TIMEOUT_S, MAX_PROFILE_STEPS,
                                       profile_request_error, profile_timeout_s)
from shardline.worker.profile_summary import (CATEGORIES, DECODE_RANGE, SAMPLE_RANGE,
                                              STEP_RANGE, category_of, summarize)
from shardline.worker.profiler import ProfileArmed, StageProfiler


def test_request_checks():
    assert profile_request_error(3, 0) == "" and profile_request_error(MAX_PROFILE_STEPS, 600) == ""
    for steps, timeout in ((0, 10), (-1, 10), (MAX_PROFILE_STEPS + 1, 10), (3, -1), (3, 601),
                           (3, float("nan")), (3, float("inf"))):
        assert profile_request_error(steps, timeout), (steps, timeout)
    assert profile_timeout_s(0) == DEFAULT_PROFILE_TIMEOUT_S and profile_timeout_s(5) == 5


def test_categories_by_name():
    assert category_of("aten::linear") == category_of("aten::addmm") == "linears"
    assert category_of("aten::scaled_dot_product_attention") == "attention"
    assert category_of("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert category_of("aten::index_select") == "attention"
    assert category_of(SAMPLE_RANGE) == category_of("aten::argmax") == "sampling"
    assert category_of("aten::index_copy_") == category_of("aten::copy_") == "copies"
    assert category_of(DECODE_RANGE) == "grpc"
    assert category_of("aten::silu") is None


def ev(name, start, end, *children, device_us=0.0):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end),
                           cpu_children=list(children), device_time_total=device_us,
                           device_type=SimpleNamespace(name="CPU"))


def test_an_operator_counts_once_in_its_outermost_category():
    step = ev(STEP_RANGE, 0, 100,
              ev(DECODE_RANGE, 0, 5, ev("aten::copy_", 1, 4)),
              ev("aten::linear", 10, 40, ev("aten::addmm", 12, 39, ev("aten::copy_", 13, 14))),
              ev("aten::scaled_dot_product_attention", 40, 60,
                 ev("aten::bmm", 41, 44), ev("aten::softmax", 45, 50)),
              ev(SAMPLE_RANGE, 60, 70, ev("aten::argmax", 61, 69)),
              ev("aten::index_copy_", 70, 75),
              ev("aten::silu", 80, 90, ev("aten::copy_", 82, 85)))   # uncategorized parent
    rows, step_s = summarize([step], window_s=200e-6)
    got = {name: round(cpu * 1e6, 6) for name, cpu, _ in rows}
    assert [name for name, _, _ in rows] == list(CATEGORIES)
    assert got == {"linears": 30, "attention": 20, "sampling": 10, "copies": 5 + 3, "grpc": 5,
                   "fused_layers": 0, "other": 100 - 30 - 20 - 10 - 8 - 5, "idle": 100}
    assert step_s == pytest.approx(100e-6)


def test_a_session_records_steps_on_the_step_thread():
    """Two steps recorded between others that are not; the sampler is wrapped in its range
    while recording only; a second profile is refused while one is armed."""
    lin = torch.nn.Linear(32, 32)

    class Sampler:
        def sample(self, x):
            return x.softmax(-1).argmax(-1)
    runner = SimpleNamespace(sampler=Sampler(), backend=SimpleNamespace(name="torch"))
    profiler = StageProfiler()
    patched = []

    def step():
        with profiler.step(runner):
            with torch.inference_mode():
                with StageProfiler.range(DECODE_RANGE):
                    x = torch.randn(4, 32)
                patched.append("sample" in vars(runner.sampler))
                runner.sampler.sample(lin(x))

    async def body():
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=1) as pool:
            await loop.run_in_executor(pool, step)          # before arming: not recorded
            session = profiler.arm(2, "cpu", loop)
            with pytest.raises(ProfileArmed):
                profiler.arm(1, "cpu", loop)
            await loop.run_in_executor(pool, step)          # armed, not started: not recorded
            await loop.run_in_executor(pool, session.start, runner)
            for _ in range(3):                               # the third is after the profile
                await loop.run_in_executor(pool, step)
            await asyncio.wait_for(session.done, 60)
            profiler.disarm(session)
            return await loop.run_in_executor(None, session.result, 1)
    res = asyncio.run(body())
    assert patched == [False, False, True, True, False]
    assert "sample" not in vars(runner.sampler)
    assert (res.steps_recorded, res.steps_requested, res.stage_index) == (2, 2, 1)
    assert res.device == "cpu" and not res.note
    cats = {c.name: c.cpu_seconds for c in res.categories}
    assert list(cats) == list(CATEGORIES)
    assert cats["linears"] > 0 and cats["sampling"] > 0 and cats["grpc"] > 0
    assert 0 < res.step_seconds <= res.window_seconds
    trace = json.loads(gzip.decompress(res.trace_json_gz))
    names = {e.get("name") for e in trace["traceEvents"]}
    assert STEP_RANGE in names and SAMPLE_RANGE in names


def test_a_session_without_steps_says_so():
    async def body():
        loop = asyncio.get_running_loop()
        session = StageProfiler().arm(3, "cpu", loop)
        session.stop()                                       # the timeout, with no step run
        await asyncio.wait_for(session.done, 10)
        return session.result(0)
    res = asyncio.run(body())
    assert res.steps_recorded == 0 and "no step ran" in res.note and not res.trace_json_gz


def test_a_session_stopped_early_keeps_what_it_recorded():
    runner = SimpleNamespace(sampler=None, backend=None)

    def step(profiler):
        with profiler.step(runner):
            torch.randn(8, 8).sum()

    async def body():
        loop = asyncio.get_running_loop()
        profiler = StageProfiler()
        session = profiler.arm(3, "cpu", loop)
        with ThreadPoolExecutor(max_workers=1) as pool:
            await loop.run_in_executor(pool, session.start, runner)
            await loop.run_in_executor(pool, step, profiler)
            await loop.run_in_executor(pool, session.stop)          # the timeout
        await asyncio.wait_for(session.done, 10)
        return await loop.run_in_executor(None, session.result, 0)
    res = asyncio.run(body())
    assert res.steps_recorded == 1 and "after 1 of 3" in res.note and res.trace_json_gz
