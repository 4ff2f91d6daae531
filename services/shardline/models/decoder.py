"""A Llama-style decoder cut to layers [layer_start, layer_end): one pipeline stage.

    stage 0:   token ids -> embed_tokens -> layers[a:b] -> hidden (residual stream)
    stage k:   hidden -> layers[a:b] -> hidden
    last:      hidden -> layers[a:b] -> norm -> lm_head (only at the rows that sample)

All sequences of a step are flattened into one batch of rows, x: [tokens, hidden].

A family is the config plus the few ways its layer differs: norms around attention and MLP
too (Gemma's sandwich norms), the MLP's activation, experts instead of one MLP (moe.py),
q/k norms, windows and soft-capping in attention, scaled embeddings and capped logits.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from shardline.models.attention import Attention, AttentionMetadata
from shardline.models.layers import MLP, Linear, RMSNorm, RotaryEmbedding, add_rms_norm
from shardline.models.config import ModelConfig
from shardline.models.moe import SparseMoE


class DecoderLayer(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + mlp(norm(h)).

    With sandwich norms (Gemma 2/3) the attention's and the MLP's outputs are normalized too,
    and post_attention_layernorm is the one after attention:
        h = x + post_attn_norm(attn(in_norm(x))); out = h + post_ff_norm(mlp(pre_ff_norm(h)))
    """

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps) if config.sandwich_norms else None
        self.post_feedforward_layernorm = RMSNorm(hidden, eps) if config.sandwich_norms else None
        if config.is_moe(layer):
            self.mlp = SparseMoE(hidden, config.moe_intermediate_size, config.num_experts,
                                 config.experts_per_token, config.norm_topk_prob,
                                 config.hidden_act)
        else:
            self.mlp = MLP(hidden, config.intermediate_size, config.hidden_act)
        self.uses_local_rope = config.local_rope is not None and config.window(layer) > 0
        self.fused = False               # set by fuse.fuse_stage: in-place residual adds

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        # x: [T, hidden]
        if self.pre_feedforward_layernorm is not None:
            a = self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, meta)
            h = x + self.post_attention_layernorm(a)
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        if self.fused:
            a = self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, meta)
            return self.post_attention(a, x)
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, meta)
        return h + self.mlp(self.post_attention_layernorm(h))

    def post_attention(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Fused layers, after attention: h = x + a (written into a); mlp(norm(h)) + h. The
        part of the layer that fuse.compile_stage hands to torch.compile."""
        if self.pre_feedforward_layernorm is not None:
            h = x + self.post_attention_layernorm(a)
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        normed, h = add_rms_norm(a, x, self.post_attention_layernorm)
        return self.mlp(normed).add_(h)


class StageModel(nn.Module):
    """Layers [layer_start, layer_end) of the model, plus the embedding on the first stage and
    the final norm and LM head on the last. Parameter names match HF checkpoints with the
    "model." prefix dropped and layers renumbered from 0 (see weights.py)."""

    def __init__(self, config: ModelConfig, layer_start: int, layer_end: int):
        super().__init__()
        if not 0 <= layer_start < layer_end <= config.num_layers:
            raise ValueError(f"layer range [{layer_start}, {layer_end}) is not inside "
                             f"[0, {config.num_layers})")
        self.config = config
        self.layer_start, self.layer_end = layer_start, layer_end
        self.is_first = layer_start == 0
        self.is_last = layer_end == config.num_layers
        self.embed_tokens = (nn.Embedding(config.vocab_size, config.hidden_size)
                             if self.is_first else None)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(layer_start, layer_end))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if self.is_last else None
        self.lm_head = (Linear(config.hidden_size, config.vocab_size, bias=False)
                        if self.is_last else None)
        self.rotary: Optional[RotaryEmbedding] = None   # built with the weights (see weights.py)
        self.rotary_local: Optional[RotaryEmbedding] = None   # sliding layers' own (Gemma 3)
        self.shard = None       # the tensor-parallel slice held (parallel.ShardSpec), if any

    def init_rotary(self, device: torch.device, dtype: torch.dtype) -> None:
        self.rotary = RotaryEmbedding(self.config, device=device, dtype=dtype)
        if any(layer.uses_local_rope for layer in self.layers):
            theta, scaling = self.config.local_rope
            local = dataclasses.replace(self.config, rope_theta=theta, rope_scaling=scaling)
            self.rotary_local = RotaryEmbedding(local, device=device, dtype=dtype)

    def rotary_for(self, j: int) -> RotaryEmbedding:
        """The RoPE tables the stage's j-th layer uses."""
        return self.rotary_local if self.layers[j].uses_local_rope else self.rotary

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        # token_ids: [T] -> [T, hidden]; Gemma scales by sqrt(hidden), rounded to the dtype
        x = self.embed_tokens(token_ids)
        if self.config.embed_scale != 1.0:
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        return x

    def forward(self, x: torch.Tensor, meta: AttentionMetadata,
                kv_layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Run this stage's layers. x: [T, hidden] residual stream; kv_layers[i] is layer i's
        (k_cache, v_cache), each [kv_heads, slots, head_dim]. Returns [T, hidden]."""
        pos = getattr(meta, "rope_positions", None)
        pos = meta.positions if pos is None else pos
        cos, sin = self.rotary(pos)                                    # [T, 1, head_dim]
        local = self.rotary_local(pos) if self.rotary_local is not None else None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_layers):
            c, s = local if layer.uses_local_rope else (cos, sin)
            x = layer(x, c, s, k_cache, v_cache, meta)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # x: [S, hidden] (the rows that sample) -> [S, vocab] float32
        return self.cap_logits(self.lm_head(self.norm(x)).float())

    def cap_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Final soft-capping (Gemma 2): cap * tanh(logits / cap), float32."""
        cap = self.config.final_softcap
        return torch.tanh(logits / cap) * cap if cap > 0 else logits


def projection_parents(layer: DecoderLayer) -> list[nn.Module]:
    """The modules whose Linear children are the layer's projections: attention, then the MLP
    or each expert (a MoE router stays as it is)."""
    return [layer.self_attn, *layer.mlp.projection_parents()]


def layer_linears(model: StageModel) -> list[nn.Linear]:
    """The dense Linear modules of the stage's decoder layers (not the embedding or head)."""
    return [mod for layer in model.layers for mod in layer.modules()
            if isinstance(mod, nn.Linear)]
