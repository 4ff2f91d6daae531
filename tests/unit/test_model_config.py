"""ModelConfig from HF config.json files of the supported families."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch

from shardline.models.layers import rope_inv_freq
from shardline.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from shardline.models.families import FAMILIES, markdown_table

LLAMA3 = {
    "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
    "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "eos_token_id": [128001, 128008, 128009], "bos_token_id": 128000,
}


def test_llama3_fields_and_rope_scaling_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = ModelConfig.from_dict(LLAMA3)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (32, 32, 8, 128)
    assert cfg.rope_type == "llama3" and cfg.eos_token_ids == (128001, 128008, 128009)
    assert not cfg.attention_bias and not cfg.tie_word_embeddings
    hf = LlamaConfig(**{k: v for k, v in LLAMA3.items() if k != "model_type"})
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    torch.testing.assert_close(rope_inv_freq(cfg), ref, rtol=0, atol=0)


def test_transformers5_rope_parameters_and_generation_eos(tmp_path):
    d = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
         "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
         "vocab_size": 49152, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
         "tie_word_embeddings": True, "eos_token_id": 2, "max_position_embeddings": 8192}
    (tmp_path / "config.json").write_text(json.dumps(d))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    cfg = ModelConfig.from_dir(tmp_path)
    assert cfg.rope_theta == 100000.0 and cfg.rope_scaling is None and cfg.head_dim == 64
    assert cfg.eos_token_ids == (2, 0) and cfg.tie_word_embeddings


def test_qwen2_has_qkv_bias_and_sliding_windows_per_layer():
    base = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100}
    q = ModelConfig.from_dict({**base, "model_type": "qwen2", "sliding_window": 32})
    assert q.attention_bias and q.layer_windows == ()         # use_sliding_window is off
    q = ModelConfig.from_dict({**base, "model_type": "qwen2", "sliding_window": 32,
                               "use_sliding_window": True, "max_window_layers": 3})
    assert [q.window(i) for i in range(4)] == [0, 0, 0, 32]
    m = ModelConfig.from_dict({**base, "model_type": "mistral", "sliding_window": 4096,
                               "head_dim": None})
    assert not m.attention_bias and m.head_dim == 16 and m.layer_windows == (4096,) * 4
    assert ModelConfig.from_dict({**base, "model_type": "mistral",
                                  "sliding_window": None}).layer_windows == ()
    t = ModelConfig.from_dict({**base, "sliding_window": 8, "layer_types": [
        "sliding_attention", "full_attention", "sliding_attention", "full_attention"]})
    assert t.layer_windows == (8, 0, 8, 0)


def test_qwen3_normalizes_q_and_k_and_keeps_its_head_dim():
    base = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100,
            "head_dim": 32, "use_sliding_window": False}
    q = ModelConfig.from_dict({**base, "model_type": "qwen3"})
    assert q.qk_norm and q.head_dim == 32 and not q.attention_bias
    assert not ModelConfig.from_dict({**base, "model_type": "qwen2"}).qk_norm


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}, "dynamic"),
    ({"num_key_value_heads": 3}, "multiple"),
    ({"layer_types": ["full_attention", "chunked_attention"]}, "chunked_attention"),
    ({"model_type": "phi3", "partial_rotary_factor": 0.75}, "partial_rotary_factor"),
    ({"model_type": "phi3", "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0],
                                             "long_factor": [2.0]}}, "longrope"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "without a sliding_window"),
])
def test_unsupported_configs_are_refused(change, message):
    base = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
            "vocab_size": 100}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict({**base, **change})


def test_the_readme_table_is_the_registry():
    """README.md's supported-families table is generated from models/families.py."""
    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert markdown_table() in readme
    assert set(SUPPORTED_MODEL_TYPES) == {f.model_type for f in FAMILIES}
