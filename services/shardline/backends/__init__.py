"""Step backends: the implementations of `StepBackend` (base.py) and the one place that
chooses among them (`select_backend`).

    torch_ref.TorchBackend           the model's PyTorch modules: float32 reference, CUDA, --compile
    cpu_kernels.CpuKernelBackend     bf16 CPU stages on the project's AVX512/AMX C++ kernels
    gpu.engine.GpuEngineBackend      the GPU engine: fixed-shape buffers, CUDA graphs, paged
                                     Triton kernels, sampling on the device (CUDA's default)

May import models, transforms (for the quantized module types) and common; never the worker,
the scheduler or the services' gRPC code. A new backend is a subclass of StepBackend plus a
line here; the runner does not change.
"""
from __future__ import annotations

import logging

from shardline.backends.base import StepBackend
from shardline.backends.cpu_kernels.backend import CpuKernelBackend
from shardline.backends.gpu.engine import GpuEngineBackend
from shardline.backends.torch_ref import TorchBackend
from shardline.models.decoder import StageModel

log = logging.getLogger(__name__)

__all__ = ["StepBackend", "CpuKernelBackend", "GpuEngineBackend", "TorchBackend",
           "select_backend"]

GPU_ENGINE_MODES = ("auto", "on", "off")


def select_backend(model: StageModel, *, cpu_kernels: bool = True, compiled: bool = False,
                   gpu_engine: str = "auto", **engine_options) -> StepBackend:
    """The backend that runs `model`'s steps: the GPU engine on CUDA (gpu_engine "auto"), or
    anywhere when "on" (on the CPU it runs eagerly: tests); else the CPU kernels where they
    apply and are allowed (cpu_kernels) and the stage was not compiled; else the PyTorch
    reference. A tensor-parallel rank's stage (transforms/shard.py) runs on any of them: the
    engine and the reference through the model's all-reduce hooks, the kernels with theirs.
    engine_options: GpuEngineBackend's (max_num_seqs, max_num_tokens, ...)."""
    if gpu_engine not in GPU_ENGINE_MODES:
        raise ValueError(f"gpu_engine must be one of {GPU_ENGINE_MODES}, got {gpu_engine!r}")
    device = next(model.parameters()).device
    engine = not compiled and (gpu_engine == "on" or (gpu_engine == "auto"
                                                      and device.type == "cuda"))
    if engine and model.config.rope_long_after:
        log.info("LongRoPE switches RoPE tables per sequence, which the GPU engine does not "
                 "read yet: this stage runs on the other backends")
    elif engine:
        return GpuEngineBackend(model, **engine_options)
    if cpu_kernels and not compiled:
        backend = CpuKernelBackend.build(model)
        if backend is not None:
            return backend
        log.info("the CPU kernels do not apply to this stage (CpuKernelBackend.build); "
                 "it runs on the PyTorch reference backend")
    return TorchBackend(model, compiled=compiled)
