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
    ({"rope_scaling": {"rope_type": "su", "factor": 4.0}}, "'su'"),
    ({"model_type": "gemma3_text", "query_pre_attn_scalar": 16,
      "use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2,
      "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64}, "shared experts"),
    ({"num_key_value_heads": 3}, "multiple"),
    ({"layer_types": ["full_attention", "chunked_attention"]}, "chunked_attention"),
    ({"model_type": "phi3", "partial_rotary_factor": 0.75}, "partial_rotary_factor"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "mrope"}}, "mrope"),
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


GEMMA_BASE = {"hidden_size": 64, "num_hidden_layers": 6, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100,
              "head_dim": 16, "query_pre_attn_scalar": 8, "sliding_window": 32,
              "hidden_activation": "gelu_pytorch_tanh"}


def test_gemma_layers_rope_and_caps_from_both_config_formats():
    g2 = ModelConfig.from_dict({**GEMMA_BASE, "model_type": "gemma2",
                                "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0})
    assert g2.layer_windows == (32, 0) * 3                    # transformers' default: alternate
    assert (g2.attn_softcap, g2.final_softcap, g2.scale) == (50.0, 30.0, 8 ** -0.5)
    assert g2.embed_scale == 8.0 and g2.norm_offset == 1.0 and g2.sandwich_norms
    assert g2.hidden_act == "gelu_tanh" and g2.tie_word_embeddings and not g2.qk_norm
    # transformers 4: rope_theta (global) + rope_local_base_freq + rope_scaling (global only)
    old = ModelConfig.from_dict({**GEMMA_BASE, "model_type": "gemma3_text",
                                 "sliding_window_pattern": 3, "rope_theta": 1e6,
                                 "rope_local_base_freq": 1e4,
                                 "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert old.layer_windows == (32, 32, 0, 32, 32, 0) and old.qk_norm
    assert old.rope_theta == 1e6 and old.rope_scaling["factor"] == 8.0
    assert old.local_rope == (1e4, None)
    # transformers 5: rope_parameters per layer type
    new = ModelConfig.from_dict({**GEMMA_BASE, "model_type": "gemma3_text",
                                 "layer_types": ["sliding_attention"] * 2 + ["full_attention"]
                                 + ["sliding_attention"] * 2 + ["full_attention"],
                                 "rope_parameters": {
                                     "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                        "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default",
                                                           "rope_theta": 1e4}}})
    assert (new.layer_windows, new.rope_theta, new.rope_scaling, new.local_rope) == \
        (old.layer_windows, old.rope_theta, {"rope_type": "linear", "factor": 8.0},
         old.local_rope)


def test_moe_layers_and_routing_options():
    base = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100}
    mix = ModelConfig.from_dict({**base, "model_type": "mixtral", "num_local_experts": 8,
                                 "num_experts_per_tok": 2, "sliding_window": 16})
    assert (mix.num_experts, mix.experts_per_token, mix.moe_intermediate_size) == (8, 2, 128)
    assert mix.norm_topk_prob and mix.moe_layers == (True,) * 4
    assert mix.layer_windows == (16,) * 4
    q = ModelConfig.from_dict({**base, "model_type": "qwen3_moe", "num_experts": 8,
                               "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                               "decoder_sparse_step": 2, "mlp_only_layers": [3],
                               "norm_topk_prob": False})
    assert q.moe_layers == (False, True, False, False) and not q.norm_topk_prob
    assert q.qk_norm and q.is_moe(1) and not q.is_moe(3)


def test_dynamic_rope_keeps_the_default_frequencies_within_the_context():
    """Dynamic NTK changes frequencies only past max_position_embeddings (transformers), the
    end of the context served: the tables are the default ones."""
    base = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
            "vocab_size": 100, "max_position_embeddings": 64}
    c = ModelConfig.from_dict({**base, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}})
    assert c.rope_scaling is None and c.rope_type == "default"
