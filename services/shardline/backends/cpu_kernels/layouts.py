"""Weight layouts of the CPU kernels: a module's weights converted once, at load, into the
blocked forms the kernels stream (csrc/). Pure tensor functions, tested exactly against the
plain weights (tests/unit/test_cpu_kernels.py)."""
from __future__ import annotations

import torch

from shardline.transforms.quantize import Int4Linear, Int8Linear, unpack_int4


def vnni_layout(w: torch.Tensor) -> torch.Tensor:
    """bf16 [n, k] -> [n' / 16, k / 2, 16, 2] for linear_vnni (n' = n rounded up to 32, zero
    rows): per block of 16 outputs, each pair of input channels' 16 x 2 values together, the
    layout AMX takes as its B tile and the GEMV streams without horizontal sums."""
    n, k = w.shape
    padded = -(-n // 32) * 32
    if padded != n:
        w = torch.cat([w, w.new_zeros(padded - n, k)])
    return w.reshape(padded // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def glu_layout(gate_up: torch.Tensor) -> torch.Tensor:
    """A fused gate_up weight [2 I, k] (gate rows, then up rows) as linear_vnni(glu=True)
    takes it: per 32 output rows, 16 gate rows and the 16 up rows of the same channels, so
    each 32-output block it computes yields act(gate) * up for 16 channels in its epilogue
    (the [T, 2 I] intermediate and the separate act_mul pass go away)."""
    n, k = gate_up.shape
    inter = n // 2
    return gate_up.view(2, inter // 16, 16, k).transpose(0, 1).reshape(n, k)


def int8_kernel_layout(m: Int8Linear) -> torch.Tensor:
    """uint8 q + 128 (unsigned weights against signed int8 activations: VNNI's dpbusd
    multiplies unsigned by signed bytes), tiled [n' / 16, k / 4, 16, 4] (n' = n rounded up to
    16): per block of 16 outputs and quad of input channels, the 16 outputs' 4 bytes, one
    64-byte vector that dpbusd takes whole."""
    u = (m.qweight.to(torch.int16) + 128).to(torch.uint8)
    n, k = u.shape
    padded = -(-n // 16) * 16
    if padded != n:
        u = torch.cat([u, u.new_full((padded - n, k), 128)])
    return u.reshape(padded // 16, 16, k // 4, 4).permute(0, 2, 1, 3).contiguous()


def int4_kernel_layout(m: Int4Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights uint8 [n' / 16, k / 8, 16, 4], scale and offset float16 [n' / 16, k / 32, 16])
    for linear_int4 (n' = n rounded up to 16): per block of 16 outputs and octet of input
    channels, output o's 4 bytes hold the octet's channels 0..3 in their low nibbles and 4..7 in
    their high nibbles; w = q * scale + offset (offset = zero - 8 * scale)."""
    q = unpack_int4(m.packed)                                          # [n, k] in [0, 15]
    n, k = q.shape
    scale, offset = m.scale.half(), (m.zero - 8 * m.scale).half()     # [n, k / 32]
    padded = -(-n // 16) * 16
    if padded != n:
        q = torch.cat([q, q.new_zeros(padded - n, k)])
        scale = torch.cat([scale, scale.new_zeros(padded - n, k // 32)])
        offset = torch.cat([offset, offset.new_zeros(padded - n, k // 32)])
    octets = q.view(padded, k // 8, 2, 4)
    packed = (octets[:, :, 0] | (octets[:, :, 1] << 4))               # [n', k / 8, 4]
    tiles = packed.view(padded // 16, 16, k // 8, 4).permute(0, 2, 1, 3).contiguous()
    per_block = (lambda t: t.view(padded // 16, 16, k // 32).transpose(1, 2).contiguous())
    return tiles, per_block(scale), per_block(offset)
