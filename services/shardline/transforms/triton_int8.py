"""A Triton int8 weight-only matmul, Int8Linear's kernel for decode-sized row counts on CUDA.

    y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]      x bf16/fp16 [M, K], q int8 [N, K]

Each program computes a BLOCK_M x BLOCK_N tile of y, streaming its BLOCK_N weight rows once
and converting them to x's dtype in registers: a step reads 1 byte per weight instead of the
2 of a bf16 weight (or the 1 + 2 + 2 of dequantizing to bf16 first). At up to BLOCK_M rows
the grid is one program per BLOCK_N outputs and the weight is read once; beyond, every
further BLOCK_M rows read it again, which is why quantize.kernel_for uses this kernel at up to
BLOCK_M rows only (INT8_TRITON_MAX_ROWS).

The default on CUDA; set SHARDLINE_TRITON_INT8=0 (or ENABLED = False, as benchmarks/weights.py
does for its int8 / int8-triton variants) to dequantize instead, for A/B measurements.
The launch reads shapes only, never tensor values, so a CUDA graph can capture it. The entry
point takes CPU tensors too when TRITON_INTERPRET=1 (tests/gpu/test_quantized_linears.py).
"""
from __future__ import annotations

import importlib.util
import os

import torch

ENABLED = os.environ.get("SHARDLINE_TRITON_INT8", "1") != "0"
BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 128
# CUDA builds of torch bring Triton; the CPU runtime image has none
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def available() -> bool:
    """Whether Int8Linear may use this kernel: ENABLED and Triton installed."""
    return ENABLED and HAVE_TRITON


def check_device(t: torch.Tensor) -> None:
    """Triton kernels here run on CUDA tensors, or on CPU ones in Triton's interpreter."""
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"a Triton kernel needs CUDA tensors (got {t.device}); CPU tensors "
                         "only with TRITON_INTERPRET=1")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


_kernel = None


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :],
                        mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None],           # [K, N] view
                        mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
            # via float32: exact for |q| <= 127 (Triton 3.6's interpreter casts int8 -> bf16
            # directly as raw bits)
            acc += tl.dot(x, w.to(tl.float32).to(x.dtype))
        s = tl.load(s_ptr + rn, mask=rn < N, other=0.0)
        acc = acc * s[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))
    return kernel


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bf16/fp16; float32 is computed in bf16), qweight int8 [N, K], scale float32
    [N] -> y [M, N] in x's dtype. Any M; fastest at up to BLOCK_M rows (module docstring)."""
    global _kernel
    check_device(x)
    if _kernel is None:
        _kernel = _build()
    m, k = x.shape
    n = qweight.shape[0]
    xk = (x.to(torch.bfloat16) if x.dtype == torch.float32 else x).contiguous()
    qweight, scale = qweight.contiguous(), scale.contiguous()
    y = torch.empty(m, n, dtype=xk.dtype, device=x.device)
    if m == 0:
        return y.to(x.dtype)
    grid = (cdiv(n, BLOCK_N), cdiv(m, BLOCK_M))
    _kernel[grid](xk, qweight, scale, y, m, n, k, xk.stride(0), qweight.stride(0), y.stride(0),
                  BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return y.to(x.dtype)
