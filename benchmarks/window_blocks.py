"""KV blocks one long generation holds on a sliding-window model, with and without releasing
the blocks every layer's window has left behind (the scheduler's count: BlockManager and
Scheduler driven step by step, no model, no clock: the numbers are exact and repeatable).

    .venv/bin/python benchmarks/window_blocks.py --prompt 128 --generate 2000 \
        --windows 512,4096 --block-size 16 --chunk 512

For each window it prints the blocks held during the last step and at the peak (prefill
chunks included), and what they weigh for a Mistral-7B-shaped model (32 layers, 8 KV heads
of 128, bf16: 2 MiB a block of 16), and how many such sequences a pool of --pool-gib holds.
"""
from __future__ import annotations

import argparse
import json

from shardline.protocol.plan import SampledToken
from shardline.scheduler.block_manager import BlockManager
from shardline.scheduler.request import Sequence
from shardline.scheduler.scheduler import Scheduler


def blocks_held(prompt: int, generate: int, window: int, block_size: int, chunk: int) -> dict:
    """Run one sequence of prompt + generate tokens alone; the blocks it holds as each step
    is planned (after that step's allocation)."""
    total = prompt + generate
    bm = BlockManager(-(-total // block_size) + 1, block_size, window=window)
    s = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=chunk)
    seq = Sequence(1, [(7 * i) % 32000 for i in range(prompt)], max_tokens=generate)
    s.add(seq)
    peak = last = steps = 0
    while not seq.is_finished:
        batch = s.schedule()
        last = bm.num_used_blocks
        peak = max(peak, last)
        steps += 1
        s.postprocess(batch, [SampledToken(1, (13 * steps) % 32000)
                              for _, st in batch.items if st.sample])
    assert bm.num_used_blocks == 0 and len(seq.output_token_ids) == generate
    return {"last_step_blocks": last, "peak_blocks": peak, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--generate", type=int, default=2000)
    ap.add_argument("--windows", default="512,4096")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=512, help="max_num_batched_tokens")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype-bytes", type=int, default=2)
    ap.add_argument("--pool-gib", type=float, default=16.0)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    mib = (2 * args.layers * args.block_size * args.kv_heads * args.head_dim * args.dtype_bytes
           / 2**20)
    pool = int(args.pool_gib * 1024 / mib)
    rows = []
    print(f"prompt {args.prompt} + {args.generate} generated, block size {args.block_size}, chunk "
          f"{args.chunk}; {mib:g} MiB a block; a {args.pool_gib:g} GiB pool = {pool} blocks")
    print("| window | release | blocks, last step | peak blocks | KV MiB at the peak | "
          "such sequences in the pool |")
    print("|---|---|---|---|---|---|")
    for window in (int(w) for w in args.windows.split(",")):
        for release in (False, True):
            r = blocks_held(args.prompt, args.generate, window if release else 0,
                            args.block_size, args.chunk)
            r.update(window=window, release=release, peak_mib=r["peak_blocks"] * mib,
                     seqs_in_pool=pool // r["peak_blocks"])
            rows.append(r)
            print(f"| {window} | {'yes' if release else 'no'} | {r['last_step_blocks']} | "
                  f"{r['peak_blocks']} | {r['peak_mib']:g} | {r['seqs_in_pool']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
