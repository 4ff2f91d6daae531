"""The quantized linears' Triton kernels (transforms/triton_int8.py, triton_dequant.py) against
float32 references, and Int8Linear / Int4Linear's forwards through them.

Without CUDA the kernels run under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py,
tests/gpu/conftest.py). A CUDA graph can capture only launches that read no tensor value on
the host: a dispatch mode that refuses such reads (.item(), bool(), int()) wraps the launches,
and the kernel modules' source is checked for .tolist(), which bypasses dispatch.
"""
from __future__ import annotations

import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from shardline.transforms import quantize as Q
from shardline.transforms import triton_dequant, triton_int8
from shardline.transforms.triton_dequant import dequant_int4
from shardline.transforms.triton_int8 import int8_linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROWS = [1, 3, 16, 17, 64]
SHAPES = [(128, 256), (256, 128)]                       # (K, N)


class NoHostReads(TorchDispatchMode):
    """Fails on any op that copies a tensor's value to the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            raise AssertionError(f"{func} reads a tensor value on the host")
        return func(*args, **(kwargs or {}))


def test_launches_read_no_tensor_values_on_the_host():
    with pytest.raises(AssertionError, match="host"), NoHostReads():
        bool(torch.ones(1))                                   # the guard itself works
    for module in (triton_int8, triton_dequant):
        source = inspect.getsource(module)
        assert ".tolist(" not in source and ".item(" not in source, module.__name__


def _close(y: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    err = (y.float() - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item(), (err, ref.abs().max().item())


def _int8_weight(k: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, s = Q.quantize_int8(torch.randn(n, k, generator=g))
    return q, s, (q.float() * s[:, None])


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k,n", SHAPES)
def test_int8_kernel_matches_reference(rows, k, n):
    q, s, w = _int8_weight(k, n, rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(k + rows)).bfloat16()
    with NoHostReads():
        y = int8_linear(x.to(DEVICE), q.to(DEVICE), s.to(DEVICE))
    assert y.shape == (rows, n) and y.dtype == torch.bfloat16
    _close(y.cpu(), x.float() @ w.t(), 1e-2)                # bf16 output rounding


def test_int8_kernel_float32_in_float32_out():
    q, s, w = _int8_weight(128, 256, 0)
    x = torch.randn(5, 128)
    y = int8_linear(x.to(DEVICE), q.to(DEVICE), s.to(DEVICE))
    assert y.dtype == torch.float32
    _close(y.cpu(), x @ w.t(), 2e-2)                        # computed from bf16 activations


def _int4_weight(k: int, n: int, group: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, s, z = Q.quantize_int4(torch.randn(n, k, generator=g), group)
    return Q.pack_int4(q), s, z, Q.dequantize_int4(q, s, z)


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("k,n", SHAPES + [(384, 48)])      # k not a multiple of BLOCK_K
def test_int4_dequant_kernel_is_exact(group, k, n):
    packed, s, z, ref = _int4_weight(k, n, group, group + k)
    args = [t.to(DEVICE) for t in (packed, s, z)]
    with NoHostReads():
        w32 = dequant_int4(*args, dtype=torch.float32)
        w16 = dequant_int4(*args)
    assert w32.shape == (n, k) and w16.dtype == torch.bfloat16
    torch.testing.assert_close(w32.cpu(), ref, atol=1e-6, rtol=1e-6)
    # within one bf16 step (Triton 3.6's interpreter rounds float32 -> bf16 toward zero)
    torch.testing.assert_close(w16.cpu().float(), ref, atol=1e-6, rtol=2 ** -7)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("group", [32, 128])
def test_int4_dequant_linear_matches_reference(rows, group):
    k, n = 256, 128
    packed, s, z, ref = _int4_weight(k, n, group, rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).bfloat16()
    w = dequant_int4(*(t.to(DEVICE) for t in (packed, s, z)))
    y = torch.nn.functional.linear(x.to(DEVICE), w)
    _close(y.cpu(), x.float() @ ref.t(), 2e-2)              # bf16 weight and output


@pytest.mark.parametrize("choice,kind", [("triton-int8", "int8"), ("dequant", "int8"),
                                          ("dequant", "int4")])
def test_forwards_run_the_chosen_kernel(monkeypatch, choice, kind):
    """The CUDA choices on CPU tensors (the interpreter runs the Triton kernels): forwards
    follow kernel_for, keep x's leading shape and add the bias."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64, bias=True)
    m = Q.quantize_linear(lin, kind, 32).to(DEVICE)
    monkeypatch.setattr(Q, "kernel_for", lambda *a, **kw: choice)
    x = torch.randn(2, 9, 128).bfloat16()
    y = m(x.to(DEVICE))
    assert y.shape == (2, 9, 64) and y.dtype == torch.bfloat16
    _close(y.cpu(), lin(x.float()), 0.1 if kind == "int4" else 3e-2)
