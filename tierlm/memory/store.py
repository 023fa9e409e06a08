"""The tierlm weight store: every tensor of a model, contiguous and 4 KiB aligned, in one file.

Why a store of our own instead of streaming from the checkpoint? Streaming with O_DIRECT needs
byte ranges that start and end on 4 KiB boundaries and tensors in the layout the forward pass uses
(fused q/k/v, fused gate/up, norm offsets folded, in the compute dtype). A safetensors or GGUF
file has neither, so the first load writes the store and every later load reads it.

Layout::

    <dir>/weights.bin     tensor data; each tensor starts at a multiple of ALIGN bytes
    <dir>/manifest.json   {"version", "meta": {...}, "tensors": {name: {dtype, shape, offset,
                           nbytes, crc32}}}; written last, so a store without a manifest is
                           an interrupted build

Invariants: offsets are multiples of ALIGN; tensors do not overlap; the data file is exactly
``manifest["data_bytes"]`` long (a multiple of ALIGN). The manifest's ``meta`` says what the store
was built from (source path, size and mtime, dtype); ``open_or_build`` rebuilds a store whose meta
or checksums do not match, and says why.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tierlm.memory.align import ALIGN, align_down, align_up

log = logging.getLogger("tierlm")

VERSION = 1
DATA_FILE = "weights.bin"
MANIFEST_FILE = "manifest.json"
_CHUNK = 16 << 20  # bytes per read while verifying or loading; a multiple of ALIGN

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "uint8": torch.uint8, "int8": torch.int8, "int32": torch.int32, "int64": torch.int64,
}


class StoreError(OSError):
    """A weight store that cannot be written or read; the message names the file."""


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lives in ``weights.bin``. offset: bytes, a multiple of ALIGN."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    crc32: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (the first dimension); a 1-D tensor is one row."""
        return self.nbytes // self.shape[0] if len(self.shape) > 1 else self.nbytes

    @property
    def num_rows(self) -> int:
        return self.shape[0] if len(self.shape) > 1 else 1


def parts_name(name: str, index: int) -> str:
    """The store name of part ``index`` of a matrix stored as parts (``WeightStore.parts``)."""
    return f"{name}.{index}"


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """A page-aligned uint8 tensor of ``nbytes`` (rounded up to ALIGN), as O_DIRECT requires.

    Anonymous mmap memory is page aligned, backed by transparent huge pages where the kernel
    allows, and returned to the OS when the tensor is freed.
    """
    size = max(ALIGN, align_up(nbytes))
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        # Every O_DIRECT read pins its destination pages. With 4 KiB pages that is 1,024 pins
        # per 4 MiB chunk, kernel work on the reading thread; when the cores are also busy
        # computing (the whole point of prefetching) it starved the disk. Measured on this 2-core
        # VM, 1.1B bf16 at a 50% budget: 1.2-1.4 tok/s with 4 KiB pages, 2.0 with huge pages,
        # while synchronous reads (no overlap) got 1.65.
        mem.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mem, dtype=torch.uint8)


def open_direct(path: Path) -> tuple[int, bool]:
    """Open ``path`` for reading, bypassing the page cache where the filesystem allows.

    Returns (fd, direct). Without O_DIRECT (tmpfs, some overlays) reads go through the page cache
    and callers drop the pages after reading (``drop_pages``) so the cache does not quietly hold
    the part of the model that the budget says is not resident.
    """
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT), True
    except OSError:
        return os.open(path, os.O_RDONLY), False


def drop_pages(fd: int, offset: int = 0, length: int = 0) -> None:
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def write_store(path: str | Path, tensors: Iterable[tuple[str, torch.Tensor]], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` (consumed one at a time, so a caller may hold one layer at a time).

    The data goes to a temporary file that is renamed into place, and the manifest is written
    last; an interrupted or failed build (a full disk) leaves no store that looks complete.
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST_FILE).unlink(missing_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create weight store folder {folder}: {e.strerror}") from e
    tmp = folder / (DATA_FILE + ".partial")
    entries: dict[str, dict[str, Any]] = {}
    offset = 0
    try:
        with open(tmp, "wb") as f:
            for name, t in tensors:
                if name in entries:
                    raise StoreError(f"tensor {name!r} written twice to {folder}")
                t = t.detach().contiguous().cpu()
                data = t.view(torch.uint8).reshape(-1).numpy() if t.numel() else b""
                f.write(data)
                nbytes = t.numel() * t.element_size()
                pad = align_up(nbytes) - nbytes if nbytes else ALIGN
                f.write(b"\0" * pad)
                entries[name] = {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
                                 "offset": offset, "nbytes": nbytes, "crc32": zlib.crc32(data)}
                offset += nbytes + pad
            f.flush()
            os.fsync(f.fileno())
            # The freshly written pages would otherwise sit in the page cache and make the first
            # streamed tokens look faster than the disk is.
            drop_pages(f.fileno())
        os.replace(tmp, folder / DATA_FILE)
        manifest = {"version": VERSION, "meta": meta, "data_bytes": offset, "tensors": entries}
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write weight store {folder}: {e.strerror or e} "
                         f"({offset / 2**20:.0f} MiB written)") from e
    except BaseException:  # a tensor that cannot be stored, an interrupt: no half-written file stays
        tmp.unlink(missing_ok=True)
        raise
    return folder


class WeightStore:
    """A written store, opened for reading. ``read`` returns whole tensors; the streamer reads ranges."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_FILE
        data_path = self.path / DATA_FILE
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError as e:
            raise StoreError(f"{manifest_path} is missing (an interrupted build?)") from e
        except (OSError, ValueError) as e:
            raise StoreError(f"{manifest_path} is unreadable: {e}") from e
        if manifest.get("version") != VERSION:
            raise StoreError(f"{manifest_path} has version {manifest.get('version')}, tierlm writes {VERSION}")
        self.meta: dict[str, Any] = manifest["meta"]
        self.data_bytes: int = manifest["data_bytes"]
        self.tensors: dict[str, StoredTensor] = {}
        for name, e in manifest["tensors"].items():
            if e["dtype"] not in _DTYPES or e["offset"] % ALIGN:
                raise StoreError(f"{manifest_path}: tensor {name!r} has a bad dtype or unaligned offset")
            self.tensors[name] = StoredTensor(name, _DTYPES[e["dtype"]], tuple(e["shape"]), e["offset"],
                                              e["nbytes"], e["crc32"])
        try:
            size = data_path.stat().st_size
        except FileNotFoundError as e:
            raise StoreError(f"{data_path} is missing") from e
        if size != self.data_bytes:
            raise StoreError(f"{data_path} is {size} bytes, its manifest says {self.data_bytes}")
        self.data_path = data_path
        self.fd, self.direct = open_direct(data_path)
        self._row_bounce: torch.Tensor | None = None

    def names(self) -> list[str]:
        return list(self.tensors)

    def parts(self, name: str) -> list[str]:
        """The stored tensors that hold matrix ``name``, in row order: ``[name]``, or for a matrix
        stacked from parts of different quantized formats (a GGUF file's Q5_0 q and k with a Q8_0 v:
        tierlm.quant.FusedWeight) its parts ``name.0``, ``name.1``, ... (parts_name)."""
        if name in self.tensors:
            return [name]
        found = []
        while parts_name(name, len(found)) in self.tensors:
            found.append(parts_name(name, len(found)))
        if not found:
            raise StoreError(f"{self.path}: the store holds no tensor {name!r} (nor parts of it)")
        return found

    def read_range(self, dest: torch.Tensor | np.ndarray, offset: int) -> None:
        """Fill the uint8 tensor or array ``dest`` with bytes from ``offset``. With O_DIRECT,
        ``offset``, ``dest``'s size and address must be multiples of ALIGN."""
        view = memoryview(dest.numpy() if isinstance(dest, torch.Tensor) else dest)
        done = 0
        while done < len(view):
            try:
                n = os.preadv(self.fd, [view[done:]], offset + done)
            except OSError as e:
                raise StoreError(f"reading {self.data_path} at byte {offset + done}: {e.strerror}") from e
            if n == 0:
                raise StoreError(f"{self.data_path} ended at byte {offset + done}: truncated since it was opened")
            done += n
        if not self.direct:
            drop_pages(self.fd, offset, len(view))

    def read(self, name: str, *, verify: bool = True, bounce: torch.Tensor | None = None) -> torch.Tensor:
        """The whole tensor ``name`` as a new tensor, its checksum checked when ``verify``."""
        e = self.tensors[name]
        return self.read_rows(name, [(0, e.num_rows)], verify=verify, bounce=bounce)[0]

    def read_rows(self, name: str, ranges: list[tuple[int, int]], *, verify: bool = True,
                  bounce: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Row ranges [a, b) of tensor ``name``, each as a new tensor of shape (b - a, ...).

        The tensor is read once from start to end through ``bounce`` (a reusable aligned buffer
        of _CHUNK bytes), so its crc32 is checked even when only some rows are kept; peak extra
        memory is the bounce buffer.
        """
        e = self.tensors[name]
        rb = e.row_bytes
        outs = [torch.empty((b - a) * rb, dtype=torch.uint8) for a, b in ranges]
        last = max((b for _, b in ranges), default=0) * rb
        read_bytes = e.nbytes if verify else last
        bounce = aligned_buffer(_CHUNK) if bounce is None else bounce
        crc = 0
        pos = 0
        while pos < read_bytes:
            n = min(bounce.numel(), align_up(read_bytes - pos))
            chunk = bounce[:n]
            self.read_range(chunk, e.offset + pos)
            valid = min(n, e.nbytes - pos)
            if verify:
                crc = zlib.crc32(chunk[:valid].numpy(), crc)
            for out, (a, b) in zip(outs, ranges):
                lo, hi = max(pos, a * rb), min(pos + valid, b * rb)
                if lo < hi:
                    out[lo - a * rb:hi - a * rb] = chunk[lo - pos:hi - pos]
            pos += n
        if verify and crc != e.crc32:
            raise StoreError(f"{self.data_path}: tensor {name!r} fails its checksum (corrupt store)")
        tail = tuple(e.shape[1:])
        if len(e.shape) <= 1:
            return [out.view(e.dtype).reshape(e.shape) for out in outs]
        return [out.view(e.dtype).reshape(b - a, *tail) for out, (a, b) in zip(outs, ranges)]

    def read_row_set(self, name: str, rows: list[int]) -> torch.Tensor:
        """Rows ``rows`` of a 2-D tensor, (len(rows), ...), one small aligned read per row (no
        checksum: these are lookups of a few KiB, e.g. embedding rows)."""
        e = self.tensors[name]
        rb = e.row_bytes
        out = torch.empty(len(rows), rb, dtype=torch.uint8)
        if self._row_bounce is None or self._row_bounce.numel() < align_up(rb) + ALIGN:
            self._row_bounce = aligned_buffer(align_up(rb) + ALIGN)
        for k, r in enumerate(rows):
            start = e.offset + r * rb
            base = align_down(start)
            n = align_up(start + rb) - base
            chunk = self._row_bounce[:n]
            self.read_range(chunk, base)
            out[k] = chunk[start - base:start - base + rb]
        return out.view(e.dtype).reshape(len(rows), *e.shape[1:])

    def close(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()
