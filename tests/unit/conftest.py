"""Fixtures of the unit tests: the real default model, tiny random HF checkpoints, tracing in
memory."""
from __future__ import annotations

import os
import pathlib

import pytest
import torch
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shardline.common import telemetry


@pytest.fixture(scope="session")
def default_model_dir() -> pathlib.Path:
    """The default model, converted once into $SHARDLINE_CACHE (or ~/.cache/shardline/models)."""
    from shardline.common.model_source import DEFAULT_MODEL, resolve_model
    return resolve_model(DEFAULT_MODEL, os.environ.get("SHARDLINE_CACHE"))


TINY_FAMILIES = {
    # name: (HF config class name, extra config)
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "llama3": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    # head_dim 32 with hidden 64 and 4 heads: q/k/v are wider than the hidden size
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True, head_dim=32)),
    "llama-yarn": ("LlamaConfig", dict(rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})),
    # fused qkv_proj and gate_up_proj in the checkpoint; every layer windowed
    "phi3": ("Phi3Config", dict(sliding_window=16, pad_token_id=0)),
    # sliding windows shorter than the tests' prompts: every layer's, or the last two's
    "mistral-swa": ("MistralConfig", dict(sliding_window=8)),
    "qwen2-swa": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=8,
                                      max_window_layers=2)),
    # alternating 8-token windows and global layers; caps low enough to change the outputs
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=8,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    # q/k norm, head_dim 32, windows on layers 0 and 2, local / global RoPE (global scaled)
    "gemma3": ("Gemma3TextConfig", dict(head_dim=32, sliding_window=8, query_pre_attn_scalar=24,
                                        layer_types=["sliding_attention", "full_attention"] * 2,
                                        rope_parameters={
                                            "full_attention": {"rope_type": "linear",
                                                               "factor": 2.0,
                                                               "rope_theta": 1e6},
                                            "sliding_attention": {"rope_type": "default",
                                                                  "rope_theta": 1e4}})),
    # LongRoPE: short factors up to 32 tokens, long ones past (factor 16 from 512 / 32)
    "phi3-longrope": ("Phi3Config", dict(pad_token_id=0, original_max_position_embeddings=32,
                                         rope_scaling={"rope_type": "longrope",
                                                       "short_factor": [1.0 + i / 8
                                                                        for i in range(8)],
                                                       "long_factor": [2.0 + i for i in
                                                                       range(8)]})),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    # one KV head (fewer than 2 tensor-parallel ranks), an odd vocab (uneven vocab slices),
    # an intermediate size whose halves are int4 groups of 32
    "llama-mqa": ("LlamaConfig", dict(num_key_value_heads=1, vocab_size=125,
                                      intermediate_size=192)),
    # the CPU kernels' shapes on each of 2 tensor-parallel ranks (head_dim 32, every rank's
    # MLP and expert columns a multiple of 64): dense, sandwich norms, experts
    "llama-wide": ("LlamaConfig", dict(hidden_size=128, intermediate_size=256,
                                       tie_word_embeddings=True)),
    "gemma3-wide": ("Gemma3TextConfig", dict(hidden_size=128, intermediate_size=256, head_dim=32,
                                             sliding_window=8, query_pre_attn_scalar=24,
                                             final_logit_softcapping=3.0,
                                             layer_types=["sliding_attention",
                                                          "full_attention"] * 2)),
    "qwen3-moe-wide": ("Qwen3MoeConfig", dict(hidden_size=128, num_experts=4,
                                              num_experts_per_tok=2, moe_intermediate_size=64,
                                              intermediate_size=256, mlp_only_layers=[1],
                                              head_dim=32)),
    # layer 1 dense; the others 4 experts, top 2, probabilities not renormalized
    "qwen3-moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32, mlp_only_layers=[1],
                                         norm_topk_prob=False, head_dim=32)),
}


def make_tiny_model(path: pathlib.Path, family: str = "llama", num_layers: int = 4,
                    seed: int = 0) -> pathlib.Path:
    """Save a random-weight HF model of `family` (safetensors) into `path` (the family's extra
    config over these shapes)."""
    import transformers

    cls_name, extra = TINY_FAMILIES[family]
    shape = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=num_layers,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                 max_position_embeddings=512, rms_norm_eps=1e-6)
    config = getattr(transformers, cls_name)(**{**shape, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():                    # larger weights than the init: peaked logits
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "norm" in name:
                p.normal_(1, 0.1)
            else:
                p.normal_(0, 0.15)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir(family) -> a directory with a random tiny model (made once per family)."""
    made: dict[str, pathlib.Path] = {}

    def get(family: str = "llama") -> pathlib.Path:
        if family not in made:
            made[family] = make_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}"), family)
        return made[family]
    return get


@pytest.fixture
def spans(monkeypatch):
    """Tracing on, in memory (a provider of the test's own, not the global one)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(telemetry, "tracer", provider.get_tracer("test"))
    monkeypatch.setattr(telemetry, "_enabled", True)
    yield exporter
    provider.shutdown()
