"""StepBuffers: a step's inputs in one persistent host buffer and one device buffer.

Every field the step reads (token ids, positions, slot mapping, block tables, context lengths,
sampling parameters...) is a fixed view into one byte buffer, allocated once:

    host  (pinned on CUDA)   [ token_ids | positions | ... | block_tables ]   numpy views
    device                   [ token_ids | positions | ... | block_tables ]   tensor views
                               \\______________ upload(): one copy ______________/

The host fills its numpy views, then `upload` copies the used prefix of the buffer to the
device in one non-blocking copy. The device views never move (their data_ptrs are what a
captured CUDA graph reads), and the host buffer is only rewritten once the previous step has
finished (the engine waits for each step's results before it plans the next).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

_ALIGN = 64                       # every field starts on a 64-byte boundary


class StepBuffers:
    """fields: (name, dtype, number of elements, row length) in layout order: a field of
    row length r > 1 is a [n // r, r] matrix. The last field should be the largest that is
    filled by rows (the block tables), so that uploading a prefix covers the rows in use."""

    def __init__(self, fields: Sequence[tuple[str, torch.dtype, int, int]],
                 device: torch.device):
        self.device = torch.device(device)
        self.offsets: dict[str, tuple[int, int, torch.dtype, int]] = {}
        offset = 0
        for name, dtype, numel, row in fields:
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            self.offsets[name] = (offset, nbytes, dtype, row)
            offset += -(-nbytes // _ALIGN) * _ALIGN
        self.nbytes = offset
        pin = self.device.type == "cuda"
        self.host_bytes = torch.zeros(offset, dtype=torch.uint8, pin_memory=pin)
        self.dev_bytes = torch.zeros(offset, dtype=torch.uint8, device=self.device)
        self.host: dict[str, np.ndarray] = {}
        self.dev: dict[str, torch.Tensor] = {}
        for name, (start, nbytes, dtype, row) in self.offsets.items():
            host = self.host_bytes[start:start + nbytes].view(dtype)
            dev = self.dev_bytes[start:start + nbytes].view(dtype)
            if row > 1:
                host, dev = host.view(-1, row), dev.view(-1, row)
            self.host[name] = host.numpy()
            self.dev[name] = dev

    def end_of(self, name: str, rows: int) -> int:
        """Byte offset just past the first `rows` rows (elements, for a vector) of a field."""
        start, nbytes, dtype, row = self.offsets[name]
        itemsize = torch.empty((), dtype=dtype).element_size()
        return start + min(nbytes, rows * row * itemsize)

    def upload(self, nbytes: int) -> None:
        """Copy the first nbytes of the host buffer to the device: one copy, non-blocking."""
        self.dev_bytes[:nbytes].copy_(self.host_bytes[:nbytes], non_blocking=True)
