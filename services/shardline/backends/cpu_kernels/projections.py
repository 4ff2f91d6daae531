"""A stage's modules as the kernels' objects: projections as kernels.StepLinear (in the layout of
their weight format), gated MLPs as a gate_up and a down StepLinear, and mixture-of-experts
MLPs (models/moe.py: SparseMoE) as KernelMoE, which CpuKernelBackend runs between a layer's
StepLayer.attention and the next layer. Each function returns None (or raises Unsupported) where
no kernel takes the module; the backend then leaves the stage to the PyTorch reference."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from shardline.backends.cpu_kernels.layouts import (glu_layout, int4_kernel_layout,
                                                    int8_kernel_layout, vnni_layout)
from shardline.models.layers import Linear
from shardline.models.moe import SparseMoE, grouped_experts
from shardline.transforms.quantize import Int4Linear, Int8Linear

# models' MLP.act -> kernels.Activation's name
ACTIVATIONS = {"silu": "SILU", "gelu_tanh": "GELU_TANH"}


class Unsupported(Exception):
    """A module no kernel takes; the message says which and why (logged by the backend)."""


def linear(kernels, m: nn.Module, **options):
    """m as a kernels.StepLinear (x [T, in] bf16 -> [T, out]; called with out_f32=True for
    float32) in the layout of m's weight format (bf16, int8 or int4); None when no kernel
    fits m. options: StepLinear's (act)."""
    # the kernels' own copies of everything they read (never a view of the module's tensors,
    # which release_module_weights frees)
    bias = getattr(m, "bias", None)
    bias = None if bias is None else bias.detach().to(torch.float32, copy=True).contiguous()
    if type(m) in (Linear, nn.Linear) and m.weight.dtype == torch.bfloat16 \
            and m.in_features % 32 == 0:
        return kernels.StepLinear(kernels.WeightFormat.BF16, vnni_layout(m.weight.detach()), None,
                                  None, bias, m.out_features, **options)
    if isinstance(m, Int8Linear) and m.in_features % 64 == 0:
        return kernels.StepLinear(kernels.WeightFormat.INT8, int8_kernel_layout(m),
                                  m.scale.detach().to(torch.float32, copy=True).contiguous(), None,
                                  bias, m.out_features, **options)
    if isinstance(m, Int4Linear) and m.group_size == 32 and m.in_features % 64 == 0:
        return kernels.StepLinear(kernels.WeightFormat.INT4, *int4_kernel_layout(m), bias,
                                  m.out_features, **options)
    return None


def gate_up(kernels, m: nn.Module, act: str = "silu"):
    """The fused gate_up projection [2 I, hidden] with its activation (act: silu or gelu_tanh):
    bf16 weights as one linear with the act(gate) * up epilogue (glu), others as a plain
    StepLinear whose output goes through act_mul (StepLayer.mlp, KernelMLP)."""
    activation = getattr(kernels.Activation, ACTIVATIONS[act])
    if (m.out_features // 2) % 16:
        return None                              # act_mul and glu_layout take 16 channels
    if type(m) in (Linear, nn.Linear) and m.weight.dtype == torch.bfloat16 \
            and m.in_features % 32 == 0 and m.out_features % 32 == 0:
        bias = getattr(m, "bias", None)
        if bias is not None:
            bias = glu_layout(bias.detach().float().view(-1, 1)).view(-1).contiguous()
        return kernels.StepLinear(kernels.WeightFormat.BF16,
                                  vnni_layout(glu_layout(m.weight.detach())), None, None,
                                  bias, m.out_features, glu=True, act=activation)
    return linear(kernels, m, act=activation)


def mlp(kernels, m: nn.Module) -> tuple:
    """A fused gated MLP (models/layers.py: MLP) as (gate_up, down) StepLinears."""
    act = getattr(m, "act", "silu")
    if act not in ACTIVATIONS:
        raise Unsupported(f"no kernel for the MLP activation {act!r}")
    if getattr(m, "gate_up_proj", None) is None:
        raise Unsupported("an unfused MLP (the kernels take gate_up_proj)")
    pair = (gate_up(kernels, m.gate_up_proj, act), linear(kernels, m.down_proj))
    if any(p is None for p in pair):
        raise Unsupported(f"no kernel for an MLP projection "
                          f"({type(m.gate_up_proj).__name__}, {type(m.down_proj).__name__})")
    return pair


class KernelMLP:
    """One expert on the kernels: x [n, hidden] bf16 -> down(act(gate) * up) [n, hidden]."""

    def __init__(self, kernels, m: nn.Module):
        self.kernels = kernels
        self.gate_up, self.down = mlp(kernels, m)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up(x.contiguous())
        if not self.gate_up.glu:                  # the activation after the projection
            gu = self.kernels.act_mul(gu, self.gate_up.act)
        return self.down(gu)


class KernelMoE:
    """A SparseMoE on the kernels: the router as a StepLinear (bf16 logits, as the module's
    Linear gives them), routed by the module's own `route`, and each expert a KernelMLP run
    once on the rows routed to it (models/moe.py: grouped_experts, the module's grouping)."""

    def __init__(self, kernels, moe: SparseMoE):
        self.router = linear(kernels, moe.gate)
        if self.router is None:
            raise Unsupported(f"no kernel for the MoE router ({type(moe.gate).__name__})")
        self.route = moe.route
        # a tensor-parallel rank's other experts stay parallel.AbsentExpert (skipped)
        self.experts = [e if getattr(e, "absent", False) else KernelMLP(kernels, e)
                        for e in moe.experts]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] bf16 (the layer's normed MLP input) -> [T, hidden] bf16."""
        weights, ids = self.route(self.router(x))
        return grouped_experts(x, weights, ids, self.experts)


def layer_mlp(kernels, m: nn.Module) -> tuple[Optional[object], Optional[object],
                                                Optional[KernelMoE]]:
    """(gate_up, down, None) for a dense MLP; (None, None, KernelMoE) for a SparseMoE."""
    if isinstance(m, SparseMoE):
        return None, None, KernelMoE(kernels, m)
    return (*mlp(kernels, m), None)
