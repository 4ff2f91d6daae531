"""Step backends: which one a stage gets (backends.select_backend, the one place that
chooses), and that a backend the runner has never heard of runs steps through the same
StepBackend calls (the interface a GPU engine will implement)."""
from __future__ import annotations

import pytest
import torch

from shardline.backends import CpuKernelBackend, StepBackend, TorchBackend, select_backend
from shardline.backends.cpu_kernels import build as cpu_kernels
from shardline.models.kv_cache import KVCache
from shardline.protocol.plan import SamplingConfig, SeqStep
from shardline.transforms.stage import StageTransforms, build_stage
from shardline.worker.build import load_runner
from shardline.worker.runner import StageRunner

KERNELS = torch.cpu._is_avx512_bf16_supported()


def _stage(model_dir, dtype, **transforms):
    return build_stage(model_dir, 0, 30, "cpu", dtype, StageTransforms(**transforms)).model


@pytest.mark.skipif(not KERNELS, reason="this CPU has no AVX512-BF16")
def test_bf16_cpu_stage_runs_on_the_cpu_kernels(default_model_dir):
    assert cpu_kernels.load() is not None               # fails, not skips, if the build breaks
    model = _stage(default_model_dir, torch.bfloat16)
    assert isinstance(select_backend(model), CpuKernelBackend)
    assert type(select_backend(model, cpu_kernels=False)) is TorchBackend
    compiled = select_backend(model, compiled=True)
    assert type(compiled) is TorchBackend and compiled.needs_warm_up


def test_other_stages_run_on_the_torch_reference(default_model_dir):
    for model in (_stage(default_model_dir, torch.float32),
                  _stage(default_model_dir, torch.bfloat16, fuse=False)):   # kernels take fused
        backend = select_backend(model)
        assert type(backend) is TorchBackend and not backend.needs_warm_up


class CountingBackend(TorchBackend):
    """A backend the runner does not know: the reference's math, every call counted."""

    name = "counting"

    def __init__(self, model):
        super().__init__(model)
        self.calls: list[str] = []

    def build_metadata(self, *args):
        self.calls.append("build_metadata")
        return super().build_metadata(*args)

    def embed(self, token_ids):
        self.calls.append("embed")
        return super().embed(token_ids)

    def forward(self, x, meta, kv_cache):
        self.calls.append("forward")
        return super().forward(x, meta, kv_cache)

    def logits(self, x):
        self.calls.append("logits")
        return super().logits(x)

    def argmax(self, logits):
        self.calls.append("argmax")
        return super().argmax(logits)


def test_a_new_backend_plugs_in_without_touching_the_runner(tiny_model_dir):
    path = tiny_model_dir("llama")
    reference = load_runner(path, 0, 4, dtype="float32", kv_cache_bytes=1 << 20, block_size=4)
    model = build_stage(path, 0, 4, "cpu", torch.float32).model
    kv = KVCache(4, reference.num_blocks, 4, model.config.num_kv_heads, model.config.head_dim,
                 torch.float32, "cpu")
    backend = CountingBackend(model)
    assert isinstance(backend, StepBackend)
    custom = StageRunner(backend, kv)
    for runner in (reference, custom):
        out = []
        _, (t,) = runner.step([SeqStep(1, [3, 5, 7, 11], 0, [0, 1], True, admit=True,
                                       sampling=SamplingConfig())], [], None)
        out.append(t.token_id)
        for k in range(4):
            _, (t,) = runner.step([SeqStep(1, [out[-1]], 4 + k, [], True, num_generated=k + 1)],
                                  [], None)
            out.append(t.token_id)
        runner.outputs = out
    assert custom.outputs == reference.outputs
    assert backend.calls[:5] == ["build_metadata", "embed", "forward", "logits", "argmax"]
    assert backend.calls.count("forward") == 5
