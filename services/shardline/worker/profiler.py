"""Profiling on demand: a stage records its next N steps with torch.profiler
(StageWorker.Profile, `shardline profile`).

The RPC arms a ProfileSession on the stage's StageProfiler and starts torch.profiler with a
job on the step thread (the servicer's compute executor), between two steps; the steps after
it are recorded and counted, the recording window opening with the first, and the profiler
stops after the N-th. At the RPC's timeout (or when its caller goes away) the stop runs as a
job on that same executor, after the step in progress: torch.profiler is started and stopped
on the thread that runs the steps. Traffic goes on throughout; only the steps that run
are recorded, so without traffic a profile ends at its timeout with none.

While recording, the sampler and the CPU kernels' entry points (invisible to the profiler
otherwise) run inside record_function ranges (profile_summary.py names them); the patches are
instance attributes, removed when recording stops.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import os
import tempfile
import time
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from shardline.v1 import common_pb2
from shardline.worker.profile_summary import (CPU_LAYERS_RANGE, CPU_LOGITS_RANGE, SAMPLE_RANGE,
                                              STEP_RANGE, summarize)

# A trace larger than this (compressed) is not sent (the summary still is): channels between
# the services receive at most 64 MiB (common/request_limits.py).
MAX_TRACE_GZ_BYTES = 48 << 20


class ProfileArmed(RuntimeError):
    """A profile is already armed on this stage."""


def _wrapped(fn, name: str):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)
    return call


class ProfileSession:
    """One profile: armed on the event loop, recorded on the step thread, read back once done."""

    def __init__(self, steps: int, device: torch.device, loop: asyncio.AbstractEventLoop):
        self.steps = steps
        self.device = torch.device(device)
        self.loop = loop
        self.done = loop.create_future()       # set (on the loop) once recording stopped
        self.recorded = 0
        self.stopped = False
        self._prof: Optional[profile] = None
        self._t_start = self._t_end = 0.0
        self._patched: list[tuple[object, str]] = []

    # -- the step thread ----------------------------------------------------------------
    def start(self, runner) -> None:
        """Start recording, between steps (a job on the step thread, queued when armed): a
        process's first start takes about a second, which no recorded step should wait for
        (nor, on a pipeline, the stages before this one)."""
        if self.stopped or self._prof is not None:
            return
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._patch(runner)
        try:
            self._prof = profile(activities=activities)
            self._prof.start()
        except BaseException:
            self._prof = None
            self._unpatch()
            raise

    def _unpatch(self) -> None:
        for obj, attr in self._patched:
            with contextlib.suppress(AttributeError):
                delattr(obj, attr)
        self._patched.clear()

    def _patch(self, runner) -> None:
        targets = []
        if getattr(runner, "sampler", None) is not None:
            targets.append((runner.sampler, "sample", SAMPLE_RANGE))
        backend = getattr(runner, "backend", None)
        if getattr(backend, "name", "") == "cpu-kernels":
            targets += [(backend, "forward", CPU_LAYERS_RANGE), (backend, "logits", CPU_LOGITS_RANGE)]
        for obj, attr, name in targets:
            setattr(obj, attr, _wrapped(getattr(obj, attr), name))
            self._patched.append((obj, attr))

    @contextlib.contextmanager
    def step(self, runner):
        """Around one step on the step thread: recorded once started, until the last; the
        recording window opens with the first."""
        if self.stopped or self._prof is None:
            yield
            return
        if self.recorded == 0:
            self._t_start = time.perf_counter()
        try:
            with record_function(STEP_RANGE):
                yield
        finally:
            self.recorded += 1
            if self.recorded >= self.steps:
                self.stop()

    def stop(self) -> None:
        """Stop recording (idempotent); on the step thread."""
        if self.stopped:
            return
        self.stopped = True
        self._t_end = time.perf_counter()
        try:
            if self._prof is not None:
                self._prof.stop()
        finally:
            self._unpatch()
            self.loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    # -- once stopped (any thread but the loop's: exporting takes a while) -------------------
    def result(self, stage_index: int) -> common_pb2.ProfileResult:
        """What was recorded, with the Chrome trace gzip-compressed."""
        res = common_pb2.ProfileResult(steps_recorded=self.recorded, steps_requested=self.steps,
                                       device=str(self.device), stage_index=stage_index)
        if self._prof is None or self.recorded == 0:
            res.note = "no step ran on this stage while it was recording (no traffic)"
            return res
        window_s = max(0.0, self._t_end - self._t_start)      # first step to the stop
        rows, step_s = summarize(self._prof.events(), window_s)
        res.window_seconds, res.step_seconds = window_s, step_s
        for name, cpu_s, dev_s in rows:
            res.categories.add(name=name, cpu_seconds=cpu_s, device_seconds=dev_s)
        notes = []
        if self.recorded < self.steps:
            notes.append(f"the timeout came after {self.recorded} of {self.steps} step(s) "
                         "(too little traffic)")
        trace = self._chrome_trace()
        if len(trace) > MAX_TRACE_GZ_BYTES:
            notes.append(f"trace dropped: {len(trace) >> 20} MiB compressed, more than "
                         f"{MAX_TRACE_GZ_BYTES >> 20} MiB (record fewer steps)")
        else:
            res.trace_json_gz = trace
        res.note = "; ".join(notes)
        return res

    def _chrome_trace(self) -> bytes:
        fd, path = tempfile.mkstemp(prefix="shardline-profile-", suffix=".json")
        os.close(fd)
        try:
            self._prof.export_chrome_trace(path)
            with open(path, "rb") as f:
                return gzip.compress(f.read(), compresslevel=6)
        finally:
            os.unlink(path)


class StageProfiler:
    """The stage's one armed profile, if any (the servicer owns one)."""

    def __init__(self):
        self.session: Optional[ProfileSession] = None

    def arm(self, steps: int, device, loop: asyncio.AbstractEventLoop) -> ProfileSession:
        """On the event loop: arm a profile of the next `steps` steps."""
        if self.session is not None:
            raise ProfileArmed(f"a profile of {self.session.steps} step(s) is already armed on "
                               "this stage; wait for it to end")
        self.session = ProfileSession(steps, device, loop)
        return self.session

    def disarm(self, session: ProfileSession) -> None:
        if self.session is session:
            self.session = None

    def step(self, runner):
        """On the step thread, around a step: the armed session's recording, else nothing."""
        session = self.session
        return session.step(runner) if session is not None else contextlib.nullcontext()

    @staticmethod
    def range(name: str):
        """A record_function range while a profiler records (cheap nothing otherwise)."""
        if torch.autograd._profiler_enabled():
            return record_function(name)
        return contextlib.nullcontext()
