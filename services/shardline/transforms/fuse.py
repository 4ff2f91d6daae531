"""Layer fusion as a transform: fewer, larger ops per decoder layer.

    q_proj, k_proj, v_proj  -> qkv_proj  [(H + 2 KV) * head_dim, hidden]   (biases kept)
    gate_proj, up_proj      -> gate_up_proj [2 * intermediate, hidden]
    x + attn; norm(...)     -> add_rms_norm (in-place residual adds)

The model code keeps the paper's names; a fused module is used when present (see
Attention.forward, MLP.forward, DecoderLayer.forward). Fuse before quantizing: per-row
quantization of the concatenated weight equals the concatenation of the per-row ones.

Measured on 2 AVX2 cores, SmolLM2-135M bf16, 30 layers' matmuls at one row: 22 ms unfused,
16 ms fused (see benchmarks/weights.py for whole decode steps).
"""
from __future__ import annotations

import torch
from torch import nn

from shardline.models.layers import Linear


def concat_linears(linears: list[nn.Module]) -> nn.Module:
    """One Linear whose output is the concatenation of `linears`' outputs (quantized modules
    of one kind are concatenated by their own `concat`, as in an optimized checkpoint)."""
    if not isinstance(linears[0], nn.Linear):
        return type(linears[0]).concat(linears)
    weight = torch.cat([m.weight for m in linears], dim=0)
    biases = [m.bias for m in linears]
    has_bias = any(b is not None for b in biases)
    with torch.device("meta"):
        fused = Linear(weight.shape[1], weight.shape[0], bias=has_bias)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        bias = torch.cat([b if b is not None else weight.new_zeros(m.weight.shape[0])
                          for m, b in zip(linears, biases)])
        fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused


def fuse_stage(model: nn.Module) -> nn.Module:
    """Fuse every decoder layer of a StageModel in place; returns it."""
    for layer in model.layers:
        if layer.fused:
            continue
        attn = layer.self_attn
        attn.qkv_proj = concat_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        del attn.q_proj, attn.k_proj, attn.v_proj
        for mlp in layer.mlp.projection_parents():          # the MLP, or each expert
            mlp.gate_up_proj = concat_linears([mlp.gate_proj, mlp.up_proj])
            del mlp.gate_proj, mlp.up_proj
        layer.fused = True
    return model
