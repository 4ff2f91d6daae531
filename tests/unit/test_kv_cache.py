"""Paged KV cache: block budget, slot addressing, per-sequence state and plan validation."""
from __future__ import annotations

import pytest
import torch

from shardline.models.attention import AttentionMetadata
from shardline.models.kv_cache import KVCache
from shardline.protocol.plan import SamplingConfig, SeqStep
from shardline.worker.build import load_runner

BS = 4


def test_bytes_per_block_and_budget():
    per_block = KVCache.bytes_per_block(30, 16, 3, 64, torch.bfloat16)
    assert per_block == 2 * 30 * 16 * 3 * 64 * 2
    assert KVCache.num_blocks_for_budget(10 * per_block + per_block - 1, 30, 16, 3, 64,
                                         torch.bfloat16) == 10
    assert KVCache.num_blocks_for_budget(10 * per_block, 30, 16, 3, 64, torch.float32) == 5
    assert KVCache.num_blocks_for_budget(10 * per_block, 30, 16, 3, 64, torch.bfloat16,
                                         max_blocks=4) == 4
    cache = KVCache(2, 5, 16, 3, 64, torch.float16, "cpu")
    assert cache.k.shape == (2, 3, 80, 64) and cache.nbytes == 5 * KVCache.bytes_per_block(
        2, 16, 3, 64, torch.float16)
    assert len(cache.layers) == 2 and cache.layers[1][0].data_ptr() == cache.k[1].data_ptr()


def test_metadata_slots_positions_and_masks():
    meta = AttentionMetadata.build([0, 5, 2], [6, 1, 3], [[3, 1], [2, 0], [4, 6]], BS,
                                   torch.device("cpu"))
    assert meta.positions.tolist() == [0, 1, 2, 3, 4, 5, 5, 2, 3, 4]
    # seq 0: blocks [3, 1] -> 12..15, 4, 5; seq 1: pos 5 in block 0 -> 1;
    # seq 2: pos 2, 3 in block 4 -> 18, 19, pos 4 in block 6 -> 24
    assert meta.slot_mapping.tolist() == [12, 13, 14, 15, 4, 5, 1, 18, 19, 24]
    assert meta.decode.rows.tolist() == [6]
    assert meta.decode.gather.tolist() == [[8, 9, 10, 11, 0, 1]] and meta.decode.mask is None
    first, third = meta.prefills
    assert (first.row_start, first.row_end, first.gather, first.mask) == (0, 6, None, None)
    assert (third.row_start, third.row_end) == (7, 10)
    assert third.gather.tolist() == [16, 17, 18, 19, 24]
    assert third.mask.tolist() == [[True, True, True, False, False],
                                   [True, True, True, True, False],
                                   [True, True, True, True, True]]


def test_metadata_pads_decodes_of_different_lengths():
    meta = AttentionMetadata.build([1, 4], [1, 1], [[2], [0, 3]], BS, torch.device("cpu"))
    assert meta.decode.rows is None and meta.prefills == []
    # the shorter context is padded (with block 0's slots) and masked
    assert meta.decode.gather.tolist() == [[8, 9, 10, 11, 0], [0, 1, 2, 3, 12]]
    assert meta.decode.mask[0, :, 0].tolist() == [[True, True, False, False, False],
                                                  [True] * 5]


@pytest.fixture
def runner(tiny_model_dir):
    return load_runner(tiny_model_dir("llama"), 0, 4, dtype=torch.float32,
                       kv_cache_bytes=16 * KVCache.bytes_per_block(4, BS, 2, 16, torch.float32),
                       block_size=BS)


@pytest.fixture
def middle(tiny_model_dir):
    return load_runner(tiny_model_dir("llama"), 1, 3, dtype=torch.float32,
                       kv_cache_bytes=1 << 20, block_size=BS)


def admit(seq_id, tokens, blocks, start=0, **kw):
    return SeqStep(seq_id, tokens, start, blocks, sample=True, admit=True,
                   sampling=SamplingConfig(**kw))


def written_slots(runner):
    return set((runner.kv_cache.k[0, 0].abs().sum(-1) > 0).nonzero().flatten().tolist())


def test_budget_sets_the_block_count(runner):
    assert runner.num_blocks == 16 and runner.block_size == BS
    assert runner.is_first and runner.is_last and runner.num_layers == 4
    assert runner.kv_cache.k.shape == (4, 2, 16 * BS, 16)


def test_too_small_budget_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="holds no block"):
        load_runner(tiny_model_dir("llama"), 0, 4, dtype="float32", kv_cache_bytes=100, block_size=BS)


def test_slots_are_written_where_the_block_table_says(runner):
    runner.step([admit(1, [5, 6, 7, 8, 9, 10], [3, 1])], [], None)
    assert written_slots(runner) == {12, 13, 14, 15, 4, 5}
    runner.step([SeqStep(1, [11], 6, [], True, num_generated=1),
                 admit(2, [1, 2, 3], [7])], [], None)
    assert written_slots(runner) == {12, 13, 14, 15, 4, 5, 6, 28, 29, 30}
    assert runner.seqs[1].block_table == [3, 1] and runner.seqs[1].num_computed == 7
    runner.step([SeqStep(1, [12, 13], 7, [9], False)], [], None)
    assert runner.seqs[1].block_table == [3, 1, 9]
    assert {7, 36} <= written_slots(runner)


def test_freed_sequences_are_forgotten(runner):
    runner.step([admit(1, [1, 2], [0], repetition_penalty=1.3), admit(2, [3], [1])], [], None)
    assert set(runner.seqs) == {1, 2} and set(runner.sampler.seqs) == {1, 2}
    _, out = runner.step([SeqStep(2, [4], 1, [], True)], [1], None)
    assert set(runner.seqs) == {2} and set(runner.sampler.seqs) == {2}
    assert [t.seq_id for t in out] == [2]
    with pytest.raises(ValueError, match="unknown"):
        runner.step([SeqStep(1, [3], 2, [], True)], [], None)
    # re-admission after a free starts over
    runner.step([admit(1, [7, 7, 7], [5])], [], None)
    assert runner.seqs[1].block_table == [5] and runner.seqs[1].num_computed == 3


@pytest.mark.parametrize("bad, message", [
    (SeqStep(9, [1], 0, [2], True), "unknown"),
    (SeqStep(1, [1], 5, [], True), "start_pos 5 but 4 tokens"),
    (SeqStep(1, [1, 2, 3, 4, 5], 4, [], True), "need 3 blocks"),
    (SeqStep(1, [1], 4, [16], True), "outside"),
    (SeqStep(1, [1000], 4, [2], True), "token id"),
    (SeqStep(1, [], 4, [2], True), "no token_ids"),
])
def test_bad_plans_raise_and_change_nothing(runner, bad, message):
    runner.step([admit(1, [1, 2, 3, 4], [0]), admit(2, [5, 6], [1])], [], None)
    k_before, v_before = runner.kv_cache.k.clone(), runner.kv_cache.v.clone()
    ok = SeqStep(2, [7], 2, [], True)
    with pytest.raises(ValueError, match=message):
        runner.step([ok, bad], [], None)
    assert torch.equal(runner.kv_cache.k, k_before) and torch.equal(runner.kv_cache.v, v_before)
    assert runner.seqs[1].num_computed == 4 and runner.seqs[2].num_computed == 2
    assert runner.seqs[1].block_table == [0]
    runner.step([ok], [], None)                           # the good part still runs after


def test_a_last_sampled_step_computes_the_token_sampled_before(runner, tiny_model_dir):
    explicit = load_runner(tiny_model_dir("llama"), 0, 4, dtype=torch.float32,
                           kv_cache_bytes=1 << 20, block_size=BS)
    _, (t1,) = runner.step([admit(1, [5, 6, 7], [2])], [], None)
    _, (e1,) = explicit.step([admit(1, [5, 6, 7], [2])], [], None)
    assert t1.token_id == e1.token_id
    # the scheduler planned this before it knew t1: the worker fills it in
    _, (t2,) = runner.step([SeqStep(1, [], 3, [], True, num_generated=1, last_sampled=True)],
                           [], None)
    _, (e2,) = explicit.step([SeqStep(1, [t1.token_id], 3, [], True, num_generated=1)], [], None)
    assert t2.token_id == e2.token_id and runner.seqs[1].num_computed == 4
    with pytest.raises(ValueError, match="no token was sampled for that position"):
        runner.step([SeqStep(1, [], 3, [], True, last_sampled=True)], [], None)   # stale
    with pytest.raises(ValueError, match="carries no token_ids"):
        runner.step([SeqStep(1, [9], 4, [], True, last_sampled=True)], [], None)
    assert runner.seqs[1].num_computed == 4              # refused plans changed nothing
    _, (t3,) = runner.step([SeqStep(1, [], 4, [3], True, num_generated=2, last_sampled=True)],
                           [], None)


def test_last_sampled_needs_a_single_stage(middle):
    middle.step([admit(1, [1, 2], [0])], [], torch.randn(2, 64))
    with pytest.raises(ValueError, match="single-stage"):
        middle.step([SeqStep(1, [], 2, [], False, last_sampled=True)], [], torch.randn(1, 64))


def test_duplicate_sequences_and_stage_inputs_are_checked(runner, middle):
    with pytest.raises(ValueError, match="twice"):
        runner.step([admit(1, [1], [0]), admit(1, [2], [1])], [], None)
    with pytest.raises(ValueError, match="must not be sent hidden"):
        runner.step([admit(1, [1], [0])], [], torch.zeros(1, 64))
    assert not middle.is_first and not middle.is_last
    with pytest.raises(ValueError, match="needs hidden"):
        middle.step([admit(1, [1, 2], [0])], [], None)
    with pytest.raises(ValueError, match=r"shape \(3, 64\), the plan needs \(2, 64\)"):
        middle.step([admit(1, [1, 2], [0])], [], torch.zeros(3, 64))
    hidden, tokens = middle.step([admit(1, [1, 2], [0])], [], torch.randn(2, 64))
    assert hidden.shape == (2, 64) and tokens == []
    assert middle.sampler is None


def test_beyond_max_position_is_refused(tiny_model_dir):
    runner = load_runner(tiny_model_dir("llama"), 0, 4, dtype="float32", kv_cache_bytes=1 << 20, block_size=BS)
    assert runner.max_position == 512
    with pytest.raises(ValueError, match="beyond"):
        runner.step([admit(1, [1], list(range(129)), start=512)], [], None)


@pytest.mark.parametrize("bad, match", [
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=float("nan")), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(top_logprobs=10_000), "top_logprobs"),
])
def test_sampling_parameters_out_of_range_are_refused_on_admission(runner, bad, match):
    """The worker checks what the scheduler already validated: its port may be reached by
    other callers, and a bad admission must change nothing."""
    with pytest.raises(ValueError, match=match):
        runner.step([SeqStep(1, [1, 2], 0, [0], True, admit=True,
                             sampling=SamplingConfig(**bad))], [], None)
    assert runner.seqs == {} and runner.sampler.seqs == {}
