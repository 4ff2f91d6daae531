"""Weight pruning as a transform: zero weights of the stage's Linear layers.

    --prune 0.5    unstructured: in each output row, the 50% lowest-scoring weights are zeroed
    --prune 2:4    semi-structured: in every 4 consecutive input channels of a row, 2 kept
    --prune-calibration  score = |W| x the L2 norm of each input channel's activations over a
                   few windows of the built-in corpus (activation-aware, as in Wanda);
                   otherwise score = |W| (magnitude)

On CUDA (bf16/fp16, unquantized), 2:4 weights become `to_sparse_semi_structured` tensors
where the GPU supports them (sparse tensor cores); elsewhere pruning trades accuracy for
size only (an optimized checkpoint's zeros compress; the dense kernels do not skip them).
Prune before fusing and quantizing: the patterns are per row, along the input channels.
"""
from __future__ import annotations

import logging
from typing import Optional, Union

import torch
from torch import nn

from shardline.models.decoder import layer_linears
from shardline.transforms.options import PruneSpec, parse_prune
from shardline.transforms.calibration import calibration_norms

log = logging.getLogger(__name__)

def prune_mask(score: torch.Tensor, spec: PruneSpec) -> torch.Tensor:
    """Boolean keep-mask [out, in] of the highest scores: per row (ratio) or per n:m group."""
    out_f, in_f = score.shape
    if isinstance(spec, tuple):
        n, m = spec
        if in_f % m:
            raise ValueError(f"in_features {in_f} is not a multiple of {m}")
        groups = score.reshape(out_f, in_f // m, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
        return keep.view(out_f, in_f)
    num_pruned = int(round(in_f * spec))
    keep = torch.ones_like(score, dtype=torch.bool)
    if num_pruned:
        keep.scatter_(1, score.topk(num_pruned, dim=1, largest=False).indices, False)
    return keep


def prune_linear(m: nn.Linear, spec: PruneSpec,
                 input_norm: Optional[torch.Tensor] = None) -> None:
    """Zero m's pruned weights in place. input_norm: [in] activation norms (calibration)."""
    w = m.weight.data
    score = w.float().abs()
    if input_norm is not None:
        score = score * input_norm.to(score.device, torch.float32)[None, :]
    w.mul_(prune_mask(score, spec).to(w.dtype))


def prune_stage(model: nn.Module, spec: Union[str, PruneSpec, None],
                calibration_dir=None) -> nn.Module:
    """Prune the Linear modules of a StageModel's layers in place (the LM head and embedding
    are kept); returns the model. calibration_dir: the model directory whose tokenizer
    encodes the calibration corpus (activation-aware scores); None: magnitude."""
    if not isinstance(spec, tuple):
        spec = parse_prune(spec)
    if spec is None:
        return model
    norms = calibration_norms(model, calibration_dir) if calibration_dir else {}
    for m in layer_linears(model):
        prune_linear(m, spec, norms.get(m))
    return model


def accelerate_semi_structured(model: nn.Module) -> int:
    """On CUDA, turn 2:4-pruned bf16/fp16 Linear weights into sparse semi-structured tensors;
    returns how many were converted (0 where unsupported)."""
    from torch.sparse import to_sparse_semi_structured
    converted = 0
    for m in layer_linears(model):
        w = m.weight
        if not w.is_cuda or w.dtype not in (torch.bfloat16, torch.float16):
            continue
        try:
            m.weight = nn.Parameter(to_sparse_semi_structured(w.data), requires_grad=False)
            converted += 1
        except (RuntimeError, ValueError) as e:   # GPU or shape not supported
            log.warning("2:4 sparse kernels unavailable (%s); keeping dense weights", e)
            break
    return converted


def sparsity(model: nn.Module) -> float:
    """Fraction of zero weights in the stage's layer Linear modules (dense weights)."""
    zeros = total = 0
    for m in layer_linears(model):
        zeros += (m.weight == 0).sum().item()
        total += m.weight.numel()
    return zeros / max(total, 1)
