"""``tierlm quantize``: a checkpoint's weights, quantized, written as a tierlm weight store.

It is the store ``LLM(..., quant=fmt, weight_memory=...)`` builds for itself (tierlm.memory.tiered):
every linear matrix and an untied head as packed quantized rows (``QuantizedWeight.packed_rows``:
codes, then float16 steps, then mins, per row), everything else (embeddings, norms, biases, a tied
head) as loaded in float32. The manifest's meta records the format, the group and, per quantized
matrix, its format, group and width, so ``read_quantized`` rebuilds the exact ``QuantizedWeight``.
Such a store is reused by ``LLM(model, quant=fmt, quant_group=group, weight_memory=..., store_dir=OUT)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tierlm.quant import QuantizedWeight, get_quantizer


def quantize_to_store(model: str | Path | None, out: str | Path, fmt: str, group: int = 64,
                      spec_dirs: tuple[Path, ...] = (), importance: str | Path | None = None,
                      method: str = "rtn") -> Path:
    """Quantize every linear matrix of ``model`` (HF folder or GGUF file) to ``fmt`` and write a store
    (or reuse the one already at ``out`` if it was built from the same checkpoint and settings);
    ``importance``: a file from ``tierlm imatrix`` weighting the range search (tierlm.quant.imatrix);
    ``method="gptq"``: the layer matrices by GPTQ (tierlm.quant.gptq), one layer in memory at a time."""
    from tierlm.loader.model_loader import open_checkpoint
    from tierlm.memory.tiered import StoreQuant, open_or_build_store

    get_quantizer(fmt, group)  # a bad format, group or method fails before anything is read
    quant = StoreQuant(fmt, group, None if importance is None else str(importance), method)
    opened = open_checkpoint(model, spec_dirs)
    try:
        store = open_or_build_store(opened, torch.float32, Path(out), quant)
        store.close()
        return store.path
    finally:
        opened.reader.close()


def read_quantized(store, name: str) -> QuantizedWeight:
    """Matrix ``name`` of a quantized store (a tierlm.memory.store.WeightStore)."""
    matrices = store.meta.get("matrices", {})
    if name not in matrices:
        raise KeyError(f"{name!r} is not a quantized matrix of store {store.path}")
    fmt, group, num_cols = matrices[name]
    return QuantizedWeight.from_packed_rows(store.read(name), fmt, group, num_cols)
