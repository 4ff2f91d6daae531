"""Step backends: the implementations of `StepBackend` (base.py) and the one place that
chooses among them (`select_backend`).

    torch_ref.TorchBackend           the model's PyTorch modules: float32 reference, CUDA, --compile
    cpu_kernels.CpuKernelBackend     bf16 CPU stages on the project's AVX512/AMX C++ kernels

May import models, transforms (for the quantized module types) and common; never the worker,
the scheduler or the services' gRPC code. A new backend is a subclass of StepBackend plus a
line here; the runner does not change.
"""
from __future__ import annotations

import logging

from shardline.backends.base import StepBackend
from shardline.backends.cpu_kernels.backend import CpuKernelBackend
from shardline.backends.torch_ref import TorchBackend
from shardline.models.decoder import StageModel

log = logging.getLogger(__name__)

__all__ = ["StepBackend", "CpuKernelBackend", "TorchBackend", "select_backend"]


def select_backend(model: StageModel, *, cpu_kernels: bool = True,
                   compiled: bool = False) -> StepBackend:
    """The backend that runs `model`'s steps: the CPU kernels where they apply and are
    allowed (cpu_kernels) and the stage was not compiled; else the PyTorch reference."""
    if cpu_kernels and not compiled:
        backend = CpuKernelBackend.build(model)
        if backend is not None:
            return backend
        log.info("the CPU kernels do not apply to this stage (CpuKernelBackend.build); "
                 "it runs on the PyTorch reference backend")
    return TorchBackend(model, compiled=compiled)
