"""Every GPU check and benchmark of the GPU engine in one run, peers in the same run (issue 13).

    python benchmarks/gpu_check.py --out DIR                        # the device run (~8 min)
    GPU_CHECK_DEVICE=cpu python benchmarks/gpu_check.py --out DIR   # dry run, tiny shapes

Phases (each writes DIR/<phase>.json; a failed phase is recorded and the run goes on):
  cuda_tests tests/gpu/ with the kernels compiled, plus tests/gpu/cuda_graph_checks.py
  linear     the eager path's anomaly: an M=1 F.linear on a loaded stage's weights vs on a
             contiguous clone (CUDA events, median of 50)
  greedy     float32 greedy ids through the whole stack (tokenizer, scheduler, worker
             processes over gRPC) equal HF transformers' on the same GPU, a small shape
  peer       the PyTorch-native static-cache decoder with CUDA graphs (peers/, batch 1)
  hf_cb      HF transformers continuous batching (generate_batch) on the mixed workload
  stack_bf16 Shardline on the Llama-3.1-8B shape, bf16: batch-1 decode, the mixed workload
  stack_int4 the same, int4 weights: batch-1 decode
  stack_pp2  two stage processes on the one GPU, bf16: the mixed workload
The 8B-shaped weights are random and made on the GPU by the worker itself (models/weights.py
RANDOM_WEIGHTS_FILE): no 16 GB checkpoint on disk. The tokenizer is a synthetic word-level one
covering the whole vocabulary (prompts are token ids). The table printed last is the summary.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import random
import subprocess
import sys
import time
import traceback

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEV = os.environ.get("GPU_CHECK_DEVICE", "cuda")
SMALL = DEV == "cpu"
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048,
            rope_theta=500000.0, tie_word_embeddings=False)
GREEDY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=2, vocab_size=1024,
              max_position_embeddings=2048, tie_word_embeddings=False)
BIG = TINY if SMALL else LLAMA_8B
# the mixed workload: prompts of 64-1024 tokens, 128 output tokens, 256 requests at once
WORKLOAD = dict(requests=4, min_len=16, max_len=64, out=4) if SMALL else dict(
    requests=256, min_len=64, max_len=1024, out=128)
B1 = dict(prompt=32, out=16, reps=2) if SMALL else dict(prompt=128, out=256, reps=3)


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def mixed_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lens = [rng.randint(WORKLOAD["min_len"], WORKLOAD["max_len"])
            for _ in range(WORKLOAD["requests"])]
    return [[rng.randrange(10, vocab - 10) for _ in range(n)] for n in lens]


def model_dir(path: pathlib.Path, shape: dict, random_weights: bool) -> pathlib.Path:
    """config.json and a word-level tokenizer over the whole vocabulary; random weights made
    by the worker (random_weights) or by HF transformers here (saved, for the greedy check)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    path.mkdir(parents=True, exist_ok=True)
    vocab = {f"t{i}": i for i in range(shape["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0",
                                                eos_token="t1")
    fast.save_pretrained(path)
    cfg = transformers.LlamaConfig(eos_token_id=1, bos_token_id=0, **shape)
    if random_weights:
        cfg.save_pretrained(path)
        (path / "shardline_random_weights.json").write_text(json.dumps({"seed": 0}))
    else:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def start_stack(path, dtype: str, stages: int = 1, extra: tuple = (), kv: str = None):
    from shardline.launcher import build_stack, free_port
    kv = kv or ("64MiB" if SMALL else ("24GiB" if stages > 1 else "48GiB"))
    sched = [] if SMALL else ["--max-num-seqs", "256", "--max-num-batched-tokens", "8192"]
    s = build_stack(str(path), "gpu-check", stages, free_port(), DEV, dtype, kv, 2 if SMALL else 4,
                    extra_scheduler=sched, worker_extra=["--gpu-engine", "on", *extra],
                    quiet=True)
    s.start()
    if not s.wait_ready(600):
        s.stop()
        raise RuntimeError(f"the stack ({dtype}, {stages} stages) did not become ready")
    return s


def load(address: str, prompts, out: int, concurrency: int) -> dict:
    from shardline.client.bench import run_load
    return asyncio.run(run_load(address, prompts, out, concurrency, progress=False))


def batch1(address: str, vocab: int) -> dict:
    from shardline.client.bench import random_prompts
    load(address, random_prompts(1, B1["prompt"], vocab, 9), 8, 1)              # warm-up
    r = load(address, random_prompts(B1["reps"], B1["prompt"], vocab, 1), B1["out"], 1)
    r["decode_tok_s"] = round(1e3 / r["tpot_p50_ms"], 1)
    return r


# ---- phases ------------------------------------------------------------------------------
def phase_linear(work: pathlib.Path) -> dict:
    """M=1 F.linear on each weight of a loaded stage (our loader, fused) vs a contiguous clone."""
    from shardline.worker.build import load_runner
    shape = dict(BIG, num_hidden_layers=1, vocab_size=1024)
    d = model_dir(work / "linear", shape, random_weights=False)
    r = load_runner(d, 0, 1, device=DEV, dtype="bfloat16" if not SMALL else "float32",
                    kv_cache_bytes=1 << 24, gpu_engine="off")
    out = {}
    for name, mod in r.model.layers[0].named_modules():
        if isinstance(mod, torch.nn.Linear) and mod.weight is not None:
            w = mod.weight
            x = torch.randn(1, w.shape[1], device=DEV, dtype=w.dtype)
            out[name] = {"shape": list(w.shape), "strides": list(w.stride()),
                         "module_us": _time_us(lambda: torch.nn.functional.linear(x, w)),
                         "clone_us": _time_us(lambda c=w.clone(): torch.nn.functional.linear(x, c))}
    return out


def _time_us(fn, reps: int = 50) -> float:
    if DEV != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return round((time.perf_counter() - t0) / reps * 1e6, 1)
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return round(sorted(times)[reps // 2], 1)


def phase_greedy(work: pathlib.Path) -> dict:
    import transformers
    from shardline.client import Client
    d = model_dir(work / "greedy", GREEDY, random_weights=False)
    hf = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).to(DEV).eval()
    hf.generation_config.eos_token_id = None
    prompts = [[5, 6, 7, 8], list(range(100, 140)), list(range(900, 1000, 3))]
    want = [hf.generate(torch.tensor([p], device=DEV), max_new_tokens=32, do_sample=False)[
        0, len(p):].tolist() for p in prompts]
    del hf
    s = start_stack(d, "float32")
    try:
        with Client(s.scheduler_address) as c:
            got = [c.generate(token_ids=p, max_tokens=32, ignore_eos=True).token_ids
                   for p in prompts]
    finally:
        s.stop()
    return {"equal": [g == w for g, w in zip(got, want)], "tokens": 32}


def phase_peer(work: pathlib.Path) -> dict:
    env = dict(os.environ, DEVICE=DEV, OUT=str(work))
    if SMALL:
        env["TINY"] = "1"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks/peers/pytorch_native_gpu_peer.py")],
                       env=env, capture_output=True, text=True, timeout=300)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        raise RuntimeError(f"peer exit {p.returncode}: {p.stderr[-2000:]}")
    return json.loads(line[-1][len("RESULT "):])


def phase_hf_cb(work: pathlib.Path) -> dict:
    """HF transformers' continuous batching (generate_batch, paged attention) on the mixed
    workload, the same model shape and random init as the stack's; bf16 on the GPU."""
    import transformers
    cfg = transformers.LlamaConfig(**BIG)
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    torch.set_default_dtype(dtype)
    with torch.device(DEV):
        model = transformers.LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    prompts = mixed_prompts(BIG["vocab_size"])
    gc = transformers.GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0,
                                       max_new_tokens=WORKLOAD["out"])
    with torch.no_grad():
        t0 = time.perf_counter()
        if not SMALL:                            # at its best: its warm-up out of the timing
            model.generate_batch(inputs=prompts[:32], generation_config=gc)
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate_batch(inputs=prompts, generation_config=gc, warmup=False)
        if DEV == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    ntok = sum(len(o.generated_tokens) for o in out.values())
    return {"requests": len(prompts), "output_tokens": ntok, "wall_s": round(wall, 2),
            "output_tok_s": round(ntok / wall, 1), "attn": cfg._attn_implementation,
            "warm_up_s": round(warm_s, 1)}


def phase_stack(work: pathlib.Path, quant: str = "none", stages: int = 1, mixed: bool = True,
                b1: bool = True) -> dict:
    d = model_dir(work / "big", BIG, random_weights=True)
    extra = ("--quantize", quant) if quant != "none" else ()
    s = start_stack(d, "bfloat16" if not SMALL else "float32", stages, extra)
    res = {}
    try:
        if b1:
            res["b1"] = batch1(s.scheduler_address, BIG["vocab_size"])
        if mixed:
            res["mixed"] = load(s.scheduler_address, mixed_prompts(BIG["vocab_size"]),
                                WORKLOAD["out"], WORKLOAD["requests"])
    finally:
        s.stop()
    return res


def phase_cuda_tests(work: pathlib.Path) -> dict:
    """tests/gpu/ on the device (Triton compiled, not interpreted) and the CUDA-only checks."""
    args = ["tests/gpu", "tests/gpu/cuda_graph_checks.py", "-k", "not dry_run"]
    if SMALL:                       # the dry run: that they are collected, not a second run
        args.append("--collect-only")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    tail = p.stdout.strip().splitlines()[-1:] or [""]
    return {"returncode": p.returncode, "summary": tail[0], "output": p.stdout[-4000:]}


PHASES = {
    "cuda_tests": phase_cuda_tests, "linear": phase_linear, "greedy": phase_greedy, "peer": phase_peer, "hf_cb": phase_hf_cb,
    "stack_bf16": phase_stack,
    "stack_int4": lambda w: phase_stack(w, quant="int4", mixed=False),
    "stack_pp2": lambda w: phase_stack(w, stages=2, b1=False),
}


def run_phase(name: str, out: pathlib.Path) -> dict:
    """Each phase in its own process (GPU memory is returned between phases)."""
    t0 = time.perf_counter()
    log(f"== {name}")
    p = subprocess.run([sys.executable, __file__, "--out", str(out), "--phase", name],
                       timeout=600)
    path = out / f"{name}.json"
    res = json.loads(path.read_text()) if path.exists() else {"error": f"exit {p.returncode}"}
    log(f"   {name}: {time.perf_counter() - t0:.0f} s")
    return res


def summary(r: dict) -> list[tuple[str, str, str, str]]:
    """(metric, Shardline, peer, ratio) rows."""
    def get(*keys):
        v = r
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        return v

    def row(name, ours, peer, invert=False):
        ratio = (f"{(peer / ours if invert else ours / peer):.2f}x"
                 if isinstance(ours, (int, float)) and isinstance(peer, (int, float)) and peer
                 and ours else "")
        return (name, str(ours), str(peer), ratio)

    peer_b1 = get("peer", "b1_decode_tok_s")
    return [
        row("tests/gpu on the device", get("cuda_tests", "summary"), "", ""),
        row("fp32 greedy = HF (3 prompts x 32)", get("greedy", "equal"), "", ""),
        row("b1 decode tok/s, bf16 vs native peer", get("stack_bf16", "b1", "decode_tok_s"),
            peer_b1),
        row("b1 decode tok/s, int4 vs peer bf16", get("stack_int4", "b1", "decode_tok_s"),
            peer_b1),
        row("mixed workload out tok/s vs HF CB", get("stack_bf16", "mixed", "output_tok_s"),
            get("hf_cb", "output_tok_s")),
        row("TTFT p50 ms (mixed)", get("stack_bf16", "mixed", "ttft_p50_ms"), "", ""),
        row("TPOT p50 / p99 ms (mixed)", f"{get('stack_bf16', 'mixed', 'tpot_p50_ms')} / "
            f"{get('stack_bf16', 'mixed', 'tpot_p99_ms')}", "", ""),
        row("PP=2 vs PP=1 mixed out tok/s", get("stack_pp2", "mixed", "output_tok_s"),
            get("stack_bf16", "mixed", "output_tok_s")),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--phase", choices=list(PHASES), help="run one phase in this process")
    ap.add_argument("--phases", default=",".join(PHASES), help="comma-separated phases")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu-check"))
    if args.phase:
        try:
            res = PHASES[args.phase](work)
        except Exception as e:                   # recorded: the run goes on with the others
            traceback.print_exc()
            res = {"error": repr(e)[:2000]}
        (out / f"{args.phase}.json").write_text(json.dumps(res, indent=1))
        return 0
    import transformers
    import triton
    results = {"device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu",
               "torch": torch.__version__, "triton": triton.__version__,
               "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d")}
    for name in args.phases.split(","):
        results[name] = run_phase(name, out)
    rows = summary(results)
    results["summary"] = rows
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    print(f"{results['device']}, torch {results['torch']}, triton {results['triton']}")
    print(f"{'metric':<42} {'Shardline':>14} {'peer':>10} {'ratio':>7}")
    for name, ours, peer, ratio in rows:
        print(f"{name:<42} {ours:>14} {peer:>10} {ratio:>7}")
    errors = [n for n in PHASES if isinstance(results.get(n), dict) and "error" in results[n]]
    if errors:
        print("phases that failed:", ", ".join(errors))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
