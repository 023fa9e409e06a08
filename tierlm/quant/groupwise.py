"""FlexGen's group-wise asymmetric min-max quantization at 8, 6, 5, 4, 3 and 2 bits (q8 .. q2).

The math (codes, float16 steps and mins per group, with a per-group range search below 8 bits) is
``tierlm.quant.base.minmax_quantize``;
what differs between bit widths is only how codes become bytes:

* q8: one code per byte.
* q4: per run of 32 weights, 16 bytes; byte j holds weight j in its low nibble and weight j + 16 in
  its high nibble (GGUF's Q4_0 order), so a SIMD kernel unpacks 32 weights in order with one mask
  and one shift::

      byte      0        1      ...     15
      low     w0       w1       ...     w15
      high    w16      w17      ...     w31

* q6, q5, q3, q2: a little-endian bit stream: 8 codes of b bits fill b bytes, code i at bits
  [i*b, (i+1)*b) of the 8b-bit word.
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


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 (R, K) codes < 2**bits, K % 8 == 0 -> uint8 (R, K * bits // 8) bit stream."""
    r, k = codes.shape
    shifts = torch.arange(8, dtype=torch.int64, device=codes.device) * bits
    words = (codes.reshape(r, k // 8, 8).to(torch.int64) << shifts).sum(dim=-1)  # (R, K/8), 8b bits used
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
    return ((words[..., None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(r, k * bits // 8)


def unpack_bits(packed: torch.Tensor, bits: int, num_cols: int) -> torch.Tensor:
    """Inverse of ``pack_bits``."""
    r = packed.shape[0]
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    words = (packed.reshape(r, num_cols // 8, bits).to(torch.int64) << byte_shifts).sum(dim=-1)
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    return ((words[..., None] >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(r, num_cols)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 (R, K) codes < 16, K % 32 == 0 -> uint8 (R, K // 2) in the q4 order (module docstring)."""
    r, k = codes.shape
    c = codes.reshape(r, k // 32, 2, 16)  # (R, chunks, low/high half, 16)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(r, k // 2)


def unpack_nibbles(packed: torch.Tensor, num_cols: int) -> torch.Tensor:
    r = packed.shape[0]
    p = packed.reshape(r, num_cols // 32, 1, 16)
    return torch.cat([p & 0x0F, p >> 4], dim=2).reshape(r, num_cols)


class GroupwiseFormat:
    """``bits``-bit group-wise asymmetric min-max (a ``Quantizer``)."""

    def __init__(self, bits: int, group: int = 64, search: bool | None = None):
        if bits not in (2, 3, 4, 5, 6, 8):
            raise ValueError(f"no group-wise format with {bits} bits")
        self.bits = bits
        self.search = bits < 8 if search is None else search  # per-group range search (tierlm.quant.base)
        self.levels = 1 << bits
        self.group = check_group(group)
        self.name = f"q{bits}"

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return codes.contiguous()
        if self.bits == 4:
            return pack_nibbles(codes)
        return pack_bits(codes, self.bits)

    def unpack(self, packed: torch.Tensor, num_cols: int) -> torch.Tensor:
        if self.bits == 8:
            return packed
        if self.bits == 4:
            return unpack_nibbles(packed, num_cols)
        return unpack_bits(packed, self.bits, num_cols)

    def quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantizedWeight:
        """float (out, in) -> quantized. ``importance``: float32 (in,) or broadcastable to (out, in),
        weights of each weight's squared error in the range search (tierlm.quant.base.minmax_quantize)."""
        codes, steps, mins = minmax_quantize(w, self.levels, self.group, self.search, importance)
        return QuantizedWeight(self.name, tuple(w.shape), self.pack(codes), self.group, steps, mins)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        return minmax_dequantize(self.unpack(qw.codes, qw.shape[1]), qw.scales, qw.mins)

    def matmul(self, x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
        return tiled_matmul(self, x, qw)
