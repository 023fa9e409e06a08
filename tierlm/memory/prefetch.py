"""Asynchronous streaming of the non-resident part of each unit into a fixed ring of buffers.

The forward pass visits units in a fixed cycle (layers, then LM-head pieces, then layers of the
next pass ...). Position p of that endless sequence is unit ``cycle[p % len(cycle)]`` and lives in
ring slot ``p % num_slots``. While the model computes on position p, slots hold p+1 ... p+window,
already requested from the I/O threads; releasing p immediately requests p + num_slots into the
slot it frees, so the disk never idles while there is a free slot:

    slot:      0      1      2      3        (window = 3, num_slots = 4)
    holds:     p      p+1    p+2    p+3      compute on p; I/O threads fill p+1..p+3
    release p: p+4    p+1    p+2    p+3      p+4 is requested at once

Each unit's streamed rows are read in chunks by a pool of threads (``os.preadv`` releases the
GIL, so reads overlap compute); a unit's segments are requested in forward order and each has its
own readiness, so attention can start while the FFN rows are still arriving. The ring is
allocated once; a step allocates no buffers. With window = 0 reads are synchronous: a unit is
requested when the forward pass asks for it (the "no prefetch" ablation).

Errors in an I/O thread (a truncated store, an I/O error) are raised in the thread that waits for
the data, as StoreError; nothing waits forever on a read that failed.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from dataclasses import dataclass

import torch

from tierlm.memory.plan import TierPlan, Unit
from tierlm.memory.store import (
    ALIGN,
    StoreError,
    WeightStore,
    align_down,
    align_up,
    aligned_buffer,
)

CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class _SegmentLayout:
    """Where a segment's streamed rows land in a slot. slot_offset is ALIGN-aligned; the rows
    start ``lead`` bytes after it (the read starts at the ALIGN boundary below them)."""

    file_offset: int  # aligned start of the read in the store
    read_bytes: int  # multiple of ALIGN
    slot_offset: int
    lead: int
    num_rows: int
    row_shape: tuple[int, ...]
    dtype: torch.dtype


class _Fill:
    """Progress of one position's reads: chunks outstanding per segment, and the first error."""

    def __init__(self, position: int, num_chunks: list[int]):
        self.position = position
        self.remaining = list(num_chunks)
        self.error: BaseException | None = None
        self.cond = threading.Condition()

    def done(self, seg: int, error: BaseException | None) -> None:
        with self.cond:
            self.remaining[seg] -= 1
            if error is not None and self.error is None:
                self.error = error
            self.cond.notify_all()

    def wait(self, seg: int | None = None) -> None:
        with self.cond:
            while self.error is None and (any(self.remaining) if seg is None else self.remaining[seg]):
                self.cond.wait()
            if self.error is not None:
                raise StoreError(f"streaming weights failed: {self.error}") from self.error


class StreamedUnit:
    """A unit's streamed rows in a slot, valid until it is released. ``segment(i)`` waits for
    segment i's rows and returns them as a (rows, ...) tensor, or None when it streams nothing."""

    def __init__(self, unit: Unit, views: list[torch.Tensor | None], fill: _Fill):
        self.unit = unit
        self._views = views
        self._fill = fill

    def segment(self, i: int) -> torch.Tensor | None:
        if self._views[i] is None:
            return None
        self._fill.wait(i)
        return self._views[i]


class Streamer:
    """Streams the plan's non-resident rows from ``store`` through a ring of plan.num_slots slots."""

    def __init__(self, store: WeightStore, plan: TierPlan, num_threads: int = 4, chunk_bytes: int | None = None):
        chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        if chunk_bytes % ALIGN:
            raise ValueError(f"chunk_bytes must be a multiple of {ALIGN}")
        self.store = store
        self.plan = plan
        self.window = plan.window
        self.cycle = [u for u in plan.units if u.streamed_bytes]
        self._position_of = {(u.kind, u.index): k for k, u in enumerate(self.cycle)}
        self.num_slots = plan.num_slots
        self.chunk_bytes = chunk_bytes
        self.layouts = [self._layout(u) for u in self.cycle]
        slot_bytes = max(sum(s.read_bytes for s in lay if s) for lay in self.layouts)
        self.slots = [aligned_buffer(slot_bytes) for _ in range(self.num_slots)]
        # The I/O threads write through numpy views: no torch (C++) frames on their stacks, so
        # nothing can turn the interpreter's shutdown of a thread into std::terminate.
        self._slot_arrays = [s.numpy() for s in self.slots]
        self.slot_bytes = self.slots[0].numel()
        # Views are made once per (slot, unit) and reused: creating tensors per step is cheap,
        # but there is no reason to.
        self._views: dict[tuple[int, int], list[torch.Tensor | None]] = {}
        self._fills: dict[int, _Fill] = {}  # position -> its reads
        self._next_request = 0  # next position not yet requested
        self._consume = 0  # position the forward pass uses next
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._worker, name=f"tierlm-io-{i}", daemon=True)
                         for i in range(num_threads)]
        for t in self._threads:
            t.start()
        _register_for_exit(self)
        self._closed = False
        self.num_stalls = 0  # times the forward pass waited for a unit that was not ready
        if self.window > 0:
            for _ in range(self.num_slots):
                self._request_next()

    # -- layout ---------------------------------------------------------------------------------
    def _layout(self, unit: Unit) -> list[_SegmentLayout | None]:
        out: list[_SegmentLayout | None] = []
        slot_offset = 0
        for seg in unit.segments:
            if not seg.streamed_bytes:
                out.append(None)
                continue
            st = self.store.tensors[seg.tensor.name]
            start = st.offset + seg.resident_end * st.row_bytes
            end = st.offset + seg.row_end * st.row_bytes
            file_offset = align_down(start)
            read_bytes = align_up(end) - file_offset
            out.append(_SegmentLayout(file_offset, read_bytes, slot_offset, start - file_offset,
                                      seg.row_end - seg.resident_end, tuple(st.shape[1:]), st.dtype))
            slot_offset += read_bytes
        return out

    def _views_for(self, slot: int, k: int) -> list[torch.Tensor | None]:
        key = (slot, k)
        if key not in self._views:
            buf = self.slots[slot]
            views: list[torch.Tensor | None] = []
            for lay in self.layouts[k]:
                if lay is None:
                    views.append(None)
                    continue
                views.append(rows_view(buf, lay.slot_offset + lay.lead, lay.num_rows, lay.row_shape, lay.dtype))
            self._views[key] = views
        return self._views[key]

    # -- requests -------------------------------------------------------------------------------
    def _request_next(self) -> None:
        p = self._next_request
        self._next_request += 1
        k = p % len(self.cycle)
        slot = p % self.num_slots
        chunks = []
        jobs = []
        for i, lay in enumerate(self.layouts[k]):
            if lay is None:
                chunks.append(0)
                continue
            n = 0
            for pos in range(0, lay.read_bytes, self.chunk_bytes):
                size = min(self.chunk_bytes, lay.read_bytes - pos)
                jobs.append((i, lay.file_offset + pos, slot, lay.slot_offset + pos, size))
                n += 1
            chunks.append(n)
        fill = _Fill(p, chunks)
        self._fills[p] = fill
        for i, file_offset, s, slot_offset, size in jobs:
            self._jobs.put((fill, i, file_offset, s, slot_offset, size))

    def _worker(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fill, seg, file_offset, slot, slot_offset, size = job
            error = None
            try:
                if fill.error is None:
                    self.store.read_range(self._slot_arrays[slot][slot_offset:slot_offset + size], file_offset)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                error = e
            fill.done(seg, error)

    # -- the forward pass's side ----------------------------------------------------------------
    def acquire(self, kind: str, index: int) -> StreamedUnit:
        """The streamed rows of unit (kind, index), which must be the next streamed unit of the
        cycle; if a pass was cut short (an exception, or a step that computed no logits), the
        positions in between are drained first so the cycle stays in step."""
        k = self._position_of[(kind, index)]
        while self._consume % len(self.cycle) != k:
            self._take(self._consume % len(self.cycle))  # drained: requested, never used
            self.release()
        return self._take(k)

    def _take(self, k: int) -> StreamedUnit:
        p = self._consume
        if self.window == 0:
            self._request_next()
        fill = self._fills[p]
        with fill.cond:
            if any(fill.remaining):
                self.num_stalls += 1
        return StreamedUnit(self.cycle[k], self._views_for(p % self.num_slots, k), fill)

    def release(self) -> None:
        """The forward pass is done with the current unit: its slot may be refilled."""
        p = self._consume
        fill = self._fills.pop(p)
        try:
            fill.wait()  # its slot must not be overwritten while reads into it are in flight
        finally:
            self._consume += 1
            if self.window > 0:
                self._request_next()

    def is_streamed(self, kind: str, index: int) -> bool:
        return (kind, index) in self._position_of

    def close(self) -> None:
        """Stop the I/O threads once the reads already queued are done (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join(timeout=30)


_live: weakref.WeakSet[Streamer] = weakref.WeakSet()
_exit_hook_registered = False


def _register_for_exit(streamer: Streamer) -> None:
    """Close live streamers before the interpreter finalizes: daemon threads still reading at
    shutdown are killed mid-call (a reference in ``_live`` does not keep a streamer alive)."""
    global _exit_hook_registered
    _live.add(streamer)
    if not _exit_hook_registered:
        atexit.register(lambda: [s.close() for s in list(_live)])
        _exit_hook_registered = True


def rows_view(buf: torch.Tensor, offset: int, num_rows: int, row_shape: tuple[int, ...],
              dtype: torch.dtype) -> torch.Tensor:
    """The bytes of uint8 ``buf`` from ``offset`` as a (num_rows, *row_shape) ``dtype`` tensor (a view)."""
    nbytes = num_rows * _prod(row_shape) * torch.empty((), dtype=dtype).element_size()
    return buf[offset:offset + nbytes].view(dtype).view(num_rows, *row_shape)


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
