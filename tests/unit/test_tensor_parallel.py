"""Tensor parallelism inside a stage (models/parallel.py, transforms/shard.py, the sharded
loader): T = 2 ranks, real processes on gloo (a file store), running the same steps give the
greedy ids of one unsharded stage and of HF transformers, each rank holding about half the
weights and reading only its slices; sizes that do not split are refused."""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shardline.backends.torch_ref import TorchBackend
from shardline.models.attention import AttentionMetadata
from shardline.models.config import ModelConfig
from shardline.models.kv_cache import KVCache
from shardline.models.parallel import AbsentExpert, check_tensor_parallel, shard_spec, slice_stage
from shardline.models import weights as W
from shardline.protocol.plan import SamplingConfig
from shardline.transforms.quantize import weight_bytes
from shardline.transforms.fuse import fuse_stage
from shardline.transforms.quantize import quantize_fp8
from shardline.transforms.shard import (TensorParallel, check_int4_groups,
                                        quantize_row_parallel, shard_stage)
from shardline.worker.build import load_runner
from shardline.worker.runner import StageRunner
from tests.unit.test_model import Driver, hf_greedy

WORLD = 2
PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7], list(range(10, 40))]
NEW_TOKENS = 12
RUN = dict(dtype=torch.float32, kv_cache_bytes=1 << 20, block_size=4)
BF16 = {"dtype": "bfloat16"}
# case: (tiny family, stage bounds, load_runner options)
CASES = {
    "llama": ("llama", (0, 4), {}),                      # tied head, GQA 4 / 2
    "llama-unfused": ("llama", (0, 4), {"fuse": False}),
    "llama-2-stages": ("llama", (0, 1, 4), {}),          # hidden states between sharded stages
    "llama-mqa": ("llama-mqa", (0, 4), {}),              # 1 KV head on both ranks, vocab 125
    "phi3": ("phi3", (0, 4), {}),                        # fused qkv / gate_up read as slices
    "qwen2": ("qwen2", (0, 4), {}),                      # q/k/v biases cut with their rows
    "gemma2": ("gemma2", (0, 4), {}),                    # final soft-capping after the gather
    "gemma3": ("gemma3", (0, 4), {}),                    # q/k norms, local / global RoPE
    "qwen3-moe": ("qwen3-moe", (0, 4), {}),              # experts sharded, one dense layer
    "qwen3-moe-ep": ("qwen3-moe", (0, 4), {"expert_parallel": True}),   # experts split
    "mixtral": ("mixtral", (0, 4), {}),
    "llama-int8": ("llama", (0, 4), {"quantize": "int8", "quantize_head": True}),
    # down_proj: 96 input columns per rank, in groups of 32
    "llama-mqa-int4": ("llama-mqa", (0, 4), {"quantize": "int4"}),
    # partial sums rounded to bf16 on each rank, summed in float32: close, not equal
    "llama-bf16": ("llama", (0, 4), {"dtype": "bfloat16"}),
    # the GPU engine (eager on the CPU: its buffers, paged attention and sampling on the
    # device) through the model's all-reduce hooks
    "llama-engine": ("llama", (0, 4), {"gpu_engine": "on"}),
    "qwen3-moe-engine": ("qwen3-moe", (0, 4), {"gpu_engine": "on"}),
    # bf16 on the CPU kernels, each layer's halves with an all-reduce between them
    "kernels": ("llama-wide", (0, 4), BF16),
    "kernels-2-stages": ("llama-wide", (0, 2, 4), BF16),
    "kernels-int8": ("llama-wide", (0, 4), {**BF16, "quantize": "int8"}),
    "kernels-gemma3": ("gemma3-wide", (0, 4), BF16),       # sandwich norms, capped logits
    "kernels-moe": ("qwen3-moe-wide", (0, 4), BF16),       # every expert's columns
    "kernels-moe-ep": ("qwen3-moe-wide", (0, 4), {**BF16, "expert_parallel": True}),
}
QUANTIZED = ("llama-int8", "llama-mqa-int4")
KERNEL_CASES = [c for c in CASES if c.startswith("kernels")]
BACKENDS = {"llama-engine": "gpu-engine", "qwen3-moe-engine": "gpu-engine",
            **{c: "cpu-kernels" for c in KERNEL_CASES}}
SEEDED = [SamplingConfig(temperature=0.8, top_p=0.9, seed=7 + i) for i in range(len(PROMPTS))]


def _runners(path: str, bounds, **options):
    return [load_runner(path, a, b, **{**RUN, **options}) for a, b in zip(bounds, bounds[1:])]


def _scales(runner) -> list[list[float]]:
    """Layer 0's int8 row scales of o_proj and down_proj (row-parallel when sharded)."""
    layer = runner.model.layers[0]
    mods = (layer.self_attn.o_proj, getattr(layer.mlp, "down_proj", None))
    return [m.scale.tolist() for m in mods if hasattr(m, "qweight")]


def _logits(runner, ids: list[int]) -> list[list[float]]:
    """float32 logits of every row of a one-shot prefill of ids (blocks 0..)."""
    bs = runner.block_size
    with torch.inference_mode():
        meta = AttentionMetadata.build([0], [len(ids)], [list(range(-(-len(ids) // bs)))], bs,
                                       runner.device)
        x = runner.model(runner.model.embed(torch.tensor(ids)), meta, runner.kv_cache.layers)
        return runner.model.logits(x).tolist()


def _backend_logits(runners: list[StageRunner], ids: list[int], prefill: int = 20,
                    seq_blocks: int = 16) -> list[list[float]]:
    """float32 logits of ids through the runners' backends (the kernels' own forward and
    head): a prefill of the first `prefill` tokens, then one token per step (decode rows),
    teacher-forced; every row's logits of the prefill's last token and of each decode step.
    Uses blocks [0, seq_blocks) of each runner's cache."""
    bs = runners[0].block_size
    table = [list(range(seq_blocks))]
    out = []
    with torch.inference_mode():
        for start, n in [(0, prefill)] + [(p, 1) for p in range(prefill, len(ids))]:
            x = None
            for r in runners:
                meta = r.backend.build_metadata([start], [n], table, bs)
                x = r.backend.embed(ids[start:start + n]) if x is None else x
                x = r.backend.forward(x, meta, r.kv_cache)
            out += r.backend.logits(x[-1:]).tolist()
    return out


def _whole_then_sharded(path: str, rank: int, world: int) -> StageRunner:
    """The transform on whole loaded weights (no sharded loading): load, shard_stage, fuse."""
    cfg = ModelConfig.from_dir(path)
    model = W.load_stage_model(path, cfg, 0, cfg.num_layers, torch.float32, "cpu")
    fuse_stage(shard_stage(model, TensorParallel(rank, world)))
    cache = KVCache(cfg.num_layers, 64, RUN["block_size"], model.shard.num_kv_heads,
                    cfg.head_dim, torch.float32, "cpu")
    return StageRunner(TorchBackend(model), cache)


ROW_PARALLEL = ("layers.0.self_attn.o_proj", "layers.3.mlp.down_proj")


def _fp8_row_parallel(path: str, tp: TensorParallel) -> dict:
    """The rank's fp8 o_proj / down_proj (quantize_row_parallel, without quantize_stage's
    device check: e4m3 values and scales are computed the same on the CPU)."""
    cfg = ModelConfig.from_dir(path)
    model = W.load_stage_model(path, cfg, 0, cfg.num_layers, torch.float32, "cpu")
    quantize_row_parallel(shard_stage(model, tp), tp, "fp8")
    return {n: (model.get_submodule(n).qweight.float().tolist(),
                model.get_submodule(n).scale.tolist()) for n in ROW_PARALLEL}


SHM_SHAPES = [((1, 64), torch.bfloat16), ((16, 64), torch.bfloat16), ((3, 100), torch.float32),
              ((64, 64), torch.float32)]          # the last exceeds a 4 KiB slot: gloo


def _shm_input(rank: int, call: int, shape, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + call)
    return torch.randn(shape, generator=g).to(dtype)


def _shm_sums(tp: TensorParallel) -> dict:
    """Sums of every SHM_SHAPES tensor, 3 calls each in turn (both slot parities reused),
    through ShmAllReduce with 4 KiB slots; None where the kernels do not load here."""
    from shardline.backends.cpu_kernels import build
    from shardline.backends.cpu_kernels.shm_comm import ShmAllReduce
    kernels = build.load()
    if kernels is None:
        return None
    comm = ShmAllReduce.create(kernels, tp, slot_bytes=4096)
    sums = [comm(_shm_input(tp.rank, call, shape, dtype)).float().tolist()
            for call in range(3) for shape, dtype in SHM_SHAPES]
    return dict(sums=sums, shm_calls=comm.seq, path=comm.path,
                path_left=os.path.exists(comm.path))


def _rank_main(rank: int, world: int, store: str, out_dir: str, cases: dict) -> None:
    """One rank: join the gloo group, run every case's steps, write what it saw."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    try:
        for name, (path, bounds, options) in cases.items():
            runners = _runners(path, bounds, tensor_parallel=(rank, world), **options)
            results[name] = dict(
                ids=Driver(runners).run(PROMPTS, NEW_TOKENS, chunk=4, stagger=1),
                weight_bytes=[weight_bytes(r.model) for r in runners],
                kv_heads=[r.kv_cache.k.shape[1] for r in runners],
                backends=[r.backend.name for r in runners], scales=_scales(runners[0]))
            if name == "kernels":
                runners[0].release_module_weights()     # the worker's order: then steps
                results[name]["released"] = Driver(runners).run(PROMPTS, NEW_TOKENS, chunk=4,
                                                                 stagger=1, seq_id_base=200)
            if name == "llama":
                results["seeded"] = dict(ids=Driver(runners, seed=3).run(
                    PROMPTS, 6, sampling=SEEDED, seq_id_base=100))
            if name == "llama-bf16":
                results[name]["logits"] = _logits(runners[0], PROMPTS[2])
            if name in KERNEL_CASES:
                results[name]["logits"] = _backend_logits(runners, PROMPTS[2])
        runner = _whole_then_sharded(cases["llama"][0], rank, world)
        results["shm"] = _shm_sums(TensorParallel(rank, world))
        results["fp8"] = _fp8_row_parallel(cases["llama"][0], TensorParallel(rank, world))
        results["transform"] = dict(ids=Driver([runner]).run(PROMPTS, NEW_TOKENS, chunk=4,
                                                             stagger=1))
    finally:
        dist.destroy_process_group()
    pathlib.Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def run_ranks(tmp: pathlib.Path, cases: dict, timeout_s: float = 240) -> list[dict]:
    """Every case on WORLD rank processes; each rank's results."""
    ctx = mp.start_processes(_rank_main, args=(WORLD, str(tmp / "store"), str(tmp), cases),
                             nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the ranks did not finish within {timeout_s} s")
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ranks(tiny_model_dir, tmp_path_factory) -> list[dict]:
    cases = {name: (str(tiny_model_dir(family)), bounds, options)
             for name, (family, bounds, options) in CASES.items()}
    return run_ranks(tmp_path_factory.mktemp("tp"), cases)


@pytest.fixture(scope="module")
def unsharded(tiny_model_dir) -> dict:
    """Each case on one process without tensor parallelism: ids and weight bytes."""
    out = {}
    for name, (family, bounds, options) in CASES.items():
        runners = _runners(tiny_model_dir(family), bounds, **options)
        out[name] = dict(ids=Driver(runners).run(PROMPTS, NEW_TOKENS, chunk=4, stagger=1),
                         backends=[r.backend.name for r in runners],
                         weight_bytes=[weight_bytes(r.model) for r in runners],
                         scales=_scales(runners[0]))
        if name == "llama":
            out["seeded"] = dict(ids=Driver(runners, seed=3).run(
                PROMPTS, 6, sampling=SEEDED, seq_id_base=100))
        if name in ("llama", "llama-bf16"):
            out[name]["logits"] = _logits(runners[0], PROMPTS[2])
        if name in KERNEL_CASES:
            # one stage on the kernels, and float32 on the reference
            out[name]["logits"] = _backend_logits(runners, PROMPTS[2])
            exact = _runners(tiny_model_dir(family), bounds,
                             **{**options, "dtype": torch.float32})
            out[name]["exact"] = _backend_logits(exact, PROMPTS[2])
    return out


@pytest.fixture(scope="module")
def hf_ids(tiny_model_dir):
    """family -> HF transformers' float32 greedy ids of PROMPTS (made once per family)."""
    made = {}

    def get(family: str) -> list[list[int]]:
        if family not in made:
            made[family] = hf_greedy(tiny_model_dir(family), PROMPTS, NEW_TOKENS)
        return made[family]
    return get


FLOAT_CASES = [c for c in CASES if c not in QUANTIZED and c != "llama-bf16"
               and c not in KERNEL_CASES]


@pytest.mark.parametrize("case", FLOAT_CASES)
def test_two_ranks_give_the_unsharded_and_hf_greedy_ids(ranks, unsharded, hf_ids, case):
    assert ranks[0][case]["ids"] == ranks[1][case]["ids"]
    assert ranks[0][case]["ids"] == unsharded[case]["ids"]
    assert unsharded[case]["ids"] == hf_ids(CASES[case][0])
    assert set(ranks[0][case]["backends"]) == {BACKENDS.get(case, "torch")}
    assert set(unsharded[case]["backends"]) == {BACKENDS.get(case, "torch")}


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_ranks_on_the_cpu_kernels_stay_as_close_to_float32_as_one_stage_on_them(
        ranks, unsharded, case):
    """bf16 ranks on the CPU kernels (attention to o, all-reduce, MLP or the rank's experts,
    all-reduce; the head's vocab slices gathered): every rank computes the same logits and
    ids, and those stay as close to float32's as one unsharded stage on the kernels does,
    over a prefill and 10 decode steps. A missing or doubled sum is off by O(1)."""
    assert set(ranks[0][case]["backends"]) == set(unsharded[case]["backends"]) == {"cpu-kernels"}
    assert ranks[0][case]["ids"] == ranks[1][case]["ids"]
    assert ranks[0][case]["logits"] == ranks[1][case]["logits"]
    exact = torch.tensor(unsharded[case]["exact"])
    two = torch.tensor(ranks[0][case]["logits"])
    one = torch.tensor(unsharded[case]["logits"])
    assert two.shape == one.shape == exact.shape and exact.shape[0] == 11
    err_two, err_one = (two - exact).abs().max().item(), (one - exact).abs().max().item()
    assert err_two <= 2 * err_one + 2e-2, (err_two, err_one)


def test_a_rank_on_the_kernels_steps_alike_after_freeing_its_module_weights(ranks):
    """The worker frees the modules' copies of what the kernels hold (the vocab slice's head
    included) before serving: the same ids after."""
    for r in ranks:
        assert r["kernels"]["released"] == r["kernels"]["ids"]


def test_bfloat16_ranks_agree_and_stay_as_close_to_float32_as_one_stage(ranks, unsharded):
    """bf16 partial sums, each rounded on its rank, summed in float32: not one stage's bf16
    rounding, so the logits are compared with float32's (greedy ids of this tiny random model
    flip on near-ties in bf16 either way)."""
    assert ranks[0]["llama-bf16"]["ids"] == ranks[1]["llama-bf16"]["ids"]
    assert ranks[0]["llama-bf16"]["logits"] == ranks[1]["llama-bf16"]["logits"]
    f32 = torch.tensor(unsharded["llama"]["logits"])
    err_two = (torch.tensor(ranks[0]["llama-bf16"]["logits"]) - f32).abs().max().item()
    err_one = (torch.tensor(unsharded["llama-bf16"]["logits"]) - f32).abs().max().item()
    assert err_two <= 2 * err_one + 1e-3, (err_two, err_one)


def test_the_transform_on_whole_loaded_weights_gives_the_same_ids(ranks, unsharded):
    assert ranks[0]["transform"]["ids"] == ranks[1]["transform"]["ids"] == \
        unsharded["llama"]["ids"]


def test_seeded_sampling_gives_every_rank_the_same_tokens(ranks, unsharded):
    assert ranks[0]["seeded"]["ids"] == ranks[1]["seeded"]["ids"] == unsharded["seeded"]["ids"]


def test_kv_heads_split_or_replicated(ranks):
    """2 KV heads: one per rank; 1 KV head: replicated, each rank's cache holds it."""
    assert [r["llama"]["kv_heads"] for r in ranks] == [[1], [1]]
    assert [r["llama-mqa"]["kv_heads"] for r in ranks] == [[1], [1]]


@pytest.mark.parametrize("case", ["llama", "qwen3-moe", "qwen3-moe-ep", "mixtral", *QUANTIZED])
def test_each_rank_holds_about_half_the_weights(ranks, unsharded, case):
    full = unsharded[case]["weight_bytes"][0]
    for r in ranks:
        # norms (and MoE routers) are replicated: a little over half
        assert 0.5 <= r[case]["weight_bytes"][0] / full < 0.53, (case, r[case], full)


@pytest.mark.parametrize("case", QUANTIZED)
def test_quantized_two_ranks_equal_quantized_one(ranks, unsharded, case):
    """Each rank quantizes its slice to its part of the unsharded stage's quantized weights:
    int8 row-parallel scales from the whole rows (here equal to one rank's), int4 groups
    inside a rank's columns; so the same ids as one quantized stage."""
    assert ranks[0][case]["ids"] == ranks[1][case]["ids"] == unsharded[case]["ids"]
    for r in ranks:
        assert r[case]["scales"] == unsharded[case]["scales"]


def test_fp8_row_parallel_ranks_hold_their_columns_of_the_whole_fp8_weights(
        ranks, tiny_model_dir):
    """fp8 scales of o_proj / down_proj from the whole rows (the max over both ranks'
    columns): rank 0's columns then rank 1's are the unsharded weights' e4m3 values."""
    path = tiny_model_dir("llama")
    cfg = ModelConfig.from_dir(path)
    whole = W.load_stage_model(path, cfg, 0, cfg.num_layers, torch.float32, "cpu")
    for name in ROW_PARALLEL:
        q, scale = quantize_fp8(whole.get_submodule(name).weight.detach())
        parts = [torch.tensor(r["fp8"][name][0]) for r in ranks]
        assert parts[0].shape[1] == parts[1].shape[1] == q.shape[1] // 2
        assert torch.equal(torch.cat(parts, dim=1), q.float())
        for r in ranks:
            assert r["fp8"][name][1] == scale.tolist()


def test_shared_memory_sums_equal_on_every_rank_and_leave_no_file(ranks):
    """ShmAllReduce (the CPU kernels' sums): every rank gets sum(rank inputs), rounded once
    to the dtype, identical on both; a tensor larger than a slot goes over gloo (not counted
    in the shared calls); the /dev/shm file is gone once both ranks mapped it."""
    if ranks[0]["shm"] is None:
        pytest.skip("the CPU kernels do not load on this CPU")
    assert ranks[0]["shm"]["sums"] == ranks[1]["shm"]["sums"]
    expected = [(_shm_input(0, call, shape, dtype).float() + _shm_input(1, call, shape, dtype)
                 .float()).to(dtype).float().tolist()
                for call in range(3) for shape, dtype in SHM_SHAPES]
    assert ranks[0]["shm"]["sums"] == expected
    assert ranks[0]["shm"]["shm_calls"] == ranks[1]["shm"]["shm_calls"] == 3 * 3
    assert ranks[0]["shm"]["path"] == ranks[1]["shm"]["path"]
    assert not ranks[0]["shm"]["path_left"] and not ranks[1]["shm"]["path_left"]


# ---- in one process: the spec, the loader, the refusals ------------------------------------

def _config(path) -> ModelConfig:
    return ModelConfig.from_dir(path)


@pytest.mark.parametrize("family", ["llama", "phi3", "qwen3-moe", "qwen3-moe-ep", "llama-mqa",
                                    "qwen2"])
def test_loader_reads_only_each_ranks_slices_and_agrees_with_the_transform(
        tiny_model_dir, monkeypatch, family):
    family, ep = family.removesuffix("-ep"), family.endswith("-ep")
    path = tiny_model_dir(family)
    cfg = _config(path)
    full = W.load_stage_model(path, cfg, 0, 4, torch.float32, "cpu")
    whole_reads = []
    real_open = W.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, name):
            whole_reads.append(name)
            return self.f.get_tensor(name)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(W, "safe_open", Spy)
    names = dict(full.named_parameters())
    for rank in range(WORLD):
        spec = shard_spec(cfg, 0, 4, rank, WORLD, expert_parallel=ep)
        whole_reads.clear()
        sharded = W.load_stage_model(path, cfg, 0, 4, torch.float32, "cpu", spec)
        sources = W.checkpoint_names(sharded)
        assert whole_reads and not {sources[n] for n in spec.params} & set(whole_reads)
        cut = slice_stage(W.load_stage_model(path, cfg, 0, 4, torch.float32, "cpu"), spec)
        ours, theirs = dict(sharded.named_parameters()), dict(cut.named_parameters())
        assert ours.keys() == theirs.keys()
        for name, p in ours.items():
            torch.testing.assert_close(p, theirs[name], rtol=0, atol=0)
            want = spec.params[name].take(names[name]) if name in spec.params else names[name]
            torch.testing.assert_close(p, want, rtol=0, atol=0)
        assert all(layer.self_attn.num_heads == 2 for layer in sharded.layers)
        assert sharded.embed_tokens.weight.shape[0] == spec.vocab[1] - spec.vocab[0]
        absent = [n for n, m in sharded.named_modules() if isinstance(m, AbsentExpert)]
        assert sorted(absent) == sorted(spec.absent)
        if cfg.num_experts and ep:                   # 2 of the 4 experts of each MoE layer
            assert len(absent) == 2 * sum(cfg.moe_layers)
            assert spec.experts == ((0, 2), (2, 4))[rank]
        elif cfg.num_experts:                        # every expert, 16 of its 32 columns
            assert not absent and spec.experts == (0, 4)
            expert = sharded.layers[0].mlp.experts[3]
            assert expert.gate_proj.weight.shape == (16, 64)
            assert expert.down_proj.weight.shape == (64, 16)
        if family == "llama-mqa":                    # vocab 125: rows 63 + 62
            assert spec.vocab == ((0, 63), (63, 125))[rank]


def test_sizes_that_do_not_split_are_refused(tiny_model_dir):
    cfg = _config(tiny_model_dir("llama"))
    with pytest.raises(ValueError, match="4 attention heads are not divisible by 3"):
        check_tensor_parallel(cfg, 3)
    with pytest.raises(ValueError, match="KV heads neither"):
        check_tensor_parallel(dataclasses.replace(cfg, num_heads=12, num_kv_heads=3), 2)
    with pytest.raises(ValueError, match="intermediate size 160 is not divisible by 3"):
        check_tensor_parallel(dataclasses.replace(cfg, num_heads=6, num_kv_heads=3), 3)
    moe = dataclasses.replace(_config(tiny_model_dir("mixtral")), num_heads=8, num_kv_heads=8)
    with pytest.raises(ValueError, match="4 experts are not divisible by 8"):
        check_tensor_parallel(moe, 8, expert_parallel=True)
    check_tensor_parallel(dataclasses.replace(moe, num_experts=8), 8,
                          expert_parallel=True)                    # MoE layers only: no dense
    check_tensor_parallel(moe, 8)              # sharded: 160 / 8 columns of every expert
    with pytest.raises(ValueError, match="experts' intermediate size 160 is not divisible by 3"):
        check_tensor_parallel(dataclasses.replace(moe, num_heads=6, num_kv_heads=6), 3)
    with pytest.raises(ValueError, match="cannot be split across 3"):
        load_runner(tiny_model_dir("llama"), 0, 4, **RUN, tensor_parallel=(0, 3))


def test_without_a_process_group_or_with_unsupported_transforms_refused(tiny_model_dir):
    path = tiny_model_dir("llama")
    with pytest.raises(ValueError, match="init_process_group"):
        load_runner(path, 0, 4, **RUN, tensor_parallel=(0, 2))
    with pytest.raises(ValueError, match="pruning"):
        load_runner(path, 0, 4, **RUN, tensor_parallel=(0, 2), prune="0.5")


def test_int4_groups_must_divide_each_ranks_input_columns(tiny_model_dir):
    """down_proj's 160 input columns are 80 per rank: not groups of 32, groups of 16."""
    path = tiny_model_dir("llama")
    cfg = _config(path)
    model = W.load_stage_model(path, cfg, 0, 4, torch.float32, "cpu",
                               shard_spec(cfg, 0, 4, 1, WORLD))
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.down_proj's 80 input columns"):
        check_int4_groups(model, 32)
    check_int4_groups(model, 16)


@pytest.mark.parametrize("family", ["llama", "qwen3-moe"])
def test_random_weights_are_cut_to_each_ranks_slices(tiny_model_dir, tmp_path, family):
    """A random-weights checkpoint (weights.RANDOM_WEIGHTS_FILE): each rank gets the slices of
    the weights one unsharded stage gets."""
    (tmp_path / "config.json").write_text((tiny_model_dir(family) / "config.json").read_text())
    (tmp_path / W.RANDOM_WEIGHTS_FILE).write_text(json.dumps({"seed": 3, "std": 0.1}))
    cfg = _config(tmp_path)
    full = dict(W.load_stage_model(tmp_path, cfg, 0, 4, torch.float32, "cpu").named_parameters())
    for rank in range(WORLD):
        spec = shard_spec(cfg, 0, 4, rank, WORLD)
        sharded = W.load_stage_model(tmp_path, cfg, 0, 4, torch.float32, "cpu", spec)
        assert sharded.shard == spec
        tied = sharded.lm_head.weight is sharded.embed_tokens.weight
        assert tied == cfg.tie_word_embeddings
        for name, p in sharded.named_parameters():
            want = spec.params[name].take(full[name]) if name in spec.params else full[name]
            torch.testing.assert_close(p, want, rtol=0, atol=0)
