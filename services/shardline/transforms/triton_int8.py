"""A Triton int8 weight-only matmul for small batches on CUDA (decode steps).

    y[m, n] = sum_k x[m, k] * q[n, k] * scale[n]       x bf16/fp16 [M <= 16, K], q int8 [N, K]

Each program computes BLOCK_N outputs for all (up to 16) rows, streaming the int8 weight once
and converting it in registers, so the step reads 1 byte per weight instead of 2. Used
on CUDA only (Int8Linear.forward, at up to 16 rows); off unless ENABLED is set (benchmarks/weights.py
--variants int8-triton). Untested on a GPU in this repository's CI.
"""
from __future__ import annotations

import importlib.util

import torch

ENABLED = False


def available() -> bool:
    return ENABLED and torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


_kernel = None


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        rm = tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :],
                        mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None],
                        mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
            acc += tl.dot(x, w.to(x.dtype))
        s = tl.load(s_ptr + rn, mask=rn < N, other=0.0)
        acc = acc * s[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))
    return kernel


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: [M <= 16, K] (bf16/fp16, CUDA); qweight int8 [N, K]; scale float32 [N] -> [M, N]."""
    global _kernel
    if _kernel is None:
        _kernel = _build()
    m, k = x.shape
    n = qweight.shape[0]
    if x.dtype == torch.float32:
        x = x.to(torch.bfloat16)
    x = x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_n = 64
    _kernel[(triton_cdiv(n, block_n),)](x, qweight, scale, y, m, n, k, x.stride(0),
                                        qweight.stride(0), y.stride(0),
                                        BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=128)
    return y


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
