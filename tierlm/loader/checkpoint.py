"""Checkpoint readers: bytes on disk -> tensors, one tensor at a time, straight into their final home.

Why not ``safetensors.torch.load_file`` or a long-lived mmap? tierlm fuses q/k/v and gate/up into
single matrices and may change dtype. Materialising the checkpoint tensors and then the fused copies
would hold the weights twice at peak (and pages of a touched mmap count in RSS until it is unmapped).
Instead each checkpoint tensor is read with ``pread`` directly into its slice of the destination
(or, when the dtype changes or the tensor is stored transposed, through one temporary of that single
tensor), so peak RSS while loading is the model's bytes plus the largest tensor.

Both readers expose the same small protocol (``CheckpointReader``): names, shapes and
``read_into(name, dest)``.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from tierlm.loader.gguf import GGUFError, GGUFTensorInfo, parse_gguf, read_rows_f32
from tierlm.loader.paths import CheckpointError


class CheckpointReader(Protocol):
    source: str  # "hf" or "gguf": which tensor-name table of a family applies

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read_into(self, name: str, dest: torch.Tensor, transpose: bool = False) -> None:
        """Fill ``dest`` (shape = stored shape, reversed when ``transpose``) with tensor ``name``."""
        ...


# -- safetensors ----------------------------------------------------------------------------------

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class _StEntry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


class SafetensorsReader:
    """Every ``*.safetensors`` file of an HF model folder, indexed by tensor name.

    The header format (8-byte little-endian length, JSON, then data) is parsed here because later
    tiers need exact byte offsets to stream tensors with O_DIRECT; the ``safetensors`` library does
    not expose them.
    """

    source = "hf"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {self.folder}")
        self._entries: dict[str, _StEntry] = {}
        for path in files:
            self._index_file(path)
        self._fds: dict[Path, int] = {}
        self._bounce: torch.Tensor | None = None

    def _index_file(self, path: Path) -> None:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8 or header_len > 100 * 2**20:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header "
                                      f"(header says {header_len} bytes, file is {size})")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise CheckpointError(f"{path}: corrupt safetensors header: {err}") from None
        base = 8 + header_len
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = _ST_DTYPES[meta["dtype"]]
                start, end = meta["data_offsets"]
                shape = tuple(int(d) for d in meta["shape"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: malformed header entry for {name!r}") from None
            if base + end > size:
                raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {base + end} "
                                      f"but the file has {size} bytes")
            expected = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
            if end - start != expected:
                raise CheckpointError(f"{path}: tensor {name!r} has {end - start} bytes, shape needs {expected}")
            if name in self._entries:
                first = self._entries[name].path.name
                raise CheckpointError(f"tensor {name!r} appears in both {first} and {path.name}")
            self._entries[name] = _StEntry(path, dtype, shape, base + start, end - start)

    def names(self) -> set[str]:
        return set(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name].dtype

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            self._fds[path] = fd
        return fd

    def read_into(self, name: str, dest: torch.Tensor, transpose: bool = False) -> None:
        e = self._entries[name]
        want = e.shape[::-1] if transpose else e.shape
        if tuple(dest.shape) != want:
            raise CheckpointError(f"{name}: stored shape {e.shape} does not fit destination {tuple(dest.shape)}")
        fd = self._fd(e.path)
        if not transpose and e.dtype == dest.dtype and dest.is_contiguous():
            _pread_exact(fd, dest, e.offset, name)  # zero-copy: straight into the final tensor
            return
        # dtype change or transposed storage: go through a bounded temporary, a band of rows at a time.
        rows = e.shape[0] if e.shape else 1
        row_bytes = e.nbytes // max(rows, 1)
        for r0, r1 in _row_bands(rows, row_bytes):
            tmp = self._temporary((r1 - r0) * row_bytes).view(e.dtype).view((r1 - r0,) + e.shape[1:])
            _pread_exact(fd, tmp, e.offset + r0 * row_bytes, name)
            if not e.shape:
                dest.copy_(tmp.reshape(()))
            elif transpose:
                dest[:, r0:r1].copy_(tmp.t())
            else:
                dest[r0:r1].copy_(tmp)

    def _temporary(self, nbytes: int) -> torch.Tensor:
        """One reused buffer: fresh allocations per band fragment the heap and inflate peak RSS."""
        if self._bounce is None or self._bounce.numel() < nbytes:
            self._bounce = torch.empty(max(nbytes, _BAND_BYTES), dtype=torch.uint8)
        return self._bounce[:nbytes]

    def close(self) -> None:
        self._bounce = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:  # readers are short-lived; do not leak descriptors
        try:
            self.close()
        except Exception:
            pass


_BAND_BYTES = 32 * 2**20  # the temporary used for a dtype change never exceeds this (or one row)


def _row_bands(rows: int, row_bytes: int) -> list[tuple[int, int]]:
    """Split [0, rows) into bands of at most _BAND_BYTES (at least one row each)."""
    step = max(1, _BAND_BYTES // max(row_bytes, 1))
    return [(r, min(rows, r + step)) for r in range(0, max(rows, 1), step)]


def _pread_exact(fd: int, dest: torch.Tensor, offset: int, name: str) -> None:
    """Read ``dest.nbytes`` bytes at ``offset`` into the memory of contiguous ``dest``."""
    view = memoryview(dest.view(torch.uint8).reshape(-1).numpy())
    done = 0
    total = len(view)
    while done < total:
        n = os.preadv(fd, [view[done:min(total, done + (1 << 30))]], offset + done)
        if n == 0:
            raise CheckpointError(f"{name}: file ended early (truncated checkpoint?)")
        done += n


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not Path(folder).exists():
        raise CheckpointError(f"model path {folder} does not exist")
    if not path.exists():
        raise CheckpointError(f"{folder} has no config.json (expected an HF model folder or a .gguf file)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON: {err}") from None


# -- GGUF ---------------------------------------------------------------------------------------

GGUF_VOCABULARY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                        "tokenizer.ggml.merges")


class GGUFFile:
    """A GGUF file: metadata as plain Python values and tensors dequantized one at a time.

    Quantized tensors are expanded to float with the ``gguf`` package's reference dequantizers;
    native quantized execution is a later tier's job.
    """

    source = "gguf"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"model file {self.path} does not exist")
        try:
            self.metadata, infos = parse_gguf(self.path)
        except GGUFError as err:
            raise CheckpointError(str(err)) from None
        self._tensors = {t.name: t for t in infos}
        # pread into one reused buffer rather than a memmap: touched map pages would count in RSS
        # until the file is closed, on top of the decoded weights.
        self._fd: int | None = os.open(self.path, os.O_RDONLY)
        self._bounce = torch.empty(0, dtype=torch.uint8)
        embed = self._tensors.get("token_embd.weight")
        if embed is not None:
            # vocab size is not always in the metadata; the embedding's row count always is.
            self.metadata.setdefault("tierlm.embedding_rows", embed.shape[0])

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise CheckpointError(f"{self.path}: GGUF has no general.architecture")
        return arch

    def names(self) -> set[str]:
        return set(self._tensors)

    def drop_vocabulary(self) -> None:
        """Forget the metadata's vocabulary arrays once a Tokenizer is built from them: the reader lives
        as long as the model (OpenedCheckpoint), and Gemma-3's 262,144 entries hold 25 MiB."""
        for key in GGUF_VOCABULARY_KEYS:
            self.metadata.pop(key, None)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name].shape

    def quant_type(self, name: str) -> str:
        return self._tensors[name].type_name

    def info(self, name: str) -> GGUFTensorInfo:
        """The tensor's header entry: shape, type, offset and bytes in the file."""
        return self._tensors[name]

    def read_raw(self, name: str) -> torch.Tensor:
        """A tensor's stored bytes, uint8 (rows, bytes_per_row): quantized blocks left as they are."""
        info = self._tensors[name]
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        _pread_exact(self._fd, raw, info.offset, name)
        return raw.view(info.shape[0], -1)

    def read_into(self, name: str, dest: torch.Tensor, transpose: bool = False) -> None:
        info = self._tensors[name]
        want = info.shape[::-1] if transpose else info.shape
        if tuple(dest.shape) != want:
            raise CheckpointError(f"{name}: stored shape {info.shape} does not fit destination {tuple(dest.shape)}")
        rows = info.shape[0]
        row_elems = max(1, int(np.prod(info.shape[1:], dtype=np.int64)))
        row_bytes = info.nbytes // rows
        for r0, r1 in _row_bands(rows, 4 * row_elems):  # float32 bands: bounded temporary
            nbytes = (r1 - r0) * row_bytes
            if self._bounce.numel() < nbytes:
                self._bounce = torch.empty(max(nbytes, _BAND_BYTES // 4), dtype=torch.uint8)
            raw = self._bounce[:nbytes]
            _pread_exact(self._fd, raw, info.offset + r0 * row_bytes, name)
            try:
                values = read_rows_f32(info, r1 - r0, raw.numpy())
            except Exception as err:  # gguf's dequantizers raise assorted errors on bad data
                raise CheckpointError(f"{self.path}: cannot decode tensor {name} ({info.type_name}): {err}") from None
            if not values.flags.writeable:  # a float32 tensor viewed straight from the read-only map
                values = values.copy()
            src = torch.from_numpy(values)
            if transpose:
                dest[:, r0:r1].copy_(src.t())
            else:
                dest[r0:r1].copy_(src)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._bounce = torch.empty(0, dtype=torch.uint8)
