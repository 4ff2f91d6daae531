"""`shardline perplexity`: perplexity of a stage worker's model on a fixed English corpus.

Corpus: the prose of the standard library's `pydoc_data.topics` (the help texts of Python's
language topics), concatenated in sorted key order, the first --tokens tokens (default 2048).
Sliding window: windows of --window tokens (default 512) every --stride tokens (default
256); each window scores only the tokens no earlier window scored (the first window scores
all but its first token), so every token after the first is predicted once with at least
window - stride tokens of context (except in the first window).

It runs through a StageRunner (one stage holding the whole model), with the same weight
transforms as the worker (--fuse, --quantize, --prune), in float32 by default.
--decode scores the tokens one decode step at a time instead (one window of --tokens): the
path a served decode step takes, the CPU kernels of bf16 stages included (backends/cpu_kernels), whose
int4 GEMV quantizes activations to int8 per block of 32.
The last line printed is `perplexity: X`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time

import torch
import torch.nn.functional as F

from shardline.common.dtypes import DTYPE_NAMES
from shardline.common.model_source import DEFAULT_MODEL, resolve_model
from shardline.models.attention import AttentionMetadata
from shardline.models.config import ModelConfig
from shardline.transforms.calibration import corpus_token_ids
from shardline.transforms.options import StageTransforms
from shardline.worker.build import load_runner
from shardline.worker.config import add_weight_args
from shardline.worker.heap import keep_freed_memory


@torch.inference_mode()
def window_logits(runner, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), vocab] (float32) of one prefill from position 0 on a fresh cache,
    through the stage's PyTorch modules."""
    n = len(ids)
    blocks = list(range(-(-n // runner.block_size)))
    meta = AttentionMetadata.build([0], [n], [blocks], runner.block_size, runner.device)
    x = runner.model.embed(torch.tensor(ids, device=runner.device))
    x = runner.model(x, meta, runner.kv_cache.layers)
    return runner.model.logits(x)


def perplexity(runner, ids: list[int], window: int = 512, stride: int = 256) -> float:
    """exp(mean NLL) of ids[1:] under the runner's model, with a sliding window."""
    if not runner.is_first or not runner.is_last:
        raise ValueError("perplexity needs a stage holding the whole model")
    nll, count, scored_until = 0.0, 0, 1        # ids[:scored_until] need no more scoring
    for start in range(0, len(ids) - 1, stride):
        end = min(start + window, len(ids))
        logits = window_logits(runner, ids[start:end])                # [L, vocab]
        first = max(scored_until, start + 1)                           # first target scored
        targets = torch.tensor(ids[first:end], device=logits.device)
        pred = logits[first - start - 1:end - start - 1]
        nll += F.cross_entropy(pred, targets, reduction="sum").item()
        count += end - first
        scored_until = end
        if end == len(ids):
            break
    return math.exp(nll / count)


@torch.inference_mode()
def decode_perplexity(runner, ids: list[int]) -> float:
    """exp(mean NLL) of ids[1:], each predicted by a one-token decode step after all earlier
    ones (teacher forcing), through the runner's serving path (its backend)."""
    if not runner.is_first or not runner.is_last:
        raise ValueError("perplexity needs a stage holding the whole model")
    backend = runner.backend
    blocks = list(range(-(-len(ids) // runner.block_size)))
    nll = 0.0
    for pos in range(len(ids) - 1):
        meta = backend.build_metadata([pos], [1], [blocks], runner.block_size)
        x = backend.embed([ids[pos]])
        logits = backend.logits(backend.forward(x, meta, runner.kv_cache))   # [1, vocab]
        target = torch.tensor([ids[pos + 1]], device=logits.device)
        nll += F.cross_entropy(logits, target, reduction="sum").item()
    return math.exp(nll / (len(ids) - 1))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shardline perplexity", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model dir, hub id, .gguf, or the default alias (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES,
                   help="dtype the model computes in (default: %(default)s, the reference)")
    p.add_argument("--tokens", type=int, default=2048,
                   help="tokens of the built-in corpus to score (default: %(default)s)")
    p.add_argument("--window", type=int, default=512,
                   help="tokens of one prefill window (default: %(default)s)")
    p.add_argument("--stride", type=int, default=256,
                   help="tokens between window starts (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads; 0 = torch's default")
    p.add_argument("--decode", action="store_true",
                   help="score one decode step per token (the serving path) over --tokens")
    add_weight_args(p)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cpu":
        keep_freed_memory()              # the heap a worker process runs with (worker/heap.py)
    model_dir = resolve_model(a.model)
    cfg = ModelConfig.from_dir(model_dir)
    t0 = time.perf_counter()
    window = a.tokens if a.decode else a.window
    runner = load_runner(model_dir, 0, cfg.num_layers, device=a.device, dtype=a.dtype,
                         kv_cache_bytes=_kv_bytes(cfg, window), cpu_kernels=a.cpu_kernels,
                         **dataclasses.asdict(weight_transforms(a)))
    ids = corpus_token_ids(model_dir, a.tokens)
    if a.decode:
        ppl = decode_perplexity(runner, ids)
    else:
        ppl = perplexity(runner, ids, a.window, a.stride)
    mode = "decode steps" if a.decode else f"window={a.window} stride={a.stride}"
    print(f"{a.model} dtype={a.dtype} quantize={a.quantize} prune={getattr(a, 'prune', None)} "
          f"tokens={len(ids)} {mode} "
          f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    print(f"perplexity: {ppl:.4f}")
    return 0


def weight_transforms(a: argparse.Namespace) -> StageTransforms:
    """The StageTransforms that add_weight_args' flags ask for."""
    return StageTransforms(**{f.name: getattr(a, f.name)
                              for f in dataclasses.fields(StageTransforms)})


def _kv_bytes(cfg, window: int) -> int:
    """A KV budget for one window of the whole model (4 bytes a value: any dtype fits)."""
    per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    return per_token * (window + 64) + (1 << 20)
