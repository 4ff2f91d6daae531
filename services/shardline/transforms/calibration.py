"""Calibration data for activation-aware transforms (pruning scores, later quantization).

The corpus is the prose of the standard library's `pydoc_data.topics` (the help texts of
Python's language topics) in sorted key order, tokenized with the model's own tokenizer; the
perplexity tool (tools/perplexity.py) scores the same text.
"""
from __future__ import annotations

import pathlib

import torch
from pydoc_data.topics import topics
from tokenizers import Tokenizer
from torch import nn

from shardline.models.attention import AttentionMetadata
from shardline.models.decoder import layer_linears
from shardline.models.kv_cache import KVCache


def corpus_token_ids(model_dir, num_tokens: int) -> list[int]:
    """The first num_tokens tokens of the pydoc topics corpus, with model_dir's tokenizer."""
    text = "\n\n".join(topics[k] for k in sorted(topics))
    tok = Tokenizer.from_file(str(pathlib.Path(model_dir) / "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids
    if len(ids) < num_tokens:
        raise ValueError(f"the corpus has only {len(ids)} tokens")
    return ids[:num_tokens]


@torch.inference_mode()
def calibration_norms(model: nn.Module, model_dir, batches: int = 4, window: int = 256
                      ) -> dict[nn.Module, torch.Tensor]:
    """Per Linear of the stage: the L2 norm of each input channel over `batches` windows of
    the built-in corpus (the stage must be the first: it embeds the tokens)."""
    if not model.is_first:
        raise ValueError("--prune-calibration needs the first stage (it embeds the corpus)")
    cfg, param = model.config, next(model.parameters())
    bs = 16
    kv = KVCache(len(model.layers), -(-window // bs), bs, cfg.num_kv_heads, cfg.head_dim,
                 param.dtype, param.device)
    sums: dict[nn.Module, torch.Tensor] = {}

    def hook(mod, inputs, output):
        x = inputs[0].float()
        sums[mod] = sums.get(mod, 0) + (x * x).sum(0)

    handles = [m.register_forward_hook(hook) for m in layer_linears(model)]
    ids = corpus_token_ids(model_dir, batches * window)
    try:
        for b in range(batches):
            chunk = ids[b * window:(b + 1) * window]
            meta = AttentionMetadata.build([0], [window], [list(range(kv.num_blocks))], bs,
                                           param.device)
            model(model.embed(torch.tensor(chunk, device=param.device)), meta, kv.layers)
    finally:
        for h in handles:
            h.remove()
    return {m: s.sqrt() for m, s in sums.items()}
