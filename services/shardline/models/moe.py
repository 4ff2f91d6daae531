"""Mixture-of-experts feed-forward (Mixtral, Qwen3-MoE): a router picks k of E expert MLPs per
token; the layer's output is the chosen experts' outputs weighted by the router.

    router logits [T, E] -> softmax (float32) -> top-k -> (renormalized over the k: Mixtral,
    Qwen3-MoE with norm_topk_prob) -> weights [T, k], expert ids [T, k]

Tokens are grouped per expert, not looped over: the T * k (token, expert) pairs are sorted by
expert, each expert runs once on its contiguous run of rows, and one index_add puts every
weighted output back on its token:

    pairs (t0,e2) (t0,e0) (t1,e2) (t1,e1)  --sort by expert-->  e0: t0 | e1: t1 | e2: t0 t1

Each expert is a plain MLP module, so quantization and fusion rewrite experts as they rewrite
any MLP (expert weights int8 / int4 like the rest). While a CUDA graph is being captured (no
host sync allowed) every expert runs on every row with zero weights where it was not chosen.
"""
from __future__ import annotations

import torch
from torch import nn

from shardline.models.layers import MLP, Linear


class SparseMoE(nn.Module):
    """Top-k routed experts. Parameter names follow Qwen3-MoE checkpoints (gate = the router,
    experts.{e}.gate_proj/up_proj/down_proj); weights.py maps Mixtral's names onto them."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 norm_topk_prob: bool, act: str = "silu"):
        super().__init__()
        self.gate = Linear(hidden_size, num_experts, bias=False)        # the router
        self.experts = nn.ModuleList(MLP(hidden_size, intermediate_size, act)
                                     for _ in range(num_experts))
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """router_logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int64)."""
        probs = torch.softmax(router_logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        weights, ids = self.route(self.gate(x))
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return dense_experts(x, weights, ids, self.experts)
        return grouped_experts(x, weights, ids, self.experts)

    def projection_parents(self) -> list[nn.Module]:
        """The experts held here (the router stays in full precision: quantize and fuse skip
        it; a tensor-parallel rank holds only its own experts: parallel.AbsentExpert)."""
        return [e for e in self.experts if isinstance(e, MLP)]


def grouped_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                    experts) -> torch.Tensor:
    """sum_j weights[t, j] * experts[ids[t, j]](x[t]) for every token t, each expert run once
    on the rows routed to it. x: [T, hidden]; weights, ids: [T, k]. Experts marked `absent`
    (a tensor-parallel rank's view of the others' experts: parallel.AbsentExpert) add zero
    and their rows are never gathered."""
    t, k = ids.shape
    flat = ids.reshape(-1)                                             # [T k]
    order = torch.argsort(flat, stable=True)                          # pairs grouped by expert
    counts = torch.bincount(flat, minlength=len(experts)).tolist()    # one host sync
    runs, start = [], 0                                               # (expert, first pair, n)
    for e, n in enumerate(counts):
        if n and not getattr(experts[e], "absent", False):
            runs.append((e, start, n))
        start += n
    out = torch.zeros_like(x)
    if not runs:
        return out
    if sum(n for _, _, n in runs) < flat.numel():                     # only the experts held
        order = torch.cat([order[s:s + n] for _, s, n in runs])
    token = order // k                                                # each pair's token
    rows = x.index_select(0, token)                                   # [pairs, hidden]
    pair_weight = weights.reshape(-1).index_select(0, order)[:, None]  # [pairs, 1] float32
    outs, start = [], 0
    for e, _, n in runs:
        outs.append(experts[e](rows[start:start + n]))
        start += n
    y = torch.cat(outs) * pair_weight                                 # [pairs, hidden] float32
    return out.index_add_(0, token, y.to(x.dtype))


def dense_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                  experts: nn.ModuleList) -> torch.Tensor:
    """grouped_experts without host syncs (for CUDA graphs): every expert on every row,
    weighted by zero where it was not chosen."""
    full = torch.zeros(x.shape[0], len(experts), dtype=torch.float32, device=x.device)
    full.scatter_(1, ids, weights)                                    # [T, E]
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        if not getattr(expert, "absent", False):
            out += (expert(x) * full[:, e:e + 1]).to(x.dtype)
    return out
