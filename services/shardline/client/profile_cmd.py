"""`shardline profile`: record the next N steps of every stage of a running stack.

The scheduler at --address asks every stage of every replica to record its next N steps with
torch.profiler (Generation.Profile) while traffic goes on; each stage's Chrome / Perfetto trace
is written to DIR/replica<R>-stage<K>.json (open it in https://ui.perfetto.dev or
chrome://tracing) and the time per operator category printed. Only steps that run are
recorded: send requests while it waits, or it ends at --timeout with none.
"""
from __future__ import annotations

import argparse
import gzip
import os
import sys
from typing import Optional, TextIO

import grpc

from shardline.client.client import api_key_metadata
from shardline.common.server import channel_options
from shardline.v1 import common_pb2, generate_pb2, generate_pb2_grpc

DEFAULT_OUT = "shardline-profile"
DEFAULT_TIMEOUT_S = 60.0
# beyond the profile's timeout: the stages stop, export and send their traces
CALL_MARGIN_S = 120.0
RECEIVE_BYTES = 1 << 30          # every stage's trace in one answer

CATEGORY_HELP = {
    "linears": "aten linear/mm/addmm/bmm/matmul, the CPU kernels' LM head",
    "attention": "scaled_dot_product_attention, KV cache index_select",
    "sampling": "the sampler (argmax/softmax/topk/sort/exponential)",
    "copies": "copy_/to/index_copy_ (the KV store)",
    "grpc": "decoding the step request, encoding the response",
    "fused_layers": "the CPU kernels' StepLayer calls (linears + attention, not split)",
    "other": "in steps, in no category",
    "idle": "the recording window outside steps",
}


def trace_name(stage: generate_pb2.StageProfile) -> str:
    return f"replica{stage.replica}-stage{stage.stage}.json"


def write_traces(profile: generate_pb2.ClusterProfile, out_dir: str) -> dict[int, str]:
    """Write each stage's trace; index in profile.stages -> path."""
    paths = {}
    for i, st in enumerate(profile.stages):
        if st.error or not st.result.trace_json_gz:
            continue
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, trace_name(st))
        with open(path, "wb") as f:
            f.write(gzip.decompress(st.result.trace_json_gz))
        paths[i] = path
    return paths


def _pct(seconds: float, window: float) -> str:
    return f"{100 * seconds / window:5.1f}%" if window > 0 else "    -"


def _stage_table(st: generate_pb2.StageProfile, path: Optional[str], out: TextIO) -> None:
    r: common_pb2.ProfileResult = st.result
    where = f" -> {path}" if path else ""
    print(f"replica {st.replica} stage {st.stage} ({st.address}, {r.device or '?'}): "
          f"{r.steps_recorded}/{r.steps_requested} steps recorded, window "
          f"{r.window_seconds * 1e3:.1f} ms, in steps {r.step_seconds * 1e3:.1f} ms{where}",
          file=out)
    if r.note:
        print(f"  note: {r.note}", file=out)
    if not r.steps_recorded:
        return
    device = any(c.device_seconds for c in r.categories)
    head = f"  {'category':<13}{'ms':>10}{'%':>8}"
    if device:
        head += f"{'device ms':>12}{'%':>8}"
    print(head + "   what", file=out)
    for c in r.categories:
        line = f"  {c.name:<13}{c.cpu_seconds * 1e3:>10.2f}{_pct(c.cpu_seconds, r.window_seconds):>8}"
        if device:
            line += f"{c.device_seconds * 1e3:>12.2f}{_pct(c.device_seconds, r.window_seconds):>8}"
        print(line + f"   {CATEGORY_HELP.get(c.name, '')}", file=out)


def report(profile: generate_pb2.ClusterProfile, paths: dict[int, str], steps: int,
           out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Print the summary table; 0 when every stage recorded steps, else 1 (and why)."""
    rc = 0
    for i, st in enumerate(profile.stages):
        if st.error:
            print(f"replica {st.replica} stage {st.stage} ({st.address}): error: {st.error}",
                  file=out)
            rc = 1
            continue
        _stage_table(st, paths.get(i), out)
        if st.result.steps_recorded == 0:
            rc = 1
        print(file=out)
    if not profile.stages:
        print("no stage answered", file=err)
        return 1
    if all(not st.error and st.result.steps_recorded == 0 for st in profile.stages):
        print("shardline profile: no step ran within the timeout on any stage: nothing was "
              "recorded. Profiles cover steps that run: send requests while it waits (or "
              "raise --timeout).", file=err)
    elif any(not st.error and st.result.steps_recorded < steps for st in profile.stages):
        print(f"shardline profile: some stages recorded fewer than {steps} step(s) before the "
              "timeout (too little traffic)", file=err)
    return rc


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shardline profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default="localhost:50051",
                   help="the scheduler's gRPC address (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="steps to record on every stage "
                                                         "(1 to 1000; default: %(default)s)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help="where the traces go (default: ./%(default)s)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds the stages wait for the steps (up to 600; default: %(default)s)")
    p.add_argument("--api-key", default=None,
                   help="the scheduler's API key, if it wants one (default: $SHARDLINE_API_KEY)")
    a = p.parse_args(argv)
    req = common_pb2.ProfileRequest(steps=a.steps, timeout_s=a.timeout)
    print(f"shardline profile: recording the next {a.steps} step(s) of every stage "
          f"(timeout {a.timeout:g}s)", file=sys.stderr, flush=True)
    try:
        with grpc.insecure_channel(a.address, options=channel_options(RECEIVE_BYTES)) as ch:
            profile = generate_pb2_grpc.GenerationStub(ch).Profile(
                req, timeout=(a.timeout if 0 < a.timeout <= 600 else DEFAULT_TIMEOUT_S)
                + CALL_MARGIN_S,
                metadata=api_key_metadata(a.api_key))
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    paths = write_traces(profile, a.out)
    return report(profile, paths, a.steps)
