"""A Triton kernel that expands Int4Linear's stored int4 weights into a dense weight on CUDA,
for the row counts at which Int4Linear multiplies with F.linear (quantize.kernel_for:
"dequant").

    q[n, 2j] = packed[n, j] & 0xF        q[n, 2j + 1] = packed[n, j] >> 4
    w[n, k]  = (q[n, k] - 8) * scale[n, k // g] + zero[n, k // g]

It reads the stored form itself (uint8 [N, K/2] plus float32 scale and zero [N, K/g], the
layout checkpoints hold), so no second copy of the weight is kept for it. One pass: each
packed byte and each group's scale and zero come from memory once (neighbouring lanes share
the loads), each dense value is written once (0.5 + 2 bytes per bf16 weight; quantize.dequantize_int4's torch ops move about 39, through
float32 temporaries). The launch reads shapes only, never tensor values, so a CUDA graph
can capture it. CPU tensors are accepted when TRITON_INTERPRET=1
(tests/gpu/test_quantized_linears.py).
"""
from __future__ import annotations

import torch

from shardline.transforms.triton_int8 import HAVE_TRITON, cdiv, check_device

BLOCK_N, BLOCK_K = 32, 256


def available() -> bool:
    """Whether Triton is installed (CUDA builds of torch bring it; the CPU image has none)."""
    return HAVE_TRITON


_kernel = None


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(p_ptr, s_ptr, z_ptr, w_ptr, N, K, stride_pn, stride_sn, stride_zn, stride_wn,
               GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rn[:, None] < N) & (rk[None, :] < K)
        byte = tl.load(p_ptr + rn[:, None] * stride_pn + rk[None, :] // 2, mask=mask, other=0)
        q = (byte.to(tl.int32) >> ((rk[None, :] % 2) * 4)) & 0xF       # even k: low nibble
        group = rk[None, :] // GROUP
        s = tl.load(s_ptr + rn[:, None] * stride_sn + group, mask=mask, other=0.0)
        z = tl.load(z_ptr + rn[:, None] * stride_zn + group, mask=mask, other=0.0)
        w = (q.to(tl.float32) - 8.0) * s + z
        tl.store(w_ptr + rn[:, None] * stride_wn + rk[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=mask)
    return kernel


def dequant_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """packed uint8 [N, K/2], scale and zero float32 [N, K/g] -> w [N, K] in dtype, with
    w = (q - 8) * scale + zero per group of g = K / scale.shape[1] input channels."""
    global _kernel
    check_device(packed)
    if _kernel is None:
        _kernel = _build()
    n, half_k = packed.shape
    k = 2 * half_k
    if scale.shape != zero.shape or scale.shape[0] != n or k % scale.shape[1]:
        raise ValueError(f"scale {tuple(scale.shape)} / zero {tuple(zero.shape)} do not "
                         f"group a [{n}, {k}] weight")
    group = k // scale.shape[1]
    w = torch.empty(n, k, dtype=dtype, device=packed.device)
    if n == 0 or k == 0:
        return w
    packed, scale, zero = packed.contiguous(), scale.float().contiguous(), zero.float().contiguous()
    _kernel[(cdiv(n, BLOCK_N), cdiv(k, BLOCK_K))](
        packed, scale, zero, w, n, k, packed.stride(0), scale.stride(0), zero.stride(0),
        w.stride(0), GROUP=group, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return w
