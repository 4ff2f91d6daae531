"""Mixture of experts (models/moe.py): routing, tokens grouped per expert against a per-token
loop, and experts quantized like any MLP."""
from __future__ import annotations

import pytest
import torch

from shardline.models.layers import Linear
from shardline.models.moe import SparseMoE, dense_experts, grouped_experts
from shardline.models.parallel import AbsentExpert
from shardline.transforms.quantize import Int4Linear, Int8Linear
from shardline.worker.build import load_runner

from tests.unit.test_model import _our_logits


def _moe(num_experts=6, top_k=2, norm=True, hidden=32, inter=48, seed=0) -> SparseMoE:
    torch.manual_seed(seed)
    moe = SparseMoE(hidden, inter, num_experts, top_k, norm)
    for p in moe.parameters():
        p.data.normal_(0, 0.3)
    return moe.eval()


def _per_token_loop(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """The definition, token by token: sum over the chosen experts of weight * expert(x_t)."""
    weights, ids = moe.route(moe.gate(x))
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            out[t] += weights[t, j] * moe.experts[int(ids[t, j])](x[t:t + 1])[0]
    return out


@pytest.mark.parametrize("tokens", [1, 3, 17])
@pytest.mark.parametrize("norm", [True, False])
def test_grouped_experts_equal_a_per_token_loop(tokens, norm):
    moe = _moe(norm=norm)
    x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(tokens))
    with torch.inference_mode():
        expected = _per_token_loop(moe, x)
        weights, ids = moe.route(moe.gate(x))
        torch.testing.assert_close(moe(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dense_experts(x, weights, ids, moe.experts), expected,
                                   atol=1e-5, rtol=1e-5)


def test_grouping_skips_experts_no_token_chose():
    """Experts that no token routes to are never called (one call per expert hit)."""
    moe = _moe(num_experts=8, top_k=1)
    calls = []
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda m, i, o, e=e: calls.append((e, i[0].shape[0])))
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        _, ids = moe.route(moe.gate(x))
        grouped_experts(x, *moe.route(moe.gate(x)), moe.experts)
    hit = torch.bincount(ids.view(-1), minlength=8)
    assert calls == [(e, int(n)) for e, n in enumerate(hit.tolist()) if n]


def test_a_ranks_absent_experts_are_skipped_and_their_shares_sum_to_the_whole():
    """Expert parallelism: a rank holding experts [0, 4) of 8 calls only those, on only the
    rows routed to them; the two ranks' outputs (grouped, and the graph-safe dense form)
    sum to the whole layer's."""
    moe = _moe(num_experts=8, top_k=2)
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        weights, ids = moe.route(moe.gate(x))
        whole = grouped_experts(x, weights, ids, moe.experts)
        halves, dense = [], []
        for held in (range(0, 4), range(4, 8)):
            experts = [e if i in held else AbsentExpert() for i, e in enumerate(moe.experts)]
            calls = []
            for i in held:
                experts[i].register_forward_hook(
                    lambda m, a, o, i=i: calls.append((i, a[0].shape[0])))
            halves.append(grouped_experts(x, weights, ids, experts))
            hit = torch.bincount(ids.view(-1), minlength=8)
            assert calls == [(i, int(hit[i])) for i in held if hit[i]]
            dense.append(dense_experts(x, weights, ids, experts))
    torch.testing.assert_close(halves[0] + halves[1], whole)
    torch.testing.assert_close(dense[0] + dense[1], whole)
    none = [AbsentExpert() for _ in range(8)]
    assert torch.equal(grouped_experts(x, weights, ids, none), torch.zeros_like(x))


def test_routing_softmax_top_k_and_renormalization():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    probs = torch.softmax(logits, -1)[0]
    w, ids = _moe(num_experts=4, top_k=2, norm=True).route(logits)
    assert ids.tolist() == [[3, 2]]
    torch.testing.assert_close(w[0], probs[[3, 2]] / probs[[3, 2]].sum())
    w, ids = _moe(num_experts=4, top_k=2, norm=False).route(logits)
    torch.testing.assert_close(w[0], probs[[3, 2]])


@pytest.mark.parametrize("mode,cls,max_error", [("int8", Int8Linear, 0.15),
                                                ("int4", Int4Linear, 0.8)])
def test_experts_quantize_like_any_mlp(tiny_model_dir, mode, cls, max_error):
    """--quantize int8 / int4 rewrites every expert's projections (the router stays float);
    the logits of a 60-token sequence stay near the float32 stage's (which equal HF's).
    The bounds are what the dense tiny Llama shows (int8 3%, int4 40% relative error: these
    random weights are far from a trained model's); a broken scale or layout is far above."""
    path = tiny_model_dir("mixtral")
    kw = dict(dtype=torch.float32, kv_cache_bytes=1 << 20, block_size=4)
    full, quant = load_runner(path, 0, 4, **kw), load_runner(path, 0, 4, quantize=mode, **kw)
    for layer in quant.model.layers:
        assert isinstance(layer.mlp.gate, Linear)
        for expert in layer.mlp.experts:
            assert isinstance(expert.gate_up_proj, cls) and isinstance(expert.down_proj, cls)
    ids = torch.randint(0, 128, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    blocks = list(range(15))
    a, b = _our_logits(full, ids, 0, blocks), _our_logits(quant, ids, 0, blocks)
    assert (a - b).norm() / a.norm() < max_error
    if mode == "int8":
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.85
