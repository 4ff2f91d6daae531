"""Sampling on the device, with no host sync: every choice is a tensor op on fixed shapes.

    logits [S, V] -> repetition penalty -> greedy rows: argmax
                                        -> / temperature -> top-k -> top-p -> probs
                                        -> argmax(probs / E),  E ~ Exp(1) from a hash

  * top-k: the k-th largest value from one `topk` of the batch's largest k, not a sort;
  * top-p: the nucleus threshold found by bisection over the float32 bit patterns of the
    probabilities (non-negative floats order like their bits): 31 masked sums per row find
    the largest probability t whose tokens p >= t hold at least top_p of the mass, exactly,
    without sorting the vocabulary (ties at the threshold are all kept);
  * noise: E = -log(u), u from a counter-based hash of (the row's 64-bit key, token index).
    A seeded row's key mixes (seed, num_generated) (splitmix64, vectorized on the host), so
    its n-th token depends only on its seed, its logits and n: not on the batch it ran in.
    Unseeded rows get fresh random keys.

Log-probabilities are those of the model's distribution (log_softmax of the raw logits).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B97F4A7C15
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def mix_keys(seeds: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """splitmix64 of (seed, counter) pairs, uint64 arrays -> int64 keys below 2**63 (the same
    mixing as the host sampler's worker.sampler.mix_seed)."""
    with np.errstate(over="ignore"):
        z = seeds.astype(np.uint64) * np.uint64(_GOLDEN) + (
            counters.astype(np.uint64) + np.uint64(1)) * np.uint64(_C1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_C1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_C2)
        z = z ^ (z >> np.uint64(31))
    return (z & np.uint64((1 << 63) - 1)).astype(np.int64)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of int64 tensors holding values in [0, 2**32). The multipliers are
    below 2**31 so no product leaves int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def exponential_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """[S] int64 keys -> [S, vocab] float32 Exp(1) draws, a pure function of (key, column)."""
    cols = torch.arange(vocab, device=keys.device, dtype=torch.int64)[None, :]
    lo, hi = (keys & _M32)[:, None], ((keys >> 32) & 0x7FFFFFFF)[:, None]
    h = _mix32(_mix32((cols * 0x2545F491 + lo) & _M32) ^ hi)
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))          # (0, 1)
    return -torch.log(u)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: torch.Tensor) -> torch.Tensor:
    """Positive logits of seen tokens divided by the penalty, negative ones multiplied."""
    p = penalty[:, None]
    return torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)


def top_k_mask(logits: torch.Tensor, top_k: torch.Tensor, max_k: int) -> torch.Tensor:
    """-inf outside each row's top_k (0: off; ties with the k-th value kept). max_k: the
    largest top_k of the batch (a host-side number), so one topk of width max_k serves all."""
    vocab = logits.shape[-1]
    width = min(max_k, vocab)
    top = logits.topk(width, dim=-1).values                            # [S, width] descending
    k = top_k.clamp(min=1, max=width)
    kth = top.gather(1, (k - 1)[:, None])                              # [S, 1]
    kth = torch.where((top_k > 0)[:, None], kth, torch.full_like(kth, float("-inf")))
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_mask(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero outside each row's nucleus: the tokens p >= t for the largest t whose tokens hold
    at least top_p of the mass (top_p >= 1: every token). 31 bisection steps over the bits."""
    bits = probs.contiguous().view(torch.int32)                        # >= 0, ordered as probs
    lo = torch.zeros(probs.shape[0], 1, dtype=torch.int32, device=probs.device)
    hi = bits.amax(dim=-1, keepdim=True) + 1                           # mass(p >= hi) = 0
    target = top_p[:, None].to(torch.float32)
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        mass = torch.where(bits >= mid, probs, 0.0).sum(dim=-1, keepdim=True)
        ok = mass >= target
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    lo = torch.where(target >= 1.0, torch.zeros_like(lo), lo)
    return torch.where(bits >= lo, probs, 0.0)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, keys: torch.Tensor, *, max_top_k: int, use_top_p: bool,
           all_greedy: bool) -> torch.Tensor:
    """[S, V] float32 logits (penalized already) -> [S] int64 tokens. temperature 0: greedy.
    max_top_k (0: no row uses top-k), use_top_p and all_greedy are host-side facts of the
    batch's parameters that only skip work; no tensor value is read on the host."""
    greedy = logits.argmax(dim=-1)
    if all_greedy:
        return greedy
    is_greedy = temperature <= 0
    scaled = logits / torch.where(is_greedy, torch.ones_like(temperature), temperature)[:, None]
    if max_top_k > 0:
        scaled = top_k_mask(scaled, top_k, max_top_k)
    probs = scaled.softmax(dim=-1)
    if use_top_p:
        probs = top_p_mask(probs, top_p)
    drawn = (probs / exponential_noise(keys, logits.shape[-1])).argmax(dim=-1)
    return torch.where(is_greedy, greedy, drawn)


def logprobs(raw: torch.Tensor, tokens: torch.Tensor,
             k: int) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(chosen token's logprob [S], top-k logprobs [S, k], their ids [S, k]) of the raw logits."""
    logp = torch.log_softmax(raw, dim=-1)
    chosen = logp.gather(1, tokens[:, None])[:, 0]
    if k <= 0:
        return chosen, None, None
    vals, ids = logp.topk(k, dim=-1)
    return chosen, vals, ids
