"""The StepBackend interface: how a stage's step is executed on some hardware.

The runner (worker/runner.py) owns plans, block tables and sampling state; it checks a plan
and hands it over as `StepInputs` to `backend.step(inputs, hidden, kv_cache, sampler)`, whose
default runs the few things a step needs, in this order:

    meta   = backend.build_metadata(start_positions, num_tokens, block_tables, block_size)
    x      = backend.embed(token_ids)                 # stage 0; later stages get hidden states
    x      = backend.forward(x, meta, kv_cache)       # this stage's layers, K/V written
    logits = backend.logits(x[sampling rows])         # last stage only
    ids    = backend.argmax(logits)                   # greedy rows (the sampler calls it)

A backend that runs a whole step its own way (the GPU engine: fixed-shape buffers, CUDA
graphs, sampling on the device) overrides `step` instead, and `forget` for the per-sequence
state it keeps.

A backend owns its weight layout (it may convert the model's weights into its own and free
the module copies: `release_module_weights`). A new device or kernel set is a new subclass,
registered in `backends.select_backend`; the runner never branches on hardware.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from shardline.models.attention import AttentionMetadata
from shardline.models.decoder import StageModel
from shardline.models.kv_cache import KVCache


@dataclass
class StepInputs:
    """A checked plan, as a backend sees it: sequence i computes num_tokens[i] tokens from
    start_positions[i] (token_ids holds every row's token, sequences in order), its whole block
    table is block_tables[i], of which new_block_ids[i] arrived with this step (all of it when
    admitted[i]); it samples its last row's next token when sample[i] (its num_generated[i]-th
    generated one)."""
    seq_ids: Sequence[int]
    token_ids: Sequence[int]
    start_positions: Sequence[int]
    num_tokens: Sequence[int]
    block_tables: Sequence[Sequence[int]]
    new_block_ids: Sequence[Sequence[int]]
    admitted: Sequence[bool]
    sample: Sequence[bool]
    num_generated: Sequence[int]
    block_size: int
    # the sequence's token is the one this stage sampled for it last step (single stage)
    fed_back: Optional[Sequence[bool]] = None
    # LongRoPE: the sequence reads the long factors' RoPE table (None: no sequence does)
    rope_long: Optional[Sequence[bool]] = None

    def rope_positions(self, positions: torch.Tensor, table_rows: int) -> Optional[torch.Tensor]:
        """[T] rows of a LongRoPE table (layers.RotaryEmbedding) for rows at `positions`:
        position + table_rows for the rows of sequences on the long factors; None when no
        sequence is."""
        if not self.rope_long or not any(self.rope_long):
            return None
        long_rows = torch.tensor([bool(f) for f, n in zip(self.rope_long, self.num_tokens)
                                  for _ in range(n)], device=positions.device)
        return positions + long_rows.long() * table_rows

    def sample_rows(self) -> list[int]:
        """The batch row of each sampling sequence's last token, in sequence order."""
        rows, end = [], 0
        for n, s in zip(self.num_tokens, self.sample):
            end += n
            if s:
                rows.append(end - 1)
        return rows


class StepBackend(ABC):
    """Executes steps of one stage's model. Subclasses set `name` (shown in the worker's
    logs) and implement `forward` and `logits`."""

    name: str = ""
    needs_warm_up = False             # compile graphs on a throwaway step before serving
    scratch_blocks = 0                # KV blocks the backend keeps for itself (padded rows)
    max_positions: Optional[int] = None   # positions per sequence, if fewer than the model's

    def __init__(self, model: StageModel):
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    def step(self, inputs: StepInputs, hidden: Optional[torch.Tensor], kv_cache: KVCache,
             sampler) -> tuple[Optional[torch.Tensor], list]:
        """One step. hidden: [T, hidden] from the previous stage (None on stage 0). Returns
        (hidden for the next stage, []) or, on the last stage (sampler given: the runner's
        worker.sampler.Sampler, which holds each sequence's sampling state), (None, one
        sampled token per sampling sequence, in order)."""
        meta = self.build_metadata(inputs.start_positions, inputs.num_tokens,
                                   inputs.block_tables, inputs.block_size)
        meta.rope_positions = inputs.rope_positions(meta.positions,
                                                    self.model.config.max_position_embeddings)
        x = (self.embed(inputs.token_ids) if hidden is None
             else hidden.to(device=self.device, dtype=self.dtype))
        x = self.forward(x, meta, kv_cache)                                 # [T, hidden]
        if sampler is None:
            return x, []
        offset = 0
        for seq_id, n in zip(inputs.seq_ids, inputs.num_tokens):
            if sampler.seqs[seq_id].seen is not None:
                sampler.observe(seq_id, torch.tensor(inputs.token_ids[offset:offset + n],
                                                     device=self.device))
            offset += n
        rows = inputs.sample_rows()
        if not rows:
            return None, []
        last = x if len(rows) == x.shape[0] else x.index_select(
            0, torch.tensor(rows, device=self.device))
        ids = [i for i, s in zip(inputs.seq_ids, inputs.sample) if s]
        gen = [g for g, s in zip(inputs.num_generated, inputs.sample) if s]
        return None, sampler.sample(self.logits(last), ids, gen)

    def prepare(self, kv_cache: KVCache) -> None:
        """Before serving, after the runner's warm-up (the GPU engine captures its graphs)."""

    def forget(self, seq_ids: Sequence[int]) -> None:
        """Sequences the scheduler freed (a backend that keeps per-sequence state drops it)."""

    def forget_all(self) -> None:
        """Every sequence (the scheduler's stream ended)."""

    def build_metadata(self, start_positions: Sequence[int], num_tokens: Sequence[int],
                       block_tables: Sequence[Sequence[int]], block_size: int) -> AttentionMetadata:
        """The step's cache addressing, shared by every layer (built once per step)."""
        return AttentionMetadata.build(start_positions, num_tokens, block_tables, block_size,
                                       self.device)

    def embed(self, token_ids: Sequence[int]) -> torch.Tensor:
        """token ids of the step's rows -> [T, hidden] (stage 0)."""
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        return self.model.embed(ids)

    @abstractmethod
    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden] through the stage's layers, writing each row's K/V."""

    @abstractmethod
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [S, hidden] (rows that sample) -> [S, vocab] float32 (final norm and LM head)."""

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, V] float32 -> [N] int64 with torch.argmax's tie and NaN rules."""
        return logits.argmax(dim=-1)

    def release_module_weights(self) -> None:
        """Free the model modules' copies of weights the backend holds in its own layout
        (a no-op for backends that run the modules themselves)."""
