"""The `shardline` command: one sub-command per service, plus local tools."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "up": ("shardline.launcher", "start the whole stack locally (tokenizer, scheduler, workers)"),
    "tokenizer": ("shardline.tokenizer.server", "run the tokenizer service"),
    "scheduler": ("shardline.scheduler.server", "run the scheduler service (public Generate API)"),
    "worker": ("shardline.worker.server", "run one pipeline stage worker"),
    "generate": ("shardline.client.generate_cmd", "stream a completion from a running stack"),
    "bench": ("shardline.client.bench", "load-test a running stack (optionally vs HF transformers)"),
    "profile": ("shardline.client.profile_cmd", "profile the next N steps of every stage "
                                                "(torch.profiler traces, time per op kind)"),
    "perplexity": ("shardline.tools.perplexity", "perplexity of the model on a built-in corpus"),
    "optimize": ("shardline.tools.optimize", "write a pruned / quantized checkpoint"),
}


def usage() -> str:
    lines = ["usage: shardline COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {doc}" for name, (_, doc) in COMMANDS.items()]
    lines += ["", "shardline COMMAND --help for a command's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"shardline: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
