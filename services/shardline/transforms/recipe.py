"""Optimized checkpoints: a stage saved after pruning / quantization, and loaded back.

A directory written by `shardline optimize` (tools/optimize.py) holds model.safetensors
(dense tensors under their HF names; a quantized Linear's stored form under its name +
".qweight"/".scale" (int8, fp8) or ".packed"/".scale"/".zero" (int4, two values per byte),
+ ".bias") and RECIPE_FILE, recording what was done. `load_optimized_stage` builds the stage
from it without re-quantizing or re-pruning, to the same outputs as the online transforms.
"""
from __future__ import annotations

import json
import pathlib
from typing import Optional, Union

import torch
from safetensors import safe_open
from torch import nn

from shardline.models.config import ModelConfig
from shardline.models.decoder import StageModel
from shardline.transforms.quantize import QUANTIZED

RECIPE_FILE = "shardline_optimization.json"


def read_recipe(model_dir: Union[str, pathlib.Path]) -> Optional[dict]:
    """The optimization recorded in model_dir, or None for a plain checkpoint."""
    path = pathlib.Path(model_dir) / RECIPE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _ckpt_name(name: str, layer_start: int) -> str:
    """A stage module/parameter name -> its checkpoint name."""
    if name.startswith("layers."):
        _, j, rest = name.split(".", 2)
        return f"model.layers.{layer_start + int(j)}.{rest}"
    if name.startswith("lm_head"):
        return name
    return f"model.{name}"


def stage_tensors(model: StageModel) -> dict[str, torch.Tensor]:
    """The tensors of an unfused (pruned / quantized) stage under checkpoint names."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, tuple(QUANTIZED.values())):
            prefix = _ckpt_name(name, model.layer_start)
            for key, t in mod.state().items():
                out[f"{prefix}.{key}"] = t
            if mod.bias is not None:
                out[f"{prefix}.bias"] = mod.bias
    for name, p in model.named_parameters():            # tied weights once
        out[_ckpt_name(name, model.layer_start)] = p.data
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def load_optimized_stage(model_dir: Union[str, pathlib.Path], config: ModelConfig,
                         layer_start: int, layer_end: int, dtype: torch.dtype,
                         device: Union[str, torch.device], recipe: dict) -> StageModel:
    """Build the stage of an optimized checkpoint: quantized modules from their stored form,
    dense tensors in dtype, all on device."""
    model_dir, device = pathlib.Path(model_dir), torch.device(device)
    mode = recipe.get("quantize", "none")
    with torch.device("meta"):
        model = StageModel(config, layer_start, layer_end)
    with safe_open(str(model_dir / "model.safetensors"), framework="pt", device="cpu") as f:
        keys = set(f.keys())

        def get(name: str, dt: Optional[torch.dtype] = None) -> torch.Tensor:
            t = f.get_tensor(name)
            return t.to(device=device, dtype=dt) if dt else t.to(device)

        if mode != "none":
            cls = QUANTIZED[mode]
            targets = [(name, mod) for name, mod in model.named_modules()
                       if isinstance(mod, nn.Linear)
                       and (name.startswith("layers.") or recipe.get("quantize_head"))]
            for name, mod in targets:
                prefix = _ckpt_name(name, layer_start)
                state = {k.rsplit(".", 1)[1]: get(k) for k in keys
                         if k.rsplit(".", 1)[0] == prefix and not k.endswith(".bias")}
                bias = get(prefix + ".bias", dtype) if prefix + ".bias" in keys else None
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, cls.from_state(state, bias, recipe.get("group_size", 32),
                                                      dtype))
        params = dict(model.named_parameters(remove_duplicate=False))
        share = (model.is_first and model.is_last and config.tie_word_embeddings
                 and "lm_head.weight" in params)
        state = {}
        for name in params:
            src = _ckpt_name(name, layer_start)
            if name == "lm_head.weight" and src not in keys:
                if share:
                    continue
                src = "model.embed_tokens.weight"
            state[name] = get(src, dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if share:
        model.lm_head.weight = model.embed_tokens.weight
    model.requires_grad_(False)
    model.init_rotary(device, dtype)
    return model.eval()
