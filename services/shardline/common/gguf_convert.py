"""A GGUF checkpoint (llama.cpp's tensor names and metadata) to an HF directory with float32
safetensors, through transformers' GGUF reader, with what that reader leaves out filled here.

transformers 5.24 reads llama.cpp's metadata through a per-architecture key table
(integrations/ggml.py) and its tensors through get_gguf_hf_weights_map plus a per-architecture
processor (Llama's Q/K permutation undone, Gemma's stored (1 + w) norms back to w). Where the
table has no key, the config class's default applies silently; this module sets each such
field from the file, as llama.cpp reads it:

- every architecture: head_dim from attention.key_length (transformers maps it for Gemma and
  Qwen3-MoE, not Qwen3: a Qwen3 file came back with Qwen3Config's default 128), the vocabulary
  from token_embd's rows, RoPE scaling (rope.scaling.*: linear and YaRN; transformers reads it
  for gpt-oss only), the experts' width (expert_feed_forward_length: Qwen2/3-MoE), float32
  metadata as the decimal it was written from (rms_norm_eps 1e-6, not 9.99999997e-07);
- gemma2: attention/final logit softcapping (llama.cpp's defaults 50/30 when absent),
  query_pre_attn_scalar (attention.scale, else head_dim, or hidden/heads for the 46-layer 27B:
  llama.cpp's rule), the sliding layers (every other one);
- gemma3: query_pre_attn_scalar (as Gemma 2, 27B = 62 layers), final softcapping, sliding
  layers (attention.sliding_window_pattern where given, else llama.cpp's 5 of every 6), the
  local layers' RoPE (rope.freq_base_swa, else llama.cpp's 10000, never scaled) beside the
  global one (rope.freq_base, scaled).

What cannot be represented is refused before any tensor is read, naming it: an architecture
transformers cannot read, split files, tensor types the gguf package cannot dequantize, RoPE
scaling other than linear/YaRN, partial rotary, keys and values of different widths, tensors
the HF model has no place for (llama.cpp's rope_freqs, say), a tokenizer longer than the
embedding. Every tensor's shape is checked against the model the config describes, and the
tensors are saved under the names HF checkpoints use (transformers 5 fuses some on load).
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# llama.cpp's layer counts of the 27B Gemmas, whose query scale is hidden/heads, not head_dim
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# llama.cpp's architecture names that transformers' GGUF tables spell differently
_TRANSFORMERS_NAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                       "minimax-m2": "minimax_m2", "t5encoder": "t5"}
# what an unmapped tensor is, where llama.cpp's meaning is known
_TENSOR_HINTS = {"rope_freqs.weight": "llama.cpp's RoPE frequency factors, Llama 3.1's rope "
                                      "scaling, which transformers' GGUF reader drops"}
_ROPE_KEYS_KNOWN = {"type", "factor", "original_context_length", "yarn_beta_fast",
                    "yarn_beta_slow", "yarn_attn_factor", "yarn_ext_factor", "yarn_log_multiplier",
                    "attn_factor", "finetuned"}


class UnsupportedGGUF(ValueError):
    """The file holds something the conversion cannot represent (named in the message)."""


@dataclass
class GgufInfo:
    """What the checks need of a GGUF file: its metadata (token arrays left out) and tensors."""
    path: pathlib.Path
    arch: str
    meta: dict[str, Any]
    tensors: dict[str, tuple[str, tuple[int, ...]]]     # name -> (type name, shape, HF order)
    n_tokens: int

    def key(self, name: str, default: Any = None) -> Any:
        """The architecture's key `name` ("attention.key_length")."""
        return self.meta.get(f"{self.arch}.{name}", default)


def _f32(x: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-06)."""
    import numpy as np
    return float(str(np.float32(x)))


def read_info(path: pathlib.Path) -> GgufInfo:
    """Read `path`'s metadata and tensor list (the tensors stay on disk)."""
    from gguf import GGUFReader, GGUFValueType

    try:
        reader = GGUFReader(str(path))
    except ValueError as e:                       # an unknown tensor or value type id
        raise UnsupportedGGUF(f"{path.name}: the gguf package cannot read it ({e})") from e
    meta: dict[str, Any] = {}
    n_tokens = 0
    for name, field in reader.fields.items():
        if name == "tokenizer.ggml.tokens":
            n_tokens = len(field.data)
        if name.startswith("tokenizer.") and field.types[0] == GGUFValueType.ARRAY:
            continue                              # vocabularies: large, read by transformers
        value = field.contents()
        if field.types[-1] == GGUFValueType.FLOAT32:
            value = [_f32(v) for v in value] if isinstance(value, list) else _f32(value)
        meta[name] = value
    tensors = {t.name: (t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)))
               for t in reader.tensors}
    return GgufInfo(path, str(meta.get("general.architecture", "")), meta, tensors, n_tokens)


def check_supported(info: GgufInfo) -> None:
    """Refuse, by name, what the conversion cannot represent (before any tensor is read)."""
    from gguf.constants import GGMLQuantizationType
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    name = info.path.name
    if _TRANSFORMERS_NAMES.get(info.arch, info.arch) not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UnsupportedGGUF(f"{name}: architecture {info.arch!r} cannot be read by transformers' "
                              f"GGUF loader (it reads {', '.join(GGUF_SUPPORTED_ARCHITECTURES)})")
    if int(info.meta.get("split.count", 1)) > 1:
        raise UnsupportedGGUF(f"{name}: a split GGUF ({info.meta['split.count']} parts); merge "
                              "the parts first (llama-gguf-split --merge)")
    readable = _dequantizable(GGMLQuantizationType)
    bad = sorted({t for t, _ in info.tensors.values() if t not in readable})
    if bad:
        raise UnsupportedGGUF(f"{name}: tensor types {bad} cannot be dequantized by the gguf "
                              "package")
    key_len, value_len = info.key("attention.key_length"), info.key("attention.value_length")
    if key_len is not None and value_len is not None and key_len != value_len:
        raise UnsupportedGGUF(f"{name}: attention.key_length {key_len} != value_length "
                              f"{value_len} (HF models have one head_dim)")
    rope_dims, heads = info.key("rope.dimension_count"), info.key("attention.head_count")
    head_dim = key_len or (_hidden(info) // heads if isinstance(heads, int) and heads else None)
    if rope_dims is not None and head_dim and rope_dims != head_dim:
        raise UnsupportedGGUF(f"{name}: rope.dimension_count {rope_dims} != head_dim {head_dim} "
                              "(partial rotary embeddings)")
    if "token_embd.weight" in info.tensors and info.n_tokens:
        rows = info.tensors["token_embd.weight"][1][0]
        if info.n_tokens > rows:
            raise UnsupportedGGUF(f"{name}: the tokenizer lists {info.n_tokens} tokens, "
                                  f"token_embd has {rows} rows")
    if info.arch in ("gemma2", "gemma3") and info.key("attention.sliding_window") is None:
        raise UnsupportedGGUF(f"{name}: {info.arch} without attention.sliding_window")
    rope_scaling(info)                            # refuses scaling it cannot represent


def _dequantizable(types) -> set[str]:
    from gguf import quants

    traits = getattr(quants, "_type_traits", None)
    if traits is None:                            # another gguf layout: let it say at read time
        return {t.name for t in types}
    return {"F32", "F16"} | {types(t).name for t in traits}


def _hidden(info: GgufInfo) -> int:
    return int(info.key("embedding_length", 0))


def rope_scaling(info: GgufInfo) -> dict | None:
    """The file's RoPE scaling as an HF rope_parameters entry (None: plain RoPE)."""
    prefix = f"{info.arch}.rope.scaling."
    stated = {k[len(prefix):]: v for k, v in info.meta.items() if k.startswith(prefix)}
    unknown = sorted(set(stated) - _ROPE_KEYS_KNOWN)
    if info.key("rope.scale_linear", 1.0) != 1.0:       # older files' linear scaling
        stated.setdefault("type", "linear")
        stated.setdefault("factor", info.key("rope.scale_linear"))
    kind = stated.get("type", "none")
    if kind == "none" or (kind == "linear" and stated.get("factor", 1.0) == 1.0):
        return None
    name = info.path.name
    if unknown:
        raise UnsupportedGGUF(f"{name}: RoPE scaling keys {unknown} are not supported")
    for key, neutral in (("attn_factor", (1.0,)), ("yarn_ext_factor", (1.0, -1.0)),
                         ("yarn_log_multiplier", (0.0,))):
        if key in stated and stated[key] not in neutral:
            raise UnsupportedGGUF(f"{name}: rope.scaling.{key} {stated[key]} is not supported")
    if kind == "linear":
        return {"rope_type": "linear", "factor": stated["factor"]}
    if kind == "yarn":
        out = {"rope_type": "yarn", "factor": stated["factor"]}
        if "original_context_length" in stated:
            out["original_max_position_embeddings"] = int(stated["original_context_length"])
        for src, dst in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                         ("yarn_attn_factor", "attention_factor")):
            if src in stated:
                out[dst] = stated[src]
        return out
    raise UnsupportedGGUF(f"{name}: RoPE scaling {kind!r} is not supported (linear, yarn)")


def config_fixes(info: GgufInfo, config: dict[str, Any]) -> dict[str, Any]:
    """The HF config fields transformers' reader leaves unset or wrong, from the metadata."""
    fixes: dict[str, Any] = {}
    if info.key("attention.key_length") is not None:
        fixes["head_dim"] = int(info.key("attention.key_length"))
    if "token_embd.weight" in info.tensors:
        fixes["vocab_size"] = info.tensors["token_embd.weight"][1][0]
    for key, field in (("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
                       ("expert_feed_forward_length", "moe_intermediate_size"),
                       ("expert_shared_feed_forward_length", "shared_expert_intermediate_size")):
        if info.key(key) is not None and field in config:
            fixes[field] = info.key(key)
    head_dim = fixes.get("head_dim") or config.get("head_dim")
    if info.arch in ("gemma2", "gemma3"):
        fixes.update(_gemma_fixes(info, config, head_dim))
    elif "rope_parameters" in config:
        params = dict(config["rope_parameters"] or {})
        if info.key("rope.freq_base") is not None:
            params["rope_theta"] = info.key("rope.freq_base")
        params.update(rope_scaling(info) or {})
        fixes["rope_parameters"] = params
    elif rope_scaling(info):
        raise UnsupportedGGUF(f"{info.path.name}: RoPE scaling in a {info.arch} file")
    return fixes


def _gemma_fixes(info: GgufInfo, config: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """Gemma 2/3: softcaps, query scale, sliding layers and (Gemma 3) both RoPEs."""
    n = int(info.key("block_count"))
    heads = int(info.key("attention.head_count"))
    out: dict[str, Any] = {"sliding_window": int(info.key("attention.sliding_window"))}
    if info.key("attention.scale") is not None:
        out["query_pre_attn_scalar"] = _f32(float(info.key("attention.scale")) ** -2)
    elif n == _GEMMA_27B_LAYERS[info.arch]:
        out["query_pre_attn_scalar"] = _hidden(info) // heads
    else:
        out["query_pre_attn_scalar"] = head_dim
    pattern = info.key("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        if len(pattern) != n:
            raise UnsupportedGGUF(f"{info.path.name}: attention.sliding_window_pattern has "
                                  f"{len(pattern)} entries for {n} layers")
        sliding = [bool(p) for p in pattern]
    else:
        every = int(pattern or (2 if info.arch == "gemma2" else 6))
        sliding = [bool((i + 1) % every) for i in range(n)]
    out["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
    theta = info.key("rope.freq_base", 10000.0)
    scaling = rope_scaling(info)
    if info.arch == "gemma2":
        out["attn_logit_softcapping"] = info.key("attn_logit_softcapping", 50.0)
        out["final_logit_softcapping"] = info.key("final_logit_softcapping", 30.0)
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
    else:
        out["attn_logit_softcapping"] = None           # llama.cpp applies none to Gemma 3
        out["final_logit_softcapping"] = info.key("final_logit_softcapping")
        out["rope_parameters"] = {
            "full_attention": {"rope_type": "default", "rope_theta": theta, **(scaling or {})},
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": info.key("rope.freq_base_swa", 10000.0)}}
    return out


def _config(gguf: pathlib.Path, info: GgufInfo):
    """transformers' config of the file, with config_fixes applied (and validated again)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    d = config.to_dict()
    d.update(config_fixes(info, d))
    for key in ("transformers_version", "architectures", "quantization_config",
                "_name_or_path", "_model_name_or_path"):
        d.pop(key, None)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def _weights_map(info: GgufInfo, skeleton, config) -> dict[str, str]:
    """GGUF tensor name -> HF parameter name, refusing tensors the model has no place for."""
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map)
    processor = TENSOR_PROCESSORS.get(info.arch, TensorProcessor)(config=config.to_dict())
    mapping = get_gguf_hf_weights_map(skeleton, processor)
    # fused expert parameters have no ".weight": their GGUF names map without the suffix
    unmapped = sorted(n for n in info.tensors
                      if n not in mapping and n.rsplit(".", 1)[0] not in mapping)
    if unmapped:
        hints = [_TENSOR_HINTS[n] for n in unmapped if n in _TENSOR_HINTS]
        what = "; ".join(hints) or "a feature the conversion cannot represent"
        raise UnsupportedGGUF(f"{info.path.name}: tensors {unmapped[:6]} have no place in "
                              f"{type(skeleton).__name__} ({what})")
    return mapping


def convert_gguf(gguf: pathlib.Path, out: pathlib.Path) -> None:
    """Dequantize a GGUF checkpoint into an HF directory with float32 safetensors.

    Uses transformers' GGUF reader (config, tokenizer, dequantized tensors with the Q/K
    permutation and Gemma's norm offset undone) without instantiating the model's weights,
    with the config fields it misses filled from the metadata (config_fixes). Tied embeddings
    are stored once (no lm_head.weight), as HF checkpoints of tied models are.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    t0 = time.perf_counter()
    log.info("converting %s to safetensors in %s", gguf.name, out)
    info = read_info(gguf)
    check_supported(info)
    config = _config(gguf, info)
    with torch.device("meta"):                 # only for the HF parameter names and shapes
        skeleton = AutoModelForCausalLM.from_config(config)
    _weights_map(info, skeleton, config)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton,
                                  torch_dtype=torch.float32)
    tensors = {k: v.contiguous() for k, v in parsed["tensors"].items()}
    _check_tensors(gguf, config, skeleton, tensors)
    # as HF checkpoints name them (transformers 5 fuses some on load: Qwen3-MoE's experts)
    tensors = {k: v.contiguous() for k, v in revert_weight_conversion(skeleton, tensors).items()}
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)
    _save_config(config, type(skeleton).__name__, out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("converted %d tensors in %.1fs", len(tensors), time.perf_counter() - t0)


def _check_tensors(gguf: pathlib.Path, config, skeleton, tensors: dict) -> None:
    """Every parameter present (lm_head dropped when tied), each of the expected shape."""
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
        tensors.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise RuntimeError(f"GGUF {gguf.name} lacks tensors {missing[:5]}...")
    for k, v in tensors.items():
        if k in expected and tuple(v.shape) != expected[k]:
            raise UnsupportedGGUF(f"{gguf.name}: {k} has shape {tuple(v.shape)}, the config "
                                  f"implies {expected[k]}")


def _save_config(config, architecture: str, out: pathlib.Path) -> None:
    config.save_pretrained(out)
    config_dict = json.loads((out / "config.json").read_text())
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    if "layer_types" in config_dict:           # Gemma 3's default pattern, not the file's
        config_dict.pop("_sliding_window_pattern", None)
    rope = config_dict.get("rope_parameters") or {}
    if "rope_theta" in rope and rope.get("rope_type", "default") == "default":
        config_dict.setdefault("rope_theta", rope["rope_theta"])   # for older readers
    config_dict["torch_dtype"] = "float32"
    config_dict["architectures"] = [architecture]
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
