"""Building blocks of a Llama-style decoder: linear, RMSNorm, rotary embedding, gated MLP.

Linear layers are `nn.Linear` modules named as in HF checkpoints (gate_proj, up_proj,
down_proj, ...), so weight names map 1:1 and quantization can swap them for other modules.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from shardline.models.config import ModelConfig


def _slow_low_precision_cpu_gemm() -> bool:
    """True on CPUs without AVX512-BF16 or AMX, where PyTorch has no native bf16/fp16 GEMM."""
    try:
        return not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:                      # older torch: assume the slow path
        return True


_CPU_GEMM_IS_SLOW = _slow_low_precision_cpu_gemm()


class Linear(nn.Linear):
    """nn.Linear, with two CPU paths for inputs of several rows (prefill, batched decode).

    Measured on 2 AVX2 cores (SmolLM2-135M):
      * without native bf16/fp16 GEMM, PyTorch's low-precision matmul is a generic kernel whose
        cost grows with the rows, while converting the weights to fp32 costs a fixed ~60 ms per
        step: up to 8 rows the native kernel wins (4-row decode step 80 vs 110 ms), beyond it
        the conversion (16 rows: 230 vs 1000 ms; 128-token prefill: 0.7 vs 1.8-3 s);
      * MKL computes weight @ x^T faster than x @ weight^T for a few rows (LM head
        [49152, 576], 2 rows: 8.3 ms vs 22.6 ms; 16 rows: 21.6 ms vs 30.4 ms).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [tokens, in] -> [tokens, out]
        rows = x.shape[0]
        if x.device.type != "cpu" or rows == 1:
            return F.linear(x, self.weight, self.bias)
        weight, bias = self.weight, self.bias
        if weight.dtype != torch.float32 and _CPU_GEMM_IS_SLOW:
            if rows <= 8:
                return F.linear(x, weight, bias)
            weight = weight.float()
            bias = None if bias is None else bias.float()
        xw = x.to(weight.dtype)
        if rows <= 64:
            out = torch.mm(weight, xw.t()).t().contiguous()             # [tokens, out]
            if bias is not None:
                out += bias
        else:
            out = F.linear(xw, weight, bias)
        return out.to(x.dtype)


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in float32 for low-precision inputs."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [tokens, hidden]
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor,
                 norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm: returns (norm(x + residual), x + residual).
    x must be a fresh tensor (a projection's output): the sum is written into it."""
    residual = x.add_(residual)
    return F.rms_norm(residual, norm.weight.shape, norm.weight, norm.eps), residual


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """The gated MLP's activation: silu (SwiGLU) or gelu_tanh (GeGLU, Gemma)."""
    return F.silu(x) if name == "silu" else F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)), act silu (SwiGLU) or gelu_tanh (GeGLU).

    After `fuse.fuse_stage`, gate_proj and up_proj are one gate_up_proj [2 * inter, hidden]."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu"):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)
        self.gate_up_proj: Optional[nn.Module] = None
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [tokens, hidden] -> [tokens, intermediate] -> [tokens, hidden]
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)              # [tokens, inter] x 2
            return self.down_proj(activation(self.act, gate).mul_(up))
        return self.down_proj(activation(self.act, self.gate_proj(x)) * self.up_proj(x))

    def projection_parents(self) -> list[nn.Module]:
        """The modules whose Linear children are this MLP's projections (what quantize and
        fuse rewrite)."""
        return [self]


def rope_inv_freq(config: ModelConfig, long: bool = False) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] (float32), with linear, llama3, yarn or longrope
    scaling applied (longrope: its short factors, or with `long` its long ones)."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    scaling = config.rope_scaling or {}
    if config.rope_type == "longrope":
        ext = torch.tensor(scaling["long_factor" if long else "short_factor"],
                           dtype=torch.float32)
        return 1.0 / (ext * config.rope_theta ** exponents)
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    if config.rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif config.rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are divided by `factor`, short ones kept, the middle interpolated
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif config.rope_type == "yarn":
        inv_freq = _yarn_inv_freq(inv_freq, config, scaling)
    return inv_freq


def _yarn_inv_freq(inv_freq: torch.Tensor, config: ModelConfig, scaling: dict) -> torch.Tensor:
    """YaRN (arXiv 2309.00071): dimensions that turn fewer than beta_slow times over the
    original context are interpolated (frequency / factor), those that turn more than
    beta_fast times kept, a linear ramp between (over the dimension index)."""
    dim, base, factor = config.head_dim, config.rope_theta, scaling["factor"]
    old_len = scaling["original_max_position_embeddings"]

    def dim_of(rotations: float) -> float:        # the dimension turning `rotations` times
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(scaling.get("beta_fast") or 32), dim_of(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp                              # 1: the original frequency, 0: interpolated
    return inv_freq / factor * (1 - keep) + inv_freq * keep


def rope_attention_factor(config: ModelConfig) -> float:
    """The factor YaRN and LongRoPE scale cos and sin by (1 for every other RoPE type)."""
    if config.rope_type not in ("yarn", "longrope"):
        return 1.0
    scaling = config.rope_scaling
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    if config.rope_type == "longrope":
        factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old_len))

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = scaling["factor"]
    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    return mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)


class RotaryEmbedding(nn.Module):
    """Precomputed cos / sin tables indexed by absolute position.

    Rotation in the "rotate half" convention of HF Llama checkpoints:
        rope(x) = x * cos + rotate_half(x) * sin,  rotate_half(x) = [-x2, x1]
    computed as x * cos + swap_halves(x) * sin_signed with sin_signed = [-sin, sin].

    LongRoPE has two tables in one: rows [0, max_pos) with the short factors, rows
    [max_pos, 2 max_pos) with the long ones; a sequence past `config.rope_long_after` tokens
    reads the second half (AttentionMetadata.rope_positions = position + max_pos).
    """

    def __init__(self, config: ModelConfig, device: Optional[torch.device] = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        positions = torch.arange(config.max_position_embeddings, device=device).float()
        inv_freq = rope_inv_freq(config).to(device)
        freqs = torch.outer(positions, inv_freq)                       # [max_pos, head_dim / 2]
        if config.rope_long_after:
            long = torch.outer(positions, rope_inv_freq(config, long=True).to(device))
            freqs = torch.cat([freqs, long])                           # [2 max_pos, head_dim / 2]
        factor = rope_attention_factor(config)
        cos, sin = freqs.cos() * factor, freqs.sin() * factor
        self.register_buffer("cos", torch.cat([cos, cos], -1).to(dtype), persistent=False)
        self.register_buffer("sin_signed", torch.cat([-sin, sin], -1).to(dtype), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin_signed for `positions` [tokens], shaped [tokens, 1, head_dim] (broadcast
        over heads). Computed once per step and shared by every layer."""
        return self.cos[positions].unsqueeze(1), self.sin_signed[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos, sin_signed: [tokens, 1, head_dim]."""
    swapped = torch.roll(x, x.shape[-1] // 2, dims=-1)                # [x2, x1]
    # not addcmul: its fused multiply-add rounds differently from HF's x * cos + rot(x) * sin
    return x * cos + swapped * sin_signed
