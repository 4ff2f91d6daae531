"""Child processes that die with their parent, started without Python code between fork and exec.

A process with gRPC threads must not run Python between fork() and exec() (Popen's
preexec_fn): gRPC's fork handlers see those threads and the child can abort. So `spawn`
passes Popen only posix_spawn/vfork-friendly arguments, and the child arranges its own
parent-death signal as its first action. The command it runs is this module:

    python -m shardline.common.spawn PARENT_PID -- ARGV...

which calls prctl(PR_SET_PDEATHSIG, SIGTERM), exits (by SIGTERM) if its parent is no longer
PARENT_PID (the parent died before the prctl), and then execs ARGV in its place (same pid;
the setting survives exec). A killed `shardline up` or test run thus leaves no services
behind. Linux only; elsewhere the child just execs ARGV.

The kernel sends the signal when the *thread* that started the child exits, so start
children from a thread that lives as long as they should (the main thread).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from typing import NoReturn, Sequence

PR_SET_PDEATHSIG = 1          # <linux/prctl.h>


def spawn(argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
    """subprocess.Popen(argv, **popen_kwargs) whose process gets SIGTERM when this process
    dies, even by SIGKILL. popen_kwargs are Popen's (stdout, env, start_new_session, ...)."""
    cmd = [sys.executable, "-m", __name__, str(os.getpid()), "--", *argv]
    return subprocess.Popen(cmd, **popen_kwargs)


def spawn_shardline(args: Sequence[str], **popen_kwargs) -> subprocess.Popen:
    """spawn() of `python -m shardline ARGS...` with this interpreter."""
    return spawn([sys.executable, "-m", "shardline", *args], **popen_kwargs)


def die_with_parent(parent_pid: int) -> None:
    """In the child: SIGTERM this process when its parent dies; if the parent (parent_pid)
    is already gone, terminate now. A no-op where prctl is missing (not Linux)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    if prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:      # reparented: the parent died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)
        os._exit(128 + signal.SIGTERM)


def _main(argv: list[str]) -> NoReturn:
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: python -m shardline.common.spawn PARENT_PID -- ARGV...")
    die_with_parent(int(argv[0]))
    cmd = argv[2:]
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    _main(sys.argv[1:])
