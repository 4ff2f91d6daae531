"""The CPU-kernel step backend: a bfloat16 CPU stage's steps on the project's kernels (csrc/).

A decode step computes one token per sequence: a few rows against every weight, bound by
memory bandwidth and per-op overhead. This backend runs each layer as one call of the kernels'
StepLayer, which chains

    rms_norm (+ residual add) -> qkv linear -> rope + KV store -> attention
    -> o linear -> rms_norm (+ residual add) -> gate_up linear + silu * up -> down linear

with the residual carried beside the hidden state (its add fused into the next norm). Weights
are converted once, at build, into the layout their kernel streams (layouts.py), one
StepLinear per projection, by weight format:

  * bf16 (WeightFormat.BF16, linear_vnni at any row count): up to 4 rows an AVX512-BF16 GEMV;
    more rows AMX tiles (blocks of 16 rows up to 16, of 32 beyond), or AVX512-BF16 register
    tiles on CPUs without AMX. gate_up is interleaved (glu_layout) so that SiLU * up happens in
    the projection's epilogue.
  * int8 (q + 128, per-channel scale) and int4 (group 32): up to 16 rows (a decode step of up
    to 16 sequences reads the weights once) VNNI tile kernels with the activations quantized
    to int8 per group of 32; more rows dequantize the weights, for that call only, into
    linear_vnni's layout and run it.

Attention: one paged-attention call per layer for every row of the step, decode or prefill,
each row against its own context in the cache (AttentionMetadata.per_row); runs of up to 16
rows of one prefill chunk go on AMX tiles where the CPU has them. The backend computes what
the PyTorch reference (models/decoder.py) computes, within bf16 rounding
(tests/unit/test_cpu_kernels.py). Other dtypes or devices, unfused stages, sizes the kernels
do not tile and CPUs without AVX512-BF16 run on the reference backend (backends/torch_ref.py).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from shardline.backends.base import StepBackend
from shardline.backends.cpu_kernels import build as cpu_kernels
from shardline.backends.cpu_kernels.layouts import (glu_layout, int4_kernel_layout,
                                                    int8_kernel_layout, vnni_layout)
from shardline.models.attention import AttentionMetadata
from shardline.models.decoder import StageModel
from shardline.models.kv_cache import KVCache
from shardline.models.layers import Linear
from shardline.transforms.quantize import Int4Linear, Int8Linear

log = logging.getLogger(__name__)

def _linear(kernels, m: nn.Module):
    """m as a kernels.StepLinear (x [T, in] bf16 -> [T, out]; called with out_f32=True for
    float32) in the layout of m's weight format (bf16, int8 or int4); None when no kernel
    fits m."""
    # the kernels' own copies of everything they read (never a view of the module's tensors,
    # which release_module_weights frees)
    bias = getattr(m, "bias", None)
    bias = None if bias is None else bias.detach().to(torch.float32, copy=True).contiguous()
    if type(m) in (Linear, nn.Linear) and m.weight.dtype == torch.bfloat16 \
            and m.in_features % 32 == 0:
        return kernels.StepLinear(kernels.WeightFormat.BF16, vnni_layout(m.weight.detach()), None,
                                  None, bias, m.out_features)
    if isinstance(m, Int8Linear) and m.in_features % 64 == 0:
        return kernels.StepLinear(kernels.WeightFormat.INT8, int8_kernel_layout(m),
                                  m.scale.detach().to(torch.float32, copy=True).contiguous(), None,
                                  bias, m.out_features)
    if isinstance(m, Int4Linear) and m.group_size == 32 and m.in_features % 64 == 0:
        return kernels.StepLinear(kernels.WeightFormat.INT4, *int4_kernel_layout(m), bias,
                                  m.out_features)
    return None


def _gate_up(kernels, m: nn.Module):
    """The fused gate_up projection; bf16 weights as one linear with the SiLU * up epilogue."""
    if type(m) in (Linear, nn.Linear) and m.weight.dtype == torch.bfloat16 \
            and m.in_features % 32 == 0 and m.out_features % 32 == 0:
        bias = getattr(m, "bias", None)
        if bias is not None:
            bias = glu_layout(bias.detach().float().view(-1, 1)).view(-1).contiguous()
        return kernels.StepLinear(kernels.WeightFormat.BF16,
                                  vnni_layout(glu_layout(m.weight.detach())), None, None,
                                  bias, m.out_features, glu=True)
    return _linear(kernels, m)


def _layer(kernels, layer) -> Optional[object]:
    """A decoder layer as a kernels.StepLayer (its whole step in one call), or None when one of
    its projections has no kernel."""
    attn, mlp = layer.self_attn, layer.mlp
    lins = [_linear(kernels, attn.qkv_proj), _linear(kernels, attn.o_proj),
            _gate_up(kernels, mlp.gate_up_proj), _linear(kernels, mlp.down_proj)]
    if any(lin is None for lin in lins):
        return None
    return kernels.StepLayer(layer.input_layernorm.weight.detach().float().contiguous(),
                             layer.post_attention_layernorm.weight.detach().float().contiguous(),
                             layer.input_layernorm.eps, *lins, attn.num_heads, attn.num_kv_heads,
                             attn.scale)


class ReleasedProjection(nn.Module):
    """Stands in for a projection whose weights were freed (CpuKernelBackend.release_module_weights):
    the kernels hold their own copy, and the stage's PyTorch forward no longer runs."""

    def __init__(self, name: str, in_features: int, out_features: int):
        super().__init__()
        self.name, self.in_features, self.out_features = name, in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"{self.name}: its weights were released to the CPU kernels' copy "
                           "(StageRunner.release_module_weights); this stage steps through "
                           "the kernels only")


class CpuKernelBackend(StepBackend):
    """A bf16 CPU stage's steps on the kernels; built by `build` for a stage it can run."""

    name = "cpu-kernels"

    def __init__(self, kernels, model: StageModel):
        super().__init__(model)
        self.kernels = kernels
        self.layers = [_layer(kernels, layer) for layer in model.layers]
        rot = model.rotary
        self.cos = rot.cos.float().contiguous()                       # [max_pos, head_dim]
        self.sin = rot.sin_signed.float().contiguous()
        self.head = None
        if model.is_last:
            self.norm = model.norm.weight.detach().float().contiguous()
            self.norm_eps = model.norm.eps
            self.head = _linear(kernels, model.lm_head)

    @classmethod
    def build(cls, model: StageModel) -> Optional["CpuKernelBackend"]:
        """The backend for `model`, or None where the kernels do not apply: another device or
        dtype, an unfused stage, sizes the kernels do not tile, a CPU without AVX512-BF16."""
        p = next(model.parameters())
        if p.device.type != "cpu" or p.dtype != torch.bfloat16:
            return None
        cfg = model.config
        if cfg.hidden_size % 32 or cfg.head_dim % 32:
            return None
        if cfg.qk_norm:                               # (Qwen3) not in the layer kernel yet
            log.info("the CPU kernels have no q/k norm (%s): this stage runs on the PyTorch "
                     "reference", cfg.model_type)
            return None
        windows = [cfg.window(i) for i in range(model.layer_start, model.layer_end)]
        if any(0 < w < cfg.max_position_embeddings for w in windows):
            log.info("the CPU kernels have no sliding window (%s, window %d): this stage runs "
                     "on the PyTorch reference", cfg.model_type, max(windows))
            return None
        if any(getattr(layer.self_attn, "qkv_proj", None) is None
               or getattr(layer.mlp, "gate_up_proj", None) is None for layer in model.layers):
            return None                               # the kernels take fused projections
        kernels = cpu_kernels.load()
        if kernels is None:
            return None
        backend = cls(kernels, model)
        if any(layer is None for layer in backend.layers):
            return None
        log.info("steps run on the CPU kernels (AVX512-BF16 / VNNI%s)",
                 ", AMX" if kernels.amx_supported() else "")
        return backend

    def release_module_weights(self) -> None:
        """Replace the model's projections, whose weights the kernels hold in their own layout,
        with ReleasedProjection: the model kept a second copy of every layer weight (and of an
        untied head). The embedding, norms and rotary tables stay (the step uses them)."""
        for i, layer in enumerate(self.model.layers):
            for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                                 (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
                m = getattr(parent, name)
                setattr(parent, name, ReleasedProjection(f"layers.{i}.{name}", m.in_features,
                                                         m.out_features))
        head, embed = self.model.lm_head, self.model.embed_tokens
        tied = (head is not None and embed is not None and hasattr(head, "weight")
                and head.weight.data_ptr() == embed.weight.data_ptr())
        if self.head is not None and not tied:
            self.model.lm_head = ReleasedProjection("lm_head", head.in_features, head.out_features)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache) -> torch.Tensor:
        """x: [T, hidden] bf16 -> [T, hidden]. Each layer is one StepLayer call; attention
        takes every row against its own context (meta.per_row)."""
        h, residual = x.contiguous(), None
        table, lengths = meta.per_row()
        for layer, (k_cache, v_cache) in zip(self.layers, kv_cache.layers):
            h, residual = layer.forward(h, residual, meta.positions, self.cos, self.sin,
                                        meta.slot_mapping, k_cache, v_cache, table, lengths,
                                        meta.block_size)
        return residual.add_(h)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [S, hidden] -> [S, vocab] float32."""
        normed = self.kernels.rms_norm(x.contiguous(), None, self.norm, self.norm_eps)
        if self.head is None:                    # a head the kernels do not take (fp8, ...)
            return self.model.lm_head(normed).float()
        return self.head(normed, True)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """argmax_rows (AVX512, torch.argmax's tie and NaN rules) for row-major float32."""
        if logits.dtype == torch.float32 and logits.dim() == 2 and logits.shape[1] > 0:
            return self.kernels.argmax_rows(logits.contiguous())
        return logits.argmax(dim=-1)
