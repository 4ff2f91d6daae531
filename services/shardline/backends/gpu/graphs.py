"""DecodeGraphs: one CUDA graph per decode batch-size bucket, captured on first use, replayed
after; on the CPU the same call runs the step eagerly.

A captured step reads only the engine's persistent buffers (their data_ptrs are baked into the
graph) and returns tensors the graph owns; each replay overwrites them. Capture runs the step
twice on a side stream first (allocator warm-up, Triton's compilation), which is harmless on a
live step: it writes the same K/V to the same slots each time. Every bucket's graph shares one
memory pool.
"""
from __future__ import annotations

from typing import Callable

import torch


class DecodeGraphs:
    def __init__(self, device: torch.device, enabled: bool = True):
        self.device = torch.device(device)
        self.enabled = enabled and self.device.type == "cuda"
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def run(self, bucket: int, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """fn's output for this step: by replaying bucket's graph (captured from fn the first
        time), or by calling fn where graphs are off."""
        if not self.enabled:
            return fn()
        entry = self.graphs.get(bucket)
        if entry is None:
            entry = self.graphs[bucket] = self._capture(fn)
        graph, out = entry
        graph.replay()
        return out

    def _capture(self, fn: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = fn()
        self._pool = graph.pool()
        return graph, out
