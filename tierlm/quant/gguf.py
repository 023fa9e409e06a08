"""GGUF block types executed natively: the file's blocks stay as they are in memory.

A GGUF row of ``in`` weights is ``in / block`` blocks of ``type_size`` bytes (each block carries its
own float16 scale(s)), so ``QuantizedWeight.codes`` is simply the raw bytes, (out, bytes_per_row),
and a band of rows decodes on its own. The compiled kernel (tierlm/model/kernels/quant_gemv.c) reads
every supported type directly for decode-sized batches, and dequantizes bands of rows for prompt
chunks equal bit for bit to the ``gguf`` package's reference (numpy) dequantizers, which run instead
where the kernel is not built. F16 and BF16 matrices are kept as they are too (a "block" of one weight,
two bytes): the kernel multiplies them against float32 activations without rounding those to int8.

Rarer types (IQ1-IQ3, TQ1/TQ2, MXFP4, Q8_1/Q8_K) are not in ``SUPPORTED``: the loader expands them to
float at load and says so once in the start-up log (tierlm.loader.weights).

A token embedding table of a supported type stays as blocks too: a lookup dequantizes only the rows it
asks for (tierlm.model.transformer.embedding_rows), and a tied head multiplies the same blocks.

Llama-family q/k rows are stored permuted for llama.cpp's RoPE; tierlm applies RoPE in the
matching (interleaved) layout, so rows are used as stored (see tierlm/model/specs/llama.toml).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from tierlm.quant.base import QuantError, QuantizedWeight, tiled_matmul

# GGUF type -> format id in quant_gemv.c (tierlm.quant.linear.KERNEL_FORMATS holds these and tierlm's own)
KERNEL_FORMATS = {"gguf:Q8_0": 2, "gguf:Q4_0": 3, "gguf:Q4_1": 4, "gguf:Q5_0": 5, "gguf:Q5_1": 6, "gguf:Q4_K": 7,
                  "gguf:Q5_K": 8, "gguf:Q6_K": 9, "gguf:Q2_K": 19, "gguf:Q3_K": 20, "gguf:IQ4_NL": 21,
                  "gguf:IQ4_XS": 22, "gguf:F16": 23, "gguf:BF16": 24}
SUPPORTED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
             "F16", "BF16")


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
        out, k = qw.shape
        kernel = _dequant_kernel() if qw.codes.device.type == "cpu" else None
        if kernel is not None:
            codes = qw.codes if qw.codes.stride(-1) == 1 else qw.codes.contiguous()
            values = torch.empty(out, k, dtype=torch.float32)
            if kernel(KERNEL_FORMATS[self.name], codes.data_ptr(), codes.stride(0), out, k, values.data_ptr(),
                      torch.get_num_threads()) == 0:
                return values
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        raw = qw.codes.contiguous().cpu().numpy()  # the reference decoder is numpy: blocks on the device come back
        values = dequantize(raw, GGMLQuantizationType[self.type_name])  # (out, in) float32
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(qw.shape)

    def matmul(self, x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
        return tiled_matmul(self, x, qw)


@functools.cache
def _dequant_kernel():
    """quant_gemv.c's dequantizer (``QuantKernel.dequant``) of the build this CPU runs, or None."""
    from tierlm.model.kernels import quant_gemv

    kernel = quant_gemv()
    return None if kernel is None else kernel.dequant
