"""Configuration of one stage worker; its fields are `shardline worker`'s flags (common.config_args).

No torch here: `shardline up` imports this module to compose the workers' command lines.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Optional

from shardline.common.auth import SecurityConfig
from shardline.common.config_args import (add_config_args, config_from_args,
                                          drain_timeout_option, log_level_option, option)
from shardline.common.dtypes import DEFAULT_DTYPE, DTYPE_NAMES, canonical_dtype
from shardline.common.model_source import DEFAULT_MODEL
from shardline.common.request_limits import DEFAULT_MAX_STEP_TOKENS, step_message_bytes
from shardline.common.units import parse_bytes
from shardline.transforms.options import QUANTIZE_MODES, StageTransforms

DEFAULT_CPU_KV_CACHE_BYTES = 256 << 20     # KV cache budget on the CPU
DEFAULT_CUDA_KV_CACHE_FRACTION = 0.8       # CUDA: fraction of free memory after the weights

# the weight transforms: flags of `shardline worker`, `shardline up` and the tools
WEIGHT_FIELDS = ("fuse", "quantize", "group_size", "quantize_head", "prune", "prune_calibration",
                 "torch_compile", "cpu_kernels")
_T = StageTransforms()                     # the transforms' defaults, written once there
DEFAULT_BLOCK_SIZE = 16                    # tokens per KV cache block

# The batch limits that suit a device, reported in GetInfo (default_max_num_seqs,
# default_max_num_batched_tokens): the scheduler's --max-num-seqs and --max-num-batched-tokens
# when those are not given. A CPU's steps are bound by weight bandwidth and per-op overhead, so
# it batches few; a GPU needs large batches to be busy.
CPU_MAX_NUM_SEQS = 64
CPU_MAX_NUM_BATCHED_TOKENS = 512
CUDA_MAX_NUM_SEQS = 256
CUDA_MAX_NUM_BATCHED_TOKENS = 8192
BATCH_DEFAULTS = {"cpu": (CPU_MAX_NUM_SEQS, CPU_MAX_NUM_BATCHED_TOKENS),
                  "cuda": (CUDA_MAX_NUM_SEQS, CUDA_MAX_NUM_BATCHED_TOKENS)}


DEFAULT_TP_TIMEOUT_S = 300.0               # a collective between tensor-parallel ranks

GPU_ENGINE_MODES = ("auto", "on", "off")      # backends.select_backend's
# sequences one step may hold on the GPU engine (its buffers), as a multiple of the device's
# default --max-num-seqs: an explicit larger flag still fits (steps past 256 run eagerly)
ENGINE_SEQS_PER_DEFAULT = 4


def batch_defaults(device: str) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) that suit a device ("cpu", "cuda", "cuda:1");
    a device type without an entry gets the CPU's."""
    return BATCH_DEFAULTS.get(device.split(":", 1)[0], BATCH_DEFAULTS["cpu"])


@dataclass
class WorkerConfig:
    model: str = option(DEFAULT_MODEL, help="model dir, hub id, .gguf, or the default alias")
    port: int = option(50061, help="gRPC port of this stage")
    host: str = option("0.0.0.0", help="address to listen on")
    stage_index: int = option(0, help="this stage's position in the pipeline, 0 first")
    num_stages: int = option(1, help="stages in the pipeline")
    next_stages: list[str] = option(
        default_factory=list, flag="--next-stage", metavar="HOST:PORT",
        help="where this stage may forward its hidden states: a next stage's address, or a DNS "
             "name (e.g. its headless Service) whose addresses are the next stages; repeatable; "
             "a non-last stage refuses a route to anywhere else")
    layers: Optional[str] = option(None, metavar="A:B",
                                   help="layer range a:b of this stage (default: an even split)")
    device: str = option("cpu", help="cpu, cuda or cuda:N")
    dtype: str = option(DEFAULT_DTYPE, choices=DTYPE_NAMES, help="dtype the stage computes in")
    kv_cache_memory: Optional[str] = option(
        None, metavar="SIZE",
        help=f"KV cache budget, bytes or e.g. 512MiB (default: {DEFAULT_CPU_KV_CACHE_BYTES >> 20}MiB "
             "on the CPU; on CUDA a fraction of free memory, --kv-cache-fraction)")
    kv_cache_fraction: float = option(
        DEFAULT_CUDA_KV_CACHE_FRACTION,
        help="CUDA without --kv-cache-memory: fraction of free memory after the weights for the "
             "KV cache")
    block_size: int = option(DEFAULT_BLOCK_SIZE, help="tokens per KV cache block")
    max_step_tokens: int = option(
        DEFAULT_MAX_STEP_TOKENS,
        help="most tokens one Step may carry, at least the scheduler's --max-num-batched-tokens "
             "(sizes the largest message accepted)")
    max_message_bytes: Optional[str] = option(
        None, metavar="SIZE",
        help="largest gRPC message accepted (a longer one is refused unread); default: "
             "--max-step-tokens float32 hidden states of the model (config.json) and their plan")
    threads: int = option(0, help="torch intra-op threads of this worker, split evenly over its "
                                  "tensor-parallel ranks (at least 1 each); 0 = torch's default "
                                  "(with --tensor-parallel-size T: the cores / T each)")
    tensor_parallel_size: int = option(
        1, aliases=("--tp",),
        help="devices this stage spans: the worker starts T - 1 more processes (ranks), one per "
             "device (cuda:0..T-1 from --device's index; on the CPU they split --threads), and "
             "sends each every step; T must divide the model's attention and KV heads")
    tp_timeout_s: float = option(
        DEFAULT_TP_TIMEOUT_S,
        help="with --tensor-parallel-size > 1: seconds a collective between the ranks may wait "
             "(a rank that is alive but stuck) before the stage gives up and exits")
    expert_parallel: bool = option(
        False, help="with --tensor-parallel-size > 1, a mixture of experts' experts whole on "
                    "one rank each (E / T per rank; T must divide E) instead of every expert's "
                    "columns split across the ranks (the default: balanced at any batch)")
    cache_dir: Optional[str] = option(
        None, env="SHARDLINE_CACHE",
        help="where converted models are kept (default: $SHARDLINE_CACHE, else "
             "~/.cache/shardline/models)")
    log_level: str = log_level_option()
    drain_timeout_s: float = drain_timeout_option()
    security: SecurityConfig = field(default_factory=SecurityConfig)   # no flags of its own
    fuse: bool = option(_T.fuse, help="fuse q/k/v and gate/up projections and residual adds "
                                   "(transforms/fuse.py)")
    quantize: str = option(_T.quantize, choices=QUANTIZE_MODES,
                           help="weight-only quantization of the stage's Linear layers")
    group_size: int = option(_T.group_size, help="int4 group size")
    quantize_head: bool = option(_T.quantize_head, help="also quantize the LM head")
    prune: Optional[str] = option(_T.prune, help="prune weights: 0.5 (unstructured ratio) or 2:4 "
                                             "(semi-structured); default: no pruning")
    prune_calibration: bool = option(_T.prune_calibration, help="activation-aware pruning scores from the "
                                                 "built-in corpus")
    torch_compile: bool = option(_T.torch_compile, flag="--compile",
                                 help="torch.compile each layer's norms and MLP (steps then run "
                                      "the PyTorch model, not the CPU kernels); graphs are "
                                      "compiled at start-up")
    cpu_kernels: bool = option(True, help="bf16 CPU stages: steps on the project's AVX512 "
                                          "kernels where the CPU has AVX512-BF16")
    gpu_engine: str = option(
        "auto", choices=GPU_ENGINE_MODES,
        help="the GPU engine (fixed-shape steps, CUDA graphs, paged Triton kernels, sampling "
             "on the device): auto = on CUDA; on = anywhere (eager on the CPU: for tests); off "
             "= the PyTorch reference")
    metrics_port: int = option(0, help="serve Prometheus metrics on this port (0 = off)")

    def __post_init__(self):
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if not 0 <= self.stage_index < self.num_stages:
            raise ValueError(f"stage_index {self.stage_index} not in [0, {self.num_stages})")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")
        self.dtype = canonical_dtype(self.dtype)
        if self.block_size <= 0:
            raise ValueError("block_size must be > 0")
        self.transforms()                  # validates quantize, group_size, prune
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
        if self.kv_cache_memory is not None:
            parse_bytes(self.kv_cache_memory)
        if self.max_step_tokens <= 0:
            raise ValueError("max_step_tokens must be > 0")
        if self.max_message_bytes is not None:
            parse_bytes(self.max_message_bytes)
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not self.tp_timeout_s > 0:
            raise ValueError(f"tp_timeout_s must be > 0, got {self.tp_timeout_s}")

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

    def rank_device(self, rank: int) -> str:
        """The device of tensor-parallel rank `rank`: the CPU, or the rank-th CUDA device from
        --device's index (cuda:2 with T = 2: ranks on cuda:2 and cuda:3)."""
        if self.device == "cpu" or self.tensor_parallel_size == 1:
            return self.device
        _, _, index = self.device.partition(":")
        return f"cuda:{int(index or 0) + rank}"

    def rank_threads(self, cpu_count: int) -> int:
        """torch threads of each rank: --threads split over the ranks (at least 1); without
        --threads, torch's default (0) for one rank, cpu_count / T for several."""
        t = self.tensor_parallel_size
        if self.threads > 0:
            return max(1, self.threads // t)
        return 0 if t == 1 else max(1, cpu_count // t)

    def receive_bytes(self, hidden_size: int, max_position: int) -> int:
        """The gRPC receive limit: --max-message-bytes, else what a Step of --max-step-tokens
        tokens of this model can carry."""
        if self.max_message_bytes is not None:
            return parse_bytes(self.max_message_bytes)
        return step_message_bytes(self.max_step_tokens, hidden_size, max_position)

    def kv_cache_bytes(self) -> Optional[int]:
        """The explicit KV budget in bytes, or None: the runner's default for the device
        (worker/build.py: DEFAULT_CPU_KV_CACHE_BYTES, or a fraction of free CUDA memory)."""
        if self.kv_cache_memory is not None:
            return parse_bytes(self.kv_cache_memory)
        return None

    def transforms(self) -> StageTransforms:
        """The weight transforms these flags ask for."""
        return StageTransforms(fuse=self.fuse, quantize=self.quantize,
                               group_size=self.group_size, quantize_head=self.quantize_head,
                               prune=self.prune, prune_calibration=self.prune_calibration,
                               torch_compile=self.torch_compile)

    @classmethod
    def add_args(cls, p: argparse.ArgumentParser) -> None:
        add_config_args(cls, p)
        SecurityConfig.add_args(p.add_argument_group("security", "common/auth.py"))

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "WorkerConfig":
        return config_from_args(cls, ns, security=SecurityConfig.from_args(ns))


def add_weight_args(p: argparse.ArgumentParser, names: tuple[str, ...] = WEIGHT_FIELDS) -> None:
    """The weight-transform flags (WEIGHT_FIELDS, or the given subset), shared by
    `shardline worker`, `shardline up` and the tools."""
    add_config_args(WorkerConfig, p, names)

