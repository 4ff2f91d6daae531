"""Configuration of one stage worker."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Optional

from shardline.common.units import parse_bytes

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_CPU_KV_CACHE_BYTES = 256 << 20     # KV cache budget on the CPU
DEFAULT_CUDA_KV_CACHE_FRACTION = 0.8       # CUDA: fraction of free memory after the weights


@dataclass
class WorkerConfig:
    model: str
    port: int = 50061
    host: str = "0.0.0.0"
    stage_index: int = 0
    num_stages: int = 1
    layers: Optional[str] = None          # "a:b" overrides the even split
    device: str = "cpu"
    dtype: Optional[str] = None           # default: bfloat16 (see docs/architecture.md)
    kv_cache_memory: Optional[str] = None # bytes or "512MiB"; default 256MiB on CPU
    kv_cache_fraction: float = 0.8        # CUDA: fraction of free memory after weights
    block_size: int = 16
    threads: int = 0                      # torch intra-op threads; 0 = torch default
    cache_dir: Optional[str] = None
    log_level: str = "INFO"
    fuse: bool = True                     # fused qkv / gate_up / residual adds (transforms/fuse.py)
    quantize: str = "none"                # none | int8 | int4 | fp8 (transforms/quantize.py)
    group_size: int = 32                  # int4 group size
    quantize_head: bool = False           # also quantize the LM head
    prune: Optional[str] = None           # "0.5" or "2:4" (transforms/prune.py)
    prune_calibration: bool = False       # activation-aware pruning scores
    cpu_kernels: bool = True              # steps on csrc kernels (bf16 CPU, cpu_path.py)
    torch_compile: bool = False           # torch.compile the layers' dense parts (fuse.py)
    metrics_port: int = 0                 # Prometheus /metrics; 0 = off

    def __post_init__(self):
        if not 0 <= self.stage_index < self.num_stages:
            raise ValueError(f"stage_index {self.stage_index} not in [0, {self.num_stages})")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if self.dtype is None:
            self.dtype = "bfloat16"
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.block_size <= 0:
            raise ValueError("block_size must be > 0")
        if self.quantize not in ("none", "int8", "int4", "fp8"):
            raise ValueError(f"quantize must be none, int8, int4 or fp8, got {self.quantize!r}")
        if self.kv_cache_memory is not None:
            parse_bytes(self.kv_cache_memory)

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """This stage's layers: the --layers override, else an even split."""
        if self.layers:
            a, b = (int(x) for x in self.layers.split(":"))
            if not 0 <= a < b <= num_layers:
                raise ValueError(f"--layers {self.layers} outside [0, {num_layers}]")
            return a, b
        if self.num_stages > num_layers:
            raise ValueError(f"{self.num_stages} stages for {num_layers} layers")
        bounds = [round(i * num_layers / self.num_stages) for i in range(self.num_stages + 1)]
        return bounds[self.stage_index], bounds[self.stage_index + 1]

    def kv_cache_bytes(self) -> Optional[int]:
        if self.kv_cache_memory is not None:
            return parse_bytes(self.kv_cache_memory)
        return None if self.device.startswith("cuda") else 256 << 20

    @staticmethod
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=None, help="model dir, hub id, .gguf, or the default alias")
        p.add_argument("--port", type=int, default=50061)
        p.add_argument("--host", default="0.0.0.0")
        p.add_argument("--stage-index", type=int, default=0)
        p.add_argument("--num-stages", type=int, default=1)
        p.add_argument("--layers", default=None, help="layer range a:b (default: even split)")
        p.add_argument("--device", default="cpu")
        p.add_argument("--dtype", default=None, choices=DTYPES)
        p.add_argument("--kv-cache-memory", default=None, help="KV cache budget, e.g. 512MiB")
        p.add_argument("--kv-cache-fraction", type=float, default=0.8)
        p.add_argument("--block-size", type=int, default=16)
        p.add_argument("--threads", type=int, default=0)
        p.add_argument("--log-level", default="INFO")
        add_weight_args(p)
        p.add_argument("--metrics-port", type=int, default=0,
                       help="serve Prometheus metrics on this port (0 = off)")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "WorkerConfig":
        from shardline.common.model_source import DEFAULT_MODEL
        return cls(model=ns.model or DEFAULT_MODEL, port=ns.port, host=ns.host,
                   stage_index=ns.stage_index, num_stages=ns.num_stages, layers=ns.layers,
                   device=ns.device, dtype=ns.dtype, kv_cache_memory=ns.kv_cache_memory,
                   kv_cache_fraction=ns.kv_cache_fraction, block_size=ns.block_size,
                   threads=ns.threads, cache_dir=os.environ.get("SHARDLINE_CACHE"),
                   log_level=ns.log_level, metrics_port=ns.metrics_port, fuse=ns.fuse,
                   quantize=ns.quantize, group_size=ns.group_size,
                   quantize_head=ns.quantize_head, prune=ns.prune,
                   prune_calibration=ns.prune_calibration, cpu_kernels=ns.cpu_kernels,
                   torch_compile=ns.torch_compile)


def add_weight_args(p: argparse.ArgumentParser) -> None:
    """Weight transforms, shared by `shardline worker` and `shardline up`."""
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="fuse q/k/v and gate/up projections (default on)")
    p.add_argument("--quantize", default="none", choices=["none", "int8", "int4", "fp8"],
                   help="weight-only quantization of the stage's Linear layers")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size")
    p.add_argument("--quantize-head", action="store_true", help="also quantize the LM head")
    p.add_argument("--prune", default=None, help="0.5 (unstructured ratio) or 2:4 (semi-structured)")
    p.add_argument("--prune-calibration", action="store_true",
                   help="activation-aware pruning scores from the built-in corpus")
    p.add_argument("--compile", dest="torch_compile", action="store_true",
                   help="torch.compile each layer's norms and MLP (steps then run the PyTorch "
                        "model, not the CPU kernels); graphs are compiled at start-up")
    p.add_argument("--cpu-kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 CPU stages: steps on the project's AVX512 kernels "
                        "(default on where the CPU has AVX512-BF16)")


def weight_argv(ns: argparse.Namespace) -> list[str]:
    """The flags of add_weight_args, to pass on to a worker's command line."""
    argv = ["--fuse" if ns.fuse else "--no-fuse", "--quantize", ns.quantize,
            "--group-size", str(ns.group_size)]
    argv += ["--quantize-head"] if ns.quantize_head else []
    argv += [] if ns.cpu_kernels else ["--no-cpu-kernels"]
    argv += ["--compile"] if ns.torch_compile else []
    argv += ["--prune", ns.prune] if ns.prune else []
    return argv + (["--prune-calibration"] if ns.prune_calibration else [])
