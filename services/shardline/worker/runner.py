"""StageRunner: executes step plans on one pipeline stage.

    step(seqs, free_seq_ids, hidden):
        forget free_seq_ids -> check the plan -> update block tables
        -> embed (stage 0) or take `hidden` -> layers (writing K/V) ->
        hidden for the next stage, or (last stage) logits at sampling rows -> sampled tokens

The runner keeps per sequence only what it must: its block table and computed-token count
(every stage), its sampling state (last stage). The scheduler owns block allocation; the
runner checks that a plan stays inside the blocks it was given, so a bad plan raises
ValueError instead of writing another sequence's cache.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from shardline.common.tensors import DTYPE_NAMES, DTYPES
from shardline.v1 import worker_pb2
from shardline.models.attention import AttentionMetadata
from shardline.backends.cpu_kernels.backend import CpuStepPath
from shardline.worker.heap import keep_freed_memory, return_free_memory
from shardline.transforms.fuse import compile_stage, fuse_stage
from shardline.tools.optimize import load_optimized_stage, read_recipe
from shardline.transforms.prune import accelerate_semi_structured, prune_stage
from shardline.transforms.quantize import quantize_stage, weight_bytes
from shardline.models.kv_cache import KVCache
from shardline.models.config import ModelConfig
from shardline.protocol.plan import SampledToken, SamplingConfig, SeqStep
from shardline.worker.sampler import Sampler
from shardline.models.weights import load_stage_model

log = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 256 << 20
DEFAULT_CUDA_KV_CACHE_FRACTION = 0.8


@dataclass
class _SeqState:
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0               # tokens of the sequence whose K/V are in the cache
    # single-stage workers: the token sampled for it last and the position it takes
    last_sampled: Optional[tuple[int, int]] = None


def _as_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
        name = aliases.get(dtype, dtype)
        if name not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        return DTYPES[name]
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype}")
    return dtype


class StageRunner:
    """Layers [layer_start, layer_end) of the model in model_dir, with a paged KV cache.

    quantize: none | int8 | int4 | fp8 weight-only quantization of the layers' Linear modules
    (and the LM head with quantize_head); group_size: int4 group (transforms/quantize.py).
    prune: "0.5" (unstructured ratio) or "2:4" (semi-structured), activation-aware with
    prune_calibration (transforms/prune.py).
    fuse: fuse q/k/v and gate/up projections and the residual adds (transforms/fuse.py).
    use_cpu_kernels: run steps of bf16 CPU stages on the csrc kernels (cpu_path.py).
    torch_compile: torch.compile each layer's dense parts (fuse.compile_stage); steps then run the
    PyTorch model.
    kv_cache_bytes: KV budget in bytes. Default: kv_cache_fraction (default 0.8) of the free
    device memory after loading the weights on CUDA, 256 MiB on the CPU.
    """

    def __init__(self, model_dir: Union[str, pathlib.Path], layer_start: int, layer_end: int,
                 device: Union[str, torch.device] = "cpu",
                 dtype: Union[str, torch.dtype, None] = None,
                 kv_cache_bytes: Optional[int] = None,
                 kv_cache_fraction: Optional[float] = None,
                 block_size: int = 16, fuse: bool = True, quantize: str = "none",
                 group_size: int = 32, quantize_head: bool = False,
                 prune: Optional[str] = None, prune_calibration: bool = False,
                 use_cpu_kernels: bool = True, torch_compile: bool = False):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = _as_dtype(dtype, self.device)
        if self.device.type == "cpu":
            keep_freed_memory()          # steps reuse their activations' memory (worker/heap.py)
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.config = ModelConfig.from_dir(model_dir)
        recipe = read_recipe(model_dir)
        if recipe is not None:           # an optimized checkpoint: already pruned / quantized
            self.model = load_optimized_stage(model_dir, self.config, layer_start, layer_end,
                                              self.dtype, self.device, recipe)
            quantize, prune = "none", None
        else:
            self.model = load_stage_model(model_dir, self.config, layer_start, layer_end,
                                          self.dtype, self.device)
        prune_stage(self.model, prune, model_dir if prune_calibration else None)
        if fuse:
            fuse_stage(self.model)
        if prune == "2:4" and quantize == "none" and self.device.type == "cuda":
            accelerate_semi_structured(self.model)
        quantize_stage(self.model, quantize, group_size, quantize_head)
        if torch_compile:
            compile_stage(self.model)
        # steps on the project's CPU kernels where they apply (bf16 on AVX512-BF16), unless the
        # model was compiled (it then runs every step)
        self.fast = CpuStepPath.build(self.model) if use_cpu_kernels and not torch_compile else None
        self.quantization = recipe["quantize"] if recipe else quantize
        self.layer_start, self.layer_end = layer_start, layer_end
        cfg = self.config
        num_local = layer_end - layer_start
        if kv_cache_bytes is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                kv_cache_bytes = int(free * (kv_cache_fraction or DEFAULT_CUDA_KV_CACHE_FRACTION))
            else:
                kv_cache_bytes = DEFAULT_CPU_KV_CACHE_BYTES
        num_blocks = KVCache.num_blocks_for_budget(kv_cache_bytes, num_local, block_size,
                                                   cfg.num_kv_heads, cfg.head_dim, self.dtype)
        if num_blocks < 1:
            need = KVCache.bytes_per_block(num_local, block_size, cfg.num_kv_heads,
                                           cfg.head_dim, self.dtype)
            raise ValueError(f"KV cache budget of {kv_cache_bytes} bytes holds no block "
                             f"({need} bytes each)")
        self.kv_cache = KVCache(num_local, num_blocks, block_size, cfg.num_kv_heads,
                                cfg.head_dim, self.dtype, self.device)
        self.seqs: dict[int, _SeqState] = {}
        self.sampler = (Sampler(cfg.vocab_size, self.device, self._cpu_argmax())
                        if self.is_last else None)
        log.info("stage [%d, %d): %d KV blocks of %d tokens (%.0f MiB) on %s in %s",
                 layer_start, layer_end, num_blocks, block_size, self.kv_cache.nbytes / 2**20,
                 self.device, self.dtype_name)
        if torch_compile:
            self._warm_up()

    # ---- what StageInfo reports -------------------------------------------------------
    @property
    def is_first(self) -> bool:
        return self.model.is_first

    @property
    def is_last(self) -> bool:
        return self.model.is_last

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.num_blocks

    @property
    def block_size(self) -> int:
        return self.kv_cache.block_size

    @property
    def max_position(self) -> int:
        return self.config.max_position_embeddings

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def device_name(self) -> str:
        return str(self.device)

    def stage_info(self, model: str, quantization: str = "none") -> worker_pb2.StageInfo:
        return worker_pb2.StageInfo(
            model=model, layer_start=self.layer_start, layer_end=self.layer_end,
            num_layers=self.num_layers, is_first=self.is_first, is_last=self.is_last,
            num_blocks=self.num_blocks, block_size=self.block_size,
            max_position=self.max_position, vocab_size=self.vocab_size, dtype=self.dtype_name,
            device=self.device_name, quantization=quantization)

    def forget_all(self) -> None:
        """Drop every sequence's state (its scheduler's stream ended); KV content stays, so a
        restarted scheduler can reuse cached prefixes."""
        self.seqs.clear()
        if self.sampler is not None:
            self.sampler.seqs.clear()

    def release_module_weights(self) -> int:
        """Free the model modules' copies of the weights the CPU kernels hold in their own
        layout (a served stage steps through the kernels only; it held both, ~2x its layer
        weights) and return their pages to the system. Returns the bytes the model no longer
        holds; 0 where the stage does not run on the kernels. Afterwards steps, logits and
        sampling run as before, and the stage's PyTorch forward (self.model) raises."""
        if self.fast is None:
            return 0
        before = weight_bytes(self.model)
        self.fast.release_module_weights()
        freed = before - weight_bytes(self.model)
        return_free_memory()
        return freed

    def _cpu_argmax(self):
        """The CPU kernels' argmax for float32 logits when this stage runs on them, else None."""
        if self.fast is None:
            return None
        kernel = self.fast.k.argmax_rows

        def argmax(x: torch.Tensor) -> torch.Tensor:
            if x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2 \
                    and x.shape[1] > 0:
                return kernel(x.contiguous())
            return x.argmax(dim=-1)
        return argmax

    def _warm_up(self) -> None:
        """A throwaway sequence's 2-token prefill and 1-token decode (in block 0, freed after),
        so that a compiled stage has its graphs before it reports SERVING rather than on a
        request's first steps (Inductor takes about 10 s on 2 CPU cores)."""
        t0 = time.perf_counter()
        hidden = (None if self.is_first else
                  torch.zeros(2, self.hidden_size, dtype=self.dtype, device=self.device))
        self.step([SeqStep(0, [1, 1], 0, [0], self.is_last, admit=True,
                           sampling=SamplingConfig())], [], hidden)
        self.step([SeqStep(0, [1], 2, [], self.is_last, num_generated=1)], [],
                  None if hidden is None else hidden[:1])
        self.step([], [0], None)
        log.info("compiled the stage's graphs in %.1f s", time.perf_counter() - t0)

    # ---- the step -----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, seqs: Sequence[SeqStep], free_seq_ids: Sequence[int],
             hidden: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], list[SampledToken]]:
        """Run one step. seqs: the scheduled sequences, their tokens in this order in the
        batch; free_seq_ids: sequences to forget first; hidden: [T, hidden] from the previous
        stage (None on stage 0). Returns (hidden [T, hidden] for the next stage, []) or, on the
        last stage, (None, one SampledToken per seq with sample=True, in seqs order)."""
        for seq_id in free_seq_ids:
            self.seqs.pop(seq_id, None)
            if self.sampler is not None:
                self.sampler.remove(seq_id)
        if not seqs:
            return (None if self.is_last else self._empty_hidden()), []
        seqs = [self._with_last_sampled(s) if s.last_sampled else s for s in seqs]
        tables = self._check_and_apply(seqs, hidden)

        num_tokens = [len(s.token_ids) for s in seqs]
        meta = AttentionMetadata.build([s.start_pos for s in seqs], num_tokens, tables,
                                       self.block_size, self.device)
        if self.is_first:
            ids = [t for s in seqs for t in s.token_ids]
            token_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
            x = self.model.embed(token_ids)                                # [T, hidden]
        else:
            x = hidden.to(device=self.device, dtype=self.dtype)
        if self.fast is not None:
            x = self.fast.forward(x, meta, self.kv_cache.layers)
        else:
            x = self.model(x, meta, self.kv_cache.layers)                  # [T, hidden]
        if not self.is_last:
            return x, []
        tokens = self._sample(seqs, num_tokens, x)
        if self.is_first:                 # single stage: a later last_sampled step uses them
            for t in tokens:
                state = self.seqs[t.seq_id]
                state.last_sampled = (state.num_computed, t.token_id)
        return None, tokens

    def _with_last_sampled(self, s: SeqStep) -> SeqStep:
        """s with the token this stage sampled for its sequence in the previous step."""
        if not (self.is_first and self.is_last):
            raise ValueError(f"seq {s.seq_id}: last_sampled needs a single-stage pipeline")
        if s.token_ids or s.admit:
            raise ValueError(f"seq {s.seq_id}: a last_sampled step carries no token_ids and "
                             "is not an admission")
        state = self.seqs.get(s.seq_id)
        if state is None or state.last_sampled is None or state.last_sampled[0] != s.start_pos:
            raise ValueError(f"seq {s.seq_id}: last_sampled at position {s.start_pos}, but no "
                             "token was sampled for that position")
        return dataclasses.replace(s, token_ids=[state.last_sampled[1]], last_sampled=False)

    def _sample(self, seqs: Sequence[SeqStep], num_tokens: list[int],
                x: torch.Tensor) -> list[SampledToken]:
        sampler = self.sampler
        offset = 0
        rows, ids, num_generated = [], [], []
        for s, n in zip(seqs, num_tokens):
            if sampler.seqs[s.seq_id].seen is not None:
                sampler.observe(s.seq_id, torch.tensor(s.token_ids, device=self.device))
            offset += n
            if s.sample:
                rows.append(offset - 1)                  # the sequence's last token
                ids.append(s.seq_id)
                num_generated.append(s.num_generated)
        if not rows:
            return []
        if len(rows) == x.shape[0]:
            last = x
        else:
            last = x.index_select(0, torch.tensor(rows, device=self.device))
        model = self.fast if self.fast is not None else self.model
        logits = model.logits(last)                                       # [S, vocab]
        return sampler.sample(logits, ids, num_generated)

    def _empty_hidden(self) -> torch.Tensor:
        return torch.empty(0, self.hidden_size, dtype=self.dtype, device=self.device)

    def _check_and_apply(self, seqs: Sequence[SeqStep],
                         hidden: Optional[torch.Tensor]) -> list[list[int]]:
        """Validate the whole plan, then update per-sequence state. Returns block tables."""
        total = 0
        seen_ids = set()
        planned = []
        for s in seqs:
            if s.seq_id in seen_ids:
                raise ValueError(f"seq {s.seq_id} appears twice in one step")
            seen_ids.add(s.seq_id)
            n = len(s.token_ids)
            if n == 0:
                raise ValueError(f"seq {s.seq_id}: no token_ids to compute")
            if s.start_pos < 0:
                raise ValueError(f"seq {s.seq_id}: negative start_pos {s.start_pos}")
            state = None if s.admit else self.seqs.get(s.seq_id)
            if not s.admit:
                if state is None:
                    raise ValueError(f"seq {s.seq_id} is unknown to this stage and not admitted "
                                     "(freed, or its admission was lost)")
                if s.start_pos != state.num_computed:
                    raise ValueError(f"seq {s.seq_id}: start_pos {s.start_pos} but "
                                     f"{state.num_computed} tokens are cached")
            for b in s.new_block_ids:
                if not 0 <= b < self.num_blocks:
                    raise ValueError(f"seq {s.seq_id}: block id {b} outside "
                                     f"[0, {self.num_blocks})")
            num_blocks = len(s.new_block_ids) + (0 if state is None else len(state.block_table))
            end = s.start_pos + n
            if end > num_blocks * self.block_size:
                raise ValueError(f"seq {s.seq_id}: positions up to {end} need "
                                 f"{-(-end // self.block_size)} blocks, its block table has "
                                 f"{num_blocks}")
            if end > self.max_position:
                raise ValueError(f"seq {s.seq_id}: position {end - 1} beyond the model's "
                                 f"{self.max_position} positions")
            if self.is_first and (min(s.token_ids) < 0 or max(s.token_ids) >= self.vocab_size):
                raise ValueError(f"seq {s.seq_id}: token id outside [0, {self.vocab_size})")
            if self.is_last and not s.admit and s.seq_id not in self.sampler.seqs:
                raise ValueError(f"seq {s.seq_id} has no sampling state on the last stage")
            total += n
            planned.append(state)
        if self.is_first:
            if hidden is not None:
                raise ValueError("stage 0 embeds token_ids; it must not be sent hidden states")
        elif hidden is None:
            raise ValueError(f"stage [{self.layer_start}, {self.layer_end}) needs hidden states")
        elif tuple(hidden.shape) != (total, self.hidden_size):
            raise ValueError(f"hidden has shape {tuple(hidden.shape)}, the plan needs "
                             f"({total}, {self.hidden_size})")

        tables = []
        for s, state in zip(seqs, planned):
            if s.admit:
                state = self.seqs[s.seq_id] = _SeqState(list(s.new_block_ids))
                if self.sampler is not None:
                    self.sampler.add(s.seq_id, s.sampling)
                    if s.prefix_token_ids:       # cached prefix: the penalty must see it too
                        self.sampler.observe(s.seq_id, torch.tensor(s.prefix_token_ids,
                                                                    device=self.device))
            else:
                state.block_table.extend(s.new_block_ids)
            state.num_computed = s.start_pos + len(s.token_ids)
            tables.append(state.block_table)
        return tables
