"""GPU check and benchmark in one run (for a lent H100/H200; see docs/benchmarks.md).

1. Builds a SmolLM2-135M-shaped checkpoint with random weights (HF init, seed 0) next to the
   real tokenizer files (the real weights are too large to carry to the device machine).
2. Starts the whole stack on CUDA (tokenizer, scheduler, worker processes over gRPC):
   greedy output through the stack in float32 must equal HF transformers' greedy output on
   the same weights on the same GPU.
3. Restarts it in bfloat16 and measures batch-1 decode / TTFT and 16-concurrent throughput,
   then HF transformers `generate` (bfloat16, same GPU) on the same shapes, in the same run.

    python3 benchmarks/gpu_check.py TOKENIZER_DIR OUT_JSON
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time

import torch


def log(*a):
    print(*a, file=sys.stderr, flush=True)


DEV = os.environ.get("GPU_CHECK_DEVICE", "cuda")     # "cpu" for a dry run of this script
SMALL = DEV == "cpu"


def hf_greedy(model, ids, n):
    out = []
    with torch.inference_mode():
        res = model(torch.tensor([ids], device=DEV), use_cache=True)
        for _ in range(n):
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            res = model(torch.tensor([[nxt]], device=DEV), past_key_values=res.past_key_values,
                        use_cache=True)
    return out


def main() -> int:
    tok_dir, out_json = sys.argv[1], sys.argv[2]
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from shardline.client import Client
    from shardline.client.bench import hf_baseline, random_prompts, run_load
    from shardline.launcher import build_stack, free_port

    res = {"device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu",
           "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d")}
    model_dir = "/tmp/smol-random"
    cfg = AutoConfig.from_pretrained(tok_dir)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    m.save_pretrained(model_dir)
    for f in os.listdir(tok_dir):
        if not f.startswith(("model", "config")):
            shutil.copy(os.path.join(tok_dir, f), model_dir)
    log("checkpoint ready")
    hf = m.to(DEV).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]

    def stack(dtype):
        s = build_stack(model_dir, "smollm2-random", 1, free_port(), DEV, dtype,
                        "256MiB" if SMALL else None, 2 if SMALL else 4)
        s.start()
        if not s.wait_ready(300):
            s.stop()
            raise SystemExit(f"stack ({dtype}) failed to start")
        return s

    s = stack("float32")
    try:
        with Client(s.scheduler_address) as c:
            ok = []
            for p in prompts:
                ids = tok(p)["input_ids"]
                ours = c.generate(token_ids=ids, max_tokens=32, ignore_eos=True).token_ids
                ok.append(ours == hf_greedy(hf, ids, 32))
        res["fp32_greedy_equals_hf"] = ok
        log("fp32 greedy equal to HF:", ok)
    finally:
        s.stop()
    del hf
    if DEV == "cuda":
        torch.cuda.empty_cache()

    s = stack("bfloat16")
    try:
        addr = s.scheduler_address
        asyncio.run(run_load(addr, random_prompts(2, 128, 49152, 9), 8, 1, progress=False))
        n_out = 8 if SMALL else 128
        res["b1"] = asyncio.run(run_load(addr, random_prompts(2 if SMALL else 5, 128, 49152, 1),
                                         n_out, 1, progress=False))
        res["c16"] = asyncio.run(run_load(addr, random_prompts(16 if SMALL else 32, 128, 49152, 2),
                                          n_out, 16, progress=False))
        res["c64"] = asyncio.run(run_load(addr, random_prompts(64 if SMALL else 128, 128, 49152, 3),
                                          n_out, 64, progress=False))
    finally:
        s.stop()
    log("stack bench done")
    n_out = 8 if SMALL else 128
    res["hf_bf16_c16"] = hf_baseline(model_dir, 128, n_out, 16, "bfloat16", DEV, 0)
    res["hf_bf16_c64"] = hf_baseline(model_dir, 128, n_out, 64, "bfloat16", DEV, 0)
    b1, c16, c64 = res["b1"], res["c16"], res["c64"]
    res["summary"] = {
        "b1_decode_tok_s": round(1e3 / b1["tpot_p50_ms"], 1),
        "hf_b1_decode_tok_s": res["hf_bf16_c16"]["hf_b1_decode_tok_s"],
        "b1_ttft_ms": b1["ttft_p50_ms"], "hf_b1_ttft_ms": res["hf_bf16_c16"]["hf_b1_ttft_ms"],
        "c16_out_tok_s": c16["output_tok_s"], "hf_b16_out_tok_s": res["hf_bf16_c16"]["hf_b16_out_tok_s"],
        "c64_out_tok_s": c64["output_tok_s"], "hf_b64_out_tok_s": res["hf_bf16_c64"]["hf_b64_out_tok_s"],
    }
    print(json.dumps(res["summary"], indent=1))
    with open(out_json, "w") as f:
        json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
