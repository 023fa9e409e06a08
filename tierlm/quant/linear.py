"""``QuantLinear``: the LinearMethod (tierlm.model.linear) for quantized weights.

``prepare`` quantizes a float matrix into the engine's format (or passes through weights that are
already quantized, such as a GGUF file's own blocks) and, with a kernel that has row tiles, repacks
resident matrices into them (tierlm.quant.tiles); ``apply`` multiplies without expanding the whole
matrix: on a CPU with a build of the compiled kernel (tierlm/model/kernels/quant_gemv.c: AVX512-VNNI
with row tiles, or AVX2 with 8-row tiles for the K-quants, IQ4_XS and Q4_0 and rows for the rest),
decode-sized batches (up to ``max_kernel_rows`` = 8 rows) go to it; prompt chunks dequantize a tile of
rows at a time and use ``F.linear`` on it (tierlm.quant.base.tiled_matmul), unless ``int8_prompts``
sends them to the kernel too: True everywhere it can, False never, None (the default) where the
kernel is the faster path: GGUF K-quants and IQ4_XS where the AVX2 build tiles them
(``INT8_PROMPT_TILES``; 4 rows of x per pass over a tile; for 512 rows of x against a 5632 x 2048 matrix
1.6-1.9x the float path for the K-quants, 1.1x IQ4_XS; llama.cpp rounds its prompts to int8 the same
way), their rows (a tiered matrix's streamed ones) then too, so that both halves of a matrix round
alike. Q4_0's and Q8_0's tiles gain 1.7x and 1.3-1.4x that way, but a tied Q8_0 table's rows would
take the row kernel, slower than the float path: they stay float unless int8_prompts is True.

The kernel quantizes the activations to int8 in blocks of 32 (as llama.cpp does, at every batch
size), so its products differ from the float product by that rounding; the tiled path is float
throughout. That rounding is why prompts stay float by default: through the kernel, SmolLM2's q8
perplexity on the Brown excerpt is +0.87% instead of +0.40% against float (the 8-bit target is
0.5%). What it buys (AVX512-VNNI build, 256 rows of x against a 5632 x 2048 matrix, 2 threads, AMD EPYC, G
multiply-adds/s): row tiles q4 170, q8 200, q3h 130 (54 before its byte-lookup tiles) against the float
path's 53, 56, 42; file-layout rows 43, 74, 28; at 16 rows the float path manages 5-10
(bench/results/quant_prefill.md has the whole-model prefill).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tierlm.quant import (
    AnyQuantized,
    FusedWeight,
    QuantizedWeight,
    Quantizer,
    method_for,
)
from tierlm.quant.gguf import KERNEL_FORMATS as GGUF_KERNEL_FORMATS
from tierlm.quant.tiles import (
    GROUPWISE_BITS,
    KX8_FORMATS,
    KX8_ROWS,
    TILE_FORMATS,
    RowTiles,
    tile_rows,
    tile_rows_kx8,
    tiled_tiles_matmul,
)

log = logging.getLogger("tierlm")

# format name -> format id in quant_gemv.c
KERNEL_FORMATS = {"q8": 0, "q4": 1, "q3h": 10, "q6": 11, "q5": 12, "q3": 13, "q2": 14, **GGUF_KERNEL_FORMATS}
# Formats whose products the AVX2 build computes against x rounded to int8 per 256 values (one scale
# per K-quant super-block, as llama.cpp's Q8_K), not per 32 (quant_gemv.c: "K-quants against x rounded
# per super-block"); F16 and BF16 take x unrounded.
SUPER_BLOCK_X_FORMATS = ("gguf:Q2_K", "gguf:Q3_K", "gguf:Q4_K", "gguf:Q5_K", "gguf:Q6_K", "gguf:IQ4_XS")
FLOAT_X_FORMATS = ("gguf:F16", "gguf:BF16")
# 8-row tile formats whose prompt chunks take the int8 kernel by default (int8_prompts None; module docstring)
# (not Q4_0 and Q8_0: their rows, a tied table's or a tiered matrix's streamed ones, would take the slow row
# kernel for prompts, where the K-quants' take the prompt GEMM)
INT8_PROMPT_TILES = frozenset(f"gguf:{t}" for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"))
# Formats quant_gemv.c's prompt GEMM (tierlm_quant_prompt) takes: with ``int8_prompts``, prompt chunks in
# these go there. On this project's AVX2 EPYC it is 5-10% faster than dequantized bands through MKL's
# float32 GEMM (both near the cores' multiply rate), at the cost of x's rounding, so it stays opt-in.
PROMPT_KERNEL_FORMATS = ("gguf:Q2_K", "gguf:Q3_K", "gguf:Q4_K", "gguf:Q5_K", "gguf:Q6_K")
# source format -> format id of its row-tile kernel (tierlm.quant.tiles)
TILE_KERNEL_FORMATS = {"gguf:Q4_0": 15, "gguf:Q6_K": 16, **{f: 17 for f in GROUPWISE_BITS}, "q3h": 18}


@dataclass(frozen=True)
class KernelOperand:
    """A quantized matrix as quant_gemv.c takes it: ``tierlm_quant_gemv(fmt, x, M, K, codes, steps, mins,
    group, row_bytes, scale_stride, y, N, threads)``. Holds the tensors whose memory the call reads."""

    fmt: int
    codes: torch.Tensor  # row tiles, or the codes (rows may be strided: views into a store's packed rows)
    steps: torch.Tensor | None
    mins: torch.Tensor | None
    group: int
    row_bytes: int  # row tiles of tierlm's formats: the bits per code
    scale_stride: int  # 0: steps and mins stored on their own


def kernel_operand(qw: QuantizedWeight | RowTiles) -> KernelOperand:
    """The kernel's arguments for ``qw``; the caller checks KERNEL_FORMATS (or, for row tiles,
    TILE_KERNEL_FORMATS)."""
    if isinstance(qw, RowTiles) and qw.rows_per_tile == KX8_ROWS:
        return KernelOperand(KX8_FORMATS[qw.format][3], qw.tiles, None, None, qw.group, qw.tiles.stride(0), 0)
    if isinstance(qw, RowTiles):
        return KernelOperand(TILE_KERNEL_FORMATS[qw.format], qw.tiles, None, None, qw.group,
                             GROUPWISE_BITS.get(qw.format, 0), 0)
    # The kernel takes the row stride of the codes and of the steps/mins, which must share one stride.
    codes = qw.codes if qw.codes.stride(-1) == 1 else qw.codes.contiguous()
    scales, mins = qw.scales, qw.mins
    if scales is not None and not (scales.stride(-1) == 1 and mins.stride() == scales.stride()):
        scales, mins = scales.contiguous(), mins.contiguous()
    return KernelOperand(KERNEL_FORMATS[qw.format], codes, scales, mins, qw.group, codes.stride(0),
                         0 if scales is None else scales.stride(0))


def kernel_matmul(kernel, x: torch.Tensor, qw: QuantizedWeight | RowTiles,
                  num_threads: int | None = None) -> torch.Tensor:
    """x (M, in) @ W^T with the compiled kernel (a tierlm.model.kernels.QuantKernel); float32 (M, out).
    The caller checks KERNEL_FORMATS (or, for row tiles, TILE_KERNEL_FORMATS and ``kernel.row_tiles``)."""
    out, k = qw.shape
    xf = x.to(torch.float32).contiguous()
    y = torch.empty(x.shape[0], out, dtype=torch.float32)
    if x.shape[0] == 0:
        return y
    op = kernel_operand(qw)
    ptr = (lambda t: None if t is None else t.data_ptr())
    status = kernel(op.fmt, xf.data_ptr(), x.shape[0], k, op.codes.data_ptr(), ptr(op.steps), ptr(op.mins), op.group,
                    op.row_bytes, op.scale_stride, y.data_ptr(), out, num_threads or torch.get_num_threads())
    if status != 0:
        layout = "row tiles" if isinstance(qw, RowTiles) else "matrix"
        raise ValueError(f"the quantized kernel does not take a {qw.format} {layout} of shape {qw.shape}")
    return y


def prompt_matmul(kernel, x: torch.Tensor, qw: QuantizedWeight, num_threads: int | None = None) -> torch.Tensor:
    """x (M, in) @ W^T for a K-quant W in PROMPT_KERNEL_FORMATS, any M: quant_gemv.c's prompt GEMM (each tile
    of W decoded once, x rounded to int8 per 256 values); float32 (M, out)."""
    out, k = qw.shape
    xf = x.to(torch.float32).contiguous()
    y = torch.empty(x.shape[0], out, dtype=torch.float32)
    codes = qw.codes if qw.codes.stride(-1) == 1 else qw.codes.contiguous()
    if x.shape[0] and kernel.prompt(KERNEL_FORMATS[qw.format], xf.data_ptr(), x.shape[0], k, codes.data_ptr(),
                                    codes.stride(0), y.data_ptr(), out, num_threads or torch.get_num_threads()) != 0:
        raise ValueError(f"the prompt kernel does not take a {qw.format} matrix of shape {qw.shape}")
    return y


class QuantLinear:
    """Quantized weights: ``quantizer`` (None = keep float matrices float, run by ``dense``) for float
    matrices; quantized ones (GGUF blocks) are used as they are. ``kernel``: a build of the compiled
    kernel (tierlm.model.kernels.QuantKernel), or None."""

    max_kernel_rows = 8  # decode-sized batches; above, the float path unless int8_prompts (module docstring)

    def __init__(self, quantizer: Quantizer | None, dense, kernel=None, int8_prompts: bool | None = None):
        self.quantizer = quantizer
        self.dense = dense
        self.kernel = kernel
        self.int8_prompts = int8_prompts
        self.name = (f"quant-{quantizer.name if quantizer else 'native'}+{dense.name}"
                     + (f"+{kernel.isa}" if kernel else ""))

    def prepare(self, weight: torch.Tensor | AnyQuantized) -> torch.Tensor | AnyQuantized:
        """Quantize a float matrix (with a quantizer), and, with a kernel that has row tiles, repack a
        resident matrix whose format has a row-tile kernel (tierlm.quant.tiles) into row tiles."""
        if isinstance(weight, RowTiles):
            return weight
        if isinstance(weight, FusedWeight):
            return FusedWeight(tuple(self.prepare(p) for p in weight.parts))
        if isinstance(weight, QuantizedWeight):
            return self._tile(weight)
        if self.quantizer is None:
            return self.dense.prepare(weight)
        qw = self._tile(self.quantizer.quantize(weight))
        if isinstance(qw, QuantizedWeight) and self.kernel is not None and qw.format in KERNEL_FORMATS:
            # the kernel reads codes in place (tiles are a copy already)
            qw = QuantizedWeight(qw.format, qw.shape, qw.codes.contiguous(), qw.group,
                                 qw.scales.contiguous(), qw.mins.contiguous())
        return qw

    def _tile(self, qw: QuantizedWeight) -> QuantizedWeight | RowTiles:
        if self.kernel is None or qw.codes.device.type != "cpu":
            return qw
        if self.kernel.row_tiles and qw.format in TILE_FORMATS:
            return tile_rows(qw)
        if self.kernel.kx8_tiles and qw.format in KX8_FORMATS:
            return tile_rows_kx8(qw)
        return qw

    def apply(self, x: torch.Tensor, weight: torch.Tensor | AnyQuantized, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(weight, torch.Tensor):
            return self.dense.apply(x, weight, bias)
        if isinstance(weight, FusedWeight):
            y = torch.cat([self._matmul(x, part) for part in weight.parts], dim=-1)
        else:
            y = self._matmul(x, weight)
        if bias is not None:
            y = y + bias
        return y

    def kernel_takes(self, qw: QuantizedWeight | RowTiles) -> bool:
        """Whether products of decode-sized batches (CPU) with ``qw`` run in the compiled kernel; row
        tiles are only made when it has them (``prepare``)."""
        if self.kernel is None:
            return False
        if isinstance(qw, RowTiles):
            return self.kernel.kx8_tiles if qw.rows_per_tile == KX8_ROWS else self.kernel.row_tiles
        return qw.format in KERNEL_FORMATS

    def int8_prompts_for(self, qw: QuantizedWeight | RowTiles) -> bool:
        """Whether prompt chunks multiply ``qw`` in the int8 kernel (module docstring). Decided by format,
        not layout, so that the rows a tiered matrix streams take the path of its resident tiles."""
        if self.int8_prompts is not None:
            return self.int8_prompts
        return self.kernel is not None and self.kernel.kx8_tiles and qw.format in INT8_PROMPT_TILES

    def _matmul(self, x: torch.Tensor, qw: QuantizedWeight | RowTiles) -> torch.Tensor:
        if (self.int8_prompts_for(qw) and x.shape[0] > self.max_kernel_rows and isinstance(qw, QuantizedWeight)
                and qw.format in PROMPT_KERNEL_FORMATS and x.device.type == "cpu" and self.kernel is not None):
            return prompt_matmul(self.kernel, x, qw).to(x.dtype)
        in_kernel_rows = x.shape[0] <= self.max_kernel_rows or self.int8_prompts_for(qw)
        if isinstance(qw, RowTiles):  # made elsewhere (tile_rows) if this kernel has no tiles
            if in_kernel_rows and self.kernel_takes(qw):
                return kernel_matmul(self.kernel, x, qw).to(x.dtype)
            return tiled_tiles_matmul(x, qw)
        if in_kernel_rows and x.device.type == "cpu" and self.kernel_takes(qw):
            return kernel_matmul(self.kernel, x, qw).to(x.dtype)
        return method_for(qw.format, qw.group).matmul(x, qw)


def quant_linear(quant: str, group: int, dense, device: torch.device | str,
                 int8_prompts: bool | None = None) -> QuantLinear:
    """The linear method for ``LLM(..., quant=...)``: a tierlm format name, or "gguf" (keep the file's
    blocks, which the loader delivers already quantized). ``dense`` runs whatever stays float;
    ``int8_prompts``: prompt chunks through the kernel too (True), never (False), or where that is
    faster (None; module docstring)."""
    from tierlm.model.kernels import cpu_runs_quant_build, quant_gemv
    from tierlm.quant import GGUF_NATIVE, get_quantizer

    kernel = quant_gemv() if torch.device(device).type == "cpu" else None
    if kernel is None and torch.device(device).type == "cpu" and cpu_runs_quant_build():
        # Without it decode runs through numpy dequantization, tens of times slower: say so.
        log.warning("the quantized kernel is missing or older than its source: run `make setup` "
                    "(python -m tierlm.model.kernels); decoding with the slow tiled path")
    return QuantLinear(None if quant == GGUF_NATIVE else get_quantizer(quant, group), dense, kernel, int8_prompts)
