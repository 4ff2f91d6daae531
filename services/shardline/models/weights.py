"""Load one stage's weights from an HF safetensors checkpoint (single file or sharded).

Only the tensors of the stage's layers are read, one at a time, straight into the target
dtype and device; the model skeleton is built on the meta device, so the full model is never
materialized. Names map 1:1 to the checkpoint's:

    model.embed_tokens.weight          -> embed_tokens.weight          (first stage)
    model.layers.{layer_start + j}.X   -> layers.{j}.X
    model.norm.weight                  -> norm.weight                  (last stage)
    lm_head.weight                     -> lm_head.weight               (last stage; with tied
                                          embeddings: model.embed_tokens.weight)

Mixtral's expert names map onto the project's (Qwen3-MoE's): block_sparse_moe.gate -> mlp.gate,
block_sparse_moe.experts.{e}.w1 / w3 / w2 -> mlp.experts.{e}.gate_proj / up_proj / down_proj.
Gemma's RMSNorm weights w (applied as 1 + w) are stored as 1 + w, so every backend's norm
is the plain one.

Tensor parallelism: given a rank's parallel.ShardSpec, the skeleton is cut to the rank's shapes
first (parallel.slice_stage, on the meta device) and each sharded tensor is read as its slice
only (safetensors' get_slice), the embedding and LM head included: no rank reads a whole
sharded weight.
"""
from __future__ import annotations

import json
import logging
import pathlib
import time
import zlib
from collections import defaultdict
from typing import Optional, Union

import torch
from safetensors import safe_open

from shardline.models.decoder import StageModel
from shardline.models.config import ModelConfig
from shardline.models.parallel import Shard, ShardSpec, slice_stage

log = logging.getLogger(__name__)


def checkpoint_names(model: StageModel) -> dict[str, str]:
    """The stage's parameter names -> the checkpoint tensor each is loaded from."""
    cfg, start = model.config, model.layer_start
    names = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        if name.startswith("layers."):
            _, j, rest = name.split(".", 2)
            if cfg.model_type == "mixtral" and rest.startswith("mlp."):
                rest = _mixtral_name(rest)
            names[name] = f"model.layers.{start + int(j)}.{rest}"
        elif name == "lm_head.weight":
            names[name] = "model.embed_tokens.weight" if cfg.tie_word_embeddings else name
        else:
            names[name] = f"model.{name}"
    return names


_MIXTRAL_EXPERT = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _mixtral_name(rest: str) -> str:
    """mlp.gate.weight -> block_sparse_moe.gate.weight; mlp.experts.3.up_proj.weight ->
    block_sparse_moe.experts.3.w3.weight."""
    parts = rest.split(".")
    parts[0] = "block_sparse_moe"
    if parts[1] == "experts":
        parts[3] = _MIXTRAL_EXPERT[parts[3]]
    return ".".join(parts)


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def _tensor_files(model_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Checkpoint tensor name -> the safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    where = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                where[name] = path
    return where


# A checkpoint directory with this file instead of weights: random weights made on the device
# ({"seed": 0, "std": 0.02}), for benchmarks of shapes too large to carry (benchmarks/gpu_check.py)
RANDOM_WEIGHTS_FILE = "shardline_random_weights.json"


def random_stage_model(config: ModelConfig, layer_start: int, layer_end: int,
                       dtype: torch.dtype, device: torch.device, seed: int = 0,
                       std: float = 0.02, shard: Optional[ShardSpec] = None) -> StageModel:
    """StageModel with normal(0, std) weights (norms 1) made directly on the device. Each
    tensor's generator is seeded by (seed, its checkpoint name), so a layer gets the same
    weights whichever stage holds it: PP=2 serves the same model as PP=1. With a
    tensor-parallel `shard`, the rank's slices of those weights: a sharded tensor is made
    whole, one at a time, and cut (the stage is never held whole)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)                   # made in dtype: no float32 copy first
    try:
        with torch.device(device if shard is None else "meta"):
            model = StageModel(config, layer_start, layer_end)
    finally:
        torch.set_default_dtype(default)
    slices = {}
    if shard is not None:
        slices = {name: (shard.params[name], p.shape) for name, p in model.named_parameters()
                  if name in shard.params}
        slice_stage(model, shard).to_empty(device=device)
    gen = torch.Generator(device=device)
    for name, src in checkpoint_names(model).items():
        param = model.get_parameter(name)
        if "norm" in name:
            param.data.fill_(1.0)
            continue
        gen.manual_seed(seed * 1_000_003 + zlib.crc32(src.encode()))
        if name in slices:
            cut, shape = slices[name]
            whole = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std,
                                                                           generator=gen)
            param.data.copy_(cut.take(whole))
            continue
        param.data.normal_(0.0, std, generator=gen)
    if model.is_first and model.is_last and config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.requires_grad_(False)
    model.init_rotary(device, dtype)
    return model.eval()


def _fused_part(src: str, config: ModelConfig):
    """Where a separate projection lives in a checkpoint that stores it fused (Phi-3:
    self_attn.qkv_proj = q; k; v rows, mlp.gate_up_proj = gate; up rows): (fused tensor name,
    first row, end row), or None."""
    prefix, _, leaf = src.rpartition(".")
    prefix, _, proj = prefix.rpartition(".")
    if leaf != "weight":
        return None
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    inter = config.intermediate_size
    rows = {"q_proj": ("qkv_proj", 0, q), "k_proj": ("qkv_proj", q, q + kv),
            "v_proj": ("qkv_proj", q + kv, q + 2 * kv), "gate_proj": ("gate_up_proj", 0, inter),
            "up_proj": ("gate_up_proj", inter, 2 * inter)}.get(proj)
    if rows is None:
        return None
    return f"{prefix}.{rows[0]}.weight", rows[1], rows[2]


def _read(f, src: str, part: Optional[tuple[str, int, int]],
          shard: Optional[Shard]) -> torch.Tensor:
    """Checkpoint tensor src from the open file f: whole, or the rows `part` of a fused tensor
    holds (_fused_part), and of those only `shard`'s slice where given."""
    if part is None and shard is None:
        return f.get_tensor(src)
    sliced = f.get_slice(part[0] if part else src)
    start, end = (part[1], part[2]) if part else (0, sliced.get_shape()[0])
    if shard is None:
        return sliced[start:end]
    if shard.dim == 0:
        return sliced[start + shard.start:start + shard.end]
    return sliced[start:end, shard.start:shard.end]


def load_stage_model(model_dir: Union[str, pathlib.Path], config: ModelConfig,
                     layer_start: int, layer_end: int, dtype: torch.dtype,
                     device: Union[str, torch.device],
                     shard: Optional[ShardSpec] = None) -> StageModel:
    """Build StageModel(config, layer_start, layer_end) with its weights in dtype on device
    (random ones where the directory holds RANDOM_WEIGHTS_FILE instead of weights); with a
    tensor-parallel `shard` (parallel.shard_spec), only that rank's slices, read as slices
    (random weights: each made whole, then cut)."""
    t0 = time.perf_counter()
    model_dir = pathlib.Path(model_dir)
    device = torch.device(device)
    random_spec = model_dir / RANDOM_WEIGHTS_FILE
    if random_spec.exists():
        spec = json.loads(random_spec.read_text())
        model = random_stage_model(config, layer_start, layer_end, dtype, device,
                                   int(spec.get("seed", 0)), float(spec.get("std", 0.02)), shard)
        log.info("random weights (%s) for layers [%d, %d) in %.1fs", spec, layer_start,
                 layer_end, time.perf_counter() - t0)
        return model
    with torch.device("meta"):
        model = StageModel(config, layer_start, layer_end)
    if shard is not None:
        slice_stage(model, shard)
    slices = {} if shard is None else shard.params
    names = checkpoint_names(model)
    share_embedding = model.is_first and model.is_last and config.tie_word_embeddings
    if share_embedding:
        names.pop("lm_head.weight")
    where = _tensor_files(model_dir)
    prefix = config.extra.get("weight_prefix", "")    # Gemma 3 multimodal: language_model.
    if prefix:
        names = {name: prefix + src for name, src in names.items()}
    parts = {src: part for src in names.values() if src not in where
             for part in [_fused_part(src, config)] if part and part[0] in where}
    missing = sorted(src for src in names.values() if src not in where and src not in parts)
    if missing:
        raise KeyError(f"checkpoint {model_dir} lacks {missing[:5]}"
                       f"{' ...' if len(missing) > 5 else ''}")

    by_file: dict[pathlib.Path, list[tuple[str, str]]] = defaultdict(list)
    for name, src in names.items():
        by_file[where[parts[src][0] if src in parts else src]].append((name, src))
    state = {}
    for path, pairs in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name, src in pairs:
                tensor = _read(f, src, parts.get(src), slices.get(name))
                if config.norm_offset and _is_norm(name):        # Gemma: 1 + w
                    tensor = tensor.float() + config.norm_offset
                state[name] = tensor.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=not share_embedding, assign=True)
    if share_embedding:
        model.lm_head.weight = model.embed_tokens.weight
    model.requires_grad_(False)
    model.init_rotary(device, dtype)
    model.eval()
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    log.info("loaded layers [%d, %d) (%d tensors, %.0f MiB) in %.1fs", layer_start, layer_end,
             len(state), nbytes / 2**20, time.perf_counter() - t0)
    return model
