"""The project's CPU decode kernels (the C++ sources in csrc/), built on first use.

`load()` compiles every csrc/*.cpp into one extension module with PyTorch's C++ extension
builder, once per version of the sources: the build directory and the module's name carry a
digest of every source and header file in csrc/ (names and contents) and of the compiler flags.
Builds are cached under $SHARDLINE_CACHE/torch_extensions/<digest>, or
~/.cache/shardline/torch_extensions/<digest> (the set-up script builds ahead). It returns the
module, or None where it cannot be used: a CPU without AVX512-BF16 and VNNI (or another
instruction set the kernels need: the module's supported()), no compiler, or
SHARDLINE_CPU_KERNELS=0. Callers fall back to PyTorch's own ops then.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import pathlib
import threading
from types import ModuleType
from typing import Optional

log = logging.getLogger(__name__)

CSRC = pathlib.Path(__file__).parent / "csrc"
CFLAGS = ["-O3", "-std=c++17", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
_lock = threading.Lock()
_module: Optional[ModuleType] = None
_tried = False


def _build_dir(digest: str) -> pathlib.Path:
    root = os.environ.get("SHARDLINE_CACHE") or os.path.expanduser("~/.cache/shardline")
    path = pathlib.Path(root) / "torch_extensions" / digest
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sources() -> list[pathlib.Path]:
    """The translation units: every .cpp in csrc/."""
    return sorted(CSRC.glob("*.cpp"))


def _digest() -> str:
    """12 hex digits of SHA-256 over every source and header file in csrc/ (each file's name
    and contents, in name order) and the flags: any edit, added or removed file, or flag change
    gives a new build directory and module name."""
    h = hashlib.sha256()
    for path in sorted(p for p in CSRC.iterdir() if p.suffix in (".cpp", ".h")):
        data = path.read_bytes()
        h.update(f"{path.name}\0{len(data)}\0".encode())
        h.update(data)
    h.update("\0".join(CFLAGS + ["--"] + LDFLAGS).encode())
    return h.hexdigest()[:12]


def load() -> Optional[ModuleType]:
    """The kernels module, or None where they cannot run here (logged once)."""
    global _module, _tried
    with _lock:
        if _tried:
            return _module
        _tried = True
        if os.environ.get("SHARDLINE_CPU_KERNELS", "1") == "0":
            return None
        import torch
        if not torch.cpu._is_avx512_bf16_supported():
            log.info("CPU kernels off: this CPU lacks AVX512-BF16 / VNNI; using PyTorch ops")
            return None
        try:
            _ninja_on_path()
            from torch.utils import cpp_extension
            digest = _digest()
            build = _build_dir(digest)
            with _build_lock(build):
                mod = cpp_extension.load(
                    name=f"shardline_cpu_kernels_{digest}",
                    sources=[str(p) for p in _sources()],
                    extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                    build_directory=str(build), verbose=False)
        except Exception as e:                       # no compiler, no ninja, ...
            log.warning("CPU kernels unavailable (%s); using PyTorch ops", e)
            return None
        if not mod.supported():
            return None
        _module = mod
        return mod


@contextlib.contextmanager
def _build_lock(build: pathlib.Path):
    """One build at a time per directory, under a lock the OS drops when its holder dies.
    PyTorch's own lock is a file that a process killed mid-build leaves behind, and every later
    start then waits on it forever; under ours, such a file is stale and removed."""
    with open(build / ".shardline.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            (build / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ninja_on_path() -> None:
    """The extension builder runs `ninja`: put the pip package's binary on PATH (a venv's bin
    is not on PATH when its python is run by path)."""
    import shutil
    if shutil.which("ninja"):
        return
    try:
        import ninja
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
