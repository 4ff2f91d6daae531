"""ShmAllReduce: the sum of the CPU kernels' per-layer partial outputs over the tensor-parallel
ranks of one host, through shared memory (the kernels' shm_all_reduce), instead of gloo.

Every rank of a tensor-parallel stage runs the same sequence of all-reduces (two per layer
per step). On gloo each one goes through the loopback socket and wakes the receiving thread:
about 0.3 ms alone, and 1.5 ms per call measured inside the qwen3-0.6b-shaped decode step on
two 1-thread ranks (the ranks' skew included), 87 of its 121 ms. Here a call is a copy into
this rank's slot of a shared buffer, a flag, a spin until every rank's flag is up, and a sum
of the slots in rank order (the same values on every rank).

    reduce = ShmAllReduce.create(kernels, tp)      # collective: every rank of tp's group
    x = reduce(x)                                  # in place; gloo for what a slot cannot hold

The buffer is a file in /dev/shm that rank 0 creates and removes as soon as every rank has
mapped it (nothing is left behind, whatever happens to the ranks later). Where any rank cannot
map it, every rank keeps gloo.
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Optional

import torch
import torch.distributed as dist

from shardline.transforms.shard import TensorParallel, all_reduce

log = logging.getLogger(__name__)

SLOT_BYTES = 1 << 20          # a decode step's sums (rows x hidden x 2 bytes) fit; prefill: gloo
TIMEOUT_S = 300.0             # a peer that does not arrive (the worker's --tp-timeout-s default)
_NAME_BYTES = 256


class ShmAllReduce:
    def __init__(self, kernels, shm: torch.Tensor, tp: TensorParallel,
                 slot_bytes: int = SLOT_BYTES, timeout_s: float = TIMEOUT_S,
                 path: Optional[str] = None):
        self.kernels, self.shm, self.tp = kernels, shm, tp
        self.path = path                      # the buffer's former name (removed)
        self.slot_bytes, self.timeout_s = slot_bytes, timeout_s
        self.seq = 0                          # calls so far: the same count on every rank

    @classmethod
    def create(cls, kernels, tp: TensorParallel, slot_bytes: int = SLOT_BYTES,
               timeout_s: float = TIMEOUT_S) -> Optional["ShmAllReduce"]:
        """The group's buffer, mapped on every rank (a collective call), or None on every rank
        where one of them could not map it (then gloo)."""
        size = kernels.shm_header_bytes(tp.world_size) + 2 * tp.world_size * slot_bytes
        src = 0 if tp.group is None else dist.get_global_rank(tp.group, 0)
        name = torch.zeros(_NAME_BYTES, dtype=torch.uint8)
        path = None
        if tp.rank == 0:
            path = _create_file(size)
            if path is not None:
                encoded = path.encode()[:_NAME_BYTES]
                name[:len(encoded)] = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
        dist.broadcast(name, src, group=tp.group)
        path = bytes(name[name > 0].tolist()).decode() or None
        shm = None
        if path is not None:
            try:
                shm = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
            except (OSError, RuntimeError) as exc:
                log.warning("tensor parallel: cannot map %s (%s)", path, exc)
        mapped = torch.tensor([int(shm is not None)])
        dist.all_reduce(mapped, op=dist.ReduceOp.MIN, group=tp.group)  # every rank has mapped
        if tp.rank == 0 and path is not None:
            os.unlink(path)                   # the mappings stay; the name goes
        if not int(mapped):
            log.warning("tensor parallel: the CPU kernels' sums go over gloo (no shared buffer)")
            return None
        log.info("tensor parallel: the CPU kernels' sums go through a shared buffer (%d KiB)",
                 size >> 10)
        return cls(kernels, shm, tp, slot_bytes, timeout_s, path)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks, in place (gloo for a tensor a slot cannot hold)."""
        if (x.numel() * x.element_size() > self.slot_bytes or not x.is_contiguous()
                or x.dtype not in (torch.bfloat16, torch.float32)):
            return all_reduce(x, self.tp.group)
        self.seq += 1
        self.kernels.shm_all_reduce(x, self.shm, self.tp.rank, self.tp.world_size, self.seq,
                                    self.slot_bytes, self.timeout_s)
        return x


def _create_file(size: int) -> Optional[str]:
    """A new file of `size` zero bytes in /dev/shm (else the temp directory); None if not."""
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    try:
        fd, path = tempfile.mkstemp(prefix="shardline-tp-", dir=folder)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return path
    except OSError as exc:
        log.warning("tensor parallel: no shared buffer in %s (%s)", folder, exc)
        return None
