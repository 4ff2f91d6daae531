"""Weight-only quantization as a transform: Linear modules of a stage are replaced by
modules holding quantized weights (never a dequantized copy: the dequantizing kernels below
expand the weight into a temporary, per call).

    int8  per output channel, symmetric:   w ~ q * scale,            q in [-127, 127]
    int4  group-wise along k, asymmetric:  w ~ (q - 8) * scale + zero, q in [0, 15],
          groups of `group_size` input channels; stored two values per byte
    fp8   e4m3, per output channel scale:   w ~ q * scale (CUDA, capability >= 8.9)

Kernels: each forward asks `kernel_for(kind, rows, device_type)`, a pure function of the
thresholds below, which kernel multiplies this many rows:

    CUDA  int8  <= INT8_TRITON_MAX_ROWS: "triton-int8" (triton_int8.py, 1 byte per weight
                read); beyond, or with it off (SHARDLINE_TRITON_INT8=0): "dequant" (q -> x's
                dtype, F.linear, scale on the output)
          int4  <= INT4_TINYGEMM_MAX_ROWS: "tinygemm" (`_weight_int4pack_mm`, bf16); beyond:
                "dequant" (triton_dequant.py expands the stored form, then F.linear)
          fp8   "scaled-mm" (`torch._scaled_mm`, per-row activation scales, rows padded to
                FP8_ROW_MULTIPLE)
    CPU   int8  "cpu-int8pack" (`_weight_int8pack_mm`; one 1536x576 matrix, one row, 2 AVX2
                cores: bf16 0.156 ms vs plain bf16 0.139 ms), float32: "cpu-dequant" (its
                float32 kernel: 1 row 7.5 vs 2.3 ms, 512 rows 1582 vs 52 ms dequantized)
          int4  "cpu-int4pack" (`_weight_int4pack_mm_for_cpu`), float32 beyond
                CPU_INT4_FP32_MAX_ROWS: "cpu-dequant"

fbgemm's dynamic int8 GEMM is faster on CPU (0.095 ms) but quantizes activations per tensor
too: SmolLM2 greedy tokens then matched the unquantized ones at only 4 of 24 positions, so it
is not used.

The stored form (`state()`: int8 qweight, int4 uint8 [n, k/2] + scales/zeros) is what an
optimized checkpoint holds (transforms/recipe.py); modules are rebuilt from it by `from_state`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from shardline.models.decoder import projection_parents
# both import Triton only when a kernel is first built (the CPU image has no Triton)
from shardline.transforms import triton_dequant, triton_int8
from shardline.transforms.options import QUANTIZE_MODES

MODES = QUANTIZE_MODES

# ---- kernel choice by row count ------------------------------------------------------------
# benchmarks/gpu_check.py (being written) is to re-measure each of these on a GPU.
# tinygemm (`_weight_int4pack_mm`) was measured faster than a plain bf16 F.linear on an H200
# at 1-8 rows only. Beyond, the int4 weight is expanded to bf16 and cuBLAS runs (vLLM's
# fallback too): the expansion costs 0.5 + 2 bytes per weight and the GEMM reads 2, amortized
# over prefill-sized row counts.
INT4_TINYGEMM_MAX_ROWS = 8
# the Triton int8 kernel's row tile (triton_int8.BLOCK_M): up to it the weight is streamed
# once; every further tile streams it again, so beyond it q -> bf16 once and cuBLAS is
# expected to win (not yet measured).
INT8_TRITON_MAX_ROWS = triton_int8.BLOCK_M
# `torch._scaled_mm` required M % 16 == 0 (pytorch/pytorch#108308 relaxed that for a
# row-major mat1): rows are padded to this multiple until a GPU run shows 1 is safe.
FP8_ROW_MULTIPLE = 16
# CPU, float32 activations: `_weight_int4pack_mm_for_cpu` is slow for many rows (prefill,
# perplexity), so beyond this the weight is dequantized into a float32 temporary.
CPU_INT4_FP32_MAX_ROWS = 16


def kernel_for(kind: str, rows: int, device_type: str, dtype: torch.dtype = torch.bfloat16,
               use_triton: bool = True) -> str:
    """The kernel a `kind` ("int8", "int4", "fp8") linear runs for `rows` activation rows of
    `dtype` on `device_type` ("cuda"; anything else takes the CPU rules). `use_triton`: whether
    the Triton int8 kernel may run (triton_int8.available()). Pure: the rule, testable
    without a GPU (tests/unit/test_quantize.py). An empty batch (0 rows) of int4 on CUDA
    takes "dequant", whose F.linear is defined for it."""
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    if kind == "fp8":
        return "scaled-mm"
    if kind not in ("int8", "int4"):
        raise ValueError(f"no quantized kernel for {kind!r}")
    if device_type == "cuda":
        if kind == "int8":
            return "triton-int8" if use_triton and rows <= INT8_TRITON_MAX_ROWS else "dequant"
        return "tinygemm" if 0 < rows <= INT4_TINYGEMM_MAX_ROWS else "dequant"
    if dtype != torch.float32:
        return f"cpu-{kind}pack"
    if kind == "int8" or rows > CPU_INT4_FP32_MAX_ROWS:
        return "cpu-dequant"
    return "cpu-int4pack"


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., k] -> [rows, k] (the kernels take 2-D activations)."""
    return x.reshape(-1, x.shape[-1])


def _finish(y: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y [rows, n] -> x's leading shape and dtype, + bias."""
    y = y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])
    return y if bias is None else y + bias.to(x.dtype)


# ---- int8 ---------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor, row_max: Optional[torch.Tensor] = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [n, k] -> (q int8 [n, k], scale float32 [n]) with w ~ q * scale[:, None]. row_max:
    each row's largest |value| where w holds only some of the rows' columns (a row-parallel
    shard, transforms/shard.py): the scales of the whole rows; default w's own."""
    w = w.float()
    amax = w.abs().amax(dim=1) if row_max is None else row_max.float()
    scale = amax.clamp(min=1e-8) / 127
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
        x2 = _as_rows(x)
        kernel = kernel_for("int8", x2.shape[0], x.device.type, x.dtype, triton_int8.available())
        if kernel == "triton-int8":
            y = triton_int8.int8_linear(x2, self.qweight, self.scale)
        elif kernel == "cpu-int8pack":          # weight-only: activations stay in x's dtype
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scale.to(x.dtype))
        else:                                   # "dequant", "cpu-dequant": q exact in x's dtype
            y = F.linear(x2, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return _finish(y, x, self.bias)


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
    """Group-wise int4 weights: the stored form (`packed` uint8 [n, k/2], float32 `scale` and
    `zero` [n, k/g]) and, built from it, the layout of the small-row kernel (kernel_for):

        CUDA  tinygemm's (`_convert_weight_to_int4pack`): int32, n * k / 2 bytes, and bf16
              (scale, zero) pairs [k/g, n, 2], 4 bytes per group
        CPU   `_convert_weight_to_int4pack_for_cpu`'s: uint8, n * k / 2 bytes, pairs in the
              model dtype

    So the weight is held twice. On CUDA that is 1 byte per weight + 12 bytes per group of g
    (g = 32: 1.375 bytes per weight, g = 128: 1.09; bf16 is 2, int8 1 + 4 / k). Both are
    buffers: `weight_bytes` counts them, `.to()` moves them, checkpoints save only the stored
    form. tinygemm's layout is opaque, so "dequant" (more rows than tinygemm wins at) expands
    the stored form (triton_dequant.py). Holding one copy would take a kernel that reads the
    stored form at 1-8 rows as fast as tinygemm does (benchmarks/gpu_check.py)."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 bias: Optional[torch.Tensor], group_size: int, dtype: torch.dtype,
                 inner_k_tiles: Optional[int] = None):
        super().__init__()
        n, half_k = packed.shape
        self.in_features, self.out_features = half_k * 2, n
        self.group_size = group_size
        self.dtype = dtype
        self.register_buffer("packed", packed)       # stored form: uint8 [n, k/2]
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero", zero.float())
        self.register_buffer("bias", bias)
        if packed.device.type == "cuda":
            kdtype = torch.bfloat16
            # tinygemm takes the even column in the high nibble: swap the stored form's
            tiles = inner_k_tiles or _inner_k_tiles(self.in_features)
            weight = torch.ops.aten._convert_weight_to_int4pack(
                (packed & 0xF) << 4 | packed >> 4, tiles)
        else:
            kdtype = dtype
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                unpack_int4(packed).to(torch.int32), 1)
        self.register_buffer("kernel_weight", weight, persistent=False)
        # [k/g, n, 2]: (scale, zero) per group, as the kernels take them
        self.register_buffer("kernel_scales_zeros", torch.stack(
            [self.scale, self.zero], -1).transpose(0, 1).contiguous().to(kdtype),
            persistent=False)

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
        x2 = _as_rows(x)
        kernel = kernel_for("int4", x2.shape[0], x.device.type, x.dtype)
        sz = self.kernel_scales_zeros
        if kernel == "tinygemm":
            y = torch.ops.aten._weight_int4pack_mm(x2.to(sz.dtype), self.kernel_weight,
                                                   self.group_size, sz)
        elif kernel == "cpu-int4pack":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(sz.dtype), self.kernel_weight,
                                                           self.group_size, sz)
        else:                                   # "dequant", "cpu-dequant": a transient weight
            y = F.linear(x2, self.dense_weight(x.dtype, triton=kernel == "dequant"))
        return _finish(y, x, self.bias)

    def dense_weight(self, dtype: torch.dtype, triton: bool = False) -> torch.Tensor:
        """The weight expanded from the stored form into dtype [n, k]: by the Triton kernel
        (triton_dequant.py) if `triton` and Triton is installed, else with torch ops."""
        if triton and triton_dequant.available():
            return triton_dequant.dequant_int4(self.packed, self.scale, self.zero, dtype)
        return dequantize_int4(unpack_int4(self.packed), self.scale, self.zero).to(dtype)


def _inner_k_tiles(k: int) -> int:
    """tinygemm's inner k tiles for in_features k: the most of 8, 4, 2 dividing k / 16 (the
    conversion wants k / 16 to be a multiple of it, so a fixed 8 would refuse e.g. SmolLM2's
    k = 576; unconfirmed on a GPU)."""
    for tiles in (8, 4, 2):
        if k % (16 * tiles) == 0:
            return tiles
    raise ValueError(f"int4 on CUDA (tinygemm) needs in_features % 32 == 0, got {k}")


# ---- fp8 ----------------------------------------------------------------------------------
def fp8_supported(device: torch.device) -> bool:
    return (device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) >= (8, 9))


def require_fp8(device: torch.device, what: str = "the stage") -> None:
    """Raise ValueError unless fp8 runs on device."""
    if not fp8_supported(torch.device(device)):
        raise ValueError("fp8 quantization needs a CUDA GPU of compute capability >= 8.9 "
                         f"({what} is on {device})")


def quantize_fp8(w: torch.Tensor, row_max: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [n, k] -> (q float8_e4m3fn [n, k], scale float32 [n]) with w ~ q * scale[:, None].
    row_max: as quantize_int8's (a row-parallel shard's whole rows)."""
    w = w.float()
    fmax = torch.finfo(torch.float8_e4m3fn).max
    amax = w.abs().amax(1) if row_max is None else row_max.float()
    scale = amax.clamp(min=1e-12) / fmax
    return (w / scale[:, None]).clamp(-fmax, fmax).to(torch.float8_e4m3fn), scale


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
        require_fp8(m.weight.device, "the weight")
        q, scale = quantize_fp8(m.weight.detach())
        return cls(q, scale, None if m.bias is None else m.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _as_rows(x)
        rows = x2.shape[0]
        kernel = kernel_for("fp8", rows, x.device.type, x.dtype)
        if kernel != "scaled-mm":
            raise NotImplementedError(f"Fp8Linear has no {kernel!r} kernel")
        pad = (-rows) % FP8_ROW_MULTIPLE
        if pad:     # zero rows, in x's dtype (no float32 copy): they quantize to 0, cut off y
            x2 = F.pad(x2, (0, 0, 0, pad))
        fmax = torch.finfo(torch.float8_e4m3fn).max
        xs = x2.abs().amax(1, keepdim=True).float().clamp(min=1e-12) / fmax      # [M, 1]
        xq = (x2 / xs).to(torch.float8_e4m3fn)           # one float32 temporary, [M, k]
        y = torch._scaled_mm(xq, self.qweight.t(), scale_a=xs, scale_b=self.scale[None, :],
                             out_dtype=torch.bfloat16)                       # row-wise scales
        return _finish(y[:rows], x, self.bias)


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
        require_fp8(next(model.parameters()).device)
    for layer in model.layers:
        for parent in projection_parents(layer):      # attention, the MLP or each expert
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, quantize_linear(child, mode, group_size))
    if include_head and model.lm_head is not None:
        if isinstance(model.lm_head, nn.Linear):
            model.lm_head = quantize_linear(model.lm_head, mode, group_size)
        else:               # a head around its Linear (shard.py's VocabParallelHead)
            model.lm_head.linear = quantize_linear(model.lm_head.linear, mode, group_size)
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
