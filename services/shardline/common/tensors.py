"""Tensors <-> `shardline.v1.Tensor` (raw little-endian bytes, dtype name, shape).

bfloat16 has no numpy type, so every dtype travels through a same-width integer view of
the tensor's storage; decoding wraps the message's bytes with `torch.frombuffer` (no copy
on the CPU) and moves to `device` in one transfer.
"""
from __future__ import annotations

import sys
import warnings
from typing import Optional, Union

import torch

from shardline.common.dtypes import DTYPE_NAMES as _NAMES
from shardline.v1 import common_pb2

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in _NAMES}
DTYPE_TO_NAME: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover - every platform we run on is little-endian
    raise ImportError("shardline.common.tensors assumes a little-endian host")


def tensor_to_pb(t: torch.Tensor) -> common_pb2.Tensor:
    """Encode a float32 / bfloat16 / float16 tensor (any device) as raw bytes."""
    name = DTYPE_TO_NAME.get(t.dtype)
    if name is None:
        raise ValueError(f"unsupported tensor dtype {t.dtype}; expected one of {list(DTYPES)}")
    flat = t.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    data = flat.contiguous().view(torch.uint8).numpy().tobytes()
    return common_pb2.Tensor(dtype=name, shape=list(t.shape), data=data)


def pb_to_tensor(pb: common_pb2.Tensor,
                 device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Decode a `Tensor` message; the result shares the message's bytes when it stays on the CPU
    (read-only memory: copy it before writing in place)."""
    dtype = DTYPES.get(pb.dtype)
    if dtype is None:
        raise ValueError(f"unsupported tensor dtype {pb.dtype!r}; expected one of {list(DTYPES)}")
    shape = tuple(int(s) for s in pb.shape)
    numel = 1
    for s in shape:
        if s < 0:
            raise ValueError(f"negative dimension in tensor shape {shape}")
        numel *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(pb.data) != numel * itemsize:
        raise ValueError(f"tensor of shape {shape} and dtype {pb.dtype} needs "
                         f"{numel * itemsize} bytes, got {len(pb.data)}")
    if numel == 0:
        t = torch.empty(shape, dtype=dtype)
    else:
        with warnings.catch_warnings():  # frombuffer warns that `bytes` are not writable
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(pb.data, dtype=torch.uint8).view(dtype).view(shape)
    if device is not None and torch.device(device) != t.device:
        t = t.to(device)
    return t
