"""Which weight bytes stay resident under a memory budget, and which stream from disk (FlexInfer).

The model is cut into *units* that the forward pass uses in a fixed cyclic order: one unit per
decoder layer (its qkv, o, up, down matrices) and the LM head cut into row pieces no larger than a
layer (so one ring slot size fits every unit). Small tensors (norms, biases, learned positions) are
always resident; an untied embedding table is resident only when the whole model is (otherwise
its rows are read on demand: a step needs a few rows, not the table).

*Balanced memory locking*: every unit keeps the same fraction of its bytes resident, so every unit
streams the same amount and the disk is busy at an even rate through the whole pass; locking
whole layers instead (``locking="whole_layer"``) leaves some layers with nothing to read and
others with everything, and the pass stalls on the latter.

*Flexible tensor preservation* (FlexInfer Algorithm 1) decides which tensors of a layer hold its
resident share: FFN tensors first when the share holds at least one FFN tensor of the layer,
attention tensors first when it does not; whole tensors in that order while they fit, and the rest
of the share spread evenly (the same fraction of rows) over the remaining tensors. A tensor is
split by rows: rows [0, r) resident, [r, rows) streamed.

The budget is the bytes of matrices (and of an untied embedding table) kept resident. Two things
come on top, both printed with the plan: the always-resident small tensors (norms, biases), and
the streaming ring of (window + 1) slots (one being computed on, ``window`` being prefetched),
each the size of the largest unit's streamed part. So peak RSS = budget + ring + small tensors +
KV cache + the runtime (Python, torch: ~250 MB). Keeping the ring out of the budget makes the
ablations comparable: every variant keeps the same bytes resident and differs only in how it
streams the rest. Row counts are rounded down, so resident bytes never exceed the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tierlm.memory.align import align_up

ATTENTION = ("qkv", "o")
FFN = ("up", "down")
MATRICES = ATTENTION + FFN  # forward order within a layer

ORDERS = ("auto", "ffn_first", "attn_first")
LOCKINGS = ("balanced", "whole_layer")


def layer_matrix(name: str) -> str:
    """Which of MATRICES a layer tensor's store name holds: "layers.3.up" and the parts of a matrix
    stored as parts, "layers.3.qkv.0", "layers.3.qkv.1", ... -> "up", "qkv"."""
    return name.split(".")[2]


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


class PlanError(ValueError):
    """A budget that cannot run the model; the message gives the smallest one that can."""


@dataclass(frozen=True)
class TensorInfo:
    """One streamable matrix as the planner sees it. row_bytes * num_rows = its bytes."""

    name: str  # store name, e.g. "layers.3.up"
    num_rows: int
    row_bytes: int

    @property
    def nbytes(self) -> int:
        return self.num_rows * self.row_bytes


@dataclass(frozen=True)
class Segment:
    """Rows [row_start, row_end) of a tensor, part of one unit; rows [row_start, resident_end)
    are resident and [resident_end, row_end) stream. Invariant: row_start <= resident_end <= row_end."""

    tensor: TensorInfo
    row_start: int
    row_end: int
    resident_end: int

    @property
    def resident_bytes(self) -> int:
        return (self.resident_end - self.row_start) * self.tensor.row_bytes

    @property
    def streamed_bytes(self) -> int:
        return (self.row_end - self.resident_end) * self.tensor.row_bytes

    @property
    def nbytes(self) -> int:
        return (self.row_end - self.row_start) * self.tensor.row_bytes


@dataclass(frozen=True)
class Unit:
    """What the forward pass needs at one point: a layer ("layer", i) or a head piece ("head", k)."""

    kind: str
    index: int
    segments: tuple[Segment, ...]

    @property
    def resident_bytes(self) -> int:
        return sum(s.resident_bytes for s in self.segments)

    @property
    def streamed_bytes(self) -> int:
        return sum(s.streamed_bytes for s in self.segments)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments)

    @property
    def ring_bytes(self) -> int:
        """Slot bytes this unit needs: each streamed range widened to ALIGN at both ends (+1 page)."""
        return sum(align_up(s.streamed_bytes) + 4096 for s in self.segments if s.streamed_bytes)


@dataclass(frozen=True)
class ModelLayout:
    """The planner's view of a model: its units at full size, and the bytes outside them."""

    layers: tuple[tuple[TensorInfo, ...], ...]  # per layer, in MATRICES order (a matrix's parts in row order)
    head: TensorInfo  # the LM head matrix (the embedding table when tied)
    always_resident_bytes: int  # norms, biases, learned positions
    embed_bytes: int  # an untied embedding table; 0 when tied (it is the head)

    @property
    def total_bytes(self) -> int:
        return self.matrix_bytes + self.always_resident_bytes + self.embed_bytes

    @property
    def matrix_bytes(self) -> int:
        """Bytes of the streamable matrices: every layer's and the head."""
        return sum(t.nbytes for layer in self.layers for t in layer) + self.head.nbytes

    @property
    def max_layer_bytes(self) -> int:
        return max(sum(t.nbytes for t in layer) for layer in self.layers)


@dataclass(frozen=True)
class TierPlan:
    """A frozen placement: printed at start-up, followed by the loader and the streamer."""

    budget_bytes: int
    locking: str
    order: str  # requested: auto / ffn_first / attn_first
    window: int  # units prefetched ahead of the one being computed; 0 = synchronous reads
    units: tuple[Unit, ...]
    always_resident_bytes: int
    embed_resident: bool
    embed_bytes: int
    chosen_order: str = ""  # what "auto" resolved to for the layers (Algorithm 1)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def streams(self) -> bool:
        return any(u.streamed_bytes for u in self.units)

    @property
    def num_slots(self) -> int:
        return 0 if not self.streams else self.window + 1

    @property
    def slot_bytes(self) -> int:
        return max((u.ring_bytes for u in self.units), default=0) if self.streams else 0

    @property
    def ring_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    @property
    def resident_bytes(self) -> int:
        """Weight bytes kept in RAM outside the ring."""
        return (sum(u.resident_bytes for u in self.units) + self.always_resident_bytes
                + (self.embed_bytes if self.embed_resident else 0))

    @property
    def streamed_bytes_per_pass(self) -> int:
        return sum(u.streamed_bytes for u in self.units)

    @property
    def total_bytes(self) -> int:
        return sum(u.nbytes for u in self.units) + self.always_resident_bytes + self.embed_bytes

    def predicted_tokens_per_pass_s(self, memory_bw: float, disk_bw: float) -> float:
        """Forward passes per second if reading from RAM and from disk overlap perfectly
        (bandwidths in bytes/s): every weight byte is read from RAM once per pass, the streamed
        ones also from disk."""
        t_mem = (self.total_bytes - (0 if self.embed_resident else self.embed_bytes)) / memory_bw
        t_disk = self.streamed_bytes_per_pass / disk_bw
        return 1.0 / max(t_mem, t_disk)

    def issue_limit_tokens_s(self, memory_bw: float, disk_bw: float) -> float:
        """min(memory bandwidth / resident bytes, disk bandwidth / streamed bytes), tok/s."""
        limits = [memory_bw / max(1, self.resident_bytes)]
        if self.streamed_bytes_per_pass:
            limits.append(disk_bw / self.streamed_bytes_per_pass)
        return min(limits)

    def describe(self) -> str:
        lines = [f"TierPlan(budget={fmt_bytes(self.budget_bytes)} of {fmt_bytes(self.total_bytes)}, "
                 f"locking={self.locking}, order={self.order}"
                 + (f"->{self.chosen_order}" if self.chosen_order and self.order == "auto" else "")
                 + f", window={self.window})",
                 (f"  resident {fmt_bytes(self.resident_bytes)} + ring {self.num_slots} x "
                  f"{fmt_bytes(self.slot_bytes)}; streamed per forward pass "
                  f"{fmt_bytes(self.streamed_bytes_per_pass)} "
                  f"({sum(1 for u in self.units if u.streamed_bytes)} of {len(self.units)} units stream)")]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _layer_segments(tensors: tuple[TensorInfo, ...], share: int, order: str) -> tuple[tuple[Segment, ...], str]:
    """Algorithm 1 for one layer: which rows of each tensor hold ``share`` resident bytes. ``tensors``
    are in forward order; a matrix stored as parts (WeightStore.parts) counts each part as a tensor."""
    ffn = [t for t in tensors if layer_matrix(t.name) in FFN]
    attn = [t for t in tensors if layer_matrix(t.name) in ATTENTION]
    if order == "auto":
        order = "ffn_first" if share >= min(t.nbytes for t in ffn) else "attn_first"
    priority = ffn + attn if order == "ffn_first" else attn + ffn
    resident_rows: dict[str, int] = {}
    left = share
    rest: list[TensorInfo] = []
    for t in priority:
        if not rest and t.nbytes <= left:
            resident_rows[t.name] = t.num_rows
            left -= t.nbytes
        else:
            rest.append(t)
    rest_bytes = sum(t.nbytes for t in rest)
    for t in rest:
        # The same fraction of every remaining tensor, rounded down to whole rows.
        rows = t.num_rows * left // rest_bytes if rest_bytes else 0
        resident_rows[t.name] = min(t.num_rows, rows)
    segs = tuple(Segment(t, 0, t.num_rows, resident_rows[t.name]) for t in tensors)
    return segs, order


def _head_units(head: TensorInfo, piece_bytes: int, fraction: float) -> list[Unit]:
    rows_per_piece = max(1, piece_bytes // head.row_bytes)
    units = []
    for k, start in enumerate(range(0, head.num_rows, rows_per_piece)):
        end = min(head.num_rows, start + rows_per_piece)
        keep = int((end - start) * fraction)
        units.append(Unit("head", k, (Segment(head, start, end, start + keep),)))
    return units


def _balanced(layout: ModelLayout, fraction: float, order: str) -> tuple[list[Unit], str]:
    units = []
    chosen = ""
    for i, tensors in enumerate(layout.layers):
        share = int(sum(t.nbytes for t in tensors) * fraction)
        segs, chosen = _layer_segments(tensors, share, order)
        units.append(Unit("layer", i, segs))
    units += _head_units(layout.head, layout.max_layer_bytes, fraction)
    return units, chosen


def _whole_layer(layout: ModelLayout, budget: int) -> list[Unit]:
    """Whole units resident from the first on while they fit; the rest stream whole."""
    units = [Unit("layer", i, tuple(Segment(t, 0, t.num_rows, 0) for t in tensors))
             for i, tensors in enumerate(layout.layers)]
    units += _head_units(layout.head, layout.max_layer_bytes, 0.0)
    out = []
    for u in units:
        if u.nbytes <= budget:
            budget -= u.nbytes
            out.append(Unit(u.kind, u.index, tuple(Segment(s.tensor, s.row_start, s.row_end, s.row_end)
                                                   for s in u.segments)))
        else:
            out.append(u)
    return out


def make_plan(layout: ModelLayout, budget_bytes: int, *, window: int = 3, locking: str = "balanced",
              order: str = "auto") -> TierPlan:
    """The plan that keeps ``budget_bytes`` of the matrices (and an untied embedding) resident.

    A budget at or above the model's size keeps everything resident and streams nothing.
    """
    if locking not in LOCKINGS:
        raise PlanError(f"locking must be one of {LOCKINGS}, got {locking!r}")
    if order not in ORDERS:
        raise PlanError(f"order must be one of {ORDERS}, got {order!r}")
    if window < 0:
        raise PlanError(f"the prefetch window must be >= 0, got {window}")
    if budget_bytes < 0:
        raise PlanError(f"the weight budget must be >= 0 bytes, got {budget_bytes}")
    fixed = layout.always_resident_bytes
    if budget_bytes >= layout.total_bytes - fixed:
        units, chosen = _balanced(layout, 1.0, order)
        return TierPlan(budget_bytes, locking, order, window, tuple(units), fixed, True, layout.embed_bytes, chosen)
    if locking == "whole_layer":
        units = _whole_layer(layout, budget_bytes)
        return TierPlan(budget_bytes, locking, order, window, tuple(units), fixed, False, layout.embed_bytes)
    # Beyond the matrices, the rest of a budget would go to the embedding table, which is only
    # kept when all of it fits (handled above): its rows are cheap to read on demand.
    fraction = min(1.0, budget_bytes / layout.matrix_bytes)
    units, chosen = _balanced(layout, fraction, order)
    return TierPlan(budget_bytes, locking, order, window, tuple(units), fixed, False, layout.embed_bytes, chosen)


def parse_budget(text: str | float, model_bytes: int) -> int:
    """"2GiB", "500MB", "25%" (of model_bytes), or a number of bytes -> bytes."""
    if isinstance(text, (int, float)):
        if text < 0:
            raise PlanError(f"weight memory must be >= 0, got {text}")
        return int(text)
    s = str(text).strip()
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30, "b": 1}
    try:
        if s.endswith("%"):
            pct = float(s[:-1])
            if not 0 <= pct:
                raise ValueError
            return int(model_bytes * pct / 100)
        low = s.lower()
        for suffix in sorted(units, key=len, reverse=True):
            if low.endswith(suffix):
                value = float(low[: -len(suffix)])
                if value < 0:
                    raise ValueError
                return int(value * units[suffix])
        value = float(low)
        if value < 0:
            raise ValueError
        return int(value)
    except ValueError:
        raise PlanError(f"weight memory {text!r} is not a size: use e.g. 2GiB, 500MB, 25% or a byte count") from None


def device_plan(host: TierPlan, device_bytes: int, *, window: int = 1) -> TierPlan:
    """The device tier (FlexGen's GPU share) on top of ``host``, the RAM/disk plan.

    ``host`` keeps rows [row_start, r) of every segment off disk. The device holds the first rows
    of that: [row_start, d) with d - row_start = floor((r - row_start) * f), the same fraction
    f = device_bytes / (matrix bytes ``host`` keeps) of every segment, so every unit copies the
    same share host -> device (balanced, as on the host) and d <= r: a row on the device is never
    also one the disk has to deliver. Rows [d, r) stay in (pinned) host RAM and [r, row_end) on
    disk; both are *staged*: copied into a ring of window + 1 device slots before their unit runs.

    The result is a TierPlan over the device: its resident rows are the device rows, its
    "streamed" rows the staged ones, so ``streamed_bytes_per_pass`` is the host -> device traffic.
    """
    if device_bytes < 0:
        raise PlanError(f"the device weight budget must be >= 0 bytes, got {device_bytes}")
    if window < 0:
        raise PlanError(f"the device prefetch window must be >= 0, got {window}")
    kept = sum(u.resident_bytes for u in host.units)
    fraction = 1.0 if device_bytes >= kept else device_bytes / kept
    units = []
    for u in host.units:
        segs = tuple(Segment(s.tensor, s.row_start, s.row_end,
                             s.row_start + int((s.resident_end - s.row_start) * fraction)) for s in u.segments)
        units.append(Unit(u.kind, u.index, segs))
    notes = (f"device tier: {fraction:.1%} of the {fmt_bytes(kept)} of matrices kept off disk",)
    return TierPlan(device_bytes, host.locking, host.order, window, tuple(units), host.always_resident_bytes,
                    False, host.embed_bytes, host.chosen_order, notes)
