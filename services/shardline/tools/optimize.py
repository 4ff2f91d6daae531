"""`shardline optimize SRC OUT`: write a pruned and/or quantized checkpoint.

OUT holds model.safetensors (dense tensors under their HF names; a quantized Linear's stored
form under its name + ".qweight"/".scale" (int8, fp8) or ".packed"/".scale"/".zero" (int4,
two values per byte), + ".bias"), SRC's config, generation config and tokenizer files, and
shardline_optimization.json recording what was done. StageRunner loads it without
re-quantizing or re-pruning (`load_optimized_stage`), to the same outputs as the online flags.

    shardline optimize smollm2-135m-instruct /tmp/smol-int4 --quantize int4
    shardline up --model /tmp/smol-int4
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from shardline.models.decoder import StageModel
from shardline.models.config import ModelConfig
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


def optimize(src: Union[str, pathlib.Path], out: Union[str, pathlib.Path], dtype: str,
             quantize: str = "none", group_size: int = 32, quantize_head: bool = False,
             prune: Optional[str] = None, prune_calibration: bool = False) -> pathlib.Path:
    from shardline.worker.runner import StageRunner

    src, out = pathlib.Path(src), pathlib.Path(out)
    cfg = ModelConfig.from_dir(src)
    runner = StageRunner(src, 0, cfg.num_layers, dtype=dtype, kv_cache_bytes=1 << 20,
                         block_size=1, fuse=False, quantize=quantize, group_size=group_size,
                         quantize_head=quantize_head, prune=prune,
                         prune_calibration=prune_calibration)
    out.mkdir(parents=True, exist_ok=True)
    tensors = stage_tensors(runner.model)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for path in src.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") \
                and path.name != "model.safetensors.index.json":
            shutil.copy2(path, out / path.name)
    recipe = dict(source=str(src), dtype=dtype, quantize=quantize, group_size=group_size,
                  quantize_head=quantize_head, prune=prune, prune_calibration=prune_calibration,
                  weight_bytes=sum(t.numel() * t.element_size() for t in tensors.values()))
    (out / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
    return out


def main(argv: list[str]) -> int:
    from shardline.worker.config import add_weight_args
    from shardline.common.model_source import resolve_model

    p = argparse.ArgumentParser(prog="shardline optimize", description=__doc__.split("\n")[0])
    p.add_argument("src", help="model dir, hub id, .gguf, or the default alias")
    p.add_argument("out", help="output directory")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the dense tensors")
    add_weight_args(p)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    out = optimize(resolve_model(a.src), a.out, a.dtype, a.quantize, a.group_size,
                   a.quantize_head, a.prune, a.prune_calibration)
    recipe = read_recipe(out)
    print(f"wrote {out} ({recipe['weight_bytes'] / 2**20:.1f} MiB of weights, "
          f"quantize={a.quantize} prune={a.prune}) in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
