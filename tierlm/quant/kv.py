"""KV cache slots stored 8- or 4-bit, group-wise along the head dimension.

A ``QuantizedSlots`` stands in for one layer's K (or V) tensor of the paged cache
(tierlm.model.attention.KVCache): the same (num_slots, kv_heads, head_dim) shape, written with
``index_copy_`` and read with ``index_select``, the only two operations paged attention uses on it.
Each (slot, head) vector of ``head_dim`` values is quantized in groups of ``kv_group(head_dim)``
consecutive values with the weights' min-max scheme (tierlm.quant.base; plain, no range search,
which would cost too much per decoded token): float16 step and min per group, so a slot reads back
exactly as ``dequantize(quantize(vector))``, whatever else is written.
"""

from __future__ import annotations

import torch

from tierlm.quant import KV_FORMATS, QuantError, QuantizedWeight, get_quantizer


def kv_group(head_dim: int) -> int:
    """64 values per group where the head dimension allows, else 32."""
    for group in (64, 32):
        if head_dim % group == 0:
            return group
    raise QuantError(f"a quantized KV cache needs a head dimension that is a multiple of 32, got {head_dim}")


class QuantizedSlots:
    """(num_slots, num_kv_heads, head_dim) of K or V, held as codes plus per-group steps and mins."""

    def __init__(self, fmt: str, num_slots: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        if fmt not in KV_FORMATS:
            raise QuantError(f"unknown KV cache format {fmt!r}; choose one of {', '.join(KV_FORMATS)}")
        self.format = fmt
        self.quantizer = get_quantizer(fmt, kv_group(head_dim), search=False)  # plain min-max: cheap per token
        self.shape = (num_slots, num_kv_heads, head_dim)
        self.dtype = dtype
        row_bytes = head_dim if fmt == "q8" else head_dim // 2
        num_groups = head_dim // self.quantizer.group
        # torch.empty does not touch pages: memory is committed as slots are first written.
        self.codes = torch.empty(num_slots, num_kv_heads, row_bytes, dtype=torch.uint8, device=device)
        self.steps = torch.empty(num_slots, num_kv_heads, num_groups, dtype=torch.float16, device=device)
        self.mins = torch.empty(num_slots, num_kv_heads, num_groups, dtype=torch.float16, device=device)

    @staticmethod
    def bytes_per_value(fmt: str, head_dim: int) -> float:
        bits = 8 if fmt == "q8" else 4
        return bits / 8 + 4 / kv_group(head_dim)  # codes + float16 step and min per group

    def zero_(self, num_slots: int) -> None:
        """Slots [0, num_slots) read back as zeros (the null block)."""
        for t in (self.codes, self.steps, self.mins):
            t[:num_slots].zero_()

    def index_copy_(self, dim: int, index: torch.Tensor, values: torch.Tensor) -> QuantizedSlots:
        """Quantize ``values`` (N, kv_heads, head_dim) into slots ``index`` (N,)."""
        assert dim == 0
        n, h, d = values.shape
        qw = self.quantizer.quantize(values.reshape(n * h, d))
        self.codes.index_copy_(0, index, qw.codes.view(n, h, -1))
        self.steps.index_copy_(0, index, qw.scales.view(n, h, -1))
        self.mins.index_copy_(0, index, qw.mins.view(n, h, -1))
        return self

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        """Slots ``index`` (L,) dequantized: (L, kv_heads, head_dim) in the cache's dtype."""
        assert dim == 0
        n, (_, h, d) = len(index), self.shape
        qw = QuantizedWeight(self.format, (n * h, d), self.codes.index_select(0, index).view(n * h, -1),
                             self.quantizer.group, self.steps.index_select(0, index).view(n * h, -1),
                             self.mins.index_select(0, index).view(n * h, -1))
        return self.quantizer.dequantize(qw).view(n, h, d).to(self.dtype)
