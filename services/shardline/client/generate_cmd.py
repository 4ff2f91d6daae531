"""`shardline generate`: stream one completion to stdout."""
from __future__ import annotations

import argparse
import sys

import grpc

from shardline.client.client import Client


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shardline generate", description=__doc__)
    p.add_argument("prompt")
    p.add_argument("--address", default="localhost:50051")
    p.add_argument("--max-tokens", type=int, default=0, help="0: the server default")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--chat", action="store_true", help="send PROMPT as a user chat message")
    p.add_argument("--tenant", default=None)
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--usage", action="store_true", help="print token usage to stderr")
    a = p.parse_args(argv)
    kwargs = dict(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                  repetition_penalty=a.repetition_penalty, seed=a.seed, stop=a.stop)
    if a.chat:
        kwargs["messages"] = [{"role": "user", "content": a.prompt}]
        prompt = None
    else:
        prompt = a.prompt
    try:
        with Client(a.address, timeout=a.timeout, tenant=a.tenant) as c:
            last = None
            for chunk in c.stream(prompt, **kwargs):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                last = chunk
            sys.stdout.write("\n")
            if a.usage and last is not None and last.usage:
                u = last.usage
                print(f"finish_reason={last.finish_reason} prompt_tokens={u.prompt_tokens} "
                      f"completion_tokens={u.completion_tokens} cached_tokens={u.cached_tokens}",
                      file=sys.stderr)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
