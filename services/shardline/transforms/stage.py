"""`build_stage`: load a stage's layers and apply the weight transforms, in one order.

    load (safetensors, or an optimized checkpoint) -> prune -> fuse -> 2:4 sparse kernels
    (CUDA) -> quantize -> compile

A tensor-parallel rank (shard.py) loads only its slices, then gets its collectives, before
fusing and quantizing: load (its slices) -> shard -> fuse -> quantize.

Each transform is a plain function on the loaded StageModel (fuse.py, prune.py,
quantize.py, compile.py); `StageTransforms` (options.py) names which ones a stage gets. An optimized
checkpoint (recipe.py) is already pruned and quantized: only fusing and compiling apply.
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Optional, Union

import torch

from shardline.models.config import ModelConfig
from shardline.models.decoder import StageModel
from shardline.models.parallel import shard_spec
from shardline.models.weights import load_stage_model
from shardline.transforms.compile import compile_stage
from shardline.transforms.fuse import fuse_stage
from shardline.transforms.options import StageTransforms
from shardline.transforms.prune import accelerate_semi_structured, prune_stage
from shardline.transforms.recipe import load_optimized_stage, read_recipe
from shardline.transforms.quantize import quantize_stage, require_fp8
from shardline.transforms.shard import (ROW_SCALED, TensorParallel, check_int4_groups,
                                        quantize_row_parallel, shard_stage)


@dataclass
class BuiltStage:
    """A loaded, transformed stage and what was done to it."""
    model: StageModel
    quantization: str                   # none | int8 | int4 | fp8, as served
    compiled: bool


def _tensor_parallel_stage(model_dir, config: ModelConfig, layer_start: int, layer_end: int,
                           dtype: torch.dtype, device, t: StageTransforms,
                           tp: TensorParallel) -> StageModel:
    """Rank tp.rank's slices of the stage, loaded as slices, with its collectives. Raises
    ValueError for what this does not split: T not dividing the model, optimized
    checkpoints, pruning, torch.compile; and with no process group of tp's rank and size."""
    spec = shard_spec(config, layer_start, layer_end, tp.rank, tp.world_size,
                      tp.expert_parallel)
    refused = [what for what, on in (("an optimized checkpoint", read_recipe(model_dir)),
                                     ("pruning", t.prune), ("torch.compile", t.torch_compile))
               if on]
    if refused:
        raise ValueError(f"tensor parallelism does not take {', '.join(refused)} yet")
    tp.check()
    if t.quantize == "fp8":
        require_fp8(device)
    model = load_stage_model(model_dir, config, layer_start, layer_end, dtype, device, spec)
    return shard_stage(model, tp)


def build_stage(model_dir: Union[str, pathlib.Path], layer_start: int, layer_end: int,
                device: Union[str, torch.device], dtype: torch.dtype,
                transforms: StageTransforms = StageTransforms(),
                tensor_parallel: Optional[TensorParallel] = None) -> BuiltStage:
    """Layers [layer_start, layer_end) of the checkpoint in model_dir, in dtype on device,
    with `transforms` applied; with tensor_parallel, only that rank's part (shard.py), on
    its process group."""
    config = ModelConfig.from_dir(model_dir)
    recipe = read_recipe(model_dir)
    t = transforms
    if tensor_parallel is not None:
        model = _tensor_parallel_stage(model_dir, config, layer_start, layer_end, dtype,
                                       device, t, tensor_parallel)
        if t.fuse:
            fuse_stage(model)
        if t.quantize == "int4":
            check_int4_groups(model, t.group_size, t.quantize_head)
        elif t.quantize in ROW_SCALED:
            quantize_row_parallel(model, tensor_parallel, t.quantize)
        quantize_stage(model, t.quantize, t.group_size, t.quantize_head)
        return BuiltStage(model, t.quantize, False)
    if recipe is not None:              # an optimized checkpoint: already pruned / quantized
        model = load_optimized_stage(model_dir, config, layer_start, layer_end, dtype, device,
                                     recipe)
        quantization, prune = recipe.get("quantize", "none"), None
    else:
        model = load_stage_model(model_dir, config, layer_start, layer_end, dtype, device)
        quantization, prune = t.quantize, t.prune
        prune_stage(model, prune, model_dir if t.prune_calibration else None)
    if t.fuse:
        fuse_stage(model)
    if prune == "2:4" and quantization == "none" and torch.device(device).type == "cuda":
        accelerate_semi_structured(model)
    if recipe is None:
        quantize_stage(model, t.quantize, t.group_size, t.quantize_head)
    if t.torch_compile:
        compile_stage(model)
    return BuiltStage(model, quantization, t.torch_compile)
