"""Steps of a bfloat16 CPU stage through the project's kernels (csrc/cpu_kernels.cpp).

A decode step computes one token per sequence: a few rows against every weight, bound by
memory bandwidth and per-op overhead. This path runs each layer as one call of the kernels'
StepLayer, which chains

    rms_norm (+ residual add) -> qkv linear -> rope + KV store -> attention
    -> o linear -> rms_norm (+ residual add) -> gate_up linear + silu * up -> down linear

with the residual carried beside the hidden state (its add fused into the next norm), and
weights read as stored: bf16 (in the VNNI-blocked layout the GEMV and the AMX tiles share),
int8 (per channel, as q + 128) or int4 (group 32, the kernel's nibble layout), converted once
here; int8 and int4 kernels quantize the activations to int8 per block of 32 (VNNI).
bf16 layers of more than 4 rows run on AMX tiles, or on AVX512-BF16 register tiles where the
CPU has no AMX. int8 and int4 layers run VNNI tiles up to 16 rows (a 16-sequence decode step
reads the quantized weights once); beyond, they dequantize to bf16 for a GEMM.
Attention: one paged_attention call per layer for every row of the step, decode or prefill,
each row against its own context in the cache (AttentionMetadata.per_row).
It computes what StageModel.forward / .logits compute, within bf16 rounding
(tests/unit/test_cpu_kernels.py). Other dtypes or devices, unfused stages and CPUs without
AVX512-BF16 use StageModel's PyTorch ops.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from shardline.backends.cpu_kernels import build as cpu_kernels
from shardline.models.attention import AttentionMetadata
from shardline.models.layers import Linear
from shardline.transforms.quantize import Int4Linear, Int8Linear, unpack_int4

log = logging.getLogger(__name__)

# Up to StepLinear::QUANT_ROWS (16) rows the int8 and int4 tile kernels run; beyond, weights are
# dequantized to bf16 for a GEMM. bf16 weights take linear_vnni at any row count (GEMV up to 4 rows, AMX or
# AVX512-BF16 register tiles beyond). Measured for SmolLM2-135M's layer matmuls (no head):
#   2 Sapphire Rapids cores: 1 row 9.5 ms (PyTorch 19), 16 rows 11.8 ms (oneDNN packed weights
#   13.7), 512 rows 94 ms (129);
#   2 AMD EPYC Zen 4 cores (no AMX): 1 row 7.0 ms, 16 rows 10.8, 128 rows 67; PyTorch's bf16
#   F.linear with the head's 28 M more weights 19, 29, 102.


def vnni_layout(w: torch.Tensor) -> torch.Tensor:
    """bf16 [n, k] -> [n' / 16, k / 2, 16, 2] for linear_vnni (n' = n rounded up to 32, zero
    rows): per block of 16 outputs, each pair of input channels' 16 x 2 values together, the
    layout AMX takes as its B tile and the GEMV streams without horizontal sums."""
    n, k = w.shape
    padded = -(-n // 32) * 32
    if padded != n:
        w = torch.cat([w, w.new_zeros(padded - n, k)])
    return w.reshape(padded // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def glu_layout(gate_up: torch.Tensor) -> torch.Tensor:
    """A fused gate_up weight [2 I, k] (gate rows, then up rows) as linear_vnni(glu=True)
    takes it: per 32 output rows, 16 gate rows and the 16 up rows of the same channels, so
    each 32-output block it computes yields silu(gate) * up for 16 channels in its epilogue
    (the [T, 2 I] intermediate and the separate silu_mul pass go away)."""
    n, k = gate_up.shape
    inter = n // 2
    return gate_up.view(2, inter // 16, 16, k).transpose(0, 1).reshape(n, k)


def int8_kernel_layout(m: Int8Linear) -> torch.Tensor:
    """uint8 q + 128 (unsigned weights against signed int8 activations: VNNI's dpbusd
    multiplies unsigned by signed bytes), tiled [n' / 16, k / 4, 16, 4] (n' = n rounded up to
    16): per block of 16 outputs and quad of input channels, the 16 outputs' 4 bytes, one
    64-byte vector that dpbusd takes whole."""
    u = (m.qweight.to(torch.int16) + 128).to(torch.uint8)
    n, k = u.shape
    padded = -(-n // 16) * 16
    if padded != n:
        u = torch.cat([u, u.new_full((padded - n, k), 128)])
    return u.reshape(padded // 16, 16, k // 4, 4).permute(0, 2, 1, 3).contiguous()


def int4_kernel_layout(m: Int4Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights uint8 [n' / 16, k / 8, 16, 4], scale and offset float16 [n' / 16, k / 32, 16])
    for linear_int4 (n' = n rounded up to 16): per block of 16 outputs and octet of input
    channels, output o's 4 bytes hold the octet's channels 0..3 in their low nibbles and 4..7 in
    their high nibbles; w = q * scale + offset (offset = zero - 8 * scale)."""
    q = unpack_int4(m.packed)                                          # [n, k] in [0, 15]
    n, k = q.shape
    scale, offset = m.scale.half(), (m.zero - 8 * m.scale).half()     # [n, k / 32]
    padded = -(-n // 16) * 16
    if padded != n:
        q = torch.cat([q, q.new_zeros(padded - n, k)])
        scale = torch.cat([scale, scale.new_zeros(padded - n, k // 32)])
        offset = torch.cat([offset, offset.new_zeros(padded - n, k // 32)])
    octets = q.view(padded, k // 8, 2, 4)
    packed = (octets[:, :, 0] | (octets[:, :, 1] << 4))               # [n', k / 8, 4]
    tiles = packed.view(padded // 16, 16, k // 8, 4).permute(0, 2, 1, 3).contiguous()
    per_block = (lambda t: t.view(padded // 16, 16, k // 32).transpose(1, 2).contiguous())
    return tiles, per_block(scale), per_block(offset)


def _linear(kernels, m: nn.Module):
    """m as a kernels.StepLinear (x [T, in] bf16 -> [T, out]; called with out_f32=True for
    float32): the kernel for m's weight format, quantized layers of more than 4 rows
    dequantized for ATen's GEMM; None when no kernel fits m."""
    # the kernels' own copies of everything they read (never a view of the module's tensors,
    # which release_module_weights frees)
    bias = getattr(m, "bias", None)
    bias = None if bias is None else bias.detach().to(torch.float32, copy=True).contiguous()
    if type(m) in (Linear, nn.Linear) and m.weight.dtype == torch.bfloat16 \
            and m.in_features % 32 == 0:
        return kernels.StepLinear(0, vnni_layout(m.weight.detach()), None, None, bias,
                                  m.out_features)
    if isinstance(m, Int8Linear) and m.in_features % 64 == 0:
        return kernels.StepLinear(1, int8_kernel_layout(m),
                                  m.scale.detach().to(torch.float32, copy=True).contiguous(), None,
                                  bias, m.out_features)
    if isinstance(m, Int4Linear) and m.group_size == 32 and m.in_features % 64 == 0:
        return kernels.StepLinear(2, *int4_kernel_layout(m), bias, m.out_features)
    return None


def _gate_up(kernels, m: nn.Module):
    """The fused gate_up projection; bf16 weights as one linear with the SiLU * up epilogue."""
    if type(m) in (Linear, nn.Linear) and m.weight.dtype == torch.bfloat16 \
            and m.in_features % 32 == 0 and m.out_features % 32 == 0:
        bias = getattr(m, "bias", None)
        if bias is not None:
            bias = glu_layout(bias.detach().float().view(-1, 1)).view(-1).contiguous()
        return kernels.StepLinear(0, vnni_layout(glu_layout(m.weight.detach())), None, None,
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
    """Stands in for a projection whose weights were freed (CpuStepPath.release_module_weights):
    the kernels hold their own copy, and the stage's PyTorch forward no longer runs."""

    def __init__(self, name: str, in_features: int, out_features: int):
        super().__init__()
        self.name, self.in_features, self.out_features = name, in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"{self.name}: its weights were released to the CPU kernels' copy "
                           "(StageRunner.release_module_weights); this stage steps through "
                           "the kernels only")


class CpuStepPath:
    """Built by `build` for a stage it can run; `forward` and `logits` mirror StageModel's."""

    def __init__(self, kernels, model):
        self.k = kernels
        self.model = model
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
    def build(cls, model) -> Optional["CpuStepPath"]:
        """The path for `model` (a StageModel), or None where it does not apply."""
        p = next(model.parameters())
        if p.device.type != "cpu" or p.dtype != torch.bfloat16:
            return None
        cfg = model.config
        if cfg.hidden_size % 32 or cfg.head_dim % 32:
            return None
        if any(layer.self_attn.qkv_proj is None or layer.mlp.gate_up_proj is None
               for layer in model.layers):
            return None                               # the path expects fused projections
        kernels = cpu_kernels.load()
        if kernels is None:
            return None
        path = cls(kernels, model)
        if any(layer is None for layer in path.layers):
            return None
        log.info("steps run on the CPU kernels (AVX512-BF16 / VNNI%s)",
                 ", AMX" if kernels.amx_supported() else "")
        return path

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

    def forward(self, x: torch.Tensor, meta: AttentionMetadata,
                kv_layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """x: [T, hidden] bf16 -> [T, hidden] (StageModel.forward). Each layer is one call;
        attention takes every row against its own context (meta.per_row)."""
        h, residual = x.contiguous(), None
        table, lengths = meta.per_row()
        for layer, (k_cache, v_cache) in zip(self.layers, kv_layers):
            h, residual = layer.forward(h, residual, meta.positions, self.cos, self.sin,
                                        meta.slot_mapping, k_cache, v_cache, table, lengths,
                                        meta.block_size)
        return residual.add_(h)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [S, hidden] -> [S, vocab] float32 (StageModel.logits)."""
        normed = self.k.rms_norm(x.contiguous(), None, self.norm, self.norm_eps)
        if self.head is None:                    # a head the kernels do not take (fp8, ...)
            return self.model.lm_head(normed).float()
        return self.head(normed, True)
