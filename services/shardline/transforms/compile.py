"""torch.compile as a transform: each decoder layer's dense parts through Inductor.

A compiled stage runs on the PyTorch reference backend (backends/torch_ref.py), which warms
its graphs up on a throwaway step before the worker reports SERVING.
"""
from __future__ import annotations

import torch
from torch import nn


def compile_stage(model: nn.Module) -> nn.Module:
    """torch.compile (dynamic shapes) the dense parts of each decoder layer in place: the
    input RMSNorm and, after attention, the residual add, RMSNorm, SwiGLU MLP and residual add
    (DecoderLayer.post_attention), and the last stage's final norm. Inductor fuses their
    elementwise work (SiLU * up, the norms, the adds) around the matmuls. Attention stays
    eager: its paged addressing changes with every step's plan. Every layer runs the same
    code, so the layers share their compiled graphs (parameters are graph inputs); each
    distinct shape class (one row, several rows) compiles once (the runner warms both up at
    start). Unfused layers compile their norms and MLP as modules."""
    for layer in model.layers:
        layer.input_layernorm.compile(dynamic=True)
        if layer.fused:
            layer.post_attention = torch.compile(layer.post_attention, dynamic=True)
        else:
            layer.post_attention_layernorm.compile(dynamic=True)
            layer.mlp.compile(dynamic=True)
    if model.norm is not None:
        model.norm.compile(dynamic=True)
    return model
