"""GGUF files of Qwen3 (and Qwen3-MoE), Gemma 2 and Gemma 3 convert to the HF checkpoints they
were made from.

Each tiny random HF checkpoint is written as a GGUF the way llama.cpp's convert_hf_to_gguf.py
writes it (its architecture names, metadata keys, tensor names, Gemma's norms as 1 + w, 1-D
tensors in float32 and the rest in float32 or f16, lm_head left out when tied, a small
tokenizer in the metadata), then resolved as `shardline up --model file.gguf` resolves it.
The converted config.json must describe the same model (to transformers and to the stage
model: same logits) and every tensor must equal the original checkpoint's (exactly; f16 tensors equal the original rounded to f16; a Gemma norm w within
float32 rounding of (1 + w) - 1). Files with what cannot be converted are refused by name,
before anything is written.
"""
from __future__ import annotations

import json
import pathlib

import gguf
import numpy as np
import pytest
import torch

from shardline.common.gguf_convert import UnsupportedGGUF, convert_gguf
from shardline.common.model_source import resolve_model

_GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
FAMILIES = {
    # name: (HF config class, llama.cpp architecture, extra config, layers, f16 weights)
    "qwen3": ("Qwen3Config", "qwen3",
              dict(head_dim=32, tie_word_embeddings=True, rope_theta=1e6), 2, False),
    "qwen3-yarn-f16": ("Qwen3Config", "qwen3", dict(head_dim=16, tie_word_embeddings=False,
                       rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e5,
                                        "original_max_position_embeddings": 128}), 2, True),
    # experts stacked per layer (ffn_{gate,up,down}_exps), their width in its own key
    "qwen3-moe": ("Qwen3MoeConfig", "qwen3moe",
                  dict(head_dim=16, moe_intermediate_size=32, num_experts=4,
                       num_experts_per_tok=2, norm_topk_prob=True), 2, False),
    # the 27B's layer count is not these: query_pre_attn_scalar is head_dim, as llama.cpp has it
    "gemma2": ("Gemma2Config", "gemma2",
               dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                    attn_logit_softcapping=40.0, final_logit_softcapping=20.0), 4, False),
    "gemma3": ("Gemma3TextConfig", "gemma3",
               dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                    rope_parameters=_GEMMA3_ROPE), 6, True),
    # a pattern (and a local RoPE base) the file states rather than llama.cpp's defaults
    "gemma3-pattern": ("Gemma3TextConfig", "gemma3",
                       dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                            final_logit_softcapping=25.0,
                            layer_types=["sliding_attention", "full_attention",
                                         "full_attention", "sliding_attention"],
                            rope_parameters={
                                "full_attention": {"rope_type": "default", "rope_theta": 2e5},
                                "sliding_attention": {"rope_type": "default",
                                                      "rope_theta": 20000.0}}), 4, False),
}
CONFIG_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                 "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings", "layer_types",
                 "sliding_window", "query_pre_attn_scalar", "attn_logit_softcapping",
                 "final_logit_softcapping", "rope_parameters", "hidden_act", "hidden_activation",
                 "use_sliding_window", "attention_bias", "moe_intermediate_size",
                 "num_experts", "num_experts_per_tok", "norm_topk_prob")


def make_model(family: str):
    import transformers

    cls_name, _, extra, layers, _ = FAMILIES[family]
    config = getattr(transformers, cls_name)(
        hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, rms_norm_eps=1e-6,
        bos_token_id=2, eos_token_id=1, pad_token_id=0, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    gemma = config.model_type.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:               # Gemma scales by (1 + w): w near 0, others near 1
                p.normal_(0 if gemma else 1, 0.1)
            else:
                p.normal_(0, 0.15)
    return model


def _tokenizer_metadata(w, arch: str) -> None:
    """A 128-token vocabulary: byte-level BPE for Qwen3 (as _set_vocab_gpt2 writes it),
    SentencePiece for Gemma (as _set_vocab_sentencepiece writes it)."""
    if arch.startswith("qwen3"):
        from transformers.convert_slow_tokenizer import bytes_to_unicode
        chars = [bytes_to_unicode()[b] for b in range(32, 32 + 123)]     # " " is "\u0120"
        tokens = ["<|endoftext|>", "<|im_end|>", "<|im_start|>"] + chars + ["ab", "cd"]
        types = [3] * 3 + [1] * 125
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_merges(["a b", "c d"])
    else:
        letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
        tokens = (["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<end_of_turn>", "\u2581"]
                  + letters + [c.upper() for c in letters] + ["\u2581" + c for c in letters]
                  + [f"<0x{i:02X}>" for i in range(43)])
        types = [3, 3, 3, 2, 3, 3] + [1] * 79 + [6] * 43
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_scores([-float(i) for i in range(len(tokens))])
        w.add_add_space_prefix(False)
    assert len(tokens) == 128
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)


def _hparams(w, config, arch: str) -> None:
    """The metadata llama.cpp's TextModel / Gemma2Model / Gemma3Model classes write."""
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    if arch == "qwen3moe":
        w.add_expert_count(config.num_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
    if arch == "gemma2":                     # no RoPE keys: llama.cpp's default base 10000
        w.add_attn_logit_softcapping(config.attn_logit_softcapping)
        w.add_final_logit_softcapping(config.final_logit_softcapping)
        w.add_sliding_window(config.sliding_window)
        return
    rope = config.rope_parameters.get("full_attention", config.rope_parameters)
    w.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if arch == "gemma3":
        if config.final_logit_softcapping:
            w.add_final_logit_softcapping(config.final_logit_softcapping)
        w.add_sliding_window(config.sliding_window)
        local = config.rope_parameters["sliding_attention"]["rope_theta"]
        if local != 10000.0:                 # not written by llama.cpp (which assumes 10000)
            w.add_rope_freq_base_swa(local)
        default = ["sliding_attention" if (i + 1) % 6 else "full_attention"
                   for i in range(config.num_hidden_layers)]
        if config.layer_types != default:    # llama.cpp assumes 5 sliding layers of each 6
            w.add_sliding_window_pattern([t == "sliding_attention" for t in config.layer_types])


def write_gguf(model, arch: str, path: pathlib.Path, f16: bool = False,
               extra=None) -> pathlib.Path:
    """Write `model` as llama.cpp's convert_hf_to_gguf.py would (`extra(writer)` adds more)."""
    config = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    _hparams(w, config, arch)
    _tokenizer_metadata(w, arch)
    names = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), config.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and (config.tie_word_embeddings or arch.startswith("gemma")):
            continue                         # llama.cpp skips Gemma's lm_head (tied)
        data = t.float().numpy()
        if ".mlp.experts." in name:          # [experts, out, in] per layer, gate and up apart
            layer, half = name.split(".")[2], data.shape[1] // 2
            parts = ({"gate": data[:, :half], "up": data[:, half:]}
                     if name.endswith("gate_up_proj") else {"down": data})
            for kind, part in parts.items():
                w.add_tensor(f"blk.{layer}.ffn_{kind}_exps.weight", np.ascontiguousarray(part))
            continue
        base, suffix = name.rsplit(".", 1)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            data = data + np.float32(1)      # Gemma's RMSNorm scales by (1 + w)
        if f16 and data.ndim > 1:            # llama.cpp keeps 1-D tensors in float32
            data = data.astype(np.float16)
        w.add_tensor(names.get_name(base) + "." + suffix, data)
    if extra:
        extra(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (original model, converted directory), made once per family; the original
    checkpoint (save_pretrained) in the converted directory's parent's "original"."""
    made = {}

    def get(family):
        if family not in made:
            tmp = tmp_path_factory.mktemp(family)
            model = make_model(family)
            _, arch, _, _, f16 = FAMILIES[family]
            path = write_gguf(model, arch, tmp / f"tiny-{family}.gguf", f16)
            model.save_pretrained(tmp / "original")
            made[family] = model, resolve_model(str(path), str(tmp / "cache"))
        return made[family]
    return get


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_config_describes_the_original_model(converted, family):
    model, out = converted(family)
    original = model.config.to_dict()
    got = json.loads((out / "config.json").read_text())
    for key in CONFIG_FIELDS:
        if key in original:
            assert got.get(key) == original[key], f"{key}: {got.get(key)} != {original[key]}"
    assert got["architectures"] == [type(model).__name__]
    assert "quantization_config" not in got and got["torch_dtype"] == "float32"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 1 and gen["bos_token_id"] == 2


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_tensor_equals_the_original(converted, family):
    from safetensors.torch import load_file

    model, out = converted(family)
    f16 = FAMILIES[family][4]
    gemma = model.config.model_type.startswith("gemma")
    expected = load_file(str(out.parent.parent / "original" / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        have = got[name]
        assert have.dtype == torch.float32 and have.shape == want.shape, name
        if f16 and want.dim() > 1:
            want = want.half().float()       # exactly what the f16 file holds
        if gemma and name.endswith("norm.weight"):
            torch.testing.assert_close(have, want, rtol=0, atol=2 ** -23, msg=name)
        else:
            assert torch.equal(have, want), name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_transformers_computes_the_same_logits(converted, family):
    """The converted directory is the same model to transformers: longer prompts than the
    sliding windows, so every config field that changes outputs takes part."""
    from transformers import AutoModelForCausalLM

    model, out = converted(family)
    reference = _reference(model, family)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=1e-4)


def _reference(model, family):
    """The original model, its matrices rounded to f16 where the file holds them so."""
    import copy

    reference = copy.deepcopy(model).eval()
    if FAMILIES[family][4]:
        with torch.no_grad():
            for p in reference.parameters():
                if p.dim() > 1:
                    p.copy_(p.half().float())
    return reference


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shardline_serves_the_converted_model(converted, family):
    """The stage model loaded from the converted directory: the original's logits."""
    from shardline.models.attention import AttentionMetadata
    from shardline.worker.build import load_runner

    model, out = converted(family)
    layers = model.config.num_hidden_layers
    runner = load_runner(out, 0, layers, dtype=torch.float32, kv_cache_bytes=1 << 20,
                         block_size=4)
    ids = torch.randint(0, 128, (24,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        meta = AttentionMetadata.build([0], [len(ids)], [list(range(6))], runner.block_size,
                                       runner.device)
        x = runner.model(runner.model.embed(ids), meta, runner.kv_cache.layers)
        ours = runner.model.logits(x)
        ref = _reference(model, family)(ids[None]).logits[0]
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shardline_reads_the_same_model_config(converted, family):
    """The stage model's ModelConfig of the converted directory equals the original's."""
    from shardline.models.config import SUPPORTED_MODEL_TYPES, ModelConfig

    model, out = converted(family)
    if model.config.model_type not in SUPPORTED_MODEL_TYPES:
        pytest.skip(f"{model.config.model_type} models are not supported yet")
    assert ModelConfig.from_dir(out) == ModelConfig.from_dir(out.parent.parent / "original")


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_tokenizer_comes_from_the_metadata(converted, family):
    from transformers import AutoTokenizer

    _, out = converted(family)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 128
    assert tok.convert_ids_to_tokens(1) == ("<eos>" if family.startswith("gemma") else "<|im_end|>")
    text = "ab cd" if family == "qwen3" else "abc"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def _refused(tmp_path, match, family="qwen3", extra=None, model_edit=None):
    model = make_model(family)
    if model_edit:
        model_edit(model)
    _, arch, _, _, f16 = FAMILIES[family]
    path = write_gguf(model, arch, tmp_path / "bad.gguf", f16, extra)
    with pytest.raises(UnsupportedGGUF, match=match):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_architecture_is_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma")          # Gemma 1: not in transformers
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedGGUF, match="architecture 'gemma'"):
        convert_gguf(tmp_path / "g.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tensors_without_a_place_are_refused(tmp_path):
    # llama.cpp's rope_freqs (Llama 3's RoPE scaling as a tensor): the HF model has none
    _refused(tmp_path, "rope_freqs.*Llama 3.1's rope scaling", extra=lambda w: w.add_tensor(
        "rope_freqs.weight", np.ones(16, np.float32)))


def test_rope_scaling_it_cannot_represent_is_refused(tmp_path):
    def longrope(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    _refused(tmp_path, "RoPE scaling 'longrope'", extra=longrope)


def test_partial_rotary_is_refused(tmp_path):
    _refused(tmp_path, "partial rotary", extra=lambda w: w.add_rope_dimension_count(16))


def test_tensor_types_gguf_cannot_dequantize_are_refused(tmp_path):
    _refused(tmp_path, r"\['I32'\]", family="gemma2", extra=lambda w: w.add_tensor(
        "blk.0.attn_q.bias", np.zeros(64, np.int32)))
