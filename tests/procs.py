"""Processes on this machine, read from /proc (Linux): what tests that start process trees
look at."""
from __future__ import annotations

import os


def child_processes(ppid: int) -> dict[int, list[str]]:
    """pid -> command line (argv) of each live process whose parent is ppid."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rpartition(")")[2].split()[1])
            if parent != ppid:
                continue
            with open(f"/proc/{entry}/cmdline") as f:
                out[int(entry)] = f.read().split("\0")
        except (OSError, ValueError, IndexError):
            continue
    return out
