"""The GPU engine's fixed-shape step (GpuEngineBackend), run eagerly on this CPU: the same
tokens as the PyTorch reference backend and HF transformers through StageRunner, padding rows
that touch only the scratch block, no host sync inside the device phase, buffers whose
data_ptrs never move."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from shardline.backends.gpu.engine import GpuEngineBackend
from shardline.protocol.plan import SamplingConfig, SeqStep
from shardline.worker.build import load_runner

from tests.unit.conftest import make_tiny_model

KV_BYTES = 1 << 22
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"     # the device run: on the GPU


def _runner(model_dir, engine: bool, **options):
    return load_runner(model_dir, 0, 4, device=DEVICE, dtype="float32", cpu_kernels=False,
                       gpu_engine="on" if engine else "off", kv_cache_bytes=KV_BYTES,
                       engine_options=options or None)


PROMPTS = {1: list(range(3, 40)), 2: [5, 6, 7], 3: list(range(40, 61))}


class Driver:
    """Drives a runner like a scheduler would: chunked prefill of seq 1 (16 + 21 tokens, the
    second chunk in the same step as the other prompts), then decode steps of every sequence,
    taking new blocks as positions cross block boundaries."""

    def __init__(self, runner, sampling=None, seqs=PROMPTS):
        self.r, self.sampling = runner, sampling or {}
        self.prompts = seqs
        self.next_block = 0
        self.tables, self.pos, self.out = {}, {}, {i: [] for i in seqs}

    def _blocks(self, seq_id, end):
        need = -(-end // self.r.block_size) - len(self.tables.setdefault(seq_id, []))
        new = list(range(self.next_block, self.next_block + need))
        self.next_block += need
        self.tables[seq_id] += new
        return new

    def run(self, decode_steps=8, chunk=16):
        first, rest = list(self.prompts)[0], list(self.prompts)[1:]
        p = self.prompts[first]
        chunk = min(chunk, len(p) - 1)
        steps = [SeqStep(first, p[:chunk], 0, self._blocks(first, chunk), False, admit=True,
                         sampling=self.sampling.get(first, SamplingConfig()))]
        self._step(steps)
        steps = [SeqStep(first, p[chunk:], chunk, self._blocks(first, len(p)), True)]
        steps += [SeqStep(i, self.prompts[i], 0, self._blocks(i, len(self.prompts[i])), True,
                          admit=True, sampling=self.sampling.get(i, SamplingConfig()))
                  for i in rest]
        self.pos = {i: len(q) for i, q in self.prompts.items()}
        self._step(steps)
        for _ in range(decode_steps):
            self._step([SeqStep(i, [self.out[i][-1].token_id], self.pos[i],
                                self._blocks(i, self.pos[i] + 1), True,
                                num_generated=len(self.out[i])) for i in self.prompts])
            for i in self.prompts:
                self.pos[i] += 1
        return self.out

    def _step(self, steps):
        _, tokens = self.r.step(steps, [], None)
        for t in tokens:
            self.out[t.seq_id].append(t)


def _ids(out):
    return {i: [t.token_id for t in ts] for i, ts in out.items()}


def test_greedy_tokens_equal_the_reference_and_hf(tiny_llama):
    import transformers
    ref = _ids(Driver(_runner(tiny_llama, False)).run())
    got = _ids(Driver(_runner(tiny_llama, True)).run())
    assert got == ref
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    hf.generation_config.eos_token_id = None            # no early stop: 9 tokens each
    for i, p in PROMPTS.items():
        want = hf.generate(torch.tensor([p]), max_new_tokens=9, do_sample=False)[0, len(p):]
        assert got[i] == want.tolist(), i


def test_sampling_on_the_device(tiny_llama):
    """Seeded temperature / top-k / top-p draws, a repetition penalty and logprobs: a seeded
    sequence's tokens are the same alone and in a batch; greedy-with-penalty and logprobs
    equal the reference's."""
    sampling = {1: SamplingConfig(temperature=0.8, top_p=0.9, seed=7),
                2: SamplingConfig(temperature=1.0, top_k=5, seed=11, logprobs=True,
                                  top_logprobs=3),
                3: SamplingConfig(repetition_penalty=1.5, logprobs=True)}
    batched = Driver(_runner(tiny_llama, True), sampling).run()
    for i in (1, 2):
        alone = Driver(_runner(tiny_llama, True), {i: sampling[i]}, {i: PROMPTS[i]}).run()
        assert _ids(alone)[i] == _ids(batched)[i]
    ref = Driver(_runner(tiny_llama, False), {3: sampling[3]}, {3: PROMPTS[3]}).run()[3]
    assert [t.token_id for t in batched[3]] == [t.token_id for t in ref]
    assert [t.logprob for t in batched[3]] == pytest.approx([t.logprob for t in ref], abs=1e-4)
    assert all(len(t.top_token_ids) == 3 and t.top_token_ids[0] != t.top_token_ids[1]
               and t.logprob <= 0 for t in batched[2])
    assert all(t.top_token_ids == [] for t in batched[1])
    assert len(set(_ids(batched)[1])) > 1               # it samples, not argmax


def test_padding_rows_write_only_the_scratch_block(tiny_llama):
    r = _runner(tiny_llama, True)
    assert isinstance(r.backend, GpuEngineBackend)
    cache, bs = r.kv_cache, r.block_size
    scratch = cache.scratch_block
    assert scratch == r.num_blocks                      # beyond every id the scheduler may use
    steps = [SeqStep(i, [4, 5], 0, [b], True, admit=True, sampling=SamplingConfig())
             for i, b in zip((1, 2, 3), (2, 5, 9))]
    r.step(steps, [], None)
    before = cache.k.clone()
    r.step([SeqStep(i, [6], 2, [], True, num_generated=1) for i in (1, 2, 3)], [], None)
    assert r.backend.buffers.host["slot_mapping"][3] == scratch * bs     # bucket 4: 1 pad row
    changed = (cache.k != before).any(dim=-1).any(dim=1).any(dim=0)      # [slots]
    slots = set(torch.nonzero(changed).flatten().tolist())
    assert slots == {2 * bs + 2, 5 * bs + 2, 9 * bs + 2, scratch * bs}


class NoHostSync(TorchDispatchMode):
    """Fails on any op that reads a tensor value on the host or whose output shape depends on
    values, and counts copies out of the host staging buffer."""

    FORBIDDEN = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "lift_fresh",
                 "_assert_async", "equal", "is_nonzero", "item")

    def __init__(self, staging: torch.Tensor):
        super().__init__()
        self.staging = staging
        self.uploads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        assert not any(name.startswith(f) for f in self.FORBIDDEN), f"host sync: {name}"
        if name.startswith("copy_") or name.startswith("_to_copy"):
            src = args[1] if name.startswith("copy_") else args[0]
            dst = args[0] if name.startswith("copy_") else None
            if dst is not None:
                assert (dst.device == src.device or src.is_pinned()
                        or dst.is_pinned()), f"blocking copy: {name}"
            base = self.staging.data_ptr()
            if base <= src.data_ptr() < base + self.staging.numel():
                self.uploads += 1
        return func(*args, **(kwargs or {}))


def test_device_phase_makes_no_host_sync(tiny_llama, monkeypatch):
    r = _runner(tiny_llama, True)
    engine = r.backend
    launch, uploads = engine.launch, []

    def guarded(*args, **kwargs):
        for name in ("tolist", "item", "numpy", "__bool__", "__int__", "__float__"):
            monkeypatch.setattr(torch.Tensor, name, _refuse(name))
        try:
            with NoHostSync(engine.buffers.host_bytes) as guard:
                out = launch(*args, **kwargs)
        finally:
            monkeypatch.undo()
        uploads.append(guard.uploads)
        return out

    engine.launch = guarded
    sampling = {1: SamplingConfig(temperature=0.7, top_k=8, top_p=0.8, seed=3,
                                  top_logprobs=2),
                2: SamplingConfig(repetition_penalty=1.2),
                3: SamplingConfig(temperature=1.0)}
    Driver(r, sampling).run(decode_steps=3)
    assert uploads == [1] * len(uploads) and len(uploads) == 5


def _refuse(name):
    def refuse(*args, **kwargs):
        raise AssertionError(f"host sync: Tensor.{name} inside the device phase")
    return refuse


def test_buffers_keep_their_data_ptrs_over_50_steps(tiny_llama):
    r = _runner(tiny_llama, True)
    engine = r.backend
    fixed = {name: t.data_ptr() for name, t in engine.buffers.dev.items()}
    fixed.update(result=engine.result.data_ptr(), last_token=engine.last_token.data_ptr())
    seen = set()
    layers = engine._layers

    def record(meta, kv_cache, logits):
        seen.add((meta.positions.data_ptr(), meta.slot_mapping.data_ptr(),
                  meta.block_tables.data_ptr(), meta.context_lens.data_ptr()))
        return layers(meta, kv_cache, logits)

    engine._layers = record
    out = Driver(r, seqs={1: [3, 4, 5], 2: [9, 8]}).run(decode_steps=50)
    assert len(out[1]) == 51
    now = {name: t.data_ptr() for name, t in engine.buffers.dev.items()}
    now.update(result=engine.result.data_ptr(), last_token=engine.last_token.data_ptr())
    assert now == fixed
    assert len(seen) == 1                   # every step's metadata: the same views


def test_triton_kernels_in_the_engine(tiny_llama):
    """The engine with its Triton attention (the interpreter here): the reference's tokens."""
    ref = _ids(Driver(_runner(tiny_llama, False)).run(decode_steps=3))
    got = _ids(Driver(_runner(tiny_llama, True, attention="triton")).run(decode_steps=3))
    assert got == ref


@pytest.mark.parametrize("attention", ["torch", "triton"])
def test_sliding_windows_in_the_engine(tiny_mistral_swa, attention):
    """An 8-token window on every layer, prompts of 21-37 tokens: the reference's tokens."""
    ref = _ids(Driver(_runner(tiny_mistral_swa, False)).run(decode_steps=4))
    got = _ids(Driver(_runner(tiny_mistral_swa, True, attention=attention)).run(decode_steps=4))
    assert got == ref


@pytest.mark.parametrize("family,attention", [("gemma2", "triton"), ("gemma3", "torch"),
                                              ("qwen3-moe", "torch")])
def test_families_in_the_engine(tmp_path_factory, family, attention):
    """Soft-capped, windowed and global layers with their own RoPE tables (Gemma 2 / 3),
    experts (Qwen3-MoE): the engine gives the reference's tokens."""
    path = make_tiny_model(tmp_path_factory.mktemp(f"engine-{family}"), family)
    ref = _ids(Driver(_runner(path, False)).run(decode_steps=3))
    got = _ids(Driver(_runner(path, True, attention=attention)).run(decode_steps=3))
    assert got == ref


def test_a_step_beyond_the_engine_limits_is_refused(tiny_llama):
    r = _runner(tiny_llama, True, max_num_seqs=2)
    steps = [SeqStep(i, [4], 0, [i], True, admit=True, sampling=SamplingConfig())
             for i in (1, 2, 3)]
    with pytest.raises(ValueError, match="exceeds the engine's 2 sequences"):
        r.step(steps, [], None)
    assert r.max_position == 512            # the tiny model's positions fit the tables


def test_warm_up_prepares_every_bucket_in_the_scratch_block(tiny_llama):
    """warm_up: a throwaway sequence in block 0, then a padding-only step per decode bucket
    (on CUDA each captured as its graph): only block 0 and the scratch block are written, and
    the engine serves the reference's tokens afterwards."""
    r = _runner(tiny_llama, True, max_num_seqs=8)
    cache, bs = r.kv_cache, r.block_size
    runs = []
    layers = r.backend._layers
    r.backend._layers = lambda meta, kv, logits: runs.append(meta.num_tokens) or layers(
        meta, kv, logits)
    r.warm_up()
    assert runs.count(4) and runs.count(8)              # buckets only prepare() runs
    written = set(torch.nonzero((cache.k != 0).any(dim=-1).any(dim=1).any(dim=0))
                  .flatten().div(bs, rounding_mode="floor").tolist())
    assert written == {0, cache.scratch_block}
    r.backend._layers = layers
    ref = _ids(Driver(_runner(tiny_llama, False)).run(decode_steps=3))
    assert _ids(Driver(r).run(decode_steps=3)) == ref
