"""Sampler: greedy, temperature / top-k / top-p masks, repetition penalty, seeds, logprobs."""
from __future__ import annotations

import math

import pytest
import torch

from shardline.protocol.plan import SamplingConfig
from shardline.worker.sampler import (Sampler, apply_repetition_penalty, apply_top_k_top_p,
                                      mix_seed)

V = 8
INF = float("-inf")


def make(configs: dict[int, SamplingConfig]) -> Sampler:
    s = Sampler(V, torch.device("cpu"))
    for seq_id, c in configs.items():
        s.add(seq_id, c)
    return s


def test_greedy_is_argmax_for_the_whole_batch():
    logits = torch.randn(5, V)
    s = make({i: SamplingConfig() for i in range(5)})
    out = s.sample(logits, list(range(5)), [0] * 5)
    assert [t.token_id for t in out] == logits.argmax(-1).tolist()
    assert [t.seq_id for t in out] == list(range(5))


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0, 5.0, 0.0, 4.0, 1.0],
                           [0.1, 3.0, 2.0, -1.0, 5.0, 0.0, 4.0, 1.0]])
    out = apply_top_k_top_p(logits, torch.tensor([3, 0]), None)
    assert out[0].tolist() == [INF, 3.0, INF, INF, 5.0, INF, 4.0, INF]
    assert torch.equal(out[1], logits[1])                               # k = 0: off


def test_top_k_keeps_ties_with_the_kth_value():
    out = apply_top_k_top_p(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), torch.tensor([2]), None)
    assert out[0].tolist() == [INF, 2.0, 2.0, INF]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3, 0.0, 0.0, 0.0, 0.0]]) + 1e-9
    logits = probs.log()
    # sorted: 0.5, 0.3 (cum 0.8), 0.15 (cum 0.95), 0.05
    keep = lambda p: (apply_top_k_top_p(logits, None, torch.tensor([p]))[0] > INF).nonzero()
    assert keep(0.4).flatten().tolist() == [1]
    assert keep(0.7).flatten().tolist() == [1, 3]
    assert keep(0.9).flatten().tolist() == [1, 2, 3]
    assert keep(0.99).flatten().tolist() == [0, 1, 2, 3]
    assert keep(1e-6).flatten().tolist() == [1]                         # always the top one


def test_top_k_then_top_p_and_sampling_stays_inside_the_mask():
    logits = torch.tensor([[2.0, 1.9, 1.8, 0.0, -1.0, -2.0, -3.0, -4.0]])
    s = make({0: SamplingConfig(temperature=1.0, top_k=3, top_p=0.6)})
    seen = {s.sample(logits, [0], [0])[0].token_id for _ in range(200)}
    # top-3 = {0, 1, 2} with probs ~ .37 .33 .30 -> nucleus 0.6 keeps {0, 1}
    assert seen == {0, 1}


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0]))
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_repetition_penalty_uses_the_sequence_history():
    s = make({0: SamplingConfig(repetition_penalty=3.0), 1: SamplingConfig()})
    s.observe(0, torch.tensor([4, 4, 2]))
    logits = torch.tensor([[0.0, 0.0, 2.0, 0.0, 2.5, 0.0, 0.0, 1.0]] * 2)
    out = s.sample(logits, [0, 1], [0, 0])
    # seq 0: 4 -> 0.83, 2 -> 0.67, so 7 (1.0) wins; seq 1 has no penalty
    assert [t.token_id for t in out] == [7, 4]


def test_seeded_draws_depend_only_on_seed_and_position():
    torch.manual_seed(0)
    logits = torch.randn(4, V)
    cfg = SamplingConfig(temperature=1.0, seed=42)
    alone = make({7: cfg}).sample(logits[2:3], [7], [5])[0].token_id
    others = {i: SamplingConfig(temperature=0.7, top_k=3, seed=None if i % 2 else i)
              for i in range(3)}
    batch = make({**others, 7: cfg})
    out = batch.sample(logits[[0, 1, 2, 3]], [0, 1, 7, 2], [1, 9, 5, 0])
    assert out[2].token_id == alone
    draws = {make({7: cfg}).sample(logits[2:3], [7], [n])[0].token_id for n in range(40)}
    assert len(draws) > 1                                    # different positions, new noise


def test_seeded_sampling_follows_the_distribution():
    logits = torch.tensor([[math.log(0.7), math.log(0.2), math.log(0.1)] + [INF] * (V - 3)])
    counts = torch.zeros(V)
    s = make({0: SamplingConfig(temperature=1.0, seed=3)})
    for n in range(2000):
        counts[s.sample(logits, [0], [n])[0].token_id] += 1
    freq = counts / counts.sum()
    assert abs(freq[0] - 0.7) < 0.04 and abs(freq[1] - 0.2) < 0.04 and freq[3:].sum() == 0


def test_unseeded_sampling_uses_fresh_randomness():
    logits = torch.zeros(1, V)
    s = make({0: SamplingConfig(temperature=1.0)})
    assert len({s.sample(logits, [0], [0])[0].token_id for _ in range(50)}) > 1


def test_logprobs_equal_log_softmax_of_the_raw_logits():
    torch.manual_seed(1)
    logits = torch.randn(3, V)
    s = make({0: SamplingConfig(logprobs=True), 1: SamplingConfig(top_logprobs=3),
              2: SamplingConfig(temperature=0.5, seed=1, logprobs=True, top_logprobs=2)})
    out = s.sample(logits, [0, 1, 2], [0, 0, 0])
    ref = torch.log_softmax(logits, -1)
    for i, t in enumerate(out):
        assert t.logprob == pytest.approx(ref[i, t.token_id].item(), abs=1e-6)
    vals, ids = ref[1].topk(3)
    assert out[1].top_token_ids == ids.tolist()
    assert out[1].top_logprobs == pytest.approx(vals.tolist(), abs=1e-6)
    assert len(out[2].top_token_ids) == 2 and out[0].top_token_ids == []


def test_mix_seed_spreads_pairs():
    seeds = {mix_seed(s, n) for s in range(20) for n in range(20)}
    assert len(seeds) == 400 and all(0 <= x < 2**63 for x in seeds)


def test_removed_sequences_are_forgotten():
    s = make({0: SamplingConfig(repetition_penalty=1.2)})
    s.remove(0)
    assert s.seqs == {}
    with pytest.raises(KeyError):
        s.sample(torch.zeros(1, V), [0], [0])
