"""What a quantized weight is, and the protocol every storage format implements.

A format is one module: how it lays codes out in bytes (``pack``/``unpack``), how it turns a float
(out, in) matrix into codes plus per-group parameters (``quantize``), and how it gets floats back
(``dequantize``, a band of rows at a time) and multiplies by them (``matmul``). Execution never
expands a whole matrix: ``tiled_matmul`` dequantizes ``TILE_BYTES`` of float weights at a time.

Group-wise asymmetric min-max (FlexGen), shared by q8..q2 and q3h: each run of ``group``
consecutive weights of a row (along the input dimension) gets

    min_g  = min(w) rounded *down* to float16
    step_g = (max(w) - min_g) / (levels - 1) rounded *up* to float16
    code   = round((w - min_g) / step_g)  in [0, levels)        w ~= min_g + step_g * code

Rounding the stored parameters outward keeps every weight inside [min_g, min_g + step_g * (levels-1)],
so no code is clamped and the error stays <= step_g / 2.

Range search (``search=True``, used for weights at 6 bits and fewer): plain min-max spends the
levels on a group's one or two outliers. Instead each group tries ``SEARCH_FACTORS`` (1.0 down to
0.7) shrinking its range toward zero (negative min and positive max scaled by the factor), rounds
the candidate's parameters to float16 as above, and keeps the candidate with the smallest squared
reconstruction error over the group (factor 1.0 is plain min-max, so the search never does worse).
Then ``REFINE_ITERS`` times: for the codes so chosen, the least-squares step and min (rounded to
float16 to nearest), kept per group where they lower the error.
With an ``importance`` (a non-negative weight per input column, e.g. llama.cpp's "imatrix": the mean
of x^2 over calibration activations), "error" in both the search and the refinement is the weighted
sum_j imp_j * (w_j - deq_j)^2 of the group (a weighted least squares for step and min): the columns
that meet large activations are fitted first, since a weight's error reaches the output times its input.
Weights inside the chosen range [min_g, min_g + step_g * (levels-1)] are then within step_g / 2;
weights outside it are clamped to its ends (codes 0 and levels-1). The round-trip tests assert both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

TILE_BYTES = 4 * 2**20  # float weights dequantized per tile of a tiled matmul: about L2-sized
SEARCH_FACTORS = tuple(1.0 - 0.3 * i / 19 for i in range(20))  # range shrink factors tried per group
# (min factor, max factor) candidates of the range search, the first (1.0, 1.0): plain min-max. Both
# ends shrink together by default; a grid of pairs also tries asymmetric ranges (one-sided outliers).
SEARCH_PAIRS = tuple((f, f) for f in SEARCH_FACTORS)
REFINE_ITERS = 3  # least-squares refinements of the searched step and min
QUANT_BAND_WEIGHTS = 2**19  # weights quantized per band of rows (minmax_quantize): 2 MiB of float32


class QuantError(ValueError):
    """An unknown format, a bad group size or a matrix a format cannot hold; the message says which."""


@dataclass(frozen=True)
class QuantizedWeight:
    """An (out, in) matrix held in a quantized format.

    ``codes`` is uint8 (out, bytes_per_row): the format's packed codes, or for a GGUF type its raw
    blocks (each block carries its own scales; ``scales``/``mins`` are then None). A row's bytes are
    contiguous, so any band of rows decodes on its own and rows can be permuted or concatenated.
    """

    format: str  # a name in tierlm.quant.FORMATS, or "gguf:<TYPE>"
    shape: tuple[int, int]  # (out, in) of the float matrix
    codes: torch.Tensor  # uint8 (out, bytes_per_row)
    group: int  # weights per group (GGUF: per block)
    scales: torch.Tensor | None = None  # float16 (out, in // group): step_g
    mins: torch.Tensor | None = None  # float16 (out, in // group): min_g

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins) if t is not None)

    def packed_rows(self) -> torch.Tensor:
        """uint8 (out, row_bytes): each row's codes, then its float16 steps, then its float16 mins, so
        that one row is one self-contained record and a store can split and stream a quantized matrix
        by rows exactly like a float one (tierlm.memory.tiered). GGUF rows are such records already."""
        if self.scales is None:
            return self.codes.contiguous()
        as_bytes = (lambda t: t.contiguous().view(torch.uint8))
        return torch.cat([self.codes, as_bytes(self.scales), as_bytes(self.mins)], dim=1)

    @staticmethod
    def from_packed_rows(rows: torch.Tensor, fmt: str, group: int, num_cols: int) -> QuantizedWeight:
        """Inverse of ``packed_rows``, as views into ``rows`` (uint8 (out, row_bytes), last dim contiguous;
        no copy): codes, steps and mins keep ``rows``'s row stride, which the kernel accepts."""
        if fmt.startswith("gguf:"):
            return QuantizedWeight(fmt, (rows.shape[0], num_cols), rows, group)
        num_groups = num_cols // group
        cb = rows.shape[1] - 4 * num_groups
        scales = rows[:, cb:cb + 2 * num_groups].view(torch.float16)
        mins = rows[:, cb + 2 * num_groups:].view(torch.float16)
        return QuantizedWeight(fmt, (rows.shape[0], num_cols), rows[:, :cb], group, scales, mins)

    def rows(self, r0: int, r1: int) -> QuantizedWeight:
        """Rows [r0, r1) as a view (no copy)."""
        pick = (lambda t: None if t is None else t[r0:r1])
        return QuantizedWeight(self.format, (r1 - r0, self.shape[1]), self.codes[r0:r1], self.group,
                               pick(self.scales), pick(self.mins))

    def take_rows(self, index: torch.Tensor) -> QuantizedWeight:
        """Rows ``index`` (int64 (R,), any order, repeats allowed) as a new (R, in) matrix: a copy of
        those rows' bytes only (an embedding lookup needs a few rows of a large table)."""
        pick = (lambda t: None if t is None else t.index_select(0, index))
        return QuantizedWeight(self.format, (index.numel(), self.shape[1]), pick(self.codes), self.group,
                               pick(self.scales), pick(self.mins))


@dataclass(frozen=True)
class FusedWeight:
    """Matrices stacked along the output dimension whose formats differ (a GGUF file may store q and
    k as Q5_0 but v as Q8_0); multiplied part by part, outputs concatenated."""

    parts: tuple  # of QuantizedWeight, or their RowTiles (tierlm.quant.tiles) once prepared for the kernel

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(p.shape[0] for p in self.parts), self.parts[0].shape[1])

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


AnyQuantized = QuantizedWeight | FusedWeight


class QuantMethod(Protocol):
    """How one storage format is executed."""

    name: str

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        """All of ``qw`` as float32 (out, in); callers pass a band of rows (``qw.rows``)."""
        ...

    def matmul(self, x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
        """x (N, in) -> x @ W^T (N, out) in x's dtype, without expanding all of W at once."""
        ...


class Quantizer(QuantMethod, Protocol):
    """A format tierlm can also produce from float weights."""

    levels: int  # distinct codes per weight
    group: int

    def quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantizedWeight:
        """float (out, in) -> quantized; ``in`` must be a multiple of ``group``. ``importance``: optional
        non-negative float32 (in,) or (out, in) weights of the squared error (``minmax_quantize``)."""
        ...

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """uint8 codes (out, in), each < levels -> uint8 (out, bytes_per_row)."""
        ...

    def unpack(self, packed: torch.Tensor, num_cols: int) -> torch.Tensor:
        """Inverse of ``pack``: exactly the codes that were packed."""
        ...


def check_group(group: int) -> int:
    """Groups are whole multiples of 32 weights: whole bytes at every bit width, and the unit of
    the compiled kernels (tierlm/model/kernels/quant_gemv.c)."""
    if not isinstance(group, int) or group < 32 or group % 32:
        raise QuantError(f"quantization group size must be a positive multiple of 32, got {group!r}")
    return group


def _round_fp16(x: torch.Tensor, toward: float) -> torch.Tensor:
    """float32 -> float16 rounded toward -inf or +inf (not to nearest)."""
    h = x.to(torch.float16)
    off = h.float() > x if toward < 0 else h.float() < x
    return torch.where(off, torch.nextafter(h, torch.full_like(h, toward)), h)


def _params(lo: torch.Tensor, hi: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A group range [lo, hi] -> float16 (steps, mins), rounded outward (module docstring)."""
    mins = _round_fp16(lo, float("-inf"))
    steps = _round_fp16((hi - mins.float()) / (levels - 1), float("inf"))
    if not torch.isfinite(steps).all():
        raise QuantError("a weight group's range does not fit float16 steps")
    return steps, mins


def _codes(g: torch.Tensor, steps: torch.Tensor, mins: torch.Tensor, levels: int) -> torch.Tensor:
    """float32 (R, G, group) -> float32 codes in [0, levels) (clamped)."""
    inv = torch.where(steps > 0, 1.0 / steps.float(), torch.zeros((), dtype=torch.float32))
    return torch.round((g - mins.float()[..., None]) * inv[..., None]).clamp_(0, levels - 1)


def _group_importance(importance: torch.Tensor | None, r: int, k: int, group: int) -> torch.Tensor | None:
    """importance (K,) or broadcastable to (R, K) -> float32 (R or 1, K // group, group), or None.

    A group whose importances are all zero carries no information about which weights matter: it gets
    uniform weights (the unweighted error), not a degenerate fit. Only relative values within a group
    matter, so the units are free (mean of x^2 over calibration tokens, for an importance matrix)."""
    if importance is None:
        return None
    imp = importance.detach().to(torch.float32)
    if imp.dim() == 1:
        imp = imp[None, :]  # (1, K): one weight per input column, shared by every row
    if imp.dim() != 2 or imp.shape[1] != k or imp.shape[0] not in (1, r):
        raise QuantError(f"importance of shape {tuple(importance.shape)} does not fit a ({r}, {k}) matrix")
    if not (torch.isfinite(imp).all() and (imp >= 0).all()):
        raise QuantError("importance must be finite and non-negative")
    imp = imp.reshape(imp.shape[0], k // group, group)  # (R or 1, G, group)
    return torch.where(imp.sum(dim=-1, keepdim=True) > 0, imp, torch.ones_like(imp))


def _group_error(deq: torch.Tensor, g: torch.Tensor, imp: torch.Tensor | None) -> torch.Tensor:
    """sum over each group of imp * (deq - g)^2 (imp = 1 when None): (R, G, group) -> (R, G)."""
    err = (deq - g).square_()
    if imp is not None:
        err.mul_(imp)
    return err.sum(dim=-1)


def _least_squares(q: torch.Tensor, g: torch.Tensor, imp: torch.Tensor | None,
                   steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and min minimising sum imp * (g - (min + step * q))^2 per group, for fixed codes q; float32
    (R, G). A group whose codes are all equal keeps ``steps`` (its step is then undetermined)."""
    if imp is None:
        qm, wm = q.mean(dim=-1, keepdim=True), g.mean(dim=-1, keepdim=True)  # (R, G, 1)
        var, cov = (q - qm).square().sum(dim=-1), ((q - qm) * (g - wm)).sum(dim=-1)
    else:
        tot = imp.sum(dim=-1, keepdim=True)  # (R or 1, G, 1), > 0 (_group_importance)
        qm, wm = (imp * q).sum(dim=-1, keepdim=True) / tot, (imp * g).sum(dim=-1, keepdim=True) / tot
        var, cov = (imp * (q - qm).square()).sum(dim=-1), (imp * (q - qm) * (g - wm)).sum(dim=-1)
    s = torch.where(var > 0, cov / var.clamp(min=1e-30), steps.float())
    return s, wm[..., 0] - s * qm[..., 0]


def minmax_quantize(w: torch.Tensor, levels: int, group: int, search: bool = False,
                    importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float (R, K) -> codes uint8 (R, K), steps and mins float16 (R, K // group). See the module
    docstring; ``search`` picks each group's range among ``SEARCH_FACTORS`` shrinkings of [min, max].

    ``importance``: float32 (K,) (per input column, e.g. the mean of x^2 over calibration inputs) or
    broadcastable to (R, K), non-negative. With it, the search and the least-squares refinement
    minimise sum_j imp_j * (w_j - deq_j)^2 per group instead of the plain squared error. It only steers
    the search (plain min-max, ``search=False``, ignores it); ``None`` is exactly the unweighted result.
    """
    r, k = w.shape
    if k % group:
        raise QuantError(f"a row of {k} weights is not a whole number of groups of {group}")
    imp = _group_importance(importance, r, k, group) if search else None  # (R or 1, G, group)
    # Rows are independent: bands of about QUANT_BAND_WEIGHTS keep the search's dozens of passes over
    # its temporaries in cache (a 5632 x 2048 q4 matrix: 3.2 s whole, 0.48 s in bands of 256 rows;
    # identical results).
    band = max(1, QUANT_BAND_WEIGHTS // k)
    if r <= band:
        return _minmax_quantize_band(w, levels, group, search, imp)
    parts = [_minmax_quantize_band(w[r0:r0 + band], levels, group, search,
                                   None if imp is None else imp if imp.shape[0] == 1 else imp[r0:r0 + band])
             for r0 in range(0, r, band)]
    return tuple(torch.cat(ts) for ts in zip(*parts, strict=True))


def _minmax_quantize_band(w: torch.Tensor, levels: int, group: int, search: bool,
                          imp: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``minmax_quantize`` of rows w (R, K), imp already grouped (R or 1, G, group) or None."""
    r, k = w.shape
    g = w.detach().float().reshape(r, k // group, group)  # (R, G, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # (R, G)
    steps, mins = _params(lo, hi, levels)
    if search:
        best = None
        for f_lo, f_hi in SEARCH_PAIRS:
            lo_f = torch.where(lo < 0, lo * f_lo, lo)
            hi_f = torch.maximum(torch.where(hi > 0, hi * f_hi, hi), lo_f)
            s_f, m_f = (steps, mins) if f_lo == f_hi == 1.0 else _params(lo_f, hi_f, levels)
            deq = _codes(g, s_f, m_f, levels) * s_f.float()[..., None] + m_f.float()[..., None]
            err = _group_error(deq, g, imp)  # (R, G)
            if best is None:
                best = err
                continue
            better = err < best
            best = torch.where(better, err, best)
            steps, mins = torch.where(better, s_f, steps), torch.where(better, m_f, mins)
        for _ in range(REFINE_ITERS):  # least-squares step and min for the chosen codes, kept where better
            s_f, m_f = _least_squares(_codes(g, steps, mins, levels), g, imp, steps)
            s_f, m_f = s_f.to(torch.float16), m_f.to(torch.float16)
            if not (torch.isfinite(s_f).all() and torch.isfinite(m_f).all()):
                break
            deq = _codes(g, s_f, m_f, levels) * s_f.float()[..., None] + m_f.float()[..., None]
            err = _group_error(deq, g, imp)
            better = (err < best) & (s_f >= 0)
            best = torch.where(better, err, best)
            steps, mins = torch.where(better, s_f, steps), torch.where(better, m_f, mins)
    codes = _codes(g, steps, mins, levels)
    return codes.to(torch.uint8).reshape(r, k), steps, mins


def minmax_dequantize(codes: torch.Tensor, steps: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """codes uint8 (R, K), steps/mins float16 (R, G) -> float32 (R, K)."""
    r, k = codes.shape
    num_groups = steps.shape[1]
    g = codes.reshape(r, num_groups, k // num_groups).float()
    return (g * steps.float()[..., None] + mins.float()[..., None]).reshape(r, k)


def tiled_matmul(method: QuantMethod, x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """x (N, in) @ W^T, W dequantized one band of rows at a time (TILE_BYTES of float32 per band)."""
    band = max(1, TILE_BYTES // (4 * qw.shape[1]))
    return banded_matmul(x, qw.shape, qw.format, band, lambda r0, r1: method.dequantize(qw.rows(r0, r1)))


def banded_matmul(x: torch.Tensor, shape: tuple[int, int], what: str, band_rows: int, dequantize) -> torch.Tensor:
    """x (N, in) @ W^T in x's dtype for an (out, in) ``shape`` matrix W, with ``dequantize(r0, r1)``
    giving its rows [r0, r1) as float (r1 - r0, in), ``band_rows`` rows at a time (r0 a multiple of it)."""
    out, k = shape
    if x.shape[-1] != k:
        raise QuantError(f"input has {x.shape[-1]} features, the {what} weight expects {k}")
    y = torch.empty(x.shape[0], out, dtype=x.dtype, device=x.device)
    for r0 in range(0, out, band_rows):
        r1 = min(out, r0 + band_rows)
        y[:, r0:r1] = F.linear(x, dequantize(r0, r1).to(device=x.device, dtype=x.dtype))
    return y
