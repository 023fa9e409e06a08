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
        """x (N, in) -> (N, out), in x's dtype. ``weight`` is what ``prepare`` returned, or a plain
        (out, in) tensor that was never prepared (a tied head: the embedding table)."""
        ...


class DenseLinear:
    """Plain ``F.linear``; works on every device."""

    name = "dense"

    def prepare(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)


class CPULinear:
    """CPU: weights re-blocked once into oneDNN's preferred layout where that pays, else plain. The
    choice for a dtype that has no StreamingLinear kernel on this machine.

    Measured on this project's CPU (bench/results/linear.md, 2 threads, weights beyond L3):
    bf16 packed moves 1.3-1.5x the bytes/s of ``F.linear`` at batch 1 and 16; fp32 packed is a
    wash at batch 1 for large matrices (1.1B Llama: 0.9-1.1x from run to run) and wins 1.2x at
    batch 16, but loses for small ones (SmolLM2's 576-wide matrices: 0.7x at batch 1), where the
    per-call overhead dominates and MKL's sgemv is already at the bandwidth limit. Hence: pack every bf16 matrix,
    and fp32 ones from ``min_fp32_packed_elements`` up.

    oneDNN packs bf16 only on CPUs its bf16 kernels run on (AVX512-BW/VL/DQ, or AVX-NE-CONVERT; torch
    asks it with ``_is_mkldnn_bf16_supported``); elsewhere, such as AVX2-only CPUs, the reorder raises,
    so bf16 weights stay plain there and go to ``F.linear`` (1.4 G weights/s at batch 1 on a 5632 x 2048
    matrix on this project's AVX2 EPYC, against 4.1 for float32).
    """

    name = "cpu-onednn"

    def __init__(self, min_fp32_packed_elements: int = 1 << 22):
        self.min_fp32_packed_elements = min_fp32_packed_elements
        self.packs_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()

    def prepare(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.dtype == torch.float32 and weight.numel() < self.min_fp32_packed_elements:
            return weight
        if weight.dtype == torch.bfloat16 and not self.packs_bf16:
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


class StreamingLinear:
    """CPU products of decode-sized batches by tierlm's own kernels, which stream W once for all rows
    of x (kernels/bf16_gemm.c with AVX512-BF16, kernels/f32_gemm.c with AVX-512F); ``F.linear`` above
    ``max_rows`` rows, where a product is compute-bound and oneDNN/MKL's blocked GEMMs are the better
    tool. Weights stay plain (out, in) in ``dtype``: the kernel and ``F.linear`` share them, and batch-1
    decode, the case this path is for, reads them as they are (two copies would double memory).

    Measured (bench/results/linear.md, Intel Xeon): bf16 at batch 1 streams weights 5-12% faster than
    oneDNN's packed kernel, at batch 16 8-20% slower than packed weights but faster than ``F.linear``;
    prompt chunks lose ~3% to oneDNN's on-the-fly re-blocking. float32 on AMD Zen 4, where MKL's
    small-M products crawl (kernels/f32_gemm.c): against ``F.linear``, 1.7-3.6x at M = 1, 2.4-6.7x at
    M = 2-8. oneDNN on the plain float32 weight (re-blocked on the fly) runs 1.3-2x faster than
    ``F.linear`` (MKL) from M = 64 to 512 there, and ties the kernel at M = 16 (0.97-1.04x), beats it
    above: so float32 takes the kernel up to 16 rows and oneDNN above (``onednn_above``).
    """

    def __init__(self, kernel, dtype: torch.dtype, max_rows: int, k_multiple: int,
                 onednn_above: bool = False):
        self.kernel, self.dtype, self.max_rows, self.k_multiple = kernel, dtype, max_rows, k_multiple
        self.onednn_above = onednn_above and torch.backends.mkldnn.is_available()
        self.name = {torch.bfloat16: "avx512-bf16", torch.float32: "avx512-f32"}[dtype]

    def prepare(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.contiguous()

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        m, k = x.shape
        if x.dtype != self.dtype or weight.dtype != self.dtype or not weight.is_contiguous():
            return F.linear(x, weight, bias)  # a tied head (the embedding table) is never prepared
        if m > self.max_rows or k % self.k_multiple:
            if self.onednn_above:
                return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [None], "")
            return F.linear(x, weight, bias)
        x = x.contiguous()
        y = torch.empty(m, weight.shape[0], dtype=torch.float32)  # (M, N), fp32 accumulators
        self.kernel(x.data_ptr(), weight.data_ptr(), y.data_ptr(), m, weight.shape[0], k, torch.get_num_threads())
        if bias is not None:
            y += bias
        return y.to(self.dtype)


def default_linear_method(device: torch.device | str, dtype: torch.dtype) -> LinearMethod:
    """The fastest method this machine has for ``dtype`` on ``device`` (policy, logged at start-up)."""
    from tierlm.model.kernels import bf16_gemm, f32_gemm

    device = torch.device(device)
    if device.type != "cpu":
        return DenseLinear()
    if dtype == torch.bfloat16 and bf16_gemm() is not None:
        return StreamingLinear(bf16_gemm(), torch.bfloat16, max_rows=16, k_multiple=32)
    if dtype == torch.float32 and f32_gemm() is not None:
        return StreamingLinear(f32_gemm(), torch.float32, max_rows=16, k_multiple=16, onednn_above=True)
    if dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available():
        return CPULinear()
    return DenseLinear()
