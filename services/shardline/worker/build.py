"""Building a stage's runner: load + transforms (transforms.stage.build_stage), the backend
(backends.select_backend), a KV cache sized from the memory budget, then StageRunner.

    load_runner(model_dir, 0, 30, dtype="bfloat16", quantize="int8")
    load_runner(model_dir, 0, 30, tensor_parallel=(rank, 2))   # rank's half, on its process group

Process-wide settings (torch threads, the heap's malloc tuning) are the worker process's
(worker/server.py), not a runner's.
"""
from __future__ import annotations

import logging
import pathlib
from typing import Optional, Union

import torch

from shardline.backends import select_backend
from shardline.common.dtypes import DEFAULT_DTYPE, canonical_dtype
from shardline.common.tensors import DTYPES
from shardline.models.kv_cache import KVCache
from shardline.transforms.options import StageTransforms
from shardline.transforms.shard import TensorParallel
from shardline.transforms.stage import build_stage
from shardline.worker.config import (DEFAULT_BLOCK_SIZE, DEFAULT_CPU_KV_CACHE_BYTES,
                                     DEFAULT_CUDA_KV_CACHE_FRACTION)
from shardline.worker.runner import StageRunner

log = logging.getLogger(__name__)


def as_torch_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """A dtype name, alias or torch dtype -> the torch dtype (one of common.dtypes')."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype}")
        return dtype
    return DTYPES[canonical_dtype(dtype)]


def kv_cache_budget(device: torch.device, kv_cache_bytes: Optional[int],
                    kv_cache_fraction: float) -> int:
    """Bytes for the KV cache: the explicit budget, else a fraction of the free memory on
    CUDA (measured after the weights are loaded), else the CPU default."""
    if kv_cache_bytes is not None:
        return kv_cache_bytes
    if device.type == "cuda":
        if not 0 < kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {kv_cache_fraction}")
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * kv_cache_fraction)
    return DEFAULT_CPU_KV_CACHE_BYTES


def load_runner(model_dir: Union[str, pathlib.Path], layer_start: int, layer_end: int, *,
                device: Union[str, torch.device] = "cpu",
                dtype: Union[str, torch.dtype] = DEFAULT_DTYPE,
                kv_cache_bytes: Optional[int] = None,
                kv_cache_fraction: float = DEFAULT_CUDA_KV_CACHE_FRACTION,
                block_size: int = DEFAULT_BLOCK_SIZE, cpu_kernels: bool = True,
                gpu_engine: str = "auto", engine_options: Optional[dict] = None,
                tensor_parallel: Optional[tuple[int, int]] = None, tensor_parallel_group=None,
                expert_parallel: bool = False,
                **transforms) -> StageRunner:
    """A runner for layers [layer_start, layer_end) of the checkpoint in model_dir.
    transforms: the fields of transforms.options.StageTransforms (fuse, quantize, group_size,
    quantize_head, prune, prune_calibration, torch_compile). cpu_kernels: let bf16 CPU stages
    run on the CPU-kernel backend where it applies. gpu_engine: "auto" (the GPU engine on
    CUDA), "on" (anywhere; eager on the CPU) or "off"; engine_options: GpuEngineBackend's
    (max_num_seqs, max_num_tokens, max_model_len, attention, cuda_graphs).

    tensor_parallel=(rank, T): build rank `rank`'s part of a stage split across T ranks
    (transforms/shard.py): its slices of the weights only, a KV cache of its KV heads, the
    collectives inside the model's forward, on `tensor_parallel_group` (None: the default
    group), which the caller has initialized (torch.distributed.init_process_group) on every
    rank. Every rank must then call `step` with the same arguments; each returns the same
    hidden states and sampled tokens. expert_parallel: a MoE's experts whole on one rank each
    instead of every expert sharded across the ranks."""
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = as_torch_dtype(dtype)
    tp = None
    if tensor_parallel is not None:
        tp = TensorParallel(*tensor_parallel, group=tensor_parallel_group,
                            expert_parallel=expert_parallel)
    stage = build_stage(model_dir, layer_start, layer_end, device, dtype,
                        StageTransforms(**transforms), tp)
    backend = select_backend(stage.model, cpu_kernels=cpu_kernels, compiled=stage.compiled,
                             gpu_engine=gpu_engine,
                             **dict(engine_options or {}, block_size=block_size))
    kv_cache = _kv_cache(stage.model, device, dtype, block_size,
                         kv_cache_budget(device, kv_cache_bytes, kv_cache_fraction),
                         backend.scratch_blocks)
    runner = StageRunner(backend, kv_cache, stage.quantization)
    log.info("stage [%d, %d): %d KV blocks of %d tokens (%.0f MiB) on %s in %s, %s backend",
             layer_start, layer_end, kv_cache.num_blocks, block_size, kv_cache.nbytes / 2**20,
             device, runner.dtype_name, backend.name)
    if backend.needs_warm_up:
        runner.warm_up()
    return runner


def _kv_cache(model, device: torch.device, dtype: torch.dtype, block_size: int,
              budget: int, scratch_blocks: int = 0) -> KVCache:
    """The stage's KV cache in `budget` bytes, of the KV heads it holds (a tensor-parallel
    rank's own)."""
    cfg, num_local = model.config, len(model.layers)
    kv_heads = cfg.num_kv_heads if model.shard is None else model.shard.num_kv_heads
    num_blocks = KVCache.num_blocks_for_budget(budget, num_local, block_size, kv_heads,
                                               cfg.head_dim, dtype)
    if num_blocks < 1:
        need = KVCache.bytes_per_block(num_local, block_size, kv_heads, cfg.head_dim, dtype)
        raise ValueError(f"KV cache budget of {budget} bytes holds no block ({need} bytes each)")
    num_blocks -= scratch_blocks                 # the backend's own come out of the budget
    if num_blocks < 1:
        raise ValueError(f"KV cache budget of {budget} bytes holds no block besides the "
                         f"backend's {scratch_blocks} scratch block(s)")
    return KVCache(num_local, num_blocks, block_size, kv_heads, cfg.head_dim, dtype, device,
                   scratch_blocks)
