"""A model whose weights are partly resident and partly streamed: store + plan + streamer, bound
to the forward pass.

The transformer sees ordinary ``LayerWeights`` whose four matrices are ``SplitMatrix`` objects,
multiplied by ``TieredLinear``. A SplitMatrix is a list of row ranges, each either a resident
tensor or a segment of a streamed unit; the product is computed part by part into one output:

    W (out, in)          y = x @ W.T  (N, out)
    rows [0, r)   RAM    y[:, :r] = x @ W[:r].T     (prepared once, e.g. oneDNN-packed)
    rows [r, out) ring   y[:, r:] = x @ W[r:].T     (plain rows straight from the slot)

Each output element is the same dot product as in the resident model, so with a kernel that
computes outputs independently (tierlm's bf16 kernel, F.linear in fp32) results match the fully
resident model.

Quantized weights (``quant=``) tier the same way: the store holds each quantized matrix as uint8
rows that carry their own codes and group parameters (``QuantizedWeight.packed_rows``), so the plan
splits and the streamer reads them by rows like float rows, only fewer bytes; a resident range or a
ring slot is wrapped back into a ``QuantizedWeight`` view and multiplied by the quantized method.
GGUF blocks (``quant="gguf"``) are such rows already. A matrix stacked from parts of different GGUF
types (a FusedWeight: Gemma-3's Q5_0 q and k with a Q8_0 v) is stored and planned as its parts; its
SplitMatrix lists each part's resident and streamed rows, every range wrapped in its own format.
A GGUF embedding table stays as blocks too: lookups dequantize the rows asked for, and a tied head
multiplies the blocks through the quantized method.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tierlm.loader.weights import LAYER_FIELDS, LayerWeights, ModelWeights
from tierlm.memory.device import DeviceStage, copy_engine_for
from tierlm.memory.plan import MATRICES, ModelLayout, TensorInfo, TierPlan
from tierlm.memory.prefetch import StreamedUnit, Streamer
from tierlm.memory.store import WeightStore, aligned_buffer
from tierlm.model.linear import DenseLinear, LinearMethod, StreamingLinear
from tierlm.model.transformer import embedding_rows, quantized_head_note
from tierlm.quant import AnyQuantized, FusedWeight, QuantizedWeight
from tierlm.quant.linear import QuantLinear

log = logging.getLogger("tierlm")


def model_layout(store: WeightStore, num_layers: int) -> ModelLayout:
    def info(name: str) -> TensorInfo:
        e = store.tensors[name]
        return TensorInfo(name, e.num_rows, e.row_bytes)

    # a matrix stored as parts (WeightStore.parts) is planned as its parts, each split by rows on its own
    layers = tuple(tuple(info(p) for m in MATRICES for p in store.parts(f"layers.{i}.{m}")) for i in range(num_layers))
    tied = "lm_head" not in store.tensors
    head = info("embed" if tied else "lm_head")
    matrices = {t.name for layer in layers for t in layer} | {head.name}
    embed_bytes = 0 if tied else store.tensors["embed"].nbytes
    small = sum(e.nbytes for n, e in store.tensors.items() if n not in matrices and n != "embed")
    return ModelLayout(layers, head, small, embed_bytes)


# -- split matrices and their product ------------------------------------------------------------

@dataclass
class _Part:
    row_start: int
    row_end: int
    resident: torch.Tensor | QuantizedWeight | None  # prepared by the inner method
    streamed: Callable[[], torch.Tensor | QuantizedWeight] | None  # rows in a ring slot, valid while acquired
    head_unit: int | None = None  # LM-head pieces acquire their own unit
    wrap: Callable[[torch.Tensor], torch.Tensor | QuantizedWeight] | None = None  # a head slot's rows -> weight


class SplitMatrix:
    """An (out, in) matrix held as row ranges, some resident and some streamed (see module doc)."""

    def __init__(self, shape: tuple[int, int], parts: list[_Part]):
        self.shape = shape
        self.parts = parts

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


class TieredLinear:
    """Wraps the machine's LinearMethod: resident parts go through it (prepared once), streamed
    parts through ``raw``, a method that takes plain (rows, in) tensors."""

    name = "tiered"

    def __init__(self, inner: LinearMethod, tiers: TieredWeights):
        self.inner = inner
        # QuantLinear multiplies QuantizedWeight views as they are, whatever backs them.
        plain = (StreamingLinear, DenseLinear, QuantLinear)
        self.raw: LinearMethod = inner if isinstance(inner, plain) else DenseLinear()
        self.tiers = tiers

    def prepare(self, weight):
        return weight if isinstance(weight, SplitMatrix) else self.inner.prepare(weight)

    def apply(self, x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
        if not isinstance(weight, SplitMatrix):
            return self.inner.apply(x, weight, bias)
        out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)  # (N, out)
        for part in weight.parts:
            if part.resident is not None:
                out[:, part.row_start:part.row_end] = self.inner.apply(x, part.resident, None)
                continue
            if part.head_unit is not None:
                unit = self.tiers.streamer.acquire("head", part.head_unit)
                try:
                    out[:, part.row_start:part.row_end] = self.raw.apply(x, part.wrap(unit.segment(0)), None)
                finally:
                    self.tiers.streamer.release()
            else:
                out[:, part.row_start:part.row_end] = self.raw.apply(x, part.streamed(), None)
        if bias is not None:
            out += bias
        return out


# -- the tiered weights --------------------------------------------------------------------------

class TieredWeights:
    """Resident tensors loaded from the store per ``plan``, the streamer for the rest, and the
    ``LayerWeights`` the transformer uses. ``acquire_layer(i)`` / ``release_layer(i)`` bracket
    layer i's compute."""

    def __init__(self, store: WeightStore, plan: TierPlan, num_layers: int, *, num_io_threads: int = 4,
                 device: torch.device | str = "cpu", host_plan: TierPlan | None = None):
        """``plan`` says which rows stay where compute runs: RAM, or with ``host_plan`` (the RAM/disk
        plan under it; tierlm.memory.plan.device_plan) device memory, the rest staged by a
        ``DeviceStage`` from RAM and disk."""
        self.store = store
        self.plan = plan
        self.host_plan = host_plan
        self.device = torch.device(device)
        self.streamer: Streamer | DeviceStage | None = None
        if host_plan is None:
            self.streamer = Streamer(store, plan, num_io_threads) if plan.streams else None
        elif plan.streams:
            host = Streamer(store, host_plan, num_io_threads) if host_plan.streams else None
            self.streamer = DeviceStage(store, host_plan, plan, host, self.device, copy_engine_for(self.device))
        self._current: StreamedUnit | None = None
        self._layer_units = {u.index: u for u in plan.units if u.kind == "layer"}
        bounce = aligned_buffer(16 << 20)
        # name -> [format, group, num_cols] of matrices stored as packed quantized rows
        self._quantized: dict[str, list] = store.meta.get("matrices", {})
        resident: dict[str, list[tuple[int, int, torch.Tensor]]] = {}
        # Read each matrix once (checking its checksum) and keep its resident row ranges.
        ranges: dict[str, list[tuple[int, int]]] = {}
        for u in plan.units:
            for s in u.segments:
                ranges.setdefault(s.tensor.name, []).append((s.row_start, s.resident_end))
        for name, rs in ranges.items():
            if sum(b - a for a, b in rs) == store.tensors[name].num_rows:
                resident[name] = [(0, store.tensors[name].num_rows, store.read(name, bounce=bounce))]
            else:
                resident[name] = [(a, b, t) for (a, b), t in zip(rs, store.read_rows(name, rs, bounce=bounce))]
        self._resident = {name: [(a, b, self._wrap(name, t.to(self.device))) for a, b, t in rs]
                          for name, rs in resident.items()}

        def small(name: str) -> torch.Tensor | None:
            return store.read(name, bounce=bounce).to(self.device) if name in store.tensors else None

        self.tied = "lm_head" not in store.tensors
        # The embedding table is looked up where it is: on the device when it is the (tied) head and
        # all of it is there, else in RAM when the RAM plan keeps it, else row by row from the store.
        # A quantized table (a GGUF file's blocks) is looked up as blocks, whose rows are dequantized.
        self.embed: torch.Tensor | QuantizedWeight | None = None
        if self.tied and self._fully_resident("embed"):
            self.embed = self._resident["embed"][0][2]
        elif (plan if host_plan is None else host_plan).embed_resident and not self.tied:
            self.embed = self._wrap("embed", store.read("embed", bounce=bounce))
        self.weights = ModelWeights(
            embed=torch.empty(0), final_norm=small("final_norm"), final_norm_bias=small("final_norm_bias"),
            lm_head=self._head_matrix(), lm_head_bias=small("lm_head_bias"), pos_embed=small("pos_embed"))
        for i in range(num_layers):
            kw = {}
            for name in LAYER_FIELDS:
                key = f"layers.{i}.{name}"
                if name in MATRICES:
                    kw[name] = self._layer_matrix(i, key)
                else:
                    kw[name] = small(key)
            self.weights.layers.append(LayerWeights(**kw))

    def _wrap(self, name: str, rows: torch.Tensor) -> torch.Tensor | QuantizedWeight:
        """Rows of matrix ``name`` as read from the store (or a ring slot) -> the weight to multiply."""
        if name not in self._quantized:
            return rows
        fmt, group, num_cols = self._quantized[name]
        return QuantizedWeight.from_packed_rows(rows, fmt, group, num_cols)

    def _shape(self, name: str) -> tuple[int, int]:
        e = self.store.tensors[name]
        if name in self._quantized:
            return (e.num_rows, self._quantized[name][2])
        return (e.num_rows, e.row_bytes // e.dtype.itemsize)

    def _fully_resident(self, name: str) -> bool:
        num_rows = self.store.tensors[name].num_rows
        return sum(b - a for a, b, _ in self._resident.get(name, [])) == num_rows

    def _layer_matrix(self, layer: int, name: str) -> SplitMatrix | torch.Tensor | AnyQuantized:
        """Matrix ``name`` of ``layer``: as a resident weight when all its rows are (the transformer
        prepares it like any weight; a matrix stored as parts is their FusedWeight), else a SplitMatrix
        of each stored part's resident rows and streamed rows, at the part's offset in the matrix."""
        unit = self._layer_units[layer]
        seg_index = {s.tensor.name: k for k, s in enumerate(unit.segments)}
        stored = self.store.parts(name)
        if all(self._fully_resident(p) for p in stored):
            whole = [self._resident[p][0][2] for p in stored]
            return whole[0] if len(whole) == 1 else FusedWeight(tuple(whole))
        parts = []
        offset = 0  # the part's first row in the matrix
        for p in stored:
            k = seg_index[p]
            seg = unit.segments[k]
            (_, r, res), = self._resident[p]
            if r > 0:
                parts.append(_Part(offset, offset + r, res, None))
            if seg.row_end > r:
                parts.append(_Part(offset + seg.resident_end, offset + seg.row_end, None,
                                   lambda p=p, k=k: self._wrap(p, self._current.segment(k))))
            offset += seg.row_end
        return SplitMatrix((offset, self._shape(stored[0])[1]), parts)

    def _head_matrix(self) -> SplitMatrix | torch.Tensor:
        name = "embed" if self.tied else "lm_head"
        if self._fully_resident(name):
            return self._resident[name][0][2]
        parts = []
        heads = [u for u in self.plan.units if u.kind == "head"]
        for u, (a, r, t) in zip(heads, self._resident[name]):
            seg = u.segments[0]
            if r > a:
                parts.append(_Part(a, r, t, None))
            if seg.row_end > r:
                parts.append(_Part(r, seg.row_end, None, None, head_unit=u.index,
                                   wrap=lambda rows, name=name: self._wrap(name, rows)))
        return SplitMatrix(self._shape(name), parts)

    def prepare(self, linear: LinearMethod) -> None:
        """Prepare the resident parts for the machine's method (e.g. oneDNN packing), once. A
        tied head is the embedding table and stays plain."""
        holders = [(lw, m) for lw in self.weights.layers for m in MATRICES]
        if not self.tied:
            holders.append((self.weights, "lm_head"))
        for holder, m in holders:
            w = getattr(holder, m)
            if isinstance(w, SplitMatrix):
                for p in w.parts:
                    if p.resident is not None:
                        p.resident = linear.prepare(p.resident)
            else:
                setattr(holder, m, linear.prepare(w))

    def bind(self, inner: LinearMethod, device: torch.device | str) -> tuple[TieredLinear, TieredLinear]:
        """Prepare the resident parts for ``inner`` and return the methods that multiply this model's
        (layer matrices, head) for a Transformer running on ``device``. A tied head is the embedding
        table and stays as stored: plain float rows (DenseLinear), or a GGUF file's blocks, which
        ``inner`` (the quantized method) multiplies as they are."""
        if torch.device(device) != self.device:
            raise ValueError(f"tiered weights were loaded for {self.device}, the model runs on {device}")
        self.prepare(inner)
        plain_head = self.tied and "embed" not in self._quantized
        if self.tied and not plain_head:
            e = self.store.tensors["embed"]
            log.info("%s", quantized_head_note(self._resident["embed"][0][2], self._shape("embed"), e.nbytes, inner))
        return TieredLinear(inner, self), TieredLinear(DenseLinear() if plain_head else inner, self)

    # -- used by the forward pass ------------------------------------------------------------------
    def acquire_layer(self, i: int) -> LayerWeights:
        if self.streamer is not None and self.streamer.is_streamed("layer", i):
            self._current = self.streamer.acquire("layer", i)
        return self.weights.layers[i]

    def release_layer(self, i: int) -> None:
        if self._current is not None:
            self._current = None
            self.streamer.release()

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (N,) -> rows (N, hidden): from RAM when the table is resident, else read from the
        store (a step needs N rows, a few KiB each); a quantized table's rows dequantized."""
        if self.embed is not None:
            return embedding_rows(self.embed, ids).to(self.device)
        uniq, inverse = torch.unique(ids.cpu(), return_inverse=True)
        rows = self._wrap("embed", self.store.read_row_set("embed", uniq.tolist()))  # (U, hidden)
        return embedding_rows(rows, inverse).to(self.device)

    def close(self) -> None:
        if self.streamer is not None:
            self.streamer.close()
        self.store.close()


@dataclass(frozen=True)
class TierSettings:
    """What the user asked for (see LLM's weight_memory, prefetch_window, ...)."""

    weight_memory: str | int
    window: int = 3
    locking: str = "balanced"
    order: str = "auto"
    num_io_threads: int = 4
    device: str = "cpu"  # where the model computes
    device_memory: str | int | None = None  # weight bytes kept on the device (a part of weight_memory)


def load_tiered(store: WeightStore, num_layers: int, settings: TierSettings) -> TieredWeights:
    """Plan for the budget, load the resident part of ``store`` (tierlm.quant.store builds it), start
    the streamer; logs the plan with the speed it predicts from bandwidths measured now."""
    from tierlm.memory.hardware import (
        available_memory_bytes,
        disk_read_bandwidth,
        memory_read_bandwidth,
    )
    from tierlm.memory.plan import PlanError, device_plan, fmt_bytes, make_plan, parse_budget

    layout = model_layout(store, num_layers)
    budget = parse_budget(settings.weight_memory, layout.total_bytes)
    plan = make_plan(layout, budget, window=settings.window, locking=settings.locking, order=settings.order)
    log.info("%s", plan.describe())
    on_device = None
    need = plan.resident_bytes + plan.ring_bytes
    if settings.device_memory is not None:
        device_bytes = parse_budget(settings.device_memory, layout.total_bytes)
        if device_bytes > budget:
            raise PlanError(f"device_memory={settings.device_memory!r} ({fmt_bytes(device_bytes)}) is more than "
                            f"weight_memory={settings.weight_memory!r} ({fmt_bytes(budget)}): the device holds "
                            f"a part of the weights kept off disk")
        # One unit copied ahead is enough to overlap: the copies share one link, one after another.
        on_device = device_plan(plan, device_bytes, window=min(settings.window, 1))
        log.info("device %s: %s", settings.device, on_device.describe())
        need -= sum(u.resident_bytes for u in on_device.units)  # those rows leave RAM for the device
        _check_device_memory(torch.device(settings.device), on_device)
    avail = available_memory_bytes()
    if avail is not None and need > avail:
        raise PlanError(f"weight_memory={settings.weight_memory!r} needs {fmt_bytes(need)} of RAM (resident weights "
                        f"+ a streaming ring of {fmt_bytes(plan.ring_bytes)}), but only {fmt_bytes(avail)} is "
                        f"available: lower weight_memory or prefetch_window")
    if plan.streams:
        mem_bw = memory_read_bandwidth()
        disk_bw = disk_read_bandwidth(store, num_threads=settings.num_io_threads)
        log.info("  measured now: memory %.1f GB/s, disk %.2f GB/s -> predicted %.2f forward passes/s "
                 "(limit min(mem/resident, disk/streamed) = %.2f)", mem_bw / 1e9, disk_bw / 1e9,
                 plan.predicted_tokens_per_pass_s(mem_bw, disk_bw), plan.issue_limit_tokens_s(mem_bw, disk_bw))
    if on_device is not None:
        return TieredWeights(store, on_device, num_layers, num_io_threads=settings.num_io_threads,
                             device=settings.device, host_plan=plan)
    return TieredWeights(store, plan, num_layers, num_io_threads=settings.num_io_threads)


def _check_device_memory(device: torch.device, plan: TierPlan) -> None:
    """A device plan must fit the device's free memory (weights + its ring), checked before loading."""
    from tierlm.memory.plan import PlanError, fmt_bytes

    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    need = sum(u.resident_bytes for u in plan.units) + plan.always_resident_bytes + plan.ring_bytes
    if need > free:
        raise PlanError(f"device_memory needs {fmt_bytes(need)} on {device} (weights + a ring of "
                        f"{fmt_bytes(plan.ring_bytes)}), but only {fmt_bytes(free)} is free: lower device_memory")
