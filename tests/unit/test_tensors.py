"""Tensors <-> shardline.v1.Tensor."""
from __future__ import annotations

import pytest
import torch

from shardline.common.tensors import pb_to_tensor, tensor_to_pb
from shardline.v1 import common_pb2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_exact(dtype):
    t = (torch.randn(5, 7) * 100).to(dtype)
    pb = tensor_to_pb(t)
    assert pb.dtype == str(dtype).removeprefix("torch.")
    assert list(pb.shape) == [5, 7] and len(pb.data) == t.numel() * t.element_size()
    back = pb_to_tensor(common_pb2.Tensor.FromString(pb.SerializeToString()))
    assert back.dtype == dtype and torch.equal(back, t)


def test_bytes_are_little_endian_row_major():
    pb = tensor_to_pb(torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16))
    assert pb.data == bytes([0x80, 0x3F, 0x00, 0x40])              # bf16 1.0, 2.0


def test_non_contiguous_and_empty_tensors():
    t = torch.arange(12, dtype=torch.float32).view(3, 4).t()
    assert torch.equal(pb_to_tensor(tensor_to_pb(t)), t)
    empty = pb_to_tensor(tensor_to_pb(torch.empty(0, 576, dtype=torch.bfloat16)))
    assert empty.shape == (0, 576) and empty.dtype == torch.bfloat16


def test_device_argument_and_writable_copy():
    t = torch.randn(2, 3)
    back = pb_to_tensor(tensor_to_pb(t), device="cpu")
    assert back.device.type == "cpu" and torch.equal(back, t)
    back.clone().add_(1)                                            # copies are writable


def test_bad_messages_are_refused():
    with pytest.raises(ValueError, match="dtype"):
        pb_to_tensor(common_pb2.Tensor(dtype="int8", shape=[1], data=b"\0"))
    with pytest.raises(ValueError, match="needs 8 bytes"):
        pb_to_tensor(common_pb2.Tensor(dtype="float32", shape=[2], data=b"\0" * 4))
    with pytest.raises(ValueError, match="unsupported"):
        tensor_to_pb(torch.zeros(2, dtype=torch.int64))
