"""Row tiles: a quantized matrix's blocks repacked so that the kernel's SIMD lanes are rows.

In a GGUF file (and in ``QuantizedWeight``) each row's blocks are contiguous. A dot product of one
row with x then fills the 8 or 16 int32 lanes of a vpdpbusd with parts of *one* block, so every
block of every row pays a broadcast of its scale, a float conversion, an FMA and scalar offset
work (quant_gemv.c ``rows_dot``): about 12 instructions per 32 weights, which left batch-1 Q4_0
decode compute-bound at ~34 G weights/s on 2 Zen 4 cores, against ~55 that DRAM allows.

Repacked in tiles of ``TILE_ROWS`` = 16 rows, block by block, with the 16 rows' scales side by side
and each 64-byte chunk holding 4 bytes of every row, int32 lane i is row i: a block of all 16 rows
is 8 vpdpbusd against x's bytes broadcast, one conversion and two FMAs with the 16 scales as one
vector. Measured (5632 x 2048, batch 1, 2 threads, AMD EPYC; G weights/s from DRAM, rows -> tiles):
Q4_0 31.7 -> 55.5 (in cache 40.7 -> 172); tierlm's q8 23 -> 25, q6 25 -> 35, q5 18 -> 34, q4 32 ->
46, q3 16 -> 56, q2 21 -> 107 (one run); q3h 22 -> 42 (with software prefetch), 58-67 with its
byte-lookup tiles (without). llama.cpp repacks Q4_0 for AVX2/AVX-512 at load for the same reason.

The repacking is done once, when the linear method prepares a resident matrix, for the kernel's
AVX512-VNNI build; its AVX2 build (CPUs without AVX-512) has tiles of its own for every K-quant,
IQ4_XS, Q4_0 and Q8_0 (``KX8_FORMATS``: 8 rows, the layouts and measurements in quant_gemv.c "Q4_K in
tiles of 8 rows", "Q4_0 ...", "Q8_0 ...", "Q6_K and Q5_K ...", "Q3_K and Q2_K ..." and "IQ4_XS in tiles
of 8 rows") and runs every other matrix from its rows
(tierlm.quant.linear.QuantLinear). Rows streamed from disk keep the file's
layout (a tile is not a band of rows a store can split) and run through the row kernel. Tiles are a
kernel's layout, not a storage format: nothing writes them to a store. A matrix of R rows takes
ceil(R / 16) * 16 rows' bytes (a tiered plan's resident slices of a few rows pay up to 15 rows of
padding each).

Layouts (``tiles`` uint8 (num_tiles, bytes per tile); tile t holds rows 16t..16t+15, the last one
padded with zero rows; the same bytes per row as the file's blocks):
- Q4_0, in / 32 * 288 bytes a tile: per block, the 16 rows' float16 d (32 bytes), then four 64-byte
  chunks, chunk l holding bytes 4l..4l+3 of row i's 16 nibble bytes at 4i..4i+3 (byte j of a Q4_0
  block: weight j in its low nibble, weight j+16 in its high one; weight = d * (nibble - 8)).
- Q6_K, in / 256 * 3360 bytes a tile: per super-block, the 16 rows' float16 d, their 16 int8 scales
  sub-block by sub-block (16 x 16 bytes), then per 32 weights four 64-byte chunks of low nibbles as
  for Q4_0 and two of the codes' top 2 bits (chunk h, row i, byte b: weight 16h + 4l + b's in bits
  2l..2l+1); weight = d * scale * (code - 32), a scale per 16 weights (quant_gemv.c q6_kx16_tile).
- tierlm's q8, q6, q5, q4, q3, q2: per group, the 16 rows' float16 steps and mins (64 bytes), then per
  32 weights the codes in bit planes (byte / nibble / 2-bit / 1-bit chunks, ``PLANES``; quant_gemv.c
  tq_x16_tile); weight = min + step * code.
- q3h: per group steps and mins as above, then per 32 weights 224 bytes of the 7-bit pair values:
  three 64-byte chunks of whole values (one byte each, int32 lane i holding 4 pairs of row i), whose
  spare top bits and 32 bytes of nibbles hold the fourth chunk's (quant_gemv.c tq3h_x16_tile).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tierlm.quant.base import TILE_BYTES, QuantError, QuantizedWeight, banded_matmul

TILE_ROWS = 16


def _tile_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_0 blocks uint8 (T * 16, nb, 18) -> tiles (T, nb * 288)."""
    num_tiles, nb = blocks.shape[0] // TILE_ROWS, blocks.shape[1]
    d = blocks[:, :, :2].reshape(num_tiles, TILE_ROWS, nb, 2).permute(0, 2, 1, 3)  # (T, nb, row, 2)
    q = blocks[:, :, 2:].reshape(num_tiles, TILE_ROWS, nb, 4, 4).permute(0, 2, 3, 1, 4)  # (T, nb, l, row, 4)
    return torch.cat([d.reshape(num_tiles, nb, 32), q.reshape(num_tiles, nb, 256)], dim=2).reshape(num_tiles, -1)


def _untile_q4_0(t: torch.Tensor, k: int) -> torch.Tensor:
    """Q4_0 tiles uint8 (T, nb * 288) -> float32 (T * 16, k)."""
    n, nb = t.shape[0], k // 32
    t = t.reshape(n, nb, 288)
    d = t[:, :, :32].contiguous().view(torch.float16).float()  # (T, nb, row)
    q = t[:, :, 32:].reshape(n, nb, 4, TILE_ROWS, 4).permute(0, 3, 1, 2, 4).reshape(n, TILE_ROWS, nb, 16)
    codes = torch.cat([q & 15, q >> 4], dim=-1).float()  # (T, row, nb, 32): weights 0..15, 16..31
    return ((codes - 8) * d.permute(0, 2, 1)[..., None]).reshape(n * TILE_ROWS, k)


def q6_k_codes(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K super-blocks uint8 (R, nsb, 210) -> their 6-bit codes uint8 (R, nsb, 256) in weight order
    (ggml's layout: per 128-weight half n, ql[64n + l] holds weights l and l + 64 of the half in its
    low and high nibble, ql[64n + 32 + l] weights l + 32 and l + 96, qh[32n + l] their top 2 bits)."""
    r, nsb = blocks.shape[:2]
    ql = blocks[..., :128].reshape(r, nsb, 2, 2, 32)  # (R, nsb, half n, first/second 32 bytes, l)
    qh = blocks[..., 128:192].reshape(r, nsb, 2, 1, 32)
    lo = torch.stack([ql & 15, ql >> 4], dim=3)  # (R, nsb, n, nibble, 32-byte part, l)
    lo = lo.reshape(r, nsb, 2, 4, 32)  # quarter j = 2 * nibble + part: weights 32j + l of the half
    hi = torch.stack([(qh >> (2 * j)) & 3 for j in range(4)], dim=3).reshape(r, nsb, 2, 4, 32)
    return (lo | (hi << 4)).reshape(r, nsb, 256)


def _tile_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K super-blocks uint8 (T * 16, nsb, 210) -> tiles (T, nsb * 3360)."""
    num_tiles, nsb = blocks.shape[0] // TILE_ROWS, blocks.shape[1]
    shape = (num_tiles, TILE_ROWS, nsb)
    d = blocks[:, :, 208:].reshape(*shape, 2).permute(0, 2, 1, 3).reshape(num_tiles, nsb, 32)
    sc = blocks[:, :, 192:208].reshape(*shape, 16).permute(0, 2, 3, 1).reshape(num_tiles, nsb, 256)
    c = q6_k_codes(blocks).reshape(*shape, 8, 2, 4, 4)  # (T, row, nsb, block t, half h, l, b)
    nib = (c[:, :, :, :, 0] & 15) | ((c[:, :, :, :, 1] & 15) << 4)  # (T, row, nsb, t, l, b)
    nib = nib.permute(0, 2, 3, 4, 1, 5).reshape(num_tiles, nsb, 8, 256)
    top = c >> 4
    # (T, row, nsb, t, h, b)
    hb = top[..., 0, :] | (top[..., 1, :] << 2) | (top[..., 2, :] << 4) | (top[..., 3, :] << 6)
    hb = hb.permute(0, 2, 3, 4, 1, 5).reshape(num_tiles, nsb, 8, 128)
    body = torch.cat([nib, hb], dim=3).reshape(num_tiles, nsb, 8 * 384)
    return torch.cat([d, sc, body], dim=2).reshape(num_tiles, -1)


def _untile_q6_k(t: torch.Tensor, k: int) -> torch.Tensor:
    """Q6_K tiles uint8 (T, nsb * 3360) -> float32 (T * 16, k)."""
    n, nsb = t.shape[0], k // 256
    t = t.reshape(n, nsb, 3360)
    d = t[:, :, :32].contiguous().view(torch.float16).float()  # (T, nsb, row)
    sc = t[:, :, 32:288].contiguous().view(torch.int8).reshape(n, nsb, 16, TILE_ROWS).float()  # (T, nsb, sub, row)
    body = t[:, :, 288:].reshape(n, nsb, 8, 384)
    nib = body[..., :256].reshape(n, nsb, 8, 4, TILE_ROWS, 4)  # (T, nsb, t, l, row, b)
    hb = body[..., 256:].reshape(n, nsb, 8, 2, TILE_ROWS, 4)  # (T, nsb, t, h, row, b)
    top = torch.stack([(hb >> (2 * j)) & 3 for j in range(4)], dim=4)  # (T, nsb, t, h, l, row, b)
    codes = torch.stack([nib & 15, nib >> 4], dim=3) | (top << 4)  # (T, nsb, t, h, l, row, b)
    codes = codes.permute(0, 5, 1, 2, 3, 4, 6).reshape(n, TILE_ROWS, nsb, 16, 16).float()  # (T, row, nsb, sub, 16)
    scale = (d.permute(0, 2, 1)[..., None] * sc.permute(0, 3, 1, 2))[..., None]  # (T, row, nsb, sub, 1): d * sc
    return (scale * (codes - 32)).reshape(n * TILE_ROWS, k)  # as ggml: (d * sc) * (c - 32)


# tierlm's group-wise formats: bits -> their code's planes, (width, position in the code), lowest first
PLANES = {8: ((8, 0),), 6: ((4, 0), (2, 4)), 5: ((4, 0), (1, 4)), 4: ((4, 0),), 3: ((2, 0), (1, 2)), 2: ((2, 0),)}


def _join_groups(steps: torch.Tensor, mins: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
    """steps/mins float16 (T * 16, G) and each group's code bytes (T, G, n) -> tiles (T, G * (64 + n)):
    per group the 16 rows' steps, their mins, then the codes."""
    num_tiles, ng = body.shape[:2]
    head = [t.reshape(num_tiles, TILE_ROWS, ng).permute(0, 2, 1).contiguous().view(torch.uint8) for t in (steps, mins)]
    return torch.cat([*head, body], dim=2).reshape(num_tiles, -1)


def _split_groups(t: torch.Tensor, ng: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``_join_groups``: float32 steps and mins (T, G, row), and the code bytes (T, G, n)."""
    t = t.reshape(t.shape[0], ng, -1)
    steps = t[:, :, :32].contiguous().view(torch.float16).float()
    mins = t[:, :, 32:64].contiguous().view(torch.float16).float()
    return steps, mins, t[:, :, 64:]


def _affine(g: torch.Tensor, steps: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Codes float32 (T, row, G, group) -> float32 (T * 16, G * group): min + step * code, as minmax_dequantize."""
    w = g * steps.permute(0, 2, 1)[..., None] + mins.permute(0, 2, 1)[..., None]
    return w.reshape(g.shape[0] * TILE_ROWS, -1)


def _tile_groupwise(codes: torch.Tensor, steps: torch.Tensor, mins: torch.Tensor, bits: int,
                    group: int) -> torch.Tensor:
    """codes uint8 (T * 16, K), steps/mins float16 (T * 16, K / group) -> tiles (T, bytes per tile)."""
    num_tiles, k = codes.shape[0] // TILE_ROWS, codes.shape[1]
    ng, bpg = k // group, group // 32
    c = codes.reshape(num_tiles, TILE_ROWS, ng, bpg, 2, 4, 4)  # (T, row, group, block, h, l, b): weight 16h + 4l + b
    planes = []
    for width, at in PLANES[bits]:
        f = (c >> at) & ((1 << width) - 1)
        if width == 8:  # chunk 4h + l
            p = f.permute(0, 2, 3, 4, 5, 1, 6)  # (T, group, block, h, l, row, b)
        elif width == 4:  # chunk l, h in the nibble
            p = (f[:, :, :, :, 0] | (f[:, :, :, :, 1] << 4)).permute(0, 2, 3, 4, 1, 5)  # (T, group, block, l, row, b)
        elif width == 2:  # chunk h, l in bits 2l
            p = sum(f[..., j, :] << (2 * j) for j in range(4)).permute(0, 2, 3, 4, 1, 5)  # (T, group, block, h, row, b)
        else:  # one chunk, (h, l) in bit 4h + l
            p = sum(f[:, :, :, :, h, j] << (4 * h + j) for h in range(2) for j in range(4))
            p = p.permute(0, 2, 3, 1, 4)  # (T, group, block, row, b)
        planes.append(p.reshape(num_tiles, ng, bpg, -1).to(torch.uint8))
    body = torch.cat(planes, dim=3).reshape(num_tiles, ng, -1)  # (T, group, blocks * 64 * bits)
    return _join_groups(steps, mins, body)


def _untile_groupwise(t: torch.Tensor, k: int, bits: int, group: int) -> torch.Tensor:
    """Group-wise tiles uint8 (T, bytes per tile) -> float32 (T * 16, k): min + step * code."""
    n, ng, bpg = t.shape[0], k // group, group // 32
    steps, mins, body = _split_groups(t, ng)
    body = body.reshape(n, ng, bpg, 64 * bits)
    codes = torch.zeros(n, ng, bpg, 2, 4, TILE_ROWS, 4, dtype=torch.uint8)  # (T, group, block, h, l, row, b)
    off = 0
    for width, at in PLANES[bits]:
        chunk = body[..., off:off + 64 * width]
        off += 64 * width
        if width == 8:
            f = chunk.reshape(n, ng, bpg, 2, 4, TILE_ROWS, 4)
        elif width == 4:
            v = chunk.reshape(n, ng, bpg, 1, 4, TILE_ROWS, 4)
            f = torch.cat([v & 15, v >> 4], dim=3)
        elif width == 2:
            v = chunk.reshape(n, ng, bpg, 2, 1, TILE_ROWS, 4)
            f = torch.cat([(v >> (2 * j)) & 3 for j in range(4)], dim=4)
        else:
            v = chunk.reshape(n, ng, bpg, 1, 1, TILE_ROWS, 4)
            f = torch.cat([torch.cat([(v >> (4 * h + j)) & 1 for j in range(4)], dim=4) for h in range(2)], dim=3)
        codes |= f << at
    g = codes.permute(0, 5, 1, 2, 3, 4, 6).reshape(n, TILE_ROWS, ng, group).float()  # (T, row, group, weights)
    return _affine(g, steps, mins)


def _tile_q3h(codes: torch.Tensor, steps: torch.Tensor, mins: torch.Tensor, group: int) -> torch.Tensor:
    """q3h codes uint8 (T * 16, K) (11 levels), steps/mins (T * 16, K / group) -> tiles: per group 16 steps,
    16 mins, then per block three chunks of whole pair values and pass 3's nibbles (quant_gemv.c tq3h_x16_tile)."""
    num_tiles, k = codes.shape[0] // TILE_ROWS, codes.shape[1]
    ng, bpg = k // group, group // 32
    c = codes.to(torch.int64).reshape(num_tiles, TILE_ROWS, ng, bpg, 4, 4, 2)  # (T, row, group, block, f, k, e)
    p = (c[..., 0] * 11 + c[..., 1]).permute(0, 2, 3, 4, 1, 5).reshape(num_tiles, ng, bpg, 4, 64)  # (.., f, position)
    high = torch.stack([(p[:, :, :, 3] >> (4 + f)) & 1 for f in range(3)], dim=3)  # pass 3's bits 4..6
    whole = p[:, :, :, :3] | (high << 7)  # (T, group, block, f < 3, position)
    nib = p[:, :, :, 3] & 15
    nib = nib[..., :32] | (nib[..., 32:] << 4)
    body = torch.cat([whole.reshape(num_tiles, ng, bpg, 192), nib], dim=3)
    return _join_groups(steps, mins, body.to(torch.uint8).reshape(num_tiles, ng, bpg * 224))


def _untile_q3h(t: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """q3h tiles uint8 (T, bytes per tile) -> float32 (T * 16, k): min + step * code."""
    n, ng, bpg = t.shape[0], k // group, group // 32
    steps, mins, body = _split_groups(t, ng)
    body = body.reshape(n, ng, bpg, 224).to(torch.int64)
    whole = body[..., :192].reshape(n, ng, bpg, 3, 64)  # (T, group, block, f < 3, position)
    nib = torch.cat([body[..., 192:] & 15, body[..., 192:] >> 4], dim=3)  # (T, group, block, position)
    p3 = nib | sum(((whole[:, :, :, f] >> 7) & 1) << (4 + f) for f in range(3))
    p = torch.cat([whole & 127, p3[:, :, :, None]], dim=3)  # (T, group, block, f, position)
    # (T, group, block, f, row, k, e)
    codes = torch.stack([p // 11, p % 11], dim=-1).reshape(n, ng, bpg, 4, TILE_ROWS, 4, 2)
    g = codes.permute(0, 4, 1, 2, 3, 5, 6).reshape(n, TILE_ROWS, ng, group).float()
    return _affine(g, steps, mins)


# GGUF source format -> (weights, bytes) of its blocks, tiling, untiling
_GGUF_LAYOUTS = {
    "gguf:Q4_0": ((32, 18), _tile_q4_0, _untile_q4_0),
    "gguf:Q6_K": ((256, 210), _tile_q6_k, _untile_q6_k),
}
GROUPWISE_BITS = {f"q{b}": b for b in PLANES}  # tierlm's bit-plane formats (and q3h's 7-bit pairs)
TILE_FORMATS = (*_GGUF_LAYOUTS, *GROUPWISE_BITS, "q3h")  # formats with a row-tile layout and kernel


@dataclass(frozen=True)
class RowTiles:
    """A ``QuantizedWeight`` of format ``format`` repacked in tiles of TILE_ROWS rows (module docstring)."""

    format: str  # the source format, one of TILE_FORMATS (or KX8_FORMATS with rows_per_tile 8)
    shape: tuple[int, int]  # (out, in) of the float matrix
    tiles: torch.Tensor  # uint8 (ceil(out / rows_per_tile), bytes per tile)
    group: int  # the source's weights per group (GGUF: per block)
    rows_per_tile: int = TILE_ROWS

    @property
    def nbytes(self) -> int:
        return self.tiles.numel()

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[0]


def tile_rows(qw: QuantizedWeight) -> RowTiles:
    """Repack ``qw`` (a format in TILE_FORMATS) into row tiles; the weight itself is unchanged.

    Band by band of about TILE_BYTES of source rows, into one preallocated tensor: the unpacked codes
    and permuted copies of a whole matrix would be several times its size (a 32000 x 2048 Q6_K head:
    ~0.4 GB for its 54 MB)."""
    if qw.format not in TILE_FORMATS:
        raise QuantError(f"no row-tile layout for {qw.format} (have: {', '.join(TILE_FORMATS)})")
    out = qw.shape[0]
    num_tiles = -(-out // TILE_ROWS)
    band = max(1, TILE_BYTES // (TILE_ROWS * qw.nbytes // out))  # tiles per band
    first = _tile_band(qw.rows(0, min(out, band * TILE_ROWS)))
    tiles = torch.empty(num_tiles, first.shape[1], dtype=torch.uint8)
    tiles[:first.shape[0]] = first
    for t0 in range(band, num_tiles, band):
        t1 = min(num_tiles, t0 + band)
        tiles[t0:t1] = _tile_band(qw.rows(t0 * TILE_ROWS, min(out, t1 * TILE_ROWS)))
    return RowTiles(qw.format, qw.shape, tiles, qw.group)


def _tile_band(qw: QuantizedWeight) -> torch.Tensor:
    """Rows of ``qw`` (zero rows pad them to whole tiles) -> their tiles (T, bytes per tile)."""
    out, k = qw.shape
    rows = -(-out // TILE_ROWS) * TILE_ROWS
    if not qw.format.startswith("gguf:"):
        from tierlm.quant import get_quantizer

        codes = torch.zeros(rows, k, dtype=torch.uint8)
        codes[:out] = get_quantizer(qw.format, qw.group).unpack(qw.codes, k)
        steps, mins = (torch.zeros(rows, k // qw.group, dtype=torch.float16) for _ in range(2))
        steps[:out], mins[:out] = qw.scales, qw.mins
        if qw.format == "q3h":
            return _tile_q3h(codes, steps, mins, qw.group)
        return _tile_groupwise(codes, steps, mins, GROUPWISE_BITS[qw.format], qw.group)
    (block, block_bytes), tile, _ = _GGUF_LAYOUTS[qw.format]
    blocks = qw.codes.reshape(out, k // block, block_bytes)
    if rows > out:
        blocks = torch.cat([blocks, blocks.new_zeros(rows - out, k // block, block_bytes)])
    return tile(blocks)


def dequantize_tiles(tw: RowTiles, t0: int, t1: int) -> torch.Tensor:
    """Tiles [t0, t1) as float32 (rows_per_tile * (t1 - t0), in), padding rows included (zeros)."""
    if tw.rows_per_tile == KX8_ROWS:
        return _untile_kx8(tw, t0, t1)
    if tw.format == "q3h":
        return _untile_q3h(tw.tiles[t0:t1], tw.shape[1], tw.group)
    if tw.format in GROUPWISE_BITS:
        return _untile_groupwise(tw.tiles[t0:t1], tw.shape[1], GROUPWISE_BITS[tw.format], tw.group)
    return _GGUF_LAYOUTS[tw.format][2](tw.tiles[t0:t1], tw.shape[1])


def tiled_tiles_matmul(x: torch.Tensor, tw: RowTiles) -> torch.Tensor:
    """x (N, in) @ W^T in x's dtype with float activations, dequantizing about TILE_BYTES of float32 at a
    time: prompt chunks, unless QuantLinear.int8_prompts sends them to the kernel."""
    per = tw.rows_per_tile
    band = per * max(1, TILE_BYTES // (4 * tw.shape[1] * per))  # whole tiles per band

    def rows(r0: int, r1: int) -> torch.Tensor:  # r0 is a whole tile's first row; drop the padding
        return dequantize_tiles(tw, r0 // per, -(-r1 // per))[:r1 - r0]

    return banded_matmul(x, tw.shape, tw.format, band, rows)


# -- the AVX2 build's tiles of 8 rows (the K-quants, IQ4_XS, Q4_0, Q8_0) ----------------------------------------

KX8_ROWS = 8
# source format -> (weights and bytes of a source block, bytes of its tile block, kernel format id)
KX8_FORMATS = {"gguf:Q4_K": (256, 144, 1184, 25), "gguf:Q4_0": (32, 18, 144, 26),
               "gguf:Q6_K": (256, 210, 1680, 27), "gguf:Q5_K": (256, 176, 1696, 28),
               "gguf:Q3_K": (256, 110, 1168, 29), "gguf:Q2_K": (256, 84, 672, 30),
               "gguf:IQ4_XS": (256, 136, 1104, 31), "gguf:Q8_0": (32, 34, 272, 32)}


def tile_rows_kx8(qw: QuantizedWeight) -> RowTiles:
    """Repack a matrix of a KX8_FORMATS type into the AVX2 build's tiles of 8 rows (quant_gemv.c's layouts),
    band by band like ``tile_rows``; the weights are unchanged (its dequantization is the file's, bit for
    bit). Q5_K's tiles hold its 5-bit codes in 6 bits (quant_gemv.c "Q6_K and Q5_K in tiles"): 212 bytes a
    row per 256 weights against the file's 176."""
    if qw.format not in KX8_FORMATS:
        raise QuantError(f"no 8-row tile layout for {qw.format} (have: {', '.join(KX8_FORMATS)})")
    out, k = qw.shape
    block, src, dst, _ = KX8_FORMATS[qw.format]
    num_tiles, nsb = -(-out // KX8_ROWS), k // block
    tiles = torch.empty(num_tiles, nsb * dst, dtype=torch.uint8)
    # tiles per band: 512 KiB of source rows, whose temporaries (several times the band) the heap reuses
    band = max(1, TILE_BYTES // 8 // (KX8_ROWS * nsb * src))
    for t0 in range(0, num_tiles, band):
        t1 = min(num_tiles, t0 + band)
        r0, r1 = t0 * KX8_ROWS, min(out, t1 * KX8_ROWS)
        blocks = qw.codes[r0:r1].reshape(r1 - r0, nsb, src)
        if (t1 - t0) * KX8_ROWS > r1 - r0:  # zero rows pad the last tile
            blocks = torch.cat([blocks, blocks.new_zeros((t1 - t0) * KX8_ROWS - (r1 - r0), nsb, src)])
        tiles[t0:t1] = _KX8_TILERS[qw.format](blocks)
    return RowTiles(qw.format, qw.shape, tiles, qw.group, KX8_ROWS)


def _tile_kx8(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_K super-blocks uint8 (T * 8, nsb, 144) -> tiles (T, nsb * 1184)."""
    n, nsb = blocks.shape[0] // KX8_ROWS, blocks.shape[1]
    b = blocks.reshape(n, KX8_ROWS, nsb, 144).permute(0, 2, 1, 3)  # (T, nsb, row, bytes)
    d, dmin = b[..., 0:2].reshape(n, nsb, 16), b[..., 2:4].reshape(n, nsb, 16)
    sc, m = _k4_scales_mins(b)
    nib = b[..., 16:144].reshape(n, nsb, KX8_ROWS, 4, 32)  # byte l of pair p: weight l of sub-blocks 2p, 2p+1
    codes = torch.stack([nib & 15, nib >> 4], dim=4).reshape(n, nsb, KX8_ROWS, 8, 2, 4, 4)  # (T, nsb, row, j, h, v, b)
    packed = codes[:, :, :, :, 0] | (codes[:, :, :, :, 1] << 4)  # (T, nsb, row, j, v, b)
    packed = packed.permute(0, 1, 3, 4, 2, 5).reshape(n, nsb, 1024)  # [j][v][row][b]
    return torch.cat([d, dmin, sc, m, packed], dim=2).reshape(n, -1)


def _tile_q4_0x8(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_0 blocks uint8 (T * 8, nb, 18) -> tiles (T, nb * 144): per block the 8 rows' d, then
    [v][row][b] the nibble bytes 4v + b (a Q4_0 byte holds weights j and j + 16, as the tiles want)."""
    n, nb = blocks.shape[0] // KX8_ROWS, blocks.shape[1]
    b = blocks.reshape(n, KX8_ROWS, nb, 18).permute(0, 2, 1, 3)  # (T, nb, row, bytes)
    d = b[..., 0:2].reshape(n, nb, 16)
    q = b[..., 2:18].reshape(n, nb, KX8_ROWS, 4, 4).permute(0, 1, 3, 2, 4).reshape(n, nb, 128)
    return torch.cat([d, q], dim=2).reshape(n, -1)


def _k4_scales_mins(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K super-blocks (T, nsb, row, bytes) -> their 6-bit scales and mins as bytes, each
    (T, nsb, 64) in [sub-block j][row] order, unpacked as the gguf package dequantizes."""
    from gguf.quants import Q4_K

    n, nsb = b.shape[:2]
    sc, m = (torch.from_numpy(v.astype("uint8").reshape(n, nsb, KX8_ROWS, 8))
             for v in Q4_K.get_scale_min(b[..., 4:16].contiguous().reshape(-1, 12).numpy()))  # (T, nsb, row, j)
    return sc.transpose(2, 3).reshape(n, nsb, 64), m.transpose(2, 3).reshape(n, nsb, 64)


# Byte b of row r in code vector k of a 32-weight pair holds weight K6_ORDER[k, b] (quant_gemv.c)
K6_ORDER = torch.tensor([[2 * k, 2 * k + 1, 16 + 2 * k, 17 + 2 * k] for k in range(8)])


def _pack_k6(codes: torch.Tensor) -> torch.Tensor:
    """6-bit codes uint8 (T, row, nsb, 256) -> the tiles' code bytes (T, nsb, 1536): per 32-weight pair p,
    two triples of byte vectors [u][a < 3][row][b]; code vector 4u + a (a < 3) in bits 0-5 of vector a,
    code vector 4u + 3 in the three vectors' bits 6-7, two bits each."""
    n, _, nsb, _ = codes.shape
    c = codes.reshape(n, KX8_ROWS, nsb, 8, 32)[..., K6_ORDER]  # (T, row, nsb, p, k, b)
    c = c.reshape(n, KX8_ROWS, nsb, 8, 2, 4, 4)  # (T, row, nsb, p, u, a, b)
    fourth = c[..., 3:4, :]
    packed = c[..., :3, :] | (((fourth >> torch.tensor([0, 2, 4], dtype=torch.uint8).view(3, 1)) & 3) << 6)
    return packed.permute(0, 2, 3, 4, 5, 1, 6).reshape(n, nsb, 1536)  # [p][u][a][row][b]


def _tile_q6_kx8(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K super-blocks uint8 (T * 8, nsb, 210) -> tiles (T, nsb * 1680)."""
    n, nsb = blocks.shape[0] // KX8_ROWS, blocks.shape[1]
    b = blocks.reshape(n, KX8_ROWS, nsb, 210)
    d = b[..., 208:210].permute(0, 2, 1, 3).reshape(n, nsb, 16)
    sc = b[..., 192:208].reshape(n, KX8_ROWS, nsb, 8, 2).permute(0, 2, 3, 1, 4).reshape(n, nsb, 128)  # [p][row][2]
    codes = q6_k_codes(blocks).reshape(n, KX8_ROWS, nsb, 256)
    return torch.cat([d, sc, _pack_k6(codes)], dim=2).reshape(n, -1)


def q5_k_codes(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_K super-blocks uint8 (R, nsb, 176) -> their 5-bit codes uint8 (R, nsb, 256) in weight order
    (qs[32p + l] holds weight l of sub-blocks 2p and 2p + 1 in its nibbles, bit j of qh[l] the top bit
    of weight l of sub-block j)."""
    r, nsb = blocks.shape[:2]
    qs = blocks[..., 48:176].reshape(r, nsb, 4, 1, 32)
    lo = torch.cat([qs & 15, qs >> 4], dim=3).reshape(r, nsb, 8, 32)  # (R, nsb, j, l)
    qh = blocks[..., 16:48].reshape(r, nsb, 1, 32)
    hi = (qh >> torch.arange(8, dtype=torch.uint8).view(8, 1)) & 1
    return (lo | (hi << 4)).reshape(r, nsb, 256)


def _tile_q5_kx8(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_K super-blocks uint8 (T * 8, nsb, 176) -> tiles (T, nsb * 1696)."""
    n, nsb = blocks.shape[0] // KX8_ROWS, blocks.shape[1]
    b = blocks.reshape(n, KX8_ROWS, nsb, 176).permute(0, 2, 1, 3)  # (T, nsb, row, bytes)
    d, dmin = b[..., 0:2].reshape(n, nsb, 16), b[..., 2:4].reshape(n, nsb, 16)
    sc, m = _k4_scales_mins(b)
    codes = q5_k_codes(blocks).reshape(n, KX8_ROWS, nsb, 256)
    return torch.cat([d, dmin, sc, m, _pack_k6(codes)], dim=2).reshape(n, -1)


def _low_bit_codes(qs: torch.Tensor) -> torch.Tensor:
    """Q2_K / Q3_K low bits uint8 (R, nsb, 64) -> 2-bit codes (R, nsb, 8, 32): byte 32h + l holds weight l of
    sub-blocks 4h .. 4h + 3 of 32 weights in bits 0-1, 2-3, 4-5, 6-7."""
    r, nsb = qs.shape[:2]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)
    return ((qs.reshape(r, nsb, 2, 1, 32) >> shifts) & 3).reshape(r, nsb, 8, 32)


def q3_k_codes(blocks: torch.Tensor) -> torch.Tensor:
    """Q3_K super-blocks uint8 (R, nsb, 110) -> codes q + 4 h (0-7; weight = d * scale * (code - 4)) uint8
    (R, nsb, 256) in weight order; bit j of hmask byte l is h of weight l of sub-block j of 32."""
    r, nsb = blocks.shape[:2]
    hi = (blocks[..., 0:32].reshape(r, nsb, 1, 32) >> torch.arange(8, dtype=torch.uint8).view(8, 1)) & 1
    return (_low_bit_codes(blocks[..., 32:96]) | (hi << 2)).reshape(r, nsb, 256)


def q3_k_scales(blocks: torch.Tensor) -> torch.Tensor:
    """Q3_K super-blocks uint8 (R, nsb, 110) -> the 16 scales int8 (R, nsb, 16), minus 32: scale i's low 4
    bits in byte i % 8 of the 12 (the high nibble for i >= 8), its top 2 in byte 8 + i % 4 at bit 2 (i // 4)."""
    sb = blocks[..., 96:108]
    i = torch.arange(16)
    low = (sb[..., i % 8] >> (4 * (i >= 8)).to(torch.uint8)) & 15
    top = (sb[..., 8 + i % 4] >> (2 * (i // 4)).to(torch.uint8)) & 3
    return ((low | (top << 4)).to(torch.int16) - 32).to(torch.int8)


def _tile_q3_kx8(blocks: torch.Tensor) -> torch.Tensor:
    """Q3_K super-blocks uint8 (T * 8, nsb, 110) -> tiles (T, nsb * 1168)."""
    n, nsb = blocks.shape[0] // KX8_ROWS, blocks.shape[1]
    d = blocks[..., 108:110].reshape(n, KX8_ROWS, nsb, 2).permute(0, 2, 1, 3).reshape(n, nsb, 16)
    sc = q3_k_scales(blocks).view(torch.uint8).reshape(n, KX8_ROWS, nsb, 8, 2).permute(0, 2, 3, 1, 4)
    c = q3_k_codes(blocks).reshape(n, KX8_ROWS, nsb, 8, 32)[..., K6_ORDER]  # (T, row, nsb, p, k, b)
    c = c.reshape(n, KX8_ROWS, nsb, 8, 4, 2, 4)  # code vector k = 2v + e
    packed = (c[..., 0, :] | (c[..., 1, :] << 4)).permute(0, 2, 3, 4, 1, 5)  # [p][v][row][b]
    return torch.cat([d, sc.reshape(n, nsb, 128), packed.reshape(n, nsb, 1024)], dim=2).reshape(n, -1)


def _tile_q2_kx8(blocks: torch.Tensor) -> torch.Tensor:
    """Q2_K super-blocks uint8 (T * 8, nsb, 84) -> tiles (T, nsb * 672)."""
    n, nsb = blocks.shape[0] // KX8_ROWS, blocks.shape[1]
    b = blocks.reshape(n, KX8_ROWS, nsb, 84)
    d = b[..., 80:82].permute(0, 2, 1, 3).reshape(n, nsb, 16)
    dmin = b[..., 82:84].permute(0, 2, 1, 3).reshape(n, nsb, 16)
    sm = b[..., 0:16].reshape(n, KX8_ROWS, nsb, 8, 2).permute(0, 2, 3, 1, 4).reshape(n, nsb, 128)  # [p][row][2]
    codes = _low_bit_codes(blocks[..., 16:80]).reshape(n, KX8_ROWS, nsb, 8, 32)[..., K6_ORDER]
    c = codes.reshape(n, KX8_ROWS, nsb, 8, 2, 4, 4)  # code vector k = 4v + f
    packed = c[..., 0, :] | (c[..., 1, :] << 2) | (c[..., 2, :] << 4) | (c[..., 3, :] << 6)
    packed = packed.permute(0, 2, 3, 4, 1, 5).reshape(n, nsb, 512)  # [p][v][row][b]
    return torch.cat([d, dmin, sm, packed], dim=2).reshape(n, -1)


def _tile_q8_0x8(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks uint8 (T * 8, nb, 34) -> tiles (T, nb * 272): per block the 8 rows' d, then
    [v][row][b] the code bytes 4v + b."""
    n, nb = blocks.shape[0] // KX8_ROWS, blocks.shape[1]
    b = blocks.reshape(n, KX8_ROWS, nb, 34).permute(0, 2, 1, 3)  # (T, nb, row, bytes)
    q = b[..., 2:34].reshape(n, nb, KX8_ROWS, 8, 4).permute(0, 1, 3, 2, 4).reshape(n, nb, 256)
    return torch.cat([b[..., 0:2].reshape(n, nb, 16), q], dim=2).reshape(n, -1)


def _tile_iq4_xsx8(blocks: torch.Tensor) -> torch.Tensor:
    """IQ4_XS super-blocks uint8 (T * 8, nsb, 136) -> tiles (T, nsb * 1104): the 8 rows' d, their scales
    minus 32 as int8 [j][row] (the low 4 bits in nibble j of bytes 4-7, the top 2 at bit 2j of the
    uint16 at 2), then the 16 code bytes of each sub-block j as Q4_0's in its tiles, [j][v][row][b]."""
    n, nsb = blocks.shape[0] // KX8_ROWS, blocks.shape[1]
    b = blocks.reshape(n, KX8_ROWS, nsb, 136).permute(0, 2, 1, 3)  # (T, nsb, row, bytes)
    d = b[..., 0:2].reshape(n, nsb, 16)
    j = torch.arange(8)
    high = b[..., 2].to(torch.int16) | (b[..., 3].to(torch.int16) << 8)  # (T, nsb, row)
    low = (b[..., 4 + j // 2] >> (4 * (j % 2)).to(torch.uint8)) & 15  # (T, nsb, row, j)
    ls = low.to(torch.int16) | (((high[..., None] >> (2 * j)) & 3) << 4)
    sc = (ls - 32).to(torch.int8).view(torch.uint8).transpose(2, 3).reshape(n, nsb, 64)
    q = b[..., 8:136].reshape(n, nsb, KX8_ROWS, 8, 4, 4).permute(0, 1, 3, 4, 2, 5).reshape(n, nsb, 1024)
    return torch.cat([d, sc, q], dim=2).reshape(n, -1)


_KX8_TILERS = {"gguf:IQ4_XS": _tile_iq4_xsx8, "gguf:Q4_K": _tile_kx8, "gguf:Q4_0": _tile_q4_0x8,
               "gguf:Q6_K": _tile_q6_kx8, "gguf:Q5_K": _tile_q5_kx8, "gguf:Q3_K": _tile_q3_kx8,
               "gguf:Q2_K": _tile_q2_kx8, "gguf:Q8_0": _tile_q8_0x8}


def _untile_kx8(tw: RowTiles, t0: int, t1: int) -> torch.Tensor:
    """Tiles [t0, t1) of an 8-row K-quant tiling as float32 (8 * (t1 - t0), in), through quant_gemv.c (the
    tiles exist only where its AVX2 build is loaded)."""
    from tierlm.model.kernels import quant_gemv

    kernel = quant_gemv("avx2")
    tiles = tw.tiles[t0:t1].contiguous()
    out = torch.empty((t1 - t0) * KX8_ROWS, tw.shape[1], dtype=torch.float32)
    if kernel is None or kernel.dequant(KX8_FORMATS[tw.format][3], tiles.data_ptr(), tiles.stride(0), t1 - t0,
                                        tw.shape[1], out.data_ptr(), torch.get_num_threads()) != 0:
        raise QuantError(f"{tw.format} 8-row tiles need the AVX2 build of the quantized kernel")
    return out
