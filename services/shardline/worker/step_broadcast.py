"""The wire between the tensor-parallel ranks of one stage: torch.distributed, never pickle.

Rank 0 (the worker process that serves gRPC) sends, for every command, on a gloo control
group:

    header   int64 [op, plan bytes, hidden rows, hidden columns, hidden dtype (0: none)]
    plan     uint8 [plan bytes]: the StepRequest as it arrived, without its hidden states;
             its trace_context is rank 0's step span when tracing is on (each rank's step
             span is that span's child), else empty
and, when the step carries hidden states, on the default group (NCCL on CUDA, gloo on the CPU):
    hidden   [rows, columns] of its dtype (moved as bytes), on the rank's device

Every rank then runs the same command with the same inputs. The control group waits as long
as a rank may idle between steps (CONTROL_TIMEOUT); the default group, where the hidden states
and the sharded model's own collectives travel, has the stage's --tp-timeout-s.
"""
from __future__ import annotations

import datetime
import enum
import os
import sys
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from shardline.common.tensors import DTYPES
from shardline.v1 import worker_pb2

# ranks idle here between steps: they learn of rank 0's death from the broken connection or
# their parent-death signal (common/spawn.py), never from this timeout
CONTROL_TIMEOUT = datetime.timedelta(days=365)
_DTYPES = list(DTYPES.values())           # a dtype travels as its index here
_HEADER = 5


class Op(enum.IntEnum):
    """What rank 0 tells the other ranks to do."""
    STEP = 1             # runner.step with the plan (and hidden states) that follow
    FORGET_ALL = 2       # runner.forget_all (the scheduler's stream ended)
    STOP = 3             # leave the group and exit


@dataclass
class Command:
    op: Op
    request: Optional[worker_pb2.StepRequest] = None     # Op.STEP: the plan, without hidden
    hidden: Optional[torch.Tensor] = None                # Op.STEP on a later stage


def plan_bytes(req: worker_pb2.StepRequest,
               trace_context: Optional[Mapping[str, str]] = None) -> bytes:
    """req serialized without its hidden states (they go as a tensor) or its own trace
    context; with trace_context (rank 0's step span) instead, when given."""
    plan = worker_pb2.StepRequest(step_id=req.step_id, seqs=req.seqs,
                                  free_seq_ids=req.free_seq_ids, trace_context=trace_context)
    if req.HasField("decode"):
        plan.decode.CopyFrom(req.decode)
    return plan.SerializeToString()


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """t's memory as uint8 (what a broadcast moves, whatever the dtype the backend supports)."""
    return t.contiguous().view(torch.uint8)


class StepBroadcast:
    """One rank's end of the wire. device: where this rank's hidden states live (the default
    group's tensors must be on it under NCCL)."""

    def __init__(self, control: dist.ProcessGroup, device: torch.device, timeout_s: float):
        self.control = control
        self.device = device
        self.timeout_s = timeout_s

    @classmethod
    def join(cls, store: dist.Store, rank: int, world_size: int, device: torch.device,
             timeout_s: float) -> "StepBroadcast":
        """Initialize the default process group (NCCL on CUDA, gloo on the CPU; timeout_s
        for its collectives) through store, and the gloo control group. Every rank calls it."""
        backend = "nccl" if device.type == "cuda" else "gloo"
        if sys.platform == "linux":          # every rank is on this host: gloo over loopback
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        return cls(control, device, timeout_s)

    # ---- rank 0 -------------------------------------------------------------------------
    def send(self, op: Op, req: Optional[worker_pb2.StepRequest] = None,
             hidden: Optional[torch.Tensor] = None,
             trace_context: Optional[Mapping[str, str]] = None) -> None:
        """Send one command to the other ranks (rank 0); trace_context: the step's span, the
        parent of the other ranks' (in the plan: no collective of its own)."""
        plan = plan_bytes(req, trace_context) if req is not None else b""
        rows = cols = dtype = 0
        if hidden is not None:
            rows, cols = hidden.shape
            dtype = 1 + _DTYPES.index(hidden.dtype)
        header = torch.tensor([int(op), len(plan), rows, cols, dtype], dtype=torch.int64)
        dist.broadcast(header, 0, group=self.control)
        if plan:
            dist.broadcast(torch.frombuffer(bytearray(plan), dtype=torch.uint8), 0,
                           group=self.control)
        if hidden is not None and hidden.numel():
            dist.broadcast(_as_bytes(hidden.to(self.device)), 0)

    # ---- the other ranks ------------------------------------------------------------------
    def receive(self) -> Command:
        """The next command from rank 0 (blocks until it comes)."""
        header = torch.empty(_HEADER, dtype=torch.int64)
        dist.broadcast(header, 0, group=self.control)
        op, n, rows, cols, dtype = header.tolist()
        req = None
        if op == Op.STEP:                  # an empty plan is 0 bytes
            buf = torch.empty(n, dtype=torch.uint8)
            if n:
                dist.broadcast(buf, 0, group=self.control)
            req = worker_pb2.StepRequest.FromString(buf.numpy().tobytes())
        hidden = None
        if dtype:
            hidden = torch.empty(rows, cols, dtype=_DTYPES[dtype - 1], device=self.device)
            if hidden.numel():
                dist.broadcast(_as_bytes(hidden), 0)
        return Command(Op(op), req, hidden)

    # ---- every rank -------------------------------------------------------------------------
    def agree(self, value: int) -> list[int]:
        """Every rank's value (its KV blocks, once loaded). A barrier first: a rank that is
        not there within timeout_s of the others is named in the error."""
        dist.monitored_barrier(group=self.control, wait_all_ranks=True,
                               timeout=datetime.timedelta(seconds=self.timeout_s))
        out = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
        dist.all_gather(out, torch.tensor([value], dtype=torch.int64), group=self.control)
        return [int(t) for t in out]

    def close(self) -> None:
        dist.destroy_process_group()
