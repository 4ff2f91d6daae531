"""Per-sequence sampling on the last stage.

For each sequence that samples this step, over its last-position logits (float32):

    logits -> repetition penalty -> greedy argmax
                                 -> / temperature -> top-k -> top-p -> softmax -> draw

Draws use the exponential race: token = argmax(probs / E) with E ~ Exp(1) i.i.d., which
samples from `probs`. With a seed, E comes from a generator seeded by (seed, num_generated),
so the n-th token of a sequence depends only on its seed, its logits and n: not on the batch
it ran in, nor on whether it was preempted and recomputed. Without a seed E is fresh.

Log-probabilities (when asked) are those of the model's distribution, log_softmax of the
raw logits, before penalty, temperature and truncation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from shardline.backends.gpu.sampling import apply_repetition_penalty
from shardline.protocol.plan import SampledToken, SamplingConfig

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, n: int) -> int:
    """A 63-bit generator seed from (seed, n) (splitmix64 of the pair)."""
    z = (seed * 0x9E3779B97F4A7C15 + (n + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def apply_top_k_top_p(logits: torch.Tensor, top_k: Optional[torch.Tensor],
                      top_p: Optional[torch.Tensor]) -> torch.Tensor:
    """Mask to -inf every token outside the row's top-k (k = 0: off; ties with the k-th value
    are kept) and outside its nucleus: the smallest set of most likely tokens whose
    probability mass reaches top_p (1: off). logits: [N, V]; top_k: [N] long; top_p: [N]."""
    if top_k is None and top_p is None:
        return logits
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1)                         # ascending
    if top_k is not None:
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
        kth = sorted_logits.gather(1, (vocab - k)[:, None])            # [N, 1]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        below = probs.cumsum(dim=-1) <= (1 - top_p)[:, None]           # mass of it and smaller
        below[:, -1] = False                                           # always keep the top one
        sorted_logits = sorted_logits.masked_fill(below, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


@dataclass
class SeqSamplingState:
    config: SamplingConfig
    seen: Optional[torch.Tensor] = None   # [V] bool, tokens of the sequence (for the penalty)


class Sampler:
    """Holds each sequence's sampling state on the last stage and samples a batch of rows."""

    def __init__(self, vocab_size: int, device: torch.device, argmax=None):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.seqs: dict[int, SeqSamplingState] = {}
        # argmax over a row-major float32 [N, V] -> [N] int64 (torch.argmax's rules); the CPU
        # kernels' argmax_rows where they run (ATen's took 1 ms for 16 x 49152 logits)
        self._argmax = argmax or (lambda x: x.argmax(dim=-1))

    def add(self, seq_id: int, config: Optional[SamplingConfig]) -> None:
        """Start (or restart) a sequence's state."""
        config = config or SamplingConfig()
        seen = None
        if config.repetition_penalty != 1.0:
            seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
        self.seqs[seq_id] = SeqSamplingState(config, seen)

    def remove(self, seq_id: int) -> None:
        self.seqs.pop(seq_id, None)

    def observe(self, seq_id: int, token_ids: torch.Tensor) -> None:
        """Record tokens of the sequence (prompt chunks and fed-back samples) for the penalty."""
        state = self.seqs[seq_id]
        if state.seen is not None:
            state.seen[token_ids] = True

    def sample(self, logits: torch.Tensor, seq_ids: Sequence[int],
               num_generated: Sequence[int]) -> list[SampledToken]:
        """logits: [N, V] float32, row i for seq_ids[i], whose next token is its
        num_generated[i]-th generated one. Returns one SampledToken per row."""
        states = [self.seqs[s] for s in seq_ids]
        configs = [s.config for s in states]
        raw = logits
        penalized = [i for i, s in enumerate(states) if s.seen is not None]
        if penalized:
            rows = torch.tensor(penalized, device=logits.device)
            seen = torch.stack([states[i].seen for i in penalized])
            pen = torch.tensor([configs[i].repetition_penalty for i in penalized],
                               device=logits.device)
            logits = logits.index_copy(0, rows, apply_repetition_penalty(logits[rows], seen, pen))

        sampled = [i for i, c in enumerate(configs) if not c.greedy]
        tokens = self._argmax(logits.contiguous())  # all greedy: one argmax for the batch
        if sampled:
            tokens[sampled] = self._draw(logits[sampled], [configs[i] for i in sampled],
                                         [num_generated[i] for i in sampled])

        want = [i for i, c in enumerate(configs) if c.logprobs or c.top_logprobs > 0]
        out = [SampledToken(seq_id=s, token_id=t) for s, t in zip(seq_ids, tokens.tolist())]
        if want:
            self._logprobs(raw[want], tokens[want], [configs[i] for i in want],
                           [out[i] for i in want])
        return out

    def tokens(self, seq_ids: Sequence[int], token_ids: Sequence[int],
               logprobs: Optional[Sequence[float]] = None,
               top_ids: Optional[Sequence[Sequence[int]]] = None,
               top_logprobs: Optional[Sequence[Sequence[float]]] = None) -> list[SampledToken]:
        """SampledTokens of tokens a backend sampled itself (the GPU engine samples on the
        device): logprobs and the top ones kept for the sequences that asked, each to its own
        top_logprobs."""
        out = [SampledToken(seq_id=s, token_id=t) for s, t in zip(seq_ids, token_ids)]
        if logprobs is None:
            return out
        for i, tok in enumerate(out):
            c = self.seqs[tok.seq_id].config
            if c.logprobs or c.top_logprobs > 0:
                tok.logprob = logprobs[i]
            if c.top_logprobs > 0:
                tok.top_token_ids = list(top_ids[i][:c.top_logprobs])
                tok.top_logprobs = list(top_logprobs[i][:c.top_logprobs])
        return out

    def _draw(self, logits: torch.Tensor, configs: list[SamplingConfig],
              num_generated: list[int]) -> torch.Tensor:
        # logits: [N, V] -> tokens [N]
        dev = logits.device
        temps = torch.tensor([c.temperature for c in configs], device=dev)
        logits = logits / temps[:, None]
        top_k = top_p = None
        if any(c.top_k > 0 for c in configs):
            top_k = torch.tensor([c.top_k for c in configs], device=dev)
        if any(c.top_p < 1.0 for c in configs):
            top_p = torch.tensor([c.top_p for c in configs], device=dev)
        probs = apply_top_k_top_p(logits, top_k, top_p).softmax(dim=-1)
        noise = torch.empty_like(probs)
        unseeded = [i for i, c in enumerate(configs) if c.seed is None]
        if len(unseeded) == len(configs):
            noise.exponential_()
        else:
            for i, c in enumerate(configs):
                if c.seed is None:
                    noise[i].exponential_()
                else:
                    g = torch.Generator(device=dev)
                    g.manual_seed(mix_seed(c.seed, num_generated[i]))
                    noise[i].exponential_(generator=g)
        return self._argmax(probs / noise)

    def _logprobs(self, raw: torch.Tensor, tokens: torch.Tensor,
                  configs: list[SamplingConfig], out: list[SampledToken]) -> None:
        logp = torch.log_softmax(raw, dim=-1)                              # [N, V]
        chosen = logp.gather(1, tokens[:, None])[:, 0].tolist()
        k = max(c.top_logprobs for c in configs)
        top_vals = top_ids = None
        if k > 0:
            top_vals, top_ids = logp.topk(k, dim=-1)
            top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
        for i, (c, tok) in enumerate(zip(configs, out)):
            tok.logprob = chosen[i]
            if c.top_logprobs > 0:
                tok.top_token_ids = top_ids[i][:c.top_logprobs]
                tok.top_logprobs = top_vals[i][:c.top_logprobs]
