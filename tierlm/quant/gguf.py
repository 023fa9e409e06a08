"""GGUF block types executed natively: the file's blocks stay as they are in memory.

A GGUF row of ``in`` weights is ``in / block`` blocks of ``type_size`` bytes (each block carries its
own float16 scale(s)), so ``QuantizedWeight.codes`` is simply the raw bytes, (out, bytes_per_row),
and a band of rows decodes on its own. Decoding uses the ``gguf`` package's reference (numpy)
dequantizers, a tile of rows at a time; the compiled kernel (tierlm/model/kernels/quant_gemv.c)
reads every supported type (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) directly for decode-sized
batches. A token embedding table of a supported type stays as blocks too: a lookup dequantizes only
the rows it asks for (tierlm.model.transformer.embedding_rows), and a tied head multiplies the same
blocks.

Llama-family q/k rows are stored permuted for llama.cpp's RoPE; tierlm applies RoPE in the
matching (interleaved) layout, so rows are used as stored (see tierlm/model/specs/llama.toml).
"""

from __future__ import annotations

import numpy as np
import torch

from tierlm.quant.base import QuantError, QuantizedWeight, tiled_matmul

SUPPORTED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


def block_size(type_name: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a GGUF type."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]


class GGUFFormat:
    """One GGUF block type (a ``QuantMethod``; GGUF files are made by llama.cpp's quantizer)."""

    def __init__(self, type_name: str):
        if type_name not in SUPPORTED:
            raise QuantError(f"GGUF type {type_name} is not executed natively (supported: {', '.join(SUPPORTED)})")
        self.type_name = type_name
        self.name = f"gguf:{type_name}"
        self.block, self.type_size = block_size(type_name)

    def weight(self, raw: torch.Tensor, shape: tuple[int, int]) -> QuantizedWeight:
        """Wrap raw blocks, uint8 (out, bytes_per_row), as a quantized (out, in) matrix."""
        out, k = shape
        if k % self.block or tuple(raw.shape) != (out, k // self.block * self.type_size):
            raise QuantError(f"{self.name}: {tuple(raw.shape)} bytes do not hold a {shape} matrix")
        return QuantizedWeight(self.name, (out, k), raw, self.block)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        raw = qw.codes.contiguous().cpu().numpy()  # the reference decoder is numpy: blocks on the device come back
        values = dequantize(raw, GGMLQuantizationType[self.type_name])  # (out, in) float32
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(qw.shape)

    def matmul(self, x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
        return tiled_matmul(self, x, qw)
