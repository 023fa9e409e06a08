"""How a weight matrix is multiplied: one small protocol, so that the layout of weights in memory
(plain, oneDNN-packed, later quantized) is a plug point and not a scattered ``if``.

Why oneDNN packing on CPU: ``F.linear`` hands oneDNN a plain (out, in) matrix, which its kernels
re-block on the fly. Re-blocking once at load time and calling the packed kernel directly reads
weights faster (see ``CPULinear``), and batch-1 decode is nothing but reading weights.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class LinearMethod(Protocol):
    name: str

    def prepare(self, weight: torch.Tensor) -> torch.Tensor:
        """(out, in) weight -> whatever ``apply`` wants; the input may be released afterwards."""
        ...

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (N, in) -> (N, out), in x's dtype."""
        ...


class DenseLinear:
    """Plain ``F.linear``; works on every device."""

    name = "dense"

    def prepare(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)


class CPULinear:
    """CPU: weights re-blocked once into oneDNN's preferred layout where that pays, else plain.

    Measured on this project's CPU (bench/results/linear.md, 2 threads, weights beyond L3):
    bf16 packed moves 1.3-1.5x the bytes/s of ``F.linear`` at batch 1 and 16; fp32 packed is a
    wash at batch 1 for large matrices (1.1B Llama: 0.9-1.1x from run to run) and wins 1.2x at
    batch 16, but loses for small ones (SmolLM2's 576-wide matrices: 0.7x at batch 1), where the
    per-call overhead dominates and MKL's sgemv is already at the bandwidth limit. Hence: pack every bf16 matrix, and fp32 ones from
    ``min_fp32_packed_elements`` up.
    """

    name = "cpu-onednn"

    def __init__(self, min_fp32_packed_elements: int = 1 << 22):
        self.min_fp32_packed_elements = min_fp32_packed_elements

    def prepare(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.dtype == torch.float32 and weight.numel() < self.min_fp32_packed_elements:
            return weight
        # The batch-size hint only steers the blocking; the packed weight serves any batch.
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if weight.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")
        return F.linear(x, weight, bias)


def plain_weight(weight: torch.Tensor) -> torch.Tensor:
    """The plain (out, in) tensor behind a weight a method prepared (oneDNN-packed ones unpacked)."""
    return weight.to_dense() if weight.is_mkldnn else weight


class AVX512BF16Linear:
    """CPU bf16 with AVX512-BF16: tierlm's own kernel (kernels/bf16_gemm.c) for decode-sized
    batches, ``F.linear`` for prompt chunks. Weights stay plain (out, in) bf16.

    Measured (bench/results/linear.md): at batch 1 the kernel streams weights 5-12% faster than
    oneDNN's packed kernel (85% of the measured read bandwidth on the 1.1B shapes); at batch 16 it
    is 8-20% slower than packed weights but faster than ``F.linear``, the alternative for weights
    stored plain. Plain storage is kept because batch-1 decode is the case this CPU path is for,
    and two copies of the weights would double memory. For prompt chunks (compute-bound) oneDNN's
    on-the-fly re-blocking costs ~3%.
    """

    name = "avx512-bf16"
    max_rows = 16  # above this a product is compute-bound: oneDNN's GEMM is the better tool

    def __init__(self, kernel):
        self.kernel = kernel

    def prepare(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.contiguous()

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        m, k = x.shape
        if m > self.max_rows or k % 32 or x.dtype != torch.bfloat16:
            return F.linear(x, weight, bias)
        x = x.contiguous()
        y = torch.empty(m, weight.shape[0], dtype=torch.float32)  # (M, N), fp32 accumulators
        self.kernel(x.data_ptr(), weight.data_ptr(), y.data_ptr(), m, weight.shape[0], k, torch.get_num_threads())
        if bias is not None:
            y += bias
        return y.to(torch.bfloat16)


def default_linear_method(device: torch.device | str, dtype: torch.dtype) -> LinearMethod:
    """The fastest method this machine has for ``dtype`` on ``device`` (policy, logged at start-up)."""
    from tierlm.model.kernels import bf16_gemm

    device = torch.device(device)
    if device.type != "cpu":
        return DenseLinear()
    if dtype == torch.bfloat16 and bf16_gemm() is not None:
        return AVX512BF16Linear(bf16_gemm())
    if dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available():
        return CPULinear()
    return DenseLinear()
