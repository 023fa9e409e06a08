"""GGUF files: a fast header parser plus tensor reads through the ``gguf`` package's dequantizers.

Why parse the header here: ``gguf.GGUFReader`` builds a Python object per array element, which
takes ~20 s for Gemma-3's 262k-token vocabulary; this parser reads the same header in ~0.3 s and
also yields each tensor's absolute byte offset, which the weight store and native quantized
kernels need. Tensor *decoding* is left to ``gguf.quants`` (reference numpy dequantizers).

Layout (little-endian, v2/v3): magic "GGUF", version u32, n_tensors u64, n_kv u64, then n_kv
key/value pairs, then n_tensors infos (name, n_dims u32, ne[n_dims] u64 fastest-first, type u32,
offset u64 relative to the data section), then padding to ``general.alignment`` (default 32) and
the data section.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_MAGIC = 0x46554747  # b"GGUF" little-endian
_STRING, _ARRAY = 8, 9
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class GGUFError(ValueError):
    """A file that is not a readable GGUF; the message names the file and what is wrong."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # rows first (torch order): the reverse of GGUF's ne[]
    ggml_type: int  # gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self.ggml_type).name


def parse_gguf(path: str | Path, with_tensors: bool = True) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    """Metadata (scalars as Python values, numeric arrays as numpy, string arrays as list[str])
    and tensor infos. Raises GGUFError on anything malformed or truncated."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, path, with_tensors)
    except (struct.error, IndexError, UnicodeDecodeError, OverflowError, ValueError) as err:
        if isinstance(err, GGUFError):
            raise
        raise GGUFError(f"{path}: corrupt or truncated GGUF header ({err})") from None
    except OSError as err:
        raise GGUFError(f"{path}: cannot read: {err}") from None


def _parse(buf: mmap.mmap, path: Path, with_tensors: bool) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    size = len(buf)
    if size < 24:
        raise GGUFError(f"{path}: too short to be a GGUF file ({size} bytes)")
    magic, version, num_tensors, num_kv = struct.unpack_from("<IIQQ", buf, 0)
    if magic != _MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (bad magic)")
    if not 2 <= version <= 3:
        raise GGUFError(f"{path}: GGUF version {version} is not supported (only 2 and 3, little-endian)")
    pos = 24

    def read_str(pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, pos)
        if pos + 8 + n > size:
            raise GGUFError(f"{path}: truncated GGUF header (string runs past the end)")
        return buf[pos + 8:pos + 8 + n].decode("utf-8", errors="replace"), pos + 8 + n

    def read_value(vtype: int, pos: int) -> tuple[Any, int]:
        if vtype == _STRING:
            return read_str(pos)
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype]
            return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
        if vtype != _ARRAY:
            raise GGUFError(f"{path}: unknown GGUF value type {vtype}")
        item_type, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if item_type in _SCALARS:
            dtype = np.dtype(_SCALARS[item_type])
            if pos + count * dtype.itemsize > size:
                raise GGUFError(f"{path}: truncated GGUF header (array runs past the end)")
            return np.frombuffer(buf, dtype, count, pos).copy(), pos + count * dtype.itemsize
        items = []
        for _ in range(count):
            item, pos = read_value(item_type, pos)
            items.append(item)
        return items, pos

    metadata: dict[str, Any] = {}
    for _ in range(num_kv):
        key, pos = read_str(pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        metadata[key], pos = read_value(vtype, pos + 4)
    if not with_tensors:
        return metadata, []

    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    raw = []
    for _ in range(num_tensors):
        name, pos = read_str(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        ne = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        ggml_type, rel = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        raw.append((name, ne, ggml_type, rel))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-pos // alignment) * alignment
    infos = []
    for name, ne, ggml_type, rel in raw:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise GGUFError(f"{path}: tensor {name} has unknown GGML type {ggml_type}") from None
        num_elements = int(np.prod(ne, dtype=np.int64))
        nbytes = num_elements // block * type_size
        offset = data_start + rel
        if offset + nbytes > size:
            raise GGUFError(f"{path}: truncated: tensor {name} ends at byte {offset + nbytes}, file has {size}")
        infos.append(GGUFTensorInfo(name, tuple(int(d) for d in reversed(ne)), ggml_type, offset, nbytes))
    return metadata, infos


def read_rows_f32(info: GGUFTensorInfo, num_rows: int, raw: np.ndarray) -> np.ndarray:
    """Decode ``num_rows`` consecutive rows of a tensor from their stored bytes ``raw`` (uint8)
    to float32, shape (num_rows,) + info.shape[1:].

    Quantization blocks never straddle rows (a row's length is a multiple of the block size),
    so any band of rows decodes on its own.
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(info.ggml_type)
    raw = raw.reshape(num_rows, -1)
    shape = (num_rows,) + info.shape[1:]
    if qtype == GGMLQuantizationType.F32:
        return raw.view(np.float32).reshape(shape)
    if qtype == GGMLQuantizationType.F16:
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    return np.asarray(dequantize(raw, qtype), dtype=np.float32).reshape(shape)
