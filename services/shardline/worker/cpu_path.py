"""Steps of a bfloat16 CPU stage through the project's kernels (csrc/cpu_kernels.cpp).

A decode step computes one token per sequence: a few rows against every weight, bound by
memory bandwidth and per-op overhead. This path runs each layer in about seven calls

    rms_norm (+ residual add) -> qkv linear -> rope + KV store -> attention
    -> o linear -> rms_norm (+ residual add) -> gate_up linear -> silu * up -> down linear

with the residual carried beside the hidden state (its add fused into the next norm), and
weights read as stored: bf16 (in the VNNI-blocked layout the GEMV and the AMX tiles share),
int8 (per channel, as q + 128) or int4 (group 32, the kernel's nibble layout), converted once
here; int8 and int4 kernels quantize the activations to int8 per block of 32 (VNNI).
bf16 layers of more than 4 rows run on AMX tiles, or on AVX512-BF16 register tiles where the
CPU has no AMX. Quantized layers of more than GEMV_ROWS rows dequantize to bf16 for a GEMM.
Attention: one paged_attention call per layer for every row of the step, decode or prefill,
each row against its own context in the cache (AttentionMetadata.per_row).
It computes what StageModel.forward / .logits compute, within bf16 rounding
(tests/unit/test_cpu_kernels.py). Other dtypes or devices, unfused stages and CPUs without
AVX512-BF16 use StageModel's PyTorch ops.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from shardline.worker import cpu_kernels
from shardline.worker.attention import AttentionMetadata
from shardline.worker.layers import Linear
from shardline.worker.quantize import Int4Linear, Int8Linear, unpack_int4

log = logging.getLogger(__name__)

# Up to this many rows the int8 / int4 GEMV kernels run; beyond, weights are dequantized to
# bf16 for a GEMM. bf16 weights take linear_vnni at any row count (GEMV up to 4 rows, AMX or
# AVX512-BF16 register tiles beyond). Measured for SmolLM2-135M's layer matmuls (no head):
#   2 Sapphire Rapids cores: 1 row 9.5 ms (PyTorch 19), 16 rows 11.8 ms (oneDNN packed weights
#   13.7), 512 rows 94 ms (129);
#   2 AMD EPYC Zen 4 cores (no AMX): 1 row 8.2 ms, 16 rows 13.9, 128 rows 71; PyTorch's bf16
#   F.linear with the head's 28 M more weights 27, 38, 111.
GEMV_ROWS = 4

LinearFn = Callable[[torch.Tensor], torch.Tensor]


def vnni_layout(w: torch.Tensor) -> torch.Tensor:
    """bf16 [n, k] -> [n' / 16, k / 2, 16, 2] for linear_vnni (n' = n rounded up to 32, zero
    rows): per block of 16 outputs, each pair of input channels' 16 x 2 values together, the
    layout AMX takes as its B tile and the GEMV streams without horizontal sums."""
    n, k = w.shape
    padded = -(-n // 32) * 32
    if padded != n:
        w = torch.cat([w, w.new_zeros(padded - n, k)])
    return w.reshape(padded // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def int8_kernel_layout(m: Int8Linear) -> torch.Tensor:
    """uint8 [n, k] = q + 128 for linear_int8: unsigned weights against signed int8
    activations (VNNI's dpbusd multiplies unsigned by signed bytes)."""
    return (m.qweight.to(torch.int16) + 128).to(torch.uint8).contiguous()


def int4_kernel_layout(m: Int4Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [n, k/2], scale float16 [n, k/32], offset float16 [n, k/32]) for
    linear_int4: per chunk of 64 channels, byte i = channel i | channel 32 + i << 4, and
    w = q * scale + offset (offset = zero - 8 * scale)."""
    q = unpack_int4(m.packed)                                          # [n, k] in [0, 15]
    n, k = q.shape
    chunks = q.view(n, k // 64, 2, 32)
    packed = (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
    return packed, m.scale.half().contiguous(), (m.zero - 8 * m.scale).half().contiguous()


def _linear_fn(kernels, m: nn.Module, out_f32: bool = False) -> Optional[LinearFn]:
    """x [T, in] bf16 -> [T, out] (float32 with out_f32, else bf16): the kernel for m's
    weight format (quantized: up to GEMV_ROWS rows, dequantized beyond); None when no kernel
    fits m."""
    bias = getattr(m, "bias", None)
    bias = None if bias is None else bias.detach().float().contiguous()
    if type(m) in (Linear, nn.Linear) and m.weight.dtype == torch.bfloat16 \
            and m.in_features % 32 == 0:
        w, n = vnni_layout(m.weight.detach()), m.out_features
        return lambda x: kernels.linear_vnni(x, w, n, bias, out_f32)     # any number of rows
    elif isinstance(m, Int8Linear) and m.in_features % 64 == 0:
        u, s = int8_kernel_layout(m), m.scale.float().contiguous()
        gemv = lambda x: kernels.linear_int8(x, u, s, bias)              # noqa: E731
        many = _dequantized(m, lambda: kernels.dequantize_int8(u, s))
    elif isinstance(m, Int4Linear) and m.group_size == 32 and m.in_features % 64 == 0:
        packed, scale, offset = int4_kernel_layout(m)
        gemv = lambda x: kernels.linear_int4(x, packed, scale, offset, bias)  # noqa: E731
        many = _dequantized(m, lambda: kernels.dequantize_int4(packed, scale, offset))
    else:
        return None

    def fn(x: torch.Tensor) -> torch.Tensor:
        y = gemv(x) if x.shape[0] <= GEMV_ROWS else many(x)
        return y.float() if out_f32 else y
    return fn


def _dequantized(m: nn.Module, weight: Callable[[], torch.Tensor]) -> LinearFn:
    """Quantized weights for many rows (prefill): dequantized to a transient bf16 weight per call
    (about 1 ms per 100 MB), then oneDNN's GEMM; PyTorch's int8 / int4 CPU kernels take
    200+ ms for a 128-token prompt of SmolLM2 against about 50 ms this way."""
    bias = None if m.bias is None else m.bias.detach().to(torch.bfloat16)
    return lambda x: F.linear(x, weight(), bias)


class _Layer:
    def __init__(self, kernels, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.in_norm = layer.input_layernorm.weight.detach().float().contiguous()
        self.post_norm = layer.post_attention_layernorm.weight.detach().float().contiguous()
        self.eps = layer.input_layernorm.eps
        self.fns = [_linear_fn(kernels, m) for m in
                    (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        self.heads, self.kv_heads, self.scale = attn.num_heads, attn.num_kv_heads, attn.scale


class CpuStepPath:
    """Built by `build` for a stage it can run; `forward` and `logits` mirror StageModel's."""

    def __init__(self, kernels, model):
        self.k = kernels
        self.model = model
        self.layers = [_Layer(kernels, layer) for layer in model.layers]
        rot = model.rotary
        self.cos = rot.cos.float().contiguous()                       # [max_pos, head_dim]
        self.sin = rot.sin_signed.float().contiguous()
        self.head: Optional[LinearFn] = None
        if model.is_last:
            self.norm = model.norm.weight.detach().float().contiguous()
            self.norm_eps = model.norm.eps
            self.head = _linear_fn(kernels, model.lm_head, out_f32=True) or model.lm_head

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
        if any(fn is None for layer in path.layers for fn in layer.fns):
            return None
        log.info("steps run on the CPU kernels (AVX512-BF16 / VNNI%s)",
                 ", AMX" if kernels.amx_supported() else "")
        return path

    def forward(self, x: torch.Tensor, meta: AttentionMetadata,
                kv_layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """x: [T, hidden] bf16 -> [T, hidden] (StageModel.forward)."""
        k = self.k
        h, residual = x.contiguous(), None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_layers):
            qkv_fn, o_fn, gate_up_fn, down_fn = layer.fns
            if residual is None:
                residual = h.clone()
                normed = k.rms_norm(h, None, layer.in_norm, layer.eps)
            else:
                normed = k.rms_norm(h, residual, layer.in_norm, layer.eps)  # residual += h
            qkv = qkv_fn(normed)                                 # [T, (H + 2 KV) * hd]
            k.rope_store_kv(qkv, meta.positions, self.cos, self.sin, meta.slot_mapping,
                            k_cache, v_cache, layer.heads, layer.kv_heads)
            o = self._attention(qkv, meta, k_cache, v_cache, layer)   # [T, H * hd]
            normed = k.rms_norm(o_fn(o), residual, layer.post_norm, layer.eps)
            h = down_fn(k.silu_mul(gate_up_fn(normed)))
        return residual.add_(h)

    def _attention(self, qkv: torch.Tensor, meta: AttentionMetadata, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, layer: _Layer) -> torch.Tensor:
        """qkv after rope (this step's K / V already in the cache) -> [T, H * hd]: every row,
        decode or prefill, against its own context through the cache."""
        table, lengths = meta.per_row()
        return self.k.paged_attention(qkv, k_cache, v_cache, table, lengths,
                                      meta.block_size,
                                      layer.heads, layer.scale)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [S, hidden] -> [S, vocab] float32 (StageModel.logits)."""
        normed = self.k.rms_norm(x.contiguous(), None, self.norm, self.norm_eps)
        return self.head(normed).float()
