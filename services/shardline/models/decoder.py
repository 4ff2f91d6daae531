"""A Llama-style decoder cut to layers [layer_start, layer_end): one pipeline stage.

    stage 0:   token ids -> embed_tokens -> layers[a:b] -> hidden (residual stream)
    stage k:   hidden -> layers[a:b] -> hidden
    last:      hidden -> layers[a:b] -> norm -> lm_head (only at the rows that sample)

All sequences of a step are flattened into one batch of rows, x: [tokens, hidden].
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from shardline.models.attention import Attention, AttentionMetadata
from shardline.models.layers import MLP, Linear, RMSNorm, RotaryEmbedding, add_rms_norm
from shardline.models.config import ModelConfig


class DecoderLayer(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.fused = False               # set by fuse.fuse_stage: in-place residual adds

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        # x: [T, hidden]
        if self.fused:
            a = self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, meta)
            return self.post_attention(a, x)
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, meta)
        return h + self.mlp(self.post_attention_layernorm(h))

    def post_attention(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Fused layers, after attention: h = x + a (written into a); mlp(norm(h)) + h. The
        part of the layer that fuse.compile_stage hands to torch.compile."""
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

    def init_rotary(self, device: torch.device, dtype: torch.dtype) -> None:
        self.rotary = RotaryEmbedding(self.config, device=device, dtype=dtype)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        # token_ids: [T] -> [T, hidden]
        return self.embed_tokens(token_ids)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata,
                kv_layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Run this stage's layers. x: [T, hidden] residual stream; kv_layers[i] is layer i's
        (k_cache, v_cache), each [kv_heads, slots, head_dim]. Returns [T, hidden]."""
        cos, sin = self.rotary(meta.positions)                         # [T, 1, head_dim]
        for layer, (k_cache, v_cache) in zip(self.layers, kv_layers):
            x = layer(x, cos, sin, k_cache, v_cache, meta)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # x: [S, hidden] (the rows that sample) -> [S, vocab] float32
        return self.lm_head(self.norm(x)).float()


def layer_linears(model: StageModel) -> list[nn.Linear]:
    """The dense Linear modules of the stage's decoder layers (not the embedding or head)."""
    return [mod for layer in model.layers for mod in layer.modules()
            if isinstance(mod, nn.Linear)]
