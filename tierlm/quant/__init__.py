"""Quantized weights: one protocol (tierlm.quant.base), one module per format.

Formats tierlm produces from float weights (``LLM(..., quant="q4")``), group-wise along the input
dimension, ``group`` weights per float16 step and min (default 64):

    name  levels  bits/weight (group 64, with step and min)   module
    q8    256     8.5                                          groupwise
    q6    64      6.5                                          groupwise
    q5    32      5.5                                          groupwise
    q4    16      4.5                                          groupwise
    q3h   11      4.0  (3.5 for the codes)                     q3h
    q3    8       3.5                                          groupwise
    q2    4       2.5                                          groupwise

``quant="gguf"`` keeps a GGUF file's own blocks (tierlm.quant.gguf) instead.
"""

from __future__ import annotations

import functools

from tierlm.config import FORMATS, GGUF_NATIVE, KV_FORMATS, METHODS  # the names, torch-free for the CLI
from tierlm.quant.base import (
    AnyQuantized,
    FusedWeight,
    QuantError,
    QuantizedWeight,
    Quantizer,
    QuantMethod,
    check_group,
)
from tierlm.quant.gguf import GGUFFormat
from tierlm.quant.groupwise import GroupwiseFormat
from tierlm.quant.q3h import Q3HFormat

__all__ = [
    "FORMATS",
    "GGUF_NATIVE",
    "KV_FORMATS",
    "METHODS",
    "AnyQuantized",
    "FusedWeight",
    "QuantError",
    "QuantMethod",
    "QuantizedWeight",
    "Quantizer",
    "check_method",
    "get_quantizer",
    "method_for",
]


def get_quantizer(name: str, group: int = 64, search: bool | None = None) -> Quantizer:
    """The format called ``name`` (one of FORMATS) with ``group`` weights per group. ``search``: the
    per-group range search (tierlm.quant.base); by default on below 8 bits, off for q8."""
    check_group(group)
    if name == "q3h":
        return Q3HFormat(group, True if search is None else search)
    if name in FORMATS:
        return GroupwiseFormat(int(name[1:]), group, search)
    raise QuantError(f"unknown quantization format {name!r}; choose one of {', '.join(FORMATS)}")


def check_method(method: str, quant: str | None, has_importance: bool) -> None:
    """The one check of a quantization method against the format and an importance file, for the
    API (resident or tiered) and for stores: QuantError naming what does not fit."""
    if method not in METHODS:
        raise QuantError(f"quant_method must be 'rtn' or 'gptq', got {method!r}")
    if method == "gptq" and (quant is None or quant == GGUF_NATIVE or has_importance):
        raise QuantError("quant_method='gptq' calibrates the float model and quantizes it to a tierlm format "
                         "(quant='q4', ...), computing its own importance: it takes neither gguf nor an "
                         "importance file")


@functools.cache
def method_for(fmt: str, group: int) -> QuantMethod:
    """The method that executes a weight of format ``fmt`` (``QuantizedWeight.format``, ``.group``)."""
    if fmt.startswith("gguf:"):
        return GGUFFormat(fmt[5:])
    return get_quantizer(fmt, group)
