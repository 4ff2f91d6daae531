"""Tensor parallelism as a transform (Megatron-style): each of T ranks holds its slice of a
stage's weights (models/parallel.py says which; models/weights.py can read only that) plus the
collectives that make T ranks running the same step compute what one unsharded stage does,
on torch.distributed (gloo on the CPU, NCCL on CUDA):

    embed_tokens  VocabParallelEmbedding: the rank's vocab rows; other ids' rows zero
                  -> all_reduce
    attention     q/k/v column-parallel (the rank's heads; the KV cache holds its KV heads),
                  o_proj row-parallel -> all_reduce of the attention's output
    MLP           gate/up column-parallel, down_proj row-parallel -> all_reduce of its output
    experts       each expert's columns (as an MLP), or the rank's experts (expert parallel)
                  -> all_reduce of the MoE output
    lm_head       VocabParallelHead: the rank's vocab slice of logits -> all_gather -> [S, V]
                  (StageModel.logits soft-caps after it)

    x -> [embed: lookup, all_reduce] -> per layer: norm -> qkv (local heads) -> attention
      -> o_proj (partial) -> all_reduce -> + x -> norm -> gate_up (local) -> down (partial)
      -> all_reduce -> + h ... -> norm -> lm_head (local vocab) -> all_gather -> logits

The sums are forward hooks on the attention and MLP modules (gpt-fast's tp.py does the same),
so fusing and quantizing, which replace the projections inside them, keep them: shard first,
then fuse and quantize (each rank quantizes its own slice). Quantized, a rank holds its slice
of the unsharded stage's quantized weights: int8 and fp8 scales of row-parallel projections come
from the whole rows (`quantize_row_parallel`: one all_reduce of row maxima each), int4 groups
lie inside a rank's columns (`check_int4_groups`), other rows are whole on a rank.

Every rank must run every step with the same inputs, in the same order (collectives pair up by
order); each then holds the same hidden states and logits, so the same sampled tokens (seeded
draws always; unseeded ones when every rank's torch RNG was seeded alike).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from shardline.models.decoder import StageModel, projection_parents
from shardline.models.parallel import shard_spec, slice_stage
from shardline.transforms.quantize import (Fp8Linear, Int8Linear, quantize_fp8,
                                            quantize_int8)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a stage's tensor-parallel group: rank `rank` of `world_size`
    in `group` (None: torch.distributed's default group, initialized by the caller).
    expert_parallel: a MoE's experts whole on one rank each, not sharded (parallel.py)."""
    rank: int
    world_size: int
    group: Optional[Any] = None
    expert_parallel: bool = False

    def check(self) -> None:
        """Raise ValueError unless the process group is initialized and has this rank and
        size."""
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("tensor parallelism needs an initialized torch.distributed process "
                             "group (torch.distributed.init_process_group) on every rank")
        actual = (dist.get_rank(self.group), dist.get_world_size(self.group))
        if actual != (self.rank, self.world_size):
            raise ValueError(f"tensor_parallel=({self.rank}, {self.world_size}), but the process "
                             f"group has this process as rank {actual[0]} of {actual[1]}")


def all_reduce(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum t over the group, in place (bf16 / fp16 summed in float32, then rounded once)."""
    if t.dtype in (torch.bfloat16, torch.float16):
        wide = t.float()
        dist.all_reduce(wide, group=group)
        return t.copy_(wide)
    dist.all_reduce(t, group=group)
    return t


def reduce_output(module: nn.Module, group=None):
    """Sum `module`'s output over the group after every forward: the module ends in a
    row-parallel projection (o_proj, down_proj) or partial expert sums. Returns the hook's
    handle."""
    def hook(_module, _args, out: torch.Tensor) -> torch.Tensor:
        return all_reduce(out, group)
    return module.register_forward_hook(hook)


class VocabParallelEmbedding(nn.Module):
    """The rank's rows [vocab_start, vocab_start + rows) of the embedding: ids outside them
    give zero rows, and the ranks' lookups are summed (each id's row comes from one rank)."""

    def __init__(self, weight: nn.Parameter, vocab_start: int, group=None):
        super().__init__()
        self.weight = weight                    # [local vocab, hidden] (the head's, if tied)
        self.vocab_start = vocab_start
        self.group = group

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        # token_ids: [T] -> [T, hidden]
        local = token_ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x.masked_fill_(outside.unsqueeze(-1), 0)
        return all_reduce(x, self.group)


class VocabParallelHead(nn.Module):
    """The LM head's rows of the rank's vocab slice (`linear`: a Linear or a quantized one),
    its logits gathered from every rank: [S, hidden] -> [S, vocab_size]. Slices are
    `chunk` rows (the last rank's fewer: padded for the gather, cut after it)."""

    def __init__(self, linear: nn.Module, vocab_size: int, chunk: int, world_size: int,
                 group=None):
        super().__init__()
        self.linear = linear
        self.vocab_size, self.chunk, self.world_size = vocab_size, chunk, world_size
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [S, hidden] -> local [S, chunk] -> gathered [S, T * chunk] -> [S, vocab]
        return self.gather(self.linear(x))

    def gather(self, y: torch.Tensor) -> torch.Tensor:
        """This rank's logits [S, its rows] -> every rank's, [S, vocab] (a backend that runs
        the linear itself, the CPU kernels, calls it)."""
        if y.shape[-1] < self.chunk:
            y = F.pad(y, (0, self.chunk - y.shape[-1]))
        parts = [torch.empty_like(y) for _ in range(self.world_size)]
        dist.all_gather(parts, y.contiguous(), group=self.group)
        logits = torch.cat(parts, dim=-1)
        return logits if logits.shape[-1] == self.vocab_size else \
            logits[..., :self.vocab_size].contiguous()


def shard_stage(model: StageModel, tp: TensorParallel) -> StageModel:
    """Make `model` rank tp.rank's part of a tensor-parallel stage, in place: its weights cut
    to the rank's slices (unless the loader read only those: model.shard, which must then be
    the same spec), the sums and the gather above installed. Before fusing and quantizing.
    Raises ValueError where the model does not split across tp.world_size ranks."""
    spec = shard_spec(model.config, model.layer_start, model.layer_end, tp.rank, tp.world_size,
                      tp.expert_parallel)
    if getattr(model, "tensor_parallel", None) is not None:
        raise ValueError("the stage is already tensor-parallel")
    if model.shard is None:
        slice_stage(model, spec)
    elif model.shard != spec:
        raise ValueError(f"the stage holds rank {model.shard.rank} of {model.shard.world_size}'s "
                         f"slices, not rank {tp.rank} of {tp.world_size}'s")
    for layer in model.layers:
        reduce_output(layer.self_attn, tp.group)
        reduce_output(layer.mlp, tp.group)
    if model.embed_tokens is not None:
        model.embed_tokens = VocabParallelEmbedding(model.embed_tokens.weight, spec.vocab[0],
                                                    tp.group)
    if model.lm_head is not None:
        model.lm_head = VocabParallelHead(model.lm_head, model.config.vocab_size,
                                          spec.vocab_chunk, tp.world_size, tp.group)
    model.tensor_parallel = tp
    log.info("tensor-parallel rank %d of %d: %d of %d heads, %d of %d KV heads, vocab rows "
             "[%d, %d)%s", tp.rank, tp.world_size, spec.num_heads, model.config.num_heads,
             spec.num_kv_heads, model.config.num_kv_heads, *spec.vocab,
             f", experts [{spec.experts[0]}, {spec.experts[1]})" if spec.experts[1] else "")
    return model


def check_int4_groups(model: StageModel, group_size: int, include_head: bool = False) -> None:
    """Raise ValueError unless every projection int4 would quantize (the LM head's too with
    include_head) has a multiple of group_size input columns on this rank (row-parallel
    o_proj and down_proj have 1/T of them)."""
    t = model.shard.world_size if model.shard is not None else 1
    names = {id(m): name for name, m in model.named_modules()}
    linears = [child for layer in model.layers for parent in projection_parents(layer)
               for child in parent.children()]
    if include_head and model.lm_head is not None:
        linears.append(getattr(model.lm_head, "linear", model.lm_head))
    for m in linears:
        if isinstance(m, nn.Linear) and m.in_features % group_size:
            name = names[id(m)]
            raise ValueError(f"int4 groups of {group_size} do not divide {name}'s "
                             f"{m.in_features} input columns on each of {t} tensor-parallel "
                             "ranks; choose a tensor parallel size or group size that does")


# the formats whose row-parallel scales come from whole rows: (quantize(w, row_max), module)
ROW_SCALED = {"int8": (quantize_int8, Int8Linear), "fp8": (quantize_fp8, Fp8Linear)}


def quantize_row_parallel(model: StageModel, tp: TensorParallel, mode: str) -> StageModel:
    """int8 or fp8 of the row-parallel projections (o_proj, a dense MLP's down_proj), each
    output row's scale that of the whole row (its maximum over every rank's columns: one
    all_reduce per projection), so that every rank holds its columns of the unsharded stage's
    quantized weights. Before quantize_stage, which leaves them as they are (and checks that
    fp8 runs on the device: this does not). Returns the model."""
    quantize, module = ROW_SCALED[mode]
    row_parallel = [name.rpartition(".")[0] for name, s in model.shard.params.items()
                    if s.dim == 1]
    for name in row_parallel:
        owner, _, leaf = name.rpartition(".")
        parent, m = model.get_submodule(owner), model.get_submodule(name)
        if not isinstance(m, nn.Linear):
            continue
        w = m.weight.detach()
        row_max = w.float().abs().amax(dim=1)
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp.group)
        q, scale = quantize(w, row_max)
        setattr(parent, leaf, module(q, scale, None if m.bias is None else m.bias.detach()))
    return model
