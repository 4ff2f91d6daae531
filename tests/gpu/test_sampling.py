"""The GPU engine's device sampling against the host sampler's definitions: top-k and the
bisection top-p keep exactly the sort-based sets, seeded keys mix like the host's, and the hash
noise draws from the distribution it is given."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from shardline.backends.gpu import sampling
from shardline.worker.sampler import apply_top_k_top_p, mix_seed


def _logits(rows, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3


@pytest.mark.parametrize("seed", range(4))
def test_top_p_keeps_the_sorted_nucleus(seed):
    logits = _logits(6, 1000, seed)
    top_p = torch.tensor([0.05, 0.3, 0.5, 0.9, 0.999, 1.0])
    want = apply_top_k_top_p(logits, None, top_p) > float("-inf")
    got = sampling.top_p_mask(logits.softmax(-1), top_p) > 0
    assert torch.equal(got, want)


def test_top_p_keeps_ties_at_the_threshold():
    probs = torch.tensor([[0.4, 0.2, 0.2, 0.2]])
    kept = sampling.top_p_mask(probs, torch.tensor([0.5])) > 0
    assert kept.tolist() == [[True, True, True, True]]   # 0.4 + one 0.2 reaches 0.5: all ties
    kept = sampling.top_p_mask(probs, torch.tensor([0.4])) > 0
    assert kept.tolist() == [[True, False, False, False]]


@pytest.mark.parametrize("seed", range(3))
def test_top_k_keeps_the_k_largest(seed):
    logits = _logits(4, 500, seed)
    top_k = torch.tensor([0, 1, 7, 40])
    want = apply_top_k_top_p(logits, top_k, None) > float("-inf")
    got = sampling.top_k_mask(logits, top_k, max_k=40) > float("-inf")
    assert torch.equal(got, want)


def test_keys_mix_like_the_host_sampler():
    seeds = np.array([0, 1, 7, 2**40 + 3], dtype=np.uint64)
    counters = np.array([0, 5, 1, 99], dtype=np.uint64)
    keys = sampling.mix_keys(seeds, counters)
    assert keys.tolist() == [mix_seed(int(s), int(n)) for s, n in zip(seeds, counters)]


def test_noise_is_a_function_of_key_and_column():
    keys = torch.tensor([5, 9, 5], dtype=torch.int64)
    e = sampling.exponential_noise(keys, 64)
    assert torch.equal(e[0], e[2]) and not torch.equal(e[0], e[1])
    assert torch.equal(sampling.exponential_noise(keys[1:2], 64)[0], e[1])   # batch-free


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    n = 4000
    keys = torch.from_numpy(sampling.mix_keys(np.full(n, 3, dtype=np.uint64),
                                              np.arange(n, dtype=np.uint64)))
    logits = probs.log().expand(n, 4).contiguous()
    ones = torch.ones(n)
    tokens = sampling.sample(logits, ones, torch.zeros(n, dtype=torch.int64), ones, keys,
                             max_top_k=0, use_top_p=False, all_greedy=False)
    freq = torch.bincount(tokens, minlength=4).float() / n
    # 4000 fixed keys: a deterministic outcome; 4 standard errors of the largest cell is 0.032
    assert torch.allclose(freq, probs, atol=0.032), freq


def test_greedy_rows_take_the_argmax():
    logits = _logits(3, 50, 1)
    temp = torch.tensor([0.0, 1.0, 0.0])
    keys = torch.tensor([1, 2, 3], dtype=torch.int64)
    out = sampling.sample(logits, temp, torch.zeros(3, dtype=torch.int64), torch.ones(3), keys,
                          max_top_k=0, use_top_p=False, all_greedy=False)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()
