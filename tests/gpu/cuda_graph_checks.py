"""Checks that need a CUDA device: the device run (benchmarks/gpu_check.py, phase
"cuda_tests") runs them with pytest beside tests/gpu/; they are not collected on a CPU machine
(no test_ prefix), where tests/gpu/ runs the same kernels under TRITON_INTERPRET=1 and the
engine eagerly."""
from __future__ import annotations

import torch

from shardline.transforms.triton_dequant import dequant_int4
from shardline.transforms.triton_int8 import int8_linear
from shardline.worker.build import load_runner
from tests.gpu.test_engine import Driver, _ids
from tests.gpu.test_quantized_linears import _int4_weight, _int8_weight


def test_quantized_kernels_replay_in_a_cuda_graph():
    q, s, _ = _int8_weight(256, 256, 0)
    packed, sc, z, _ = _int4_weight(256, 256, 32, 0)
    q, s, packed, sc, z = (t.cuda() for t in (q, s, packed, sc, z))
    x = torch.randn(8, 256, device="cuda").bfloat16()
    expect = (int8_linear(x, q, s), dequant_int4(packed, sc, z))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = (int8_linear(x, q, s), dequant_int4(packed, sc, z))
    graph.replay()
    for a, b in zip(out, expect):
        torch.testing.assert_close(a, b)


def test_engine_on_cuda_with_graphs_gives_the_reference_tokens(tiny_llama):
    def runner(engine):
        return load_runner(tiny_llama, 0, 4, device="cuda", dtype="float32",
                           gpu_engine="on" if engine else "off", kv_cache_bytes=1 << 22)
    ref = _ids(Driver(runner(False)).run(decode_steps=12))
    r = runner(True)
    got = _ids(Driver(r).run(decode_steps=12))
    assert got == ref
    assert r.backend.graphs.enabled and r.backend.graphs.graphs      # decode steps replayed
