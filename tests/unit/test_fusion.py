"""Layer fusion (transforms/fuse.py): fused and unfused stages compute the same thing."""
from __future__ import annotations

import pytest
import torch

from shardline.transforms.options import StageTransforms
from shardline.worker.build import load_runner
from shardline.worker.runner import StageRunner
from tests.unit.test_model import Driver


def _logits(runner: StageRunner, ids: list[int]) -> torch.Tensor:
    from shardline.models.attention import AttentionMetadata
    with torch.inference_mode():
        meta = AttentionMetadata.build([0], [len(ids)], [list(range(4))], runner.block_size,
                                       runner.device)
        x = runner.model.embed(torch.tensor(ids))
        x = runner.model(x, meta, runner.kv_cache.layers)
        return runner.model.logits(x)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_matches_unfused(tiny_model_dir, family):
    path = tiny_model_dir(family)
    runners = {fuse: load_runner(path, 0, 4, dtype="float32", kv_cache_bytes=1 << 20, block_size=16, fuse=fuse)
               for fuse in (False, True)}
    fused_layer = runners[True].model.layers[0]
    assert fused_layer.fused and not hasattr(fused_layer.self_attn, "q_proj")
    if family == "qwen2":                                   # q/k/v biases kept
        assert fused_layer.self_attn.qkv_proj.bias is not None
    ids = [3, 17, 42, 99, 5, 64, 1, 7]
    a, b = _logits(runners[False], ids), _logits(runners[True], ids)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    outs = [Driver([runners[fuse]]).run(prompts, 8) for fuse in (False, True)]
    assert outs[0] == outs[1]


def test_fused_bf16_close(tiny_model_dir):
    path = tiny_model_dir("llama")
    a, b = (_logits(load_runner(path, 0, 4, dtype="bfloat16", kv_cache_bytes=1 << 20, fuse=f),
                    [3, 17, 42, 99]) for f in (False, True))
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_weight_flags_reach_worker_config():
    import argparse
    from shardline.common.config_args import config_argv
    from shardline.worker.config import WEIGHT_FIELDS, WorkerConfig, add_weight_args
    up = argparse.ArgumentParser()
    add_weight_args(up)
    ns = up.parse_args(["--no-fuse", "--quantize", "int4", "--group-size", "64", "--prune", "2:4",
                        "--prune-calibration", "--compile"])
    worker = argparse.ArgumentParser()
    WorkerConfig.add_args(worker)
    cfg = WorkerConfig.from_args(worker.parse_args(["--model", "m", *config_argv(WorkerConfig, ns, WEIGHT_FIELDS)]))
    assert (cfg.fuse, cfg.quantize, cfg.group_size, cfg.prune, cfg.prune_calibration,
            cfg.torch_compile) == (False, "int4", 64, "2:4", True, True)
    default = WorkerConfig.from_args(worker.parse_args(["--model", "m"]))
    assert default.fuse and default.quantize == "none" and default.prune is None
    assert not default.torch_compile
    assert default.transforms() == StageTransforms()          # one set of defaults


def test_compiled_stage_matches_eager(tiny_model_dir):
    # --compile: the layers' norms and MLP through torch.compile (Inductor, dynamic shapes);
    # prefill (several rows) and decode (one row) both run compiled graphs
    import torch._dynamo
    torch._dynamo.reset()
    path = tiny_model_dir("llama")
    runners = {c: load_runner(path, 0, 4, dtype="float32", kv_cache_bytes=1 << 20, block_size=16,
                           torch_compile=c)
               for c in (False, True)}
    layer = runners[True].model.layers[0]
    assert hasattr(layer.post_attention, "_torchdynamo_orig_callable")   # compiled
    ids = [3, 17, 42, 99, 5, 64, 1, 7]
    torch.testing.assert_close(_logits(runners[False], ids), _logits(runners[True], ids),
                               rtol=1e-4, atol=1e-4)
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    outs = [Driver([runners[c]]).run(prompts, 8) for c in (False, True)]
    assert outs[0] == outs[1]
    # a middle stage warms its graphs up on hidden states; its warm-up sequence is gone
    middle = load_runner(path, 1, 3, dtype="float32", kv_cache_bytes=1 << 20, block_size=16,
                         torch_compile=True)
    assert middle.seqs == {} and runners[True].seqs == {}
