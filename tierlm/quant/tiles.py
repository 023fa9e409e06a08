"""Row tiles: a quantized matrix's blocks repacked so that the kernel's SIMD lanes are rows.

In a GGUF file (and in ``QuantizedWeight``) each row's blocks are contiguous. A dot product of one
row with x then fills the 8 or 16 int32 lanes of a vpdpbusd with parts of *one* block, so every
block of every row pays a broadcast of its scale, a float conversion, an FMA and scalar offset
work (quant_gemv.c ``rows_dot``): about 12 instructions per 32 weights, which left batch-1 Q4_0
decode compute-bound at ~34 G weights/s on 2 Zen 4 cores, against ~55 that DRAM allows.

Repacked in tiles of ``TILE_ROWS`` = 16 rows, block by block, with the 16 rows' scales side by side
and each 64-byte chunk holding 4 bytes of every row, int32 lane i is row i: a block of all 16 rows
is 8 vpdpbusd against x's bytes broadcast, one conversion and two FMAs with the 16 scales as one
vector. Measured (5632 x 2048 Q4_0, batch 1, 2 threads): 31.7 -> 55.5 G weights/s from DRAM, 40.7 ->
172 in cache. llama.cpp repacks Q4_0 for AVX2/AVX-512 at load for the same reason.

The repacking is done once, when the linear method prepares a resident matrix; rows streamed from
disk keep the file's layout (a tile is not a band of rows a store can split) and run through the
row kernel. Tiles are a kernel's layout, not a storage format: nothing writes them to a store.

Layout, Q4_0 (``tiles`` uint8 (num_tiles, in / 32 * 288)): tile t holds rows 16t..16t+15, the last
one padded with zero rows. Block b of a tile is 288 bytes: the 16 rows' float16 d (32 bytes), then
four 64-byte chunks, chunk l holding bytes 4l..4l+3 of row i's 16 nibble bytes at 4i..4i+3 (byte j
of a Q4_0 block: weight j in its low nibble, weight j+16 in its high one; weight = d * (nibble - 8)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tierlm.quant.base import TILE_BYTES, QuantError, QuantizedWeight

TILE_ROWS = 16
TILE_FORMATS = ("gguf:Q4_0",)  # formats with a row-tile layout and kernel
_Q4_0_BLOCK = 18  # bytes of a Q4_0 block: float16 d, 16 bytes of nibbles
_Q4_0_TILE_BLOCK = 32 + 256  # bytes of 16 rows' blocks in a tile: 16 float16 d, 4 chunks of 64


@dataclass(frozen=True)
class RowTiles:
    """A ``QuantizedWeight`` of format ``format`` repacked in tiles of TILE_ROWS rows (module docstring)."""

    format: str  # the source format, one of TILE_FORMATS
    shape: tuple[int, int]  # (out, in) of the float matrix
    tiles: torch.Tensor  # uint8 (ceil(out / TILE_ROWS), bytes per tile)

    @property
    def nbytes(self) -> int:
        return self.tiles.numel()

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[0]


def tile_rows(qw: QuantizedWeight) -> RowTiles:
    """Repack ``qw`` (a format in TILE_FORMATS) into row tiles; the weight itself is unchanged."""
    if qw.format != "gguf:Q4_0":
        raise QuantError(f"no row-tile layout for {qw.format} (have: {', '.join(TILE_FORMATS)})")
    out, k = qw.shape
    nb = k // 32
    num_tiles = -(-out // TILE_ROWS)
    blocks = torch.zeros(num_tiles * TILE_ROWS, nb, _Q4_0_BLOCK, dtype=torch.uint8)  # zero rows pad the last tile
    blocks[:out] = qw.codes.reshape(out, nb, _Q4_0_BLOCK)
    d = blocks[:, :, :2].reshape(num_tiles, TILE_ROWS, nb, 2).permute(0, 2, 1, 3)  # (T, nb, row, 2)
    q = blocks[:, :, 2:].reshape(num_tiles, TILE_ROWS, nb, 4, 4).permute(0, 2, 3, 1, 4)  # (T, nb, l, row, 4)
    tiles = torch.cat([d.reshape(num_tiles, nb, 32), q.reshape(num_tiles, nb, 256)], dim=2)
    return RowTiles(qw.format, qw.shape, tiles.reshape(num_tiles, nb * _Q4_0_TILE_BLOCK).contiguous())


def dequantize_tiles(tw: RowTiles, t0: int, t1: int) -> torch.Tensor:
    """Tiles [t0, t1) as float32 (TILE_ROWS * (t1 - t0), in), padding rows included (zeros)."""
    k = tw.shape[1]
    nb, n = k // 32, t1 - t0
    t = tw.tiles[t0:t1].reshape(n, nb, _Q4_0_TILE_BLOCK)
    d = t[:, :, :32].contiguous().view(torch.float16).float()  # (T, nb, row)
    q = t[:, :, 32:].reshape(n, nb, 4, TILE_ROWS, 4).permute(0, 3, 1, 2, 4)  # (T, row, nb, l, 4)
    q = q.reshape(n, TILE_ROWS, nb, 16)  # byte j of each row's block
    codes = torch.cat([q & 15, q >> 4], dim=-1).float()  # (T, row, nb, 32): weights 0..15, 16..31
    w = (codes - 8) * d.permute(0, 2, 1)[..., None]
    return w.reshape(n * TILE_ROWS, k)


def tiled_tiles_matmul(x: torch.Tensor, tw: RowTiles) -> torch.Tensor:
    """x (N, in) @ W^T in x's dtype, dequantizing about TILE_BYTES of float32 at a time (prompt chunks)."""
    out, k = tw.shape
    if x.shape[-1] != k:
        raise QuantError(f"input has {x.shape[-1]} features, the {tw.format} weight expects {k}")
    y = torch.empty(x.shape[0], out, dtype=x.dtype, device=x.device)
    step = max(1, TILE_BYTES // (4 * k * TILE_ROWS))  # tiles per band
    for t0 in range(0, tw.num_tiles, step):
        t1 = min(tw.num_tiles, t0 + step)
        r0, r1 = t0 * TILE_ROWS, min(out, t1 * TILE_ROWS)
        w = dequantize_tiles(tw, t0, t1)[:r1 - r0].to(dtype=x.dtype)
        y[:, r0:r1] = F.linear(x, w)
    return y
