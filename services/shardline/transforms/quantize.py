"""Weight-only quantization as a transform: Linear modules of a stage are replaced by
modules holding quantized weights (never a dequantized copy).

    int8  per output channel, symmetric:   w ~ q * scale,            q in [-127, 127]
    int4  group-wise along k, asymmetric:  w ~ (q - 8) * scale + zero, q in [0, 15],
          groups of `group_size` input channels; stored two values per byte
    fp8   e4m3, per output channel scale:   w ~ q * scale (CUDA, capability >= 8.9)

Kernels: int8 runs `_weight_int8pack_mm` (weight-only; one 1536x576 matrix, one row, 2 AVX2
cores: bf16 0.156 ms vs plain bf16 0.139 ms; fp32 activations 0.74 ms). fbgemm's dynamic int8
GEMM is faster (0.095 ms) but quantizes activations per tensor too: SmolLM2 greedy tokens
then matched the unquantized ones at only 4 of 24 positions, so it is not used. CUDA int8
uses the Triton kernel of triton_int8.py for up to 16 rows, else dequantizes on the fly.
int4 uses `_weight_int4pack_mm_for_cpu` / `_weight_int4pack_mm` (CUDA, bf16).
fp8 uses `torch._scaled_mm` with a per-row activation scale.

The stored form (`state()`: int8 qweight, int4 uint8 [n, k/2] + scales/zeros) is what an
optimized checkpoint holds (transforms/recipe.py); modules are rebuilt from it by `from_state`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from shardline.transforms import triton_int8      # imports Triton only when first used on CUDA
from shardline.transforms.options import QUANTIZE_MODES

MODES = QUANTIZE_MODES


# ---- int8 ---------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [n, k] -> (q int8 [n, k], scale float32 [n]) with w ~ q * scale[:, None]."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


class _RowScaledLinear(nn.Module):
    """A weight stored as qweight [out, in] with one scale per output row: its checkpoint
    state and the fusion of several (rows concatenated) are the same for every such format."""

    def state(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scale": self.scale}

    @classmethod
    def from_state(cls, state: dict, bias, group_size: int, dtype):
        return cls(state["qweight"], state["scale"], bias)

    @classmethod
    def concat(cls, mods: list):
        return cls(torch.cat([m.qweight for m in mods]), torch.cat([m.scale for m in mods]),
                   _cat_bias(mods))


class Int8Linear(_RowScaledLinear):
    """y = x @ (q * scale)^T + bias; q int8 [out, in], scale float32 [out]."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: Optional[torch.Tensor]):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.float())
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, m: nn.Linear) -> "Int8Linear":
        q, s = quantize_int8(m.weight.detach())
        return cls(q, s, None if m.bias is None else m.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.shape[0] <= 16:
            if triton_int8.available():
                y = triton_int8.int8_linear(x, self.qweight, self.scale)
                return y if self.bias is None else y + self.bias.to(x.dtype)
        if x.dtype != torch.float32 and x.device.type == "cpu":
            # weight-only: int8 weight, activations in x's dtype (its float32 CPU kernel is
            # slow: 1 row 7.5 vs 2.3 ms, 512 rows 1582 vs 52 ms for dequantizing on the fly)
            y = torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scale.to(x.dtype))
            return y if self.bias is None else y + self.bias.to(x.dtype)
        y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


# ---- int4 ---------------------------------------------------------------------------------
def quantize_int4(w: torch.Tensor, group_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w: [n, k] -> (q uint8 [n, k] in [0, 15], scale [n, k/g], zero [n, k/g]) (float32),
    with w ~ (q - 8) * scale + zero per group of g input channels."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group size {group_size}")
    wg = w.float().view(n, k // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    zero = lo + 8 * scale
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return q.view(n, k), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    g = k // scale.shape[1]
    wg = (q.view(n, -1, g).float() - 8) * scale[..., None] + zero[..., None]
    return wg.view(n, k)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[n, k] values in [0, 15] -> uint8 [n, k/2]: even column in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [n, k/2] -> uint8 [n, k]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).view(packed.shape[0], -1)


class Int4Linear(nn.Module):
    """Group-wise int4 weights in the kernel's packed layout (CPU or CUDA tinygemm)."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 bias: Optional[torch.Tensor], group_size: int, dtype: torch.dtype,
                 inner_k_tiles: int = 8):
        super().__init__()
        n, half_k = packed.shape
        self.in_features, self.out_features = half_k * 2, n
        self.group_size = group_size
        self.dtype = dtype
        self.register_buffer("packed", packed)       # stored form: uint8 [n, k/2]
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero", zero.float())
        self.register_buffer("bias", bias)
        q = unpack_int4(packed).to(torch.int32)
        device = packed.device
        if device.type == "cuda":
            kdtype = torch.bfloat16
            self._kernel_weight = torch.ops.aten._convert_weight_to_int4pack(
                q.to(torch.uint8)[:, ::2] << 4 | q.to(torch.uint8)[:, 1::2], inner_k_tiles)
        else:
            kdtype = dtype
            self._kernel_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self._kdtype = kdtype
        # [k/g, n, 2]: (scale, zero) per group, as the kernels take them
        self._scales_and_zeros = torch.stack([self.scale, self.zero], -1).transpose(
            0, 1).contiguous().to(kdtype)

    @classmethod
    def from_linear(cls, m: nn.Linear, group_size: int) -> "Int4Linear":
        q, s, z = quantize_int4(m.weight.detach(), group_size)
        return cls(pack_int4(q), s, z, None if m.bias is None else m.bias.detach(),
                   group_size, m.weight.dtype)

    def state(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed, "scale": self.scale, "zero": self.zero}

    @classmethod
    def from_state(cls, state: dict, bias, group_size: int, dtype) -> "Int4Linear":
        return cls(state["packed"], state["scale"], state["zero"], bias, group_size, dtype)

    @classmethod
    def concat(cls, mods: list["Int4Linear"]) -> "Int4Linear":
        m0 = mods[0]
        return cls(torch.cat([m.packed for m in mods]), torch.cat([m.scale for m in mods]),
                   torch.cat([m.zero for m in mods]), _cat_bias(mods), m0.group_size, m0.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and not x.is_cuda and x.shape[0] > 16:
            # the float32 CPU kernel is slow for many rows (prefill, perplexity): dequantize
            # on the fly into a transient weight, as Int8Linear does
            w = dequantize_int4(unpack_int4(self.packed), self.scale, self.zero)
            y = F.linear(x, w)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        xk = x.to(self._kdtype)
        if x.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(xk, self._kernel_weight, self.group_size,
                                                   self._scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xk, self._kernel_weight,
                                                           self.group_size,
                                                           self._scales_and_zeros)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


# ---- fp8 ----------------------------------------------------------------------------------
def fp8_supported(device: torch.device) -> bool:
    return (device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) >= (8, 9))


class Fp8Linear(_RowScaledLinear):
    """e4m3 weights with a per-output-channel scale; activations scaled per row."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: Optional[torch.Tensor]):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)                 # [n, k] float8_e4m3fn
        self.register_buffer("scale", scale.float())              # [n]
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, m: nn.Linear) -> "Fp8Linear":
        if not fp8_supported(m.weight.device):
            raise ValueError("fp8 quantization needs a CUDA GPU of compute capability >= 8.9 "
                             f"(weights are on {m.weight.device})")
        w = m.weight.detach().float()
        fmax = torch.finfo(torch.float8_e4m3fn).max
        scale = w.abs().amax(1).clamp(min=1e-12) / fmax
        q = (w / scale[:, None]).clamp(-fmax, fmax).to(torch.float8_e4m3fn)
        return cls(q, scale, None if m.bias is None else m.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmax = torch.finfo(torch.float8_e4m3fn).max
        rows = x.shape[0]
        pad = (-rows) % 16                                       # _scaled_mm wants M % 16 == 0
        xf = x.float()
        if pad:
            xf = F.pad(xf, (0, 0, 0, pad))
        xs = xf.abs().amax(1, keepdim=True).clamp(min=1e-12) / fmax        # [M, 1]
        xq = (xf / xs).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(xq, self.qweight.t(), scale_a=xs, scale_b=self.scale[None, :],
                             out_dtype=torch.bfloat16)[:rows].to(x.dtype)     # row-wise scales
        return y if self.bias is None else y + self.bias.to(x.dtype)


def _cat_bias(mods) -> Optional[torch.Tensor]:
    if all(m.bias is None for m in mods):
        return None
    like = next(m.bias for m in mods if m.bias is not None)
    return torch.cat([m.bias if m.bias is not None else like.new_zeros(m.out_features)
                      for m in mods])


QUANTIZED = {"int8": Int8Linear, "int4": Int4Linear, "fp8": Fp8Linear}


# ---- the transform -------------------------------------------------------------------------
def quantize_linear(m: nn.Linear, mode: str, group_size: int = 32) -> nn.Module:
    if mode == "int8":
        return Int8Linear.from_linear(m)
    if mode == "int4":
        return Int4Linear.from_linear(m, group_size)
    if mode == "fp8":
        return Fp8Linear.from_linear(m)
    raise ValueError(f"quantize must be one of {MODES}, got {mode!r}")


def quantize_stage(model: nn.Module, mode: str, group_size: int = 32,
                   include_head: bool = False) -> nn.Module:
    """Replace the Linear modules of a StageModel's layers (and the LM head if include_head)
    with quantized ones, in place; returns the model."""
    if mode == "none":
        return model
    if mode not in MODES:
        raise ValueError(f"quantize must be one of {MODES}, got {mode!r}")
    if mode == "fp8":
        device = next(model.parameters()).device
        if not fp8_supported(device):
            raise ValueError("fp8 quantization needs a CUDA GPU of compute capability >= 8.9 "
                             f"(the stage is on {device})")
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, quantize_linear(child, mode, group_size))
    if include_head and model.lm_head is not None:
        model.lm_head = quantize_linear(model.lm_head, mode, group_size)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the stage's weights as held (parameters and quantized buffers, shared once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + [b for n, b in model.named_buffers()
                                         if not n.endswith(("cos", "sin_signed"))]:
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
