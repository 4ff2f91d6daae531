"""The PyTorch reference backend: the model's own modules (models/decoder.py), any device
and dtype. float32 on the CPU is the reference every other backend is tested against; on CUDA
it is the eager path; with the compile transform (`--compile`) its layers' dense parts run
through torch.compile, so it warms its graphs up before serving."""
from __future__ import annotations

import torch

from shardline.backends.base import StepBackend
from shardline.models.attention import AttentionMetadata
from shardline.models.decoder import StageModel
from shardline.models.kv_cache import KVCache


class TorchBackend(StepBackend):
    name = "torch"

    def __init__(self, model: StageModel, compiled: bool = False):
        super().__init__(model)
        self.needs_warm_up = compiled

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache) -> torch.Tensor:
        return self.model(x, meta, kv_cache.layers)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.logits(x)
