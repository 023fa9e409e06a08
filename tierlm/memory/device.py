"""The device tier: weights kept in device memory up to a budget, the rest copied in per unit from
host RAM (and from disk behind it) on a separate copy stream, overlapped with compute (FlexGen).

Three tiers per segment of a unit (tierlm.memory.plan.device_plan):

    rows [row_start, d)   device memory, resident
    rows [d, r)           host RAM (pinned), resident           } staged: copied into a device
    rows [r, row_end)     disk, through the host ring (prefetch) } slot before the unit runs

The device ring has window + 1 slots, used in the same cyclic order as the host ring. Compute is
asynchronous on a GPU: releasing unit p only *enqueues* its kernels. So a slot is refilled only
after an event says the compute that read it has finished, and position p + window is enqueued
when p is released (its slot held p - 1, whose compute was enqueued earlier):

    compute stream:  ... | compute p-1 | compute p        | compute p+1 | ...
    copy stream:     ... | copy p+W-1  | (waits p-1) copy p+W | ...
    release p:       record "p done" on the compute stream; enqueue p + W

Data a slot receives from the host ring must be read by the copy before the host slot is
refilled: the stage waits (host side) for that copy, then releases the host unit. A forward
pass only waits on an event, never on the host, unless it outruns the copies.

On the CPU the same stage runs with ``HostCopy`` (synchronous copies, no events): it is how the
logic is tested without a GPU, and how ``device_memory`` behaves there (RAM to RAM).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from tierlm.memory.plan import TierPlan, Unit
from tierlm.memory.prefetch import Streamer, rows_view
from tierlm.memory.store import WeightStore

log = logging.getLogger("tierlm")

SLOT_ALIGN = 256  # bytes: every segment view in a device slot starts on this boundary


class CopyEngine(Protocol):
    """How staged rows reach the device and how the two streams order themselves. Events are
    opaque (None where nothing needs waiting for)."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Enqueue dst.copy_(src) on the copy stream."""
        ...

    def copy_waits_for(self, event: Any) -> None:
        """Later copies start after ``event`` (recorded on the compute stream)."""
        ...

    def copies_done(self) -> Any:
        """An event for every copy enqueued so far."""
        ...

    def compute_waits_for(self, event: Any) -> None:
        """Later compute starts after ``event`` (recorded on the copy stream)."""
        ...

    def compute_done(self) -> Any:
        """An event for the compute enqueued so far."""
        ...

    def synchronize(self, event: Any) -> None:
        """Block the calling (host) thread until ``event`` has happened."""
        ...

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in memory the copy engine reads asynchronously (page-locked on CUDA)."""
        ...


class HostCopy:
    """Synchronous copies on the calling thread: every event has already happened."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def copy_waits_for(self, event: Any) -> None:
        pass

    def copies_done(self) -> Any:
        return None

    def compute_waits_for(self, event: Any) -> None:
        pass

    def compute_done(self) -> Any:
        return None

    def synchronize(self, event: Any) -> None:
        pass

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        return t


class CudaCopy:
    """Copies on a dedicated CUDA stream; compute runs on the device's current stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)

    def copy_waits_for(self, event: Any) -> None:
        if event is not None:
            self.stream.wait_event(event)

    def copies_done(self) -> Any:
        ev = torch.cuda.Event()
        ev.record(self.stream)
        return ev

    def compute_waits_for(self, event: Any) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def compute_done(self) -> Any:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def synchronize(self, event: Any) -> None:
        if event is not None:
            event.synchronize()

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory()


def copy_engine_for(device: torch.device) -> CopyEngine:
    return CudaCopy(device) if device.type == "cuda" else HostCopy()


def register_pinned(t: torch.Tensor) -> bool:
    """Page-lock an existing host buffer (the host ring's slots) in place so copies from it are
    asynchronous; False where CUDA cannot (then they are synchronous, still correct)."""
    try:
        err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
        return int(err) == 0 if not isinstance(err, tuple) else int(err[0]) == 0
    except (RuntimeError, AttributeError):
        return False


@dataclass(frozen=True)
class _Staged:
    """Segment i of a unit in a device slot: rows [d, row_end), ``num_host`` of them from host RAM
    then the rest from the host ring; at ``slot_offset`` bytes into the slot."""

    slot_offset: int
    num_rows: int
    num_host: int
    row_shape: tuple[int, ...]
    dtype: torch.dtype


class _DeviceUnit:
    """A unit's staged rows in a device slot, valid until released (the Streamer's StreamedUnit
    interface: ``segment(i)`` -> (rows, ...) or None)."""

    def __init__(self, unit: Unit, views: list[torch.Tensor | None]):
        self.unit = unit
        self._views = views

    def segment(self, i: int) -> torch.Tensor | None:
        return self._views[i]


class DeviceStage:
    """Stages the device plan's non-resident rows into a ring of device slots (module docstring).

    Used by the forward pass exactly like a ``Streamer``: ``acquire(kind, index)`` the next unit of
    the cycle, compute, ``release()``.
    """

    def __init__(self, store: WeightStore, host_plan: TierPlan, plan: TierPlan, host: Streamer | None,
                 device: torch.device, copier: CopyEngine):
        self.host = host
        self.copier = copier
        self.window = plan.window
        self.num_slots = plan.window + 1
        self.cycle = [u for u in plan.units if u.streamed_bytes]
        self._position_of = {(u.kind, u.index): k for k, u in enumerate(self.cycle)}
        host_units = {(u.kind, u.index): u for u in host_plan.units}
        # Rows [d, r) of each segment, read once, in pinned host memory: (cycle index, segment) -> rows.
        self._host_rows: dict[tuple[int, int], torch.Tensor] = {}
        self.layouts: list[list[_Staged | None]] = []
        self.slot_bytes = 0  # the largest unit's staged rows, each segment rounded up to SLOT_ALIGN
        for k, u in enumerate(self.cycle):
            hu = host_units[(u.kind, u.index)]
            lay: list[_Staged | None] = []
            offset = 0
            for i, (s, hs) in enumerate(zip(u.segments, hu.segments)):
                if not s.streamed_bytes:
                    lay.append(None)
                    continue
                st = store.tensors[s.tensor.name]
                num_host = hs.resident_end - s.resident_end
                if num_host:
                    rows, = store.read_rows(s.tensor.name, [(s.resident_end, hs.resident_end)])
                    self._host_rows[(k, i)] = copier.pin(rows)
                lay.append(_Staged(offset, s.row_end - s.resident_end, num_host, tuple(st.shape[1:]), st.dtype))
                offset += -(-s.streamed_bytes // SLOT_ALIGN) * SLOT_ALIGN
            self.layouts.append(lay)
            self.slot_bytes = max(self.slot_bytes, offset)
        self.slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=device) for _ in range(self.num_slots)]
        if host is not None and device.type == "cuda" and not all(register_pinned(s) for s in host.slots):
            log.warning("could not page-lock the host ring: copies from it to the device are synchronous")
        self._views: dict[tuple[int, int], list[torch.Tensor | None]] = {}
        self._ready: dict[int, Any] = {}  # position -> event: its copies are done
        self._freed: list[Any] = [None] * self.num_slots  # slot -> event: compute on its last unit is done
        self._next = 0  # next position to enqueue
        self._consume = 0  # position the forward pass uses next
        for _ in range(self.window):
            self._enqueue()

    def _views_for(self, slot: int, k: int) -> list[torch.Tensor | None]:
        key = (slot, k)
        if key not in self._views:
            buf = self.slots[slot]
            views: list[torch.Tensor | None] = []
            for lay in self.layouts[k]:
                if lay is None:
                    views.append(None)
                    continue
                views.append(rows_view(buf, lay.slot_offset, lay.num_rows, lay.row_shape, lay.dtype))
            self._views[key] = views
        return self._views[key]

    def _enqueue(self) -> None:
        """Copy position ``_next``'s staged rows into its slot, after the slot's last compute."""
        p = self._next
        self._next += 1
        k = p % len(self.cycle)
        unit = self.cycle[k]
        slot = p % self.num_slots
        self.copier.copy_waits_for(self._freed[slot])
        views = self._views_for(slot, k)
        streamed = None
        if self.host is not None and self.host.is_streamed(unit.kind, unit.index):
            streamed = self.host.acquire(unit.kind, unit.index)
        try:
            for i, lay in enumerate(self.layouts[k]):
                if lay is None:
                    continue
                if lay.num_host:
                    self.copier.copy(views[i][:lay.num_host], self._host_rows[(k, i)])
                if lay.num_host < lay.num_rows:
                    rows = streamed.segment(i)  # waits for the disk read  # (rows, ...)
                    self.copier.copy(views[i][lay.num_host:], rows)
            self._ready[p] = self.copier.copies_done()
        finally:
            if streamed is not None:
                # The host slot is refilled as soon as it is released: wait for the copy out of it.
                done = self._ready.get(p)
                self.copier.synchronize(done if done is not None else self.copier.copies_done())
                self.host.release()

    def acquire(self, kind: str, index: int) -> _DeviceUnit:
        """The staged rows of unit (kind, index), the next of the cycle (positions in between, from
        a pass cut short, are drained first, as in ``Streamer.acquire``)."""
        k = self._position_of[(kind, index)]
        while self._consume % len(self.cycle) != k:
            self._take()
            self.release()
        return self._take()

    def _take(self) -> _DeviceUnit:
        p = self._consume
        while self._next <= p:  # window 0, or a drained position
            self._enqueue()
        self.copier.compute_waits_for(self._ready.pop(p))
        k = p % len(self.cycle)
        return _DeviceUnit(self.cycle[k], self._views_for(p % self.num_slots, k))

    def release(self) -> None:
        """The forward pass has enqueued its compute on the current unit."""
        p = self._consume
        self._freed[p % self.num_slots] = self.copier.compute_done()
        self._consume += 1
        if self.window > 0:
            self._enqueue()  # position p + window, into the slot p - 1 used

    def is_streamed(self, kind: str, index: int) -> bool:
        return (kind, index) in self._position_of

    def close(self) -> None:
        if self.host is not None:
            self.host.close()
