"""`shardline optimize SRC OUT`: write a pruned and/or quantized checkpoint.

OUT holds model.safetensors (dense tensors under their HF names; a quantized Linear's stored
form under its name + ".qweight"/".scale" (int8, fp8) or ".packed"/".scale"/".zero" (int4,
two values per byte), + ".bias"), SRC's config, generation config and tokenizer files, and
shardline_optimization.json recording what was done (transforms/recipe.py). A worker loads
it without re-quantizing or re-pruning, to the same outputs as the online flags.

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

from safetensors.torch import save_file

from shardline.common.dtypes import DEFAULT_DTYPE, DTYPE_NAMES, canonical_dtype
from shardline.common.model_source import resolve_model
from shardline.common.tensors import DTYPES
from shardline.models.config import ModelConfig
from shardline.transforms.recipe import RECIPE_FILE, read_recipe, stage_tensors
from shardline.transforms.stage import StageTransforms, build_stage
from shardline.worker.config import add_weight_args


def optimize(src: Union[str, pathlib.Path], out: Union[str, pathlib.Path], dtype: str,
             quantize: str = "none", group_size: int = 32, quantize_head: bool = False,
             prune: Optional[str] = None, prune_calibration: bool = False) -> pathlib.Path:
    """Write the whole model of src, pruned / quantized (unfused), as a checkpoint in out."""
    src, out = pathlib.Path(src), pathlib.Path(out)
    cfg = ModelConfig.from_dir(src)
    transforms = StageTransforms(fuse=False, quantize=quantize, group_size=group_size,
                                 quantize_head=quantize_head, prune=prune,
                                 prune_calibration=prune_calibration)
    stage = build_stage(src, 0, cfg.num_layers, "cpu", DTYPES[canonical_dtype(dtype)],
                        transforms)
    out.mkdir(parents=True, exist_ok=True)
    tensors = stage_tensors(stage.model)
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
    p = argparse.ArgumentParser(prog="shardline optimize", description=__doc__.split("\n")[0])
    p.add_argument("src", help="model dir, hub id, .gguf, or the default alias")
    p.add_argument("out", help="output directory")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPE_NAMES,
                   help="dtype of the dense tensors (default: %(default)s)")
    # an optimized checkpoint is saved unfused and uncompiled: those are the loader's choice
    add_weight_args(p, ("quantize", "group_size", "quantize_head", "prune", "prune_calibration"))
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
