"""Model families through the whole stack on this CPU, against HF transformers in the same run.

Random-weight checkpoints of two shapes, made once with transformers from a config (no hub)
and cached under ~/.cache/shardline/bench-models/:
  * qwen3-0.6b: Qwen3-0.6B's layers (28 layers, hidden 1024, 16 / 8 heads of 128, q/k norm,
    MLP 3072, tied embeddings) with the default model's 49152-token vocabulary (the stack
    detokenizes what it generates with that tokenizer; Qwen3's own has 151936), 0.5B in all;
  * moe-1b: a Qwen3-MoE of about 1B parameters (16 layers, hidden 1024, 8 experts of 2048,
    top-2, q/k norm, vocab 49152).
Each is served in bf16 (`shardline up` processes: tokenizer, scheduler, one worker) and
measured, round by round, beside HF transformers `generate` in float32 and in bfloat16 on the
same weights: batch-1 decode tok/s and 16-concurrent output tok/s for 128-token prompts. The
ratio is against HF's best dtype in the same round. The tokenizer files are the default
model's (prompts are token ids).

    .venv/bin/python benchmarks/families_cpu.py --rounds 2 --json /tmp/families.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import shutil
import statistics
import sys
import time

SHAPES = {
    "qwen3-0.6b": ("Qwen3Config", dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=49152, tie_word_embeddings=True,
        max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6)),
    "moe-1b": ("Qwen3MoeConfig", dict(
        hidden_size=1024, intermediate_size=3072, moe_intermediate_size=2048,
        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, vocab_size=49152,
        tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-6)),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def make_checkpoint(shape: str, root: pathlib.Path) -> pathlib.Path:
    """The random bf16 checkpoint of `shape` (made once)."""
    import torch
    import transformers
    from shardline.common.model_source import DEFAULT_MODEL, resolve_model

    out = root / shape
    if (out / "config.json").is_file():
        return out
    print(f"making the random {shape} checkpoint in {out}", file=sys.stderr, flush=True)
    cls, kw = SHAPES[shape]
    config = getattr(transformers, cls)(**kw)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = out.with_suffix(".tmp")
    model.save_pretrained(tmp)
    default = resolve_model(DEFAULT_MODEL)
    for name in TOKENIZER_FILES:
        if (default / name).is_file() and not (name == "generation_config.json"
                                               and (tmp / name).is_file()):
            shutil.copy(default / name, tmp / name)
    tmp.rename(out)
    return out


def bench_shape(shape: str, model_dir: pathlib.Path, a) -> dict:
    from shardline.client.bench import HFBaseline, random_prompts, run_load
    from shardline.launcher import build_stack, free_port

    vocab = 49152                                  # the tokenizer's: prompts it can decode
    stack = build_stack(str(model_dir), shape, 1, free_port(), "cpu", "bfloat16", "1GiB",
                        a.threads, quiet=not a.verbose, worker_extra=a.worker_args.split())
    hfs = {dt: HFBaseline(str(model_dir), a.prompt_tokens, dt, "cpu", 0, threads=a.threads)
           for dt in ("float32", "bfloat16")}
    print(f"{shape}: starting the stack", file=sys.stderr, flush=True)
    stack.start()
    rounds = []
    try:
        if not stack.wait_ready(600):
            raise SystemExit("stack failed to start")
        addr = stack.scheduler_address
        asyncio.run(run_load(addr, random_prompts(2, a.prompt_tokens, vocab, 99), 8, 1,
                             progress=False))
        for r in range(a.rounds):
            print(f"{shape} round {r + 1}/{a.rounds}", file=sys.stderr, flush=True)
            one = {"b1": asyncio.run(run_load(addr, random_prompts(2, a.prompt_tokens, vocab, r),
                                              a.max_tokens, 1, progress=False)),
                   "cN": asyncio.run(run_load(
                       addr, random_prompts(a.concurrency, a.prompt_tokens, vocab, 100 + r),
                       a.max_tokens, a.concurrency, progress=False))}
            for dt, hf in hfs.items():
                one[dt] = hf.batch1(a.max_tokens)
                one[dt].update(hf.batched(a.concurrency, a.max_tokens))
            rounds.append(one)
    finally:
        stack.stop()
    n, med = a.concurrency, statistics.median
    b1 = [1e3 / o["b1"]["tpot_p50_ms"] for o in rounds]
    cn = [o["cN"]["output_tok_s"] for o in rounds]
    hf_b1 = {dt: [o[dt]["hf_b1_decode_tok_s"] for o in rounds] for dt in hfs}
    hf_cn = {dt: [o[dt][f"hf_b{n}_out_tok_s"] for o in rounds] for dt in hfs}
    best_b1 = [max(v) for v in zip(*hf_b1.values())]
    best_cn = [max(v) for v in zip(*hf_cn.values())]
    return {"shape": shape, "rounds": rounds,
            "b1": med(b1), "hf_b1": {dt: med(v) for dt, v in hf_b1.items()},
            "b1_ratio": [x / y for x, y in zip(b1, best_b1)],
            "cN": med(cn), "hf_cN": {dt: med(v) for dt, v in hf_cn.items()},
            "cN_ratio": [x / y for x, y in zip(cn, best_cn)]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/shardline/bench-models"))
    p.add_argument("--worker-args", default="",
                   help="extra worker flags, e.g. '--quantize int8' (weights int8, bf16 compute)")
    p.add_argument("--json", default=None)
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args()
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from e2e_cpu import cpu_model
    res = {"machine": f"{cpu_model()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
           "args": vars(a), "shapes": []}
    for shape in a.shapes.split(","):
        model_dir = make_checkpoint(shape, pathlib.Path(a.cache))
        res["shapes"].append(bench_shape(shape, model_dir, a))
    n = a.concurrency
    print(f"\n{res['machine']}, {res['date']}")
    ours = f"shardline bf16 {a.worker_args}".strip()
    print(f"| model | metric | {ours} | HF fp32 | HF bf16 | ratio to HF's best, "
          f"median (per round) |")
    print("|---|---|---|---|---|---|")
    for s in res["shapes"]:
        for key, label, hf in (("b1", "batch-1 decode tok/s", "hf_b1"),
                               ("cN", f"{n} concurrent, output tok/s", "hf_cN")):
            ratios = s[f"{key}_ratio"]
            print(f"| {s['shape']} | {label} | {s[key]:.1f} | {s[hf]['float32']:.1f} | "
                  f"{s[hf]['bfloat16']:.1f} | {statistics.median(ratios):.2f}x "
                  f"({', '.join(f'{r:.2f}' for r in ratios)}) |")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
