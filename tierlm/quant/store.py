"""``tierlm quantize``: a checkpoint's weights, quantized, written as a tierlm weight store.

The store (tierlm.memory.store) holds plain tensors, so a quantized matrix ``M`` is three of them:
``M.codes`` (uint8, packed), ``M.scales`` and ``M.mins`` (float16, per group); everything else
(embeddings, norms, biases, a tied head) is stored as loaded, in float32 (or ``dtype``). Names follow
the tiered loader: ``embed``, ``layers.{i}.qkv``, ... . The manifest's meta records the format, the
group and which matrices are quantized, so ``read_quantized`` rebuilds the exact ``QuantizedWeight``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from tierlm.memory.plan import MATRICES
from tierlm.memory.tiered import store_tensors
from tierlm.quant import QuantizedWeight, get_quantizer

STORE_FORMAT = "tierlm-quantized-1"


def _tensors(opened, quantizer, dtype: torch.dtype, quantized: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The tiered store's tensors (one layer in memory at a time), with every linear matrix and an
    untied head replaced by its codes/scales/mins."""
    for name, t in store_tensors(opened, dtype):
        if name != "lm_head" and not (name.startswith("layers.") and name.rsplit(".", 1)[-1] in MATRICES):
            yield name, t
            continue
        qw = quantizer.quantize(t)
        quantized.append(name)
        yield f"{name}.codes", qw.codes
        yield f"{name}.scales", qw.scales
        yield f"{name}.mins", qw.mins


def quantize_to_store(model: str | Path | None, out: str | Path, fmt: str, group: int = 64,
                      spec_dirs: tuple[Path, ...] = ()) -> Path:
    """Quantize every linear matrix of ``model`` (HF folder or GGUF file) to ``fmt`` and write a store."""
    from tierlm.loader.model_loader import open_checkpoint
    from tierlm.memory.store import write_store

    quantizer = get_quantizer(fmt, group)  # a bad format or group fails before anything is read
    opened = open_checkpoint(model, spec_dirs)
    quantized: list[str] = []
    try:
        # The meta dict is written after the tensors, so the list filled while writing is complete.
        meta = {"format": STORE_FORMAT, "quant": fmt, "group": group, "family": opened.family.name,
                "num_layers": opened.config.num_layers, "quantized": quantized, **opened.fingerprint()}
        return write_store(out, _tensors(opened, quantizer, torch.float32, quantized), meta)
    finally:
        opened.reader.close()


def read_quantized(store, name: str) -> QuantizedWeight:
    """Matrix ``name`` of a store written by ``quantize_to_store`` (a tierlm.memory.store.WeightStore)."""
    meta = store.meta
    if meta.get("format") != STORE_FORMAT or name not in meta["quantized"]:
        raise KeyError(f"{name!r} is not a quantized matrix of store {store.path}")
    codes = store.read(f"{name}.codes")
    scales, mins = store.read(f"{name}.scales"), store.read(f"{name}.mins")
    quantizer = get_quantizer(meta["quant"], meta["group"])
    num_cols = scales.shape[1] * meta["group"]
    return QuantizedWeight(quantizer.name, (codes.shape[0], num_cols), codes, meta["group"], scales, mins)
