"""The decoder's shape, read from an HF config.json (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5,
Qwen3, Phi-3)."""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from shardline.models.families import FAMILIES

SUPPORTED_MODEL_TYPES = tuple(f.model_type for f in FAMILIES)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


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
        model_type = d.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        rope_dict = dict(d.get("rope_parameters") or {})
        partial = rope_dict.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise ValueError(f"partial_rotary_factor {partial} is not supported (RoPE over "
                             "the whole head only)")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only silu)")
        num_heads = d["num_attention_heads"]
        hidden = d["hidden_size"]
        # transformers >= 5 writes rope_parameters; older configs rope_theta + rope_scaling.
        rope = dict(d.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or (rope if rope else None)
        if scaling is not None:
            scaling = dict(scaling)
            scaling.pop("rope_theta", None)
            if scaling.get("rope_type", scaling.get("type", "default")) == "default":
                scaling = None
        eos: list[int] = []
        for src in (generation or {}, d):
            v = src.get("eos_token_id")
            for e in (v if isinstance(v, list) else [v] if v is not None else []):
                if e not in eos:
                    eos.append(int(e))
        return cls(
            hidden_size=hidden,
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or hidden // num_heads,
            intermediate_size=d["intermediate_size"],
            vocab_size=d["vocab_size"],
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
            layer_windows=_layer_windows(d, model_type),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            eos_token_ids=tuple(eos),
            bos_token_id=d.get("bos_token_id"),
            model_type=model_type,
            extra={k: d[k] for k in ("sliding_window", "use_sliding_window") if k in d},
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
    if types is not None:
        if len(types) != n:
            raise ValueError(f"layer_types has {len(types)} entries for {n} layers")
        unknown = set(types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ValueError(f"layer_types {sorted(unknown)} are not supported")
        if "sliding_attention" in types and not window:
            raise ValueError("sliding_attention layers without a sliding_window")
        windows = tuple(window if t == "sliding_attention" else 0 for t in types)
    elif model_type in ("mistral", "phi3"):
        windows = (window,) * n
    elif model_type in ("qwen2", "qwen3") and d.get("use_sliding_window"):
        first = d.get("max_window_layers", n)
        windows = tuple(window if i >= first else 0 for i in range(n))
    else:
        windows = ()
    return windows if any(windows) else ()
