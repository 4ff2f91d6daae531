"""Tensor parallelism's arithmetic: which part of a stage's weights each of T ranks holds
(Megatron-style), computed once by `shard_spec` and applied by `slice_stage`, which the sharded
loader (weights.py, on the meta skeleton, before reading slices) and the shard transform
(transforms/shard.py, on loaded weights) both call, so the two cannot disagree.

    q/k/v          column-parallel by heads: rank r holds q heads [r H/T, (r+1) H/T) and the
                   KV heads they read: KV/T of them, or (KV < T) its group's one KV head,
                   replicated on the T/KV ranks whose q heads read it
    o_proj         row-parallel: the input columns of the rank's q heads (outputs summed)
    gate/up        column-parallel over the intermediate size
    down_proj      row-parallel over the intermediate size (outputs summed)
    experts        sharded (the default): every expert's gate/up column-parallel and down
                   row-parallel over the expert's intermediate size, as a dense MLP (each rank
                   does 1/T of every routed expert: balanced at any batch);
                   or expert-parallel (expert_parallel=True): rank r holds experts
                   [r E/T, (r+1) E/T) whole, the others become AbsentExpert (skipped);
                   outputs summed either way; the router replicated
    embed_tokens   vocab rows [r ceil(V/T), (r+1) ceil(V/T)) (the last rank's may be fewer)
    lm_head        the same vocab rows (logits gathered)
    norms          replicated (q/k norms are per head: the same on every head)

    H = 4, KV = 2, T = 2:  rank 0: q heads 0 1, KV head 0    rank 1: q heads 2 3, KV head 1
    H = 4, KV = 1, T = 2:  rank 0: q heads 0 1, KV head 0    rank 1: q heads 2 3, KV head 0

Plain arithmetic and module surgery: no process group here (transforms/shard.py owns the
collectives: the sums and the gather above).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from shardline.models.config import ModelConfig


@dataclass(frozen=True)
class Shard:
    """The slice [start, end) along dimension `dim` of one parameter that a rank holds."""
    dim: int
    start: int
    end: int

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """t's slice (a view)."""
        return t.narrow(self.dim, self.start, self.end - self.start)


@dataclass(frozen=True)
class ShardSpec:
    """What rank `rank` of `world_size` holds of layers [layer_start, layer_end)."""
    rank: int
    world_size: int
    layer_start: int
    layer_end: int
    num_heads: int                       # the rank's q heads (attention's local count)
    num_kv_heads: int                    # the rank's KV heads (its KV cache's)
    vocab: tuple[int, int]               # [start, end) of the embedding / LM head rows
    vocab_chunk: int                     # ceil(V / T): every rank's row count but the last's
    experts: tuple[int, int]             # [first, end) of the experts held ((0, 0): no MoE;
                                         # sharded experts: all of them, each in part)
    expert_parallel: bool                # experts whole on one rank each (else sharded)
    # StageModel parameter names (unfused, as loaded) -> the slice held; absent: parameters
    # replicated whole
    params: dict[str, Shard] = field(default_factory=dict, hash=False)
    # module names of the experts other ranks hold (layers.{j}.mlp.experts.{e})
    absent: tuple[str, ...] = ()


def check_tensor_parallel(config: ModelConfig, world_size: int,
                          expert_parallel: bool = False) -> None:
    """Raise ValueError unless the model splits evenly across world_size ranks: T divides the
    q heads, the KV heads divide by T or T by them, T divides the intermediate size (of any
    dense layer) and the experts' (sharded experts) or their number (expert_parallel), and
    every rank gets some vocab rows."""
    t = world_size
    if t < 1:
        raise ValueError(f"tensor parallel size must be >= 1, got {t}")
    h, kv = config.num_heads, config.num_kv_heads
    problems = []
    if h % t:
        problems.append(f"{h} attention heads are not divisible by {t}")
    if kv % t and t % kv:
        problems.append(f"{kv} KV heads neither divide by {t} nor divide it")
    dense = any(not config.is_moe(i) for i in range(config.num_layers))
    if dense and config.intermediate_size % t:
        problems.append(f"intermediate size {config.intermediate_size} is not divisible by {t}")
    if config.num_experts and expert_parallel and config.num_experts % t:
        problems.append(f"{config.num_experts} experts are not divisible by {t}")
    if config.num_experts and not expert_parallel and config.moe_intermediate_size % t:
        problems.append(f"the experts' intermediate size {config.moe_intermediate_size} is "
                        f"not divisible by {t}")
    chunk = -(-config.vocab_size // t)
    if (t - 1) * chunk >= config.vocab_size:
        problems.append(f"vocab size {config.vocab_size} leaves a rank no rows")
    if problems:
        raise ValueError(f"{config.model_type} cannot be split across {t} tensor-parallel "
                         f"ranks: {'; '.join(problems)}")


def _attention_shards(config: ModelConfig, rank: int, t: int) -> tuple[int, int, dict]:
    """(local q heads, local KV heads, {attention parameter leaf name -> Shard})."""
    hd, h, kv = config.head_dim, config.num_heads, config.num_kv_heads
    h_local = h // t
    q0 = rank * h_local
    if kv >= t:
        kv_local, kv0 = kv // t, rank * (kv // t)
    else:                                    # one KV head, shared by T / KV ranks
        kv_local, kv0 = 1, rank // (t // kv)
    q_rows = Shard(0, q0 * hd, (q0 + h_local) * hd)
    kv_rows = Shard(0, kv0 * hd, (kv0 + kv_local) * hd)
    out = {"q_proj.weight": q_rows, "k_proj.weight": kv_rows, "v_proj.weight": kv_rows,
           "o_proj.weight": Shard(1, q_rows.start, q_rows.end)}
    if config.attention_bias:
        out.update({"q_proj.bias": q_rows, "k_proj.bias": kv_rows, "v_proj.bias": kv_rows})
    return h_local, kv_local, out


def shard_spec(config: ModelConfig, layer_start: int, layer_end: int, rank: int,
               world_size: int, expert_parallel: bool = False) -> ShardSpec:
    """What rank `rank` of `world_size` holds of StageModel(config, layer_start, layer_end)
    (see the module docstring): experts sharded, or whole on one rank each with
    expert_parallel. Raises ValueError where check_tensor_parallel does."""
    check_tensor_parallel(config, world_size, expert_parallel)
    t = world_size
    if not 0 <= rank < t:
        raise ValueError(f"rank {rank} outside [0, {t})")
    h_local, kv_local, attn = _attention_shards(config, rank, t)
    inter = config.intermediate_size // t
    mlp = {"gate_proj.weight": Shard(0, rank * inter, (rank + 1) * inter),
           "up_proj.weight": Shard(0, rank * inter, (rank + 1) * inter),
           "down_proj.weight": Shard(1, rank * inter, (rank + 1) * inter)}
    per_expert = config.num_experts // t
    experts = (rank * per_expert, (rank + 1) * per_expert) if expert_parallel else \
        (0, config.num_experts)
    inter_e = config.moe_intermediate_size // t
    expert_mlp = {"gate_proj.weight": Shard(0, rank * inter_e, (rank + 1) * inter_e),
                  "up_proj.weight": Shard(0, rank * inter_e, (rank + 1) * inter_e),
                  "down_proj.weight": Shard(1, rank * inter_e, (rank + 1) * inter_e)}
    params: dict[str, Shard] = {}
    absent = []
    for j, layer in enumerate(range(layer_start, layer_end)):
        params.update({f"layers.{j}.self_attn.{k}": s for k, s in attn.items()})
        if config.is_moe(layer) and expert_parallel:
            absent += [f"layers.{j}.mlp.experts.{e}" for e in range(config.num_experts)
                       if not experts[0] <= e < experts[1]]
        elif config.is_moe(layer):
            params.update({f"layers.{j}.mlp.experts.{e}.{k}": s for e in range(config.num_experts)
                           for k, s in expert_mlp.items()})
        else:
            params.update({f"layers.{j}.mlp.{k}": s for k, s in mlp.items()})
    chunk = -(-config.vocab_size // t)
    vocab = (rank * chunk, min(config.vocab_size, (rank + 1) * chunk))
    if layer_start == 0:
        params["embed_tokens.weight"] = Shard(0, *vocab)
    if layer_end == config.num_layers:
        params["lm_head.weight"] = Shard(0, *vocab)
    return ShardSpec(rank, t, layer_start, layer_end, h_local, kv_local, vocab, chunk,
                     experts, expert_parallel, params, tuple(absent))


class AbsentExpert(nn.Module):
    """An expert another rank holds: here its output is zero (the ranks' outputs are summed).
    The MoE layer's routing runs unchanged; its grouping (moe.py) skips `absent` experts and
    their rows, so a rank computes only its own experts."""

    absent = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [rows, hidden] -> zeros [rows, hidden]
        return torch.zeros_like(x)


def slice_stage(model: nn.Module, spec: ShardSpec) -> nn.Module:
    """Cut a StageModel (unfused, unquantized; on any device, the meta device included) down
    to what spec's rank holds, in place: each parameter in spec.params replaced by its slice
    (a copy: the whole tensor is freed), the other ranks' experts by AbsentExpert, attention's
    head counts made the local ones; a tied embedding and head stay tied. Returns the model,
    with model.shard = spec."""
    if getattr(model, "shard", None) is not None:
        raise ValueError("the stage is already sliced for tensor parallelism")
    if (spec.layer_start, spec.layer_end) != (model.layer_start, model.layer_end):
        raise ValueError(f"a spec of layers [{spec.layer_start}, {spec.layer_end}) for a stage "
                         f"of layers [{model.layer_start}, {model.layer_end})")
    for layer in model.layers:
        if layer.fused:
            raise ValueError("slice a stage for tensor parallelism before fusing it")
    tied = (model.embed_tokens is not None and model.lm_head is not None
            and model.lm_head.weight is model.embed_tokens.weight)
    for name in spec.absent:
        experts, _, e = name.rpartition(".")
        model.get_submodule(experts)[int(e)] = AbsentExpert()
    for name, shard in spec.params.items():
        if tied and name == "lm_head.weight":
            continue
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        param = getattr(module, leaf)
        if not isinstance(module, (nn.Linear, nn.Embedding)) or param is None:
            raise ValueError(f"cannot slice {name}: not a float Linear or Embedding weight")
        setattr(module, leaf, nn.Parameter(shard.take(param.data).clone(),
                                           requires_grad=False))
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        else:
            module.num_embeddings = module.weight.shape[0]
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
        model.lm_head.out_features = model.embed_tokens.weight.shape[0]
    for layer in model.layers:
        layer.self_attn.num_heads = spec.num_heads
        layer.self_attn.num_kv_heads = spec.num_kv_heads
    model.shard = spec
    return model
