"""Weight optimizations compared: bytes of weights, perplexity, batch-1 decode step.

CPU, the real model (StageRunner, one stage, like benchmarks/model_step.py):

    .venv/bin/python benchmarks/weights.py --threads 2
    .venv/bin/python benchmarks/weights.py --variants fused,int8,int4 --no-ppl

GPU, random weights of a Llama shape in bf16, none/int8/int4/fp8 decode steps plus HF
transformers' LlamaForCausalLM forward on the same weights:

    python benchmarks/weights.py --device cuda --shape llama-1b
    python benchmarks/weights.py --device cuda --shape llama-8b --batches 1,16

Perplexity is `shardline perplexity`'s (pydoc topics corpus, float32 by default: --ppl-dtype).
Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time

import torch

from shardline.protocol.plan import SamplingConfig, SeqStep
from shardline.transforms.quantize import weight_bytes
from shardline.worker.build import load_runner
from shardline.worker.runner import StageRunner
from shardline.worker.heap import keep_freed_memory

VARIANTS = {
    "unfused": dict(fuse=False),
    "fused": dict(),
    "int8": dict(quantize="int8"),
    "int4": dict(quantize="int4"),
    "int4-head": dict(quantize="int4", quantize_head=True),
    "2:4": dict(prune="2:4", prune_calibration=True),
    "2:4-magnitude": dict(prune="2:4"),           # no calibration corpus (random weights)
    "fp8": dict(quantize="fp8"),
    "int8-triton": dict(quantize="int8"),       # + triton_int8.ENABLED (CUDA)
}

SHAPES = {   # HF LlamaConfig fields
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     tie_word_embeddings=True, rope_theta=500000.0),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     tie_word_embeddings=False, rope_theta=500000.0),
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_ms(runner: StageRunner, batch: int, ctx: int, steps: int) -> float:
    """Median ms of a decode step of `batch` sequences after a `ctx`-token prompt."""
    per_seq = -(-(ctx + steps + 2) // runner.block_size)
    prompt = [1 + (j * 7) % 1000 for j in range(ctx)]
    runner.step([SeqStep(i, prompt, 0, list(range(i * per_seq, (i + 1) * per_seq)), True,
                         admit=True, sampling=SamplingConfig()) for i in range(batch)], [], None)
    times = []
    for k in range(steps + 1):
        _sync(runner.device_name)
        t = time.perf_counter()
        runner.step([SeqStep(i, [42], ctx + k, [], True, num_generated=k + 1)
                     for i in range(batch)], [], None)
        _sync(runner.device_name)
        if k:
            times.append(time.perf_counter() - t)
    for i in range(batch):
        runner.step([], [i], None)
    return statistics.median(times) * 1e3


def hf_decode_ms(model_dir, dtype, device: str, batch: int, ctx: int, steps: int) -> float:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    times = []
    with torch.inference_mode():
        ids = torch.randint(1, 1000, (batch, ctx), device=device)
        cache = model(input_ids=ids, use_cache=True).past_key_values
        tok = torch.full((batch, 1), 42, device=device)
        for k in range(steps + 1):
            _sync(device)
            t = time.perf_counter()
            model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1
                  ).logits[:, -1].argmax(-1).tolist()
            _sync(device)
            if k:
                times.append(time.perf_counter() - t)
    del model
    return statistics.median(times) * 1e3


def random_model(shape: str, root: pathlib.Path) -> pathlib.Path:
    """A random-weight HF Llama of `shape` saved (bf16 safetensors) under root."""
    import transformers
    path = root / shape
    config = transformers.LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5,
                                      **SHAPES[shape])
    with torch.device("cpu"):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    del model
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="default: the default model (CPU) or --shape")
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default=None, choices=list(SHAPES))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--variants", default=None,
                   help=f"comma list of {list(VARIANTS)} (default: CPU unfused,fused,int8,int4,"
                        "2:4; CUDA fused,int8,int4,fp8)")
    p.add_argument("--batches", default="1")
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--ppl", action=argparse.BooleanOptionalAction, default=None,
                   help="measure perplexity (default: on for the real model)")
    p.add_argument("--ppl-dtype", default="float32")
    p.add_argument("--ppl-tokens", type=int, default=2048)
    p.add_argument("--hf", action=argparse.BooleanOptionalAction, default=None,
                   help="also time HF transformers (default: on with --shape)")
    a = p.parse_args()
    keep_freed_memory()                  # as a worker process does (worker/heap.py)
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = a.device.startswith("cuda")
    tmp = tempfile.TemporaryDirectory()
    if a.shape:
        model_dir = random_model(a.shape, pathlib.Path(tmp.name))
    else:
        from shardline.common.model_source import DEFAULT_MODEL, resolve_model
        model_dir = resolve_model(a.model or DEFAULT_MODEL)
    ppl_on = a.ppl if a.ppl is not None else not a.shape
    hf_on = a.hf if a.hf is not None else bool(a.shape)
    names = (a.variants or ("fused,int8,int4,fp8" if cuda else "unfused,fused,int8,int4,2:4")
             ).split(",")
    batches = [int(b) for b in a.batches.split(",")]
    num_layers = json.loads((pathlib.Path(model_dir) / "config.json").read_text())[
        "num_hidden_layers"]
    kv = (2 << 30) if cuda else (256 << 20)

    rows = []
    for name in names:
        kw = VARIANTS[name]
        from shardline.transforms import triton_int8
        triton_int8.ENABLED = name == "int8-triton"
        try:
            runner = load_runner(model_dir, 0, num_layers, device=a.device, dtype=a.dtype,
                                 kv_cache_bytes=kv, **kw)
        except (ValueError, RuntimeError) as e:
            rows.append([name, "-", "-"] + ["-"] * len(batches) + [f"skipped: {e}"])
            continue
        mib = weight_bytes(runner.model) / 2**20
        steps = [decode_ms(runner, b, a.ctx, a.steps) for b in batches]
        del runner
        ppl = "-"
        if ppl_on:
            from shardline.tools.perplexity import perplexity
            from shardline.transforms.calibration import corpus_token_ids
            pr = load_runner(model_dir, 0, num_layers, device=a.device, dtype=a.ppl_dtype,
                             kv_cache_bytes=64 << 20, **kw)
            ppl = f"{perplexity(pr, corpus_token_ids(model_dir, a.ppl_tokens)):.3f}"
            del pr
        rows.append([name, f"{mib:.1f}", ppl] + [f"{s:.2f}" for s in steps] + [""])
        print(f"# {rows[-1]}", flush=True)
        if cuda:
            torch.cuda.empty_cache()
    if hf_on:
        dt = getattr(torch, a.dtype)
        steps = [hf_decode_ms(model_dir, dt, a.device, b, a.ctx, a.steps) for b in batches]
        rows.append(["HF transformers", "-", "-"] + [f"{s:.2f}" for s in steps] + [""])

    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{a.shape or a.model or 'default model'}, {a.dtype}, {device}, ctx {a.ctx}\n")
    head = ["variant", "weights MiB", f"perplexity ({a.ppl_dtype})"] + [
        f"decode ms (batch {b})" for b in batches] + ["note"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    tmp.cleanup()


if __name__ == "__main__":
    main()
