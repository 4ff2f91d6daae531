"""Soak: a stack of its own under 16 mixed clients for a long while, memory watched.

The clients are tests/reliability/test_soak.py's (tests/reliability/load.py: gRPC and HTTP,
streamed and whole answers, text and chat prompts of 1 to 160 words, 16 to 64 tokens, every
answer checked complete). After a warm-up (every client's first requests) the RSS of each
process is taken idle; the soak then runs for --duration-s, printing requests done, errors
and each process's RSS every --progress-s; at the end the RSS is taken idle again and a
summary table (markdown, for docs/benchmarks.md) is printed.

    .venv/bin/python benchmarks/soak.py                      # 10 minutes
    .venv/bin/python benchmarks/soak.py --duration-s 60 --json /tmp/soak.json
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # the repo's tests/

from shardline.client import Client  # noqa: E402
from shardline.common.model_source import DEFAULT_MODEL, resolve_model  # noqa: E402
from shardline.launcher import build_stack, free_port  # noqa: E402
from tests.reliability.load import KINDS, MixedLoad, rss_bytes  # noqa: E402

WARMUP_REQUESTS = 5                 # per client: every kind once


def rss_mib(stack) -> dict[str, float]:
    return {c.name: round(rss_bytes(c.proc.pid) / 2**20, 1) for c in stack.children}


def wait_idle(address: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    with Client(address, timeout=30) as c:
        while time.monotonic() < deadline:
            if all(r.num_running == 0 and r.num_waiting == 0 for r in c.stats().replicas):
                return
            time.sleep(0.2)
    raise SystemExit("the stack did not become idle")


def soak(stack, a: argparse.Namespace) -> dict:
    address, url = stack.scheduler_address, stack.http_url
    print(f"warm-up: {a.clients} clients x {WARMUP_REQUESTS} requests", flush=True)
    warm = MixedLoad(address, url, clients=a.clients, seed=1).run(WARMUP_REQUESTS)
    wait_idle(address)
    before = rss_mib(stack)
    print(f"  {warm.total} requests, {warm.num_errors} errors; RSS MiB {before}", flush=True)

    load = MixedLoad(address, url, clients=a.clients, seed=2)
    stop = threading.Event()
    runner = threading.Thread(target=load.run, kwargs={"stop": stop}, daemon=True)
    t0 = time.monotonic()
    runner.start()
    while not stop.wait(min(a.progress_s, max(0.0, a.duration_s - (time.monotonic() - t0)))):
        elapsed = time.monotonic() - t0
        print(f"  {elapsed:6.0f} s  {load.tally.total:6d} requests  {load.tally.num_errors} errors"
              f"  RSS MiB {rss_mib(stack)}", flush=True)
        if elapsed >= a.duration_s:
            stop.set()
    runner.join()
    wall = time.monotonic() - t0
    wait_idle(address)
    after = rss_mib(stack)
    tally = load.tally
    return {"date": time.strftime("%Y-%m-%d"), "clients": a.clients, "duration_s": round(wall, 1),
            "requests": tally.total, "requests_per_s": round(tally.total / wall, 2),
            "by_kind": dict(tally.done), "errors": tally.num_errors,
            "first_errors": tally.errors, "warmup_errors": warm.num_errors,
            "rss_after_warmup_mib": before, "rss_at_end_mib": after,
            "dead_children": [c.name for c in stack.dead()]}


def table(res: dict) -> str:
    lines = [f"Soak, {res['clients']} clients, {res['duration_s']:.0f} s ({res['date']}): "
             f"{res['requests']} requests ({res['requests_per_s']}/s), {res['errors']} errors",
             "", "| process | RSS after warm-up (MiB) | RSS at end (MiB) | growth |",
             "|---|---:|---:|---:|"]
    for name, before in res["rss_after_warmup_mib"].items():
        after = res["rss_at_end_mib"][name]
        lines.append(f"| {name} | {before:.1f} | {after:.1f} | {100 * (after / before - 1):+.1f}% |")
    lines += ["", "| request kind | completed |", "|---|---:|"]
    lines += [f"| {k} | {res['by_kind'][k]} |" for k in KINDS]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration-s", type=float, default=600.0)
    p.add_argument("--progress-s", type=float, default=30.0)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2, help="per worker")
    p.add_argument("--kv-cache-memory", default="128MiB")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    model_dir = str(resolve_model(DEFAULT_MODEL, os.environ.get("SHARDLINE_CACHE")))
    stack = build_stack(model_dir, DEFAULT_MODEL, 1, free_port(), "cpu", a.dtype,
                        a.kv_cache_memory, a.threads, http_port=free_port(), quiet=True)
    stack.start()
    try:
        if not stack.wait_ready(300):
            raise SystemExit(f"the stack did not start: {[c.name for c in stack.dead()]}")
        res = soak(stack, a)
    finally:
        stack.stop()
    print()
    print(table(res))
    if res["first_errors"]:
        print("\nfirst errors:\n  " + "\n  ".join(res["first_errors"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 1 if res["errors"] or res["warmup_errors"] or res["dead_children"] else 0


if __name__ == "__main__":
    sys.exit(main())
