"""Weight stores built from a checkpoint: float, quantized to a tierlm format, or a GGUF file's blocks.

A store (tierlm.memory.store) is what tiered weights stream from, and what ``tierlm quantize``
writes. Every linear matrix and an untied head of a quantized store are packed quantized rows
(``QuantizedWeight.packed_rows``: codes, then float16 steps, then mins, per row); everything else
(embeddings, norms, biases, a tied head) is as loaded, in the store's dtype, except that a GGUF
file's embedding table (and so a tied head) keeps its blocks, and a matrix stacked from parts of
different GGUF types (``FusedWeight``) is stored as its parts (``WeightStore.parts``). The manifest's meta
records the source checkpoint, the dtype, the format and group and, per quantized matrix, its
format, group and width, so ``read_quantized`` rebuilds the exact ``QuantizedWeight`` and a store
built from other settings is noticed and rebuilt (``open_or_build_store``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tierlm.cache_dir import cache_root
from tierlm.loader.model_loader import OpenedCheckpoint
from tierlm.loader.weights import LAYER_FIELDS, LayerWeights, ModelWeights, store_tensors
from tierlm.memory.plan import MATRICES
from tierlm.memory.store import StoreError, WeightStore, parts_name, write_store
from tierlm.model.linear import DenseLinear
from tierlm.quant import GGUF_NATIVE, AnyQuantized, FusedWeight, QuantizedWeight, check_method, get_quantizer
from tierlm.quant.imatrix import file_digest, importance_for, load_importance
from tierlm.quant.linear import QuantLinear

log = logging.getLogger("tierlm")

STORE_FORMAT = "dense-v1"
QUANT_STORE_FORMAT = "rows-v1"  # matrices as packed quantized rows (module docstring)
GGUF_STORE_LAYOUT = "blocks-v2"  # a GGUF file's blocks: embedding table included, mixed formats as parts


@dataclass(frozen=True)
class StoreQuant:
    """How a store's matrices are held: ``quant`` a tierlm format name (quantized while the store is
    built) or "gguf" (a GGUF file's own blocks), ``group`` its group size."""

    quant: str
    group: int = 64
    importance: str | None = None  # an importance file weighting the range search (tierlm.quant.imatrix)
    method: str = "rtn"  # "gptq": layer matrices by GPTQ, calibrated while the store is built (tierlm.quant.gptq)

    def __post_init__(self):
        check_method(self.method, self.quant, self.importance is not None)

    @property
    def tag(self) -> str:
        if self.quant == GGUF_NATIVE:
            return self.quant
        return (f"{self.quant}g{self.group}" + ("" if self.importance is None else f"-im{file_digest(self.importance)}")
                + ("-gptq" if self.method == "gptq" else ""))


def default_store_dir(opened: OpenedCheckpoint, dtype: torch.dtype, quant: StoreQuant | None = None) -> Path:
    """``$TIERLM_CACHE`` (default ~/.cache/tierlm) / stores / <model>-<hash of its path>-<dtype>[-<quant>]."""
    root = cache_root()
    key = hashlib.sha1(str(opened.path.resolve()).encode()).hexdigest()[:10]
    name = opened.path.stem if opened.path.is_file() else opened.path.name
    suffix = "" if quant is None else f"-{quant.tag}"
    return root / "stores" / f"{name}-{key}-{str(dtype).replace('torch.', '')}{suffix}"


def _store_meta(opened: OpenedCheckpoint, dtype: torch.dtype, quant: StoreQuant | None = None) -> dict:
    meta = {"format": STORE_FORMAT, "dtype": str(dtype).replace("torch.", ""), "family": opened.family.name,
            "num_layers": opened.config.num_layers, **opened.fingerprint()}
    if quant is not None:
        meta.update(format=QUANT_STORE_FORMAT, quant=quant.quant, group=quant.group)
        if quant.quant == GGUF_NATIVE:
            # the embedding table as blocks and mixed-format matrices as parts; stores built before
            # held a float32 table and had no parts, and are rebuilt
            meta["layout"] = GGUF_STORE_LAYOUT
        if quant.importance is not None:
            meta["importance"] = file_digest(quant.importance)
        if quant.method != "rtn":
            meta["method"] = quant.method
        if quant.method == "gptq":  # another calibration text or setting makes other codes: another store
            from tierlm.quant.gptq import calibration_meta

            meta["calibration"] = calibration_meta(opened.config.max_position)
    return meta


def _quantized_store_tensors(opened: OpenedCheckpoint, dtype: torch.dtype, quant: StoreQuant,
                             matrices: dict[str, list]) -> Iterator[tuple[str, torch.Tensor]]:
    """``store_tensors`` with every linear matrix and an untied head as packed quantized rows;
    ``matrices`` is filled with name -> [format, group, num_cols] for the manifest."""
    native = quant.quant == GGUF_NATIVE
    quantizer = None if native else get_quantizer(quant.quant, quant.group)
    importance = None if quant.importance is None else load_importance(quant.importance, opened.path)
    if quant.method == "gptq":  # matrices come quantized; calibrated on Brown text (tierlm.quant.imatrix)
        from tierlm.quant.gptq import gptq_store_tensors
        from tierlm.quant.imatrix import calibration_sequences

        ctx = min(512, opened.config.max_position)
        tensors = gptq_store_tensors(opened, dtype, QuantLinear(quantizer, DenseLinear()),
                                     calibration_sequences(opened.tokenizer, ctx=ctx))
    else:
        tensors = store_tensors(opened, dtype, native_quant=native)
    for name, t in tensors:
        is_matrix = name == "lm_head" or (name.startswith("layers.") and name.rsplit(".", 1)[-1] in MATRICES)
        if is_matrix and quantizer is not None and isinstance(t, torch.Tensor):  # (GPTQ's come quantized)
            t = quantizer.quantize(t, None if name == "lm_head" else importance_for(importance, name, t.shape[1]))
        # A matrix stacked from parts of different formats is stored as its parts, each streamed by rows
        # on its own (WeightStore.parts); a GGUF embedding table comes as blocks (native_quant).
        parts = list(t.parts) if isinstance(t, FusedWeight) else [t]
        for k, part in enumerate(parts):
            part_name = name if len(parts) == 1 else parts_name(name, k)
            if isinstance(part, QuantizedWeight):
                matrices[part_name] = [part.format, part.group, part.shape[1]]
                part = part.packed_rows()
            yield part_name, part


def open_or_build_store(opened: OpenedCheckpoint, dtype: torch.dtype, store_dir: Path | None = None,
                        quant: StoreQuant | None = None) -> WeightStore:
    """The store for this checkpoint, dtype and quantization: reused when its manifest matches,
    (re)built otherwise, with a log line saying which and why."""
    folder = Path(store_dir) if store_dir is not None else default_store_dir(opened, dtype, quant)
    meta = _store_meta(opened, dtype, quant)
    reason = "none exists"
    if (folder / "manifest.json").exists():
        try:
            store = WeightStore(folder)
            if {k: v for k, v in store.meta.items() if k != "matrices"} == meta:
                log.info("reusing the weight store %s", folder)
                return store
            store.close()
            reason = "it was built from a different checkpoint or dtype"
        except StoreError as e:
            reason = str(e)
    log.warning("building the weight store %s (%s)", folder, reason)
    t0 = time.perf_counter()
    if quant is None:
        tensors, desc = store_tensors(opened, dtype), "weight store"
    else:
        # write_store writes the manifest after the last tensor, so ``matrices`` is complete by then.
        meta["matrices"] = {}
        tensors = _quantized_store_tensors(opened, dtype, quant, meta["matrices"])
        desc = "weight store (GGUF blocks)" if quant.quant == GGUF_NATIVE else f"{quant.quant} by {quant.method}"
    write_store(folder, _layer_progress(tensors, opened.config.num_layers, desc), meta)
    log.info("weight store written in %.1f s", time.perf_counter() - t0)
    return WeightStore(folder)


def _layer_progress(tensors: Iterator[tuple[str, torch.Tensor]], num_layers: int,
                    desc: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``tensors`` unchanged, with a bar (tierlm.progress) of the layers reached: layer i counts when
    its first tensor arrives, which for GPTQ is once the whole layer is calibrated and quantized."""
    from tierlm.progress import progress_bar

    with progress_bar(num_layers, desc, "layer") as bar:
        for name, t in tensors:
            if name.startswith("layers."):
                reached = int(name.split(".", 2)[1]) + 1
                if reached > bar.n:
                    bar.update(reached - bar.n)
            yield name, t


def quantize_to_store(model: str | Path | None, out: str | Path, fmt: str, group: int = 64,
                      spec_dirs: tuple[Path, ...] = (), importance: str | Path | None = None,
                      method: str = "auto") -> Path:
    """Quantize every linear matrix of ``model`` (HF folder or GGUF file) to ``fmt`` and write a store
    (or reuse the one already at ``out`` if it was built from the same checkpoint and settings);
    ``importance``: a file from ``tierlm imatrix`` weighting the range search (tierlm.quant.imatrix);
    ``method="gptq"``: the layer matrices by GPTQ (tierlm.quant.gptq), one layer in memory at a time."""
    from tierlm.loader.model_loader import open_checkpoint

    get_quantizer(fmt, group)  # a bad format, group or method fails before anything is read
    opened = open_checkpoint(model, spec_dirs)
    try:
        if method == "auto":
            from tierlm.quant.methods import default_method

            method, why = default_method(fmt, opened.config, opened.tokenizer is not None, importance is not None)
            log.info("method %s: %s", method, why)
        quant = StoreQuant(fmt, group, None if importance is None else str(importance), method)
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


def resident_weights(store: WeightStore) -> ModelWeights:
    """Every tensor of ``store`` in memory, as the ModelWeights a resident model is built from (quantized
    matrices as QuantizedWeight, a matrix stored as parts as their FusedWeight), then the store is closed.
    A tied head is the embedding table (quantized too where the store holds it so)."""
    from tierlm.memory.store import aligned_buffer

    bounce = aligned_buffer(16 << 20)
    matrices = store.meta.get("matrices", {})

    def read(name: str) -> torch.Tensor | QuantizedWeight:
        rows = store.read(name, bounce=bounce)
        if name not in matrices:
            return rows
        fmt, group, num_cols = matrices[name]
        return QuantizedWeight.from_packed_rows(rows, fmt, group, num_cols)

    def get(name: str) -> torch.Tensor | AnyQuantized | None:
        if name not in store.tensors and parts_name(name, 0) not in store.tensors:
            return None
        parts = [read(part) for part in store.parts(name)]  # a matrix stored as parts is their FusedWeight
        return parts[0] if len(parts) == 1 else FusedWeight(tuple(parts))

    try:
        embed = get("embed")
        lm_head = get("lm_head")
        weights = ModelWeights(embed=embed, final_norm=get("final_norm"),
                               lm_head=embed if lm_head is None else lm_head, pos_embed=get("pos_embed"),
                               final_norm_bias=get("final_norm_bias"), lm_head_bias=get("lm_head_bias"))
        for i in range(store.meta["num_layers"]):
            weights.layers.append(LayerWeights(**{f: get(f"layers.{i}.{f}") for f in LAYER_FIELDS}))
    finally:
        store.close()
    return weights
