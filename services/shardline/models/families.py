"""The model families Shardline serves: the registry the config reader accepts model types
from, and the README's supported-families table is generated from (so neither can drift).

    python -m shardline.models.families      # prints the table (README.md holds a copy,
                                             # tests/unit/test_model_config.py compares)
"""
from __future__ import annotations

from dataclasses import dataclass

QUANTIZATION = "int8, int4, fp8 (CUDA)"
ROPE = "RoPE default / linear / dynamic / llama3 / yarn"


@dataclass(frozen=True)
class Family:
    model_type: str               # config.json's model_type
    name: str
    options: str                  # what of the family's config is honoured
    cpu_kernels: str              # where its bf16 CPU stages run
    gpu: str = "GPU engine"       # what runs its CUDA stages


FAMILIES = (
    Family("llama", "Llama 2 / 3, SmolLM2", f"{ROPE}, tied embeddings", "CPU kernels"),
    Family("mistral", "Mistral", f"{ROPE}, `sliding_window` on every layer",
           "CPU kernels"),
    Family("qwen2", "Qwen2 / 2.5", f"{ROPE}, q/k/v bias, `use_sliding_window` from "
           "`max_window_layers`, `layer_types`",
           "CPU kernels"),
    Family("qwen3", "Qwen3", f"{ROPE}, per-head q/k RMSNorm, `head_dim` of its own, "
           "sliding windows as Qwen2", "CPU kernels"),
    Family("phi3", "Phi-3", f"{ROPE}, LongRoPE (su; a sequence that grows past "
           "`original_max_position_embeddings` is recomputed on the long factors, as "
           "transformers does), fused `qkv_proj` / `gate_up_proj`, `sliding_window`",
           "CPU kernels", "GPU engine; eager PyTorch with LongRoPE"),
    Family("gemma2", "Gemma 2", f"{ROPE}, alternating sliding / global layers, attention and "
           "final logit soft-capping, `query_pre_attn_scalar`, GeGLU (tanh), sqrt(hidden) "
           "embedding scale, (1 + w) RMSNorm, norms before and after attention and MLP",
           "CPU kernels"),
    Family("gemma3_text", "Gemma 3 (text)", f"{ROPE}, as Gemma 2 plus q/k RMSNorm, "
           "`sliding_window_pattern` / `layer_types`, separate local / global RoPE bases",
           "CPU kernels"),
    Family("gemma3", "Gemma 3 (multimodal checkpoints)", "the language model of a "
           "`Gemma3ForConditionalGeneration` checkpoint, as Gemma 3 (text); images are not "
           "served", "CPU kernels"),
    Family("mixtral", "Mixtral", f"{ROPE}, top-k of E experts (softmax over the chosen), "
           "`sliding_window`", "CPU kernels (tokens grouped per expert)"),
    Family("qwen3_moe", "Qwen3-MoE", f"{ROPE}, top-k experts with `norm_topk_prob`, "
           "`decoder_sparse_step`, `mlp_only_layers`, q/k RMSNorm, `use_sliding_window`",
           "CPU kernels (tokens grouped per expert)"),
)


def markdown_table() -> str:
    rows = ["| family | `model_type` | honoured | bf16 on the CPU | GPU | quantization |",
            "|---|---|---|---|---|---|"]
    rows += [f"| {f.name} | `{f.model_type}` | {f.options} | {f.cpu_kernels} | {f.gpu} | "
             f"{QUANTIZATION} |" for f in FAMILIES]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
