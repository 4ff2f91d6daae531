"""The decoder's shape, read from an HF config.json (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5,
Qwen3, Phi-3, Gemma 2/3, Mixtral, Qwen3-MoE). Every option that changes outputs is either
honoured or refused here, by name."""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from shardline.models.families import FAMILIES

SUPPORTED_MODEL_TYPES = tuple(f.model_type for f in FAMILIES)
# "dynamic" (NTK) changes frequencies only past max_position_embeddings, the end of the
# context served: within it the default frequencies are exact (as transformers computes them)
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
GEMMA_TYPES = ("gemma2", "gemma3_text")
MOE_TYPES = ("mixtral", "qwen3_moe")
# what transformers' Gemma3TextConfig assumes where a multimodal checkpoint's text_config is
# silent (hub configs list only what differs from these)
GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216,
                            num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                            head_dim=256, hidden_activation="gelu_pytorch_tanh",
                            max_position_embeddings=131_072, rms_norm_eps=1e-6,
                            tie_word_embeddings=True, query_pre_attn_scalar=256,
                            sliding_window=4096, rope_theta=1e6, rope_local_base_freq=1e4)
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


@dataclass(frozen=True)
class ModelConfig:
    """Everything the stage model needs to know about the architecture."""
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None   # None, or {"rope_type": "linear"|"llama3"|"yarn", ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False          # bias on q/k/v (Qwen2)
    qk_norm: bool = False                 # RMSNorm of each head's q and k before RoPE (Qwen3)
    # per layer: attend to the last N positions only (the current one included); 0 = all
    layer_windows: tuple[int, ...] = ()
    max_position_embeddings: int = 4096
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: Optional[int] = None
    model_type: str = "llama"
    hidden_act: str = "silu"              # of the gated MLP: silu | gelu_tanh (Gemma's GeGLU)
    attn_scale: float = 0.0               # 0: head_dim ** -0.5 (Gemma: query_pre_attn_scalar)
    attn_softcap: float = 0.0             # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float = 0.0            # logits -> cap * tanh(logits / cap) (Gemma 2)
    embed_scale: float = 1.0              # embeddings times this (Gemma: sqrt(hidden))
    norm_offset: float = 0.0              # RMSNorm by (offset + w) (Gemma: 1, folded at load)
    sandwich_norms: bool = False          # norms after attention and MLP too (Gemma 2/3)
    # sliding layers' own RoPE (theta, scaling) where it differs from the global one (Gemma 3)
    local_rope: Optional[tuple[float, Optional[dict]]] = None
    # mixture of experts: 0 experts = a dense MLP on every layer
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True           # renormalize the chosen experts' probabilities
    moe_layers: tuple[bool, ...] = ()     # per layer: sparse (experts) or dense MLP
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in SUPPORTED_ROPE_TYPES:
                raise ValueError(f"rope scaling {kind!r} is not supported "
                                 f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")

    @property
    def scale(self) -> float:
        """The attention scores' scale."""
        return self.attn_scale or self.head_dim ** -0.5

    @property
    def rope_long_after(self) -> int:
        """LongRoPE: the length (original_max_position_embeddings) past which a sequence's
        RoPE takes the long factors (0: no such switch)."""
        if self.rope_type != "longrope":
            return 0
        return int(self.rope_scaling["original_max_position_embeddings"])

    def is_moe(self, layer: int) -> bool:
        """Whether layer `layer`'s MLP is a mixture of experts."""
        return bool(self.moe_layers) and self.moe_layers[layer]

    def window(self, layer: int) -> int:
        """Layer `layer`'s sliding window (0: it attends to every position)."""
        return self.layer_windows[layer] if self.layer_windows else 0

    @property
    def rope_type(self) -> str:
        if self.rope_scaling is None:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @classmethod
    def from_dict(cls, d: dict[str, Any], generation: Optional[dict[str, Any]] = None
                  ) -> "ModelConfig":
        """Build from config.json's contents (and generation_config.json's, for eos ids)."""
        if d.get("model_type") == "gemma3":       # multimodal checkpoint: its language model
            d = {**GEMMA3_TEXT_DEFAULTS, **d.get("text_config", {}), "model_type": "gemma3_text",
                 "weight_prefix": "language_model."}
        model_type = d.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        act_name = d.get("hidden_activation") or d.get("hidden_act", "silu")
        if act_name not in ACTIVATIONS:
            raise ValueError(f"hidden_act {act_name!r} is not supported "
                             f"(supported: {', '.join(ACTIVATIONS)})")
        if d.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention is not supported (causal decoders only)")
        num_heads = d["num_attention_heads"]
        hidden = d["hidden_size"]
        theta, scaling, local_rope = _rope(d, model_type)
        eos: list[int] = []
        for src in (generation or {}, d):
            v = src.get("eos_token_id")
            for e in (v if isinstance(v, list) else [v] if v is not None else []):
                if e not in eos:
                    eos.append(int(e))
        gemma = model_type in GEMMA_TYPES
        return cls(
            hidden_size=hidden,
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or hidden // num_heads,
            intermediate_size=d["intermediate_size"],
            vocab_size=d["vocab_size"],
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
            attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
            layer_windows=_layer_windows(d, model_type),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            eos_token_ids=tuple(eos),
            bos_token_id=d.get("bos_token_id"),
            model_type=model_type,
            hidden_act=ACTIVATIONS[act_name],
            attn_scale=float(d["query_pre_attn_scalar"]) ** -0.5 if gemma else 0.0,
            attn_softcap=float(d.get("attn_logit_softcapping") or 0.0),
            final_softcap=float(d.get("final_logit_softcapping") or 0.0),
            embed_scale=hidden ** 0.5 if gemma else 1.0,
            norm_offset=1.0 if gemma else 0.0,
            sandwich_norms=gemma,
            local_rope=local_rope,
            **_moe_fields(d, model_type),
            extra={k: d[k] for k in ("sliding_window", "use_sliding_window", "weight_prefix")
                   if k in d},
        )

    @classmethod
    def from_dir(cls, model_dir: Union[str, pathlib.Path]) -> "ModelConfig":
        """Read <model_dir>/config.json and, when present, generation_config.json."""
        model_dir = pathlib.Path(model_dir)
        d = json.loads((model_dir / "config.json").read_text())
        gen_path = model_dir / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else None
        return cls.from_dict(d, gen)


def _layer_windows(d: dict[str, Any], model_type: str) -> tuple[int, ...]:
    """Each layer's sliding window from config.json, as transformers reads it: `layer_types`
    where given ("sliding_attention" layers get `sliding_window`); else Mistral's
    `sliding_window` on every layer; else Qwen2/3's `use_sliding_window` on the layers from
    `max_window_layers` on. () when no layer has one."""
    n, window = d["num_hidden_layers"], d.get("sliding_window") or 0
    types = d.get("layer_types")
    if types is None and model_type == "gemma2":          # transformers' default: alternate
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    elif types is None and model_type == "gemma3_text":
        pattern = d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                 for i in range(n)]
    if types is not None:
        if len(types) != n:
            raise ValueError(f"layer_types has {len(types)} entries for {n} layers")
        unknown = set(types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ValueError(f"layer_types {sorted(unknown)} are not supported")
        if "sliding_attention" in types and not window:
            raise ValueError("sliding_attention layers without a sliding_window")
        windows = tuple(window if t == "sliding_attention" else 0 for t in types)
    elif model_type in ("mistral", "phi3", "mixtral"):
        windows = (window,) * n
    elif model_type == "qwen3_moe":
        windows = (window if d.get("use_sliding_window") else 0,) * n
    elif model_type in ("qwen2", "qwen3") and d.get("use_sliding_window"):
        first = d.get("max_window_layers", n)
        windows = tuple(window if i >= first else 0 for i in range(n))
    else:
        windows = ()
    return windows if any(windows) else ()


def _rope_type(params: Optional[dict]) -> str:
    return (params or {}).get("rope_type", (params or {}).get("type", "default"))


def _rope_params(params: Optional[dict], default_theta: float) -> tuple[float, Optional[dict]]:
    """(theta, scaling or None for plain RoPE) of one rope_parameters / rope_scaling dict."""
    params = dict(params or {})
    theta = float(params.pop("rope_theta", default_theta))
    partial = params.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor {partial} is not supported (RoPE over the "
                         "whole head only)")
    kind = _rope_type(params)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope scaling {kind!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    return theta, (None if kind in ("default", "dynamic") else params)


def _rope(d: dict[str, Any], model_type: str
          ) -> tuple[float, Optional[dict], Optional[tuple[float, Optional[dict]]]]:
    """(theta, scaling, local_rope) from transformers 5's `rope_parameters` (one dict, or one
    per layer type: Gemma 3) or transformers 4's `rope_theta` + `rope_scaling` (+ Gemma 3's
    `rope_local_base_freq` for its sliding layers)."""
    if d.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor {d['partial_rotary_factor']} is not supported "
                         "(RoPE over the whole head only)")
    params = d.get("rope_parameters") or {}
    default_theta = float(d.get("rope_theta", 1e6 if model_type == "gemma3_text" else 10000.0))
    if "full_attention" in params or "sliding_attention" in params:
        theta, scaling = _rope_params(params.get("full_attention"), default_theta)
        local = _rope_params(params.get("sliding_attention"), 10000.0)
    else:
        merged = dict(params)
        merged.update(d.get("rope_scaling") or {})
        if model_type == "phi3" and _rope_type(merged) in ("su", "yarn"):
            merged["rope_type"] = "longrope"       # transformers reads both as longrope
            merged.pop("type", None)
        if _rope_type(merged) == "longrope":
            merged.setdefault("original_max_position_embeddings",
                              d.get("original_max_position_embeddings"))
            if merged.get("factor") is None:       # Phi-3: the ratio of the two lengths
                merged["factor"] = (d.get("max_position_embeddings", 4096)
                                    / merged["original_max_position_embeddings"])
        theta, scaling = _rope_params(merged, default_theta)
        local = None
        if model_type == "gemma3_text":      # transformers 4: the local base beside the global
            local = (float(d.get("rope_local_base_freq", 10000.0)), None)
    if local == (theta, scaling):
        local = None
    return theta, scaling, local


def _moe_fields(d: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The mixture-of-experts fields of ModelConfig (none for dense families)."""
    if model_type not in MOE_TYPES:
        return {}
    n = d["num_hidden_layers"]
    experts = d.get("num_local_experts") or d.get("num_experts") or 0
    if model_type == "mixtral":
        return dict(num_experts=experts, experts_per_token=d["num_experts_per_tok"],
                    moe_intermediate_size=d["intermediate_size"], norm_topk_prob=True,
                    moe_layers=(True,) * n)
    if d.get("shared_expert_intermediate_size"):
        raise ValueError("shared experts are not supported")
    step, dense = d.get("decoder_sparse_step", 1), set(d.get("mlp_only_layers") or ())
    layers = tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(n))
    return dict(num_experts=experts, experts_per_token=d["num_experts_per_tok"],
                moe_intermediate_size=d["moe_intermediate_size"],
                norm_topk_prob=bool(d.get("norm_topk_prob", False)), moe_layers=layers)
