"""The StepBackend interface: how a stage's step is executed on some hardware.

The runner (worker/runner.py) owns plans, block tables and sampling state; it asks its
backend for the few things a step needs, in this order:

    meta   = backend.build_metadata(start_positions, num_tokens, block_tables, block_size)
    x      = backend.embed(token_ids)                 # stage 0; later stages get hidden states
    x      = backend.forward(x, meta, kv_cache)       # this stage's layers, K/V written
    logits = backend.logits(x[sampling rows])         # last stage only
    ids    = backend.argmax(logits)                   # greedy rows (the sampler calls it)

A backend owns its weight layout (it may convert the model's weights into its own and free
the module copies: `release_module_weights`). A new device or kernel set is a new subclass,
registered in `backends.select_backend`; the runner never branches on hardware.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch

from shardline.models.attention import AttentionMetadata
from shardline.models.decoder import StageModel
from shardline.models.kv_cache import KVCache


class StepBackend(ABC):
    """Executes steps of one stage's model. Subclasses set `name` (shown in the worker's
    logs) and implement `forward` and `logits`."""

    name: str = ""
    needs_warm_up = False             # compile graphs on a throwaway step before serving

    def __init__(self, model: StageModel):
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

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
