"""Inferflow's 3.5-bit format (q3h): 11 levels per weight, two adjacent weights in 7 bits.

Two codes a, b in [0, 11) make one value ``a * 11 + b`` <= 120 < 128, which needs 7 bits; eight such
pairs (16 weights) fill 7 bytes as a little-endian bit stream (``pack_bits`` with 7 bits). So 3.5
bits per weight buy 11 levels where 3 bits buy 8 and 4 bits 16. The levels and float16 steps/mins
per group are the same scheme as q6..q2 (tierlm.quant.base), range search included.
"""

from __future__ import annotations

import torch

from tierlm.quant.base import (
    QuantizedWeight,
    check_group,
    minmax_dequantize,
    minmax_quantize,
    tiled_matmul,
)
from tierlm.quant.groupwise import pack_bits, unpack_bits

LEVELS = 11


class Q3HFormat:
    name = "q3h"
    levels = LEVELS

    def __init__(self, group: int = 64, search: bool = True):
        self.group = check_group(group)
        self.search = search  # per-group range search (tierlm.quant.base)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        r, k = codes.shape
        pairs = codes.reshape(r, k // 2, 2).to(torch.int64)
        return pack_bits((pairs[..., 0] * LEVELS + pairs[..., 1]).to(torch.uint8), 7)  # (R, K * 7 // 16)

    def unpack(self, packed: torch.Tensor, num_cols: int) -> torch.Tensor:
        pairs = unpack_bits(packed, 7, num_cols // 2)  # (R, K/2)
        return torch.stack([pairs // LEVELS, pairs % LEVELS], dim=-1).reshape(packed.shape[0], num_cols)

    def quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantizedWeight:
        """float (out, in) -> quantized. ``importance``: float32 (in,) or broadcastable to (out, in),
        weights of each weight's squared error in the range search (tierlm.quant.base.minmax_quantize)."""
        codes, steps, mins = minmax_quantize(w, LEVELS, self.group, self.search, importance)
        return QuantizedWeight(self.name, tuple(w.shape), self.pack(codes), self.group, steps, mins)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        return minmax_dequantize(self.unpack(qw.codes, qw.shape[1]), qw.scales, qw.mins)

    def matmul(self, x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
        return tiled_matmul(self, x, qw)
