"""Pruning (transforms/prune.py): asked sparsity, exact 2:4 pattern, calibration, stage outputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from shardline.transforms import prune as P
from shardline.worker.build import load_runner
from tests.unit.test_model import Driver


def test_parse_prune():
    assert P.parse_prune("0.5") == 0.5 and P.parse_prune("2:4") == (2, 4)
    assert P.parse_prune(None) is None and P.parse_prune("none") is None
    with pytest.raises(ValueError):
        P.parse_prune("1.5")


def test_unstructured_ratio_exact():
    m = nn.Linear(64, 32)
    P.prune_linear(m, 0.5)
    assert ((m.weight == 0).sum(1) == 32).all()


def test_two_four_pattern_exact_and_keeps_largest():
    m = nn.Linear(64, 32)
    w = m.weight.detach().clone()
    P.prune_linear(m, (2, 4))
    groups = m.weight.view(32, 16, 4)
    assert ((groups != 0).sum(-1) == 2).all()
    kept = w.abs().view(32, 16, 4).topk(2, -1).values.sum()
    assert torch.isclose(m.weight.abs().sum(), kept)


def test_calibration_changes_scores():
    m = nn.Linear(8, 1, bias=False)
    m.weight.data = torch.tensor([[1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]])
    P.prune_linear(m, (2, 4), input_norm=torch.tensor([10.0, 10.0, 1.0, 1.0] * 2))
    assert m.weight[0, :4].tolist() == [1.0, 2.0, 0.0, 0.0]


@pytest.mark.parametrize("spec", ["0.5", "2:4"])
def test_pruned_stage(tiny_model_dir, monkeypatch, spec):
    import shardline.transforms.calibration as calibration
    # the tiny model has no tokenizer: calibrate on fixed token ids
    monkeypatch.setattr(calibration, "corpus_token_ids", lambda d, n: [(7 * i) % 128 for i in range(n)])
    path = tiny_model_dir("llama")
    r = load_runner(path, 0, 4, dtype="float32", kv_cache_bytes=1 << 20, fuse=False, prune=spec,
                    prune_calibration=True)
    assert P.sparsity(r.model) == pytest.approx(0.5)
    fused = load_runner(path, 0, 4, dtype="float32", kv_cache_bytes=1 << 20, prune=spec,
                        prune_calibration=True)
    prompts = [[1, 2, 3, 4, 5]]
    assert Driver([r]).run(prompts, 6) == Driver([fused]).run(prompts, 6)
