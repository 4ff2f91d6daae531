"""Weight-only quantization (transforms/quantize.py): error bounds, packed layouts, stage outputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from shardline.transforms import quantize as Q
from shardline.worker.build import load_runner
from tests.unit.test_model import Driver


def test_int8_roundtrip_error():
    w = torch.randn(96, 64)
    q, s = Q.quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (96,)
    err = (Q.dequantize_int8(q, s) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-6).all()


def test_int4_pack_roundtrip_and_error():
    w = torch.randn(48, 128)
    q, s, z = Q.quantize_int4(w, 32)
    assert q.max() <= 15 and s.shape == (48, 4)
    packed = Q.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 64)      # two per byte
    assert torch.equal(Q.unpack_int4(packed), q)
    assert packed[0, 0] == q[0, 0] | (q[0, 1] << 4)
    err = (Q.dequantize_int4(q, s, z) - w).abs()
    assert (err <= s.repeat_interleave(32, 1) / 2 + 1e-5).all()


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_close(mode, dtype):
    torch.manual_seed(0)
    m = nn.Linear(128, 96, bias=True).to(dtype)
    x = torch.randn(24, 128, dtype=dtype)
    ref = m(x).float()
    qm = Q.quantize_linear(m, mode, 32)
    assert not any(p.is_floating_point() and p.shape == m.weight.shape
                   for p in qm.buffers())                      # no dequantized copy
    rel = ((qm(x).float() - ref).norm() / ref.norm()).item()
    assert rel < (0.03 if mode == "int8" else 0.1)


def test_fp8_needs_capable_gpu():
    with pytest.raises(ValueError, match="8.9"):
        Q.quantize_linear(nn.Linear(64, 64), "fp8")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_stage_replaces_linears(tiny_model_dir, mode):
    path = tiny_model_dir("llama")
    base = load_runner(path, 0, 4, dtype="float32", kv_cache_bytes=1 << 20)
    r = load_runner(path, 0, 4, dtype="float32", kv_cache_bytes=1 << 20, quantize=mode, quantize_head=True)
    kinds = {type(m).__name__ for m in r.model.modules()}
    assert {"Int8Linear" if mode == "int8" else "Int4Linear"} <= kinds
    assert not any(isinstance(m, nn.Linear) for m in r.model.modules())
    assert Q.weight_bytes(r.model) < Q.weight_bytes(base.model)
    assert r.quantization == mode
    out = Driver([r]).run([[1, 2, 3, 4, 5]], 4)
    assert len(out[0]) == 4


def test_int8_greedy_close_on_real_model(default_model_dir):
    """int8's greedy next token agrees with bf16's on most contexts. Teacher-forced (both
    predict after the same bf16 continuation): free-running outputs diverge for good at the
    first near-tie (bf16 implementations alone disagree on this set's first prompt, whose top
    two logits are 0.26 apart in float32), which says nothing about the other positions."""
    prompts = [[1, 504, 3458, 282, 260], [504, 1116, 314, 2132, 30], [9519, 28, 253, 1164]]
    runners = {mode: load_runner(default_model_dir, 0, 30, dtype="bfloat16",
                                 kv_cache_bytes=16 << 20, quantize=mode)
               for mode in ("none", "int8")}
    greedy = Driver([runners["none"]]).run(prompts, 8)
    contexts = [p + g[:j] for p, g in zip(prompts, greedy) for j in range(8)]
    nxt = {mode: [o[0] for o in Driver([r]).run(contexts, 1)] for mode, r in runners.items()}
    same = sum(a == b for a, b in zip(nxt["none"], nxt["int8"]))
    assert same >= 0.75 * len(contexts), (same, len(contexts))
