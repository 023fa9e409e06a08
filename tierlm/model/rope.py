"""Rotary position embeddings, in both memory layouts.

"half" layout (HF, GPT-NeoX): the rotated pairs are (x[j], x[j + r/2]) for j < r/2.
"interleaved" layout (GPT-J, llama.cpp's permuted llama weights): pairs are (x[2j], x[2j+1]).
Only the first ``rotary_dim`` (r) features of each head rotate; the rest pass through (GPT-J).

    half:        [ a0 a1 a2 a3 | b0 b1 b2 b3 | pass ]   pair j = (a_j, b_j)
    interleaved: [ a0 b0 a1 b1 a2 b2 a3 b3   | pass ]   pair j = (a_j, b_j)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch


def inv_frequencies(rotary_dim: int, theta: float, scaling: Mapping[str, Any] | None = None) -> torch.Tensor:
    """(rotary_dim / 2,) float64 inverse frequencies, with HF's "linear" and "llama3" scaling."""
    inv = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    scaling = dict(scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = old_len / low, old_len / high
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(is_medium, smoothed, scaled)
    return inv


class RotaryTable:
    """cos/sin for positions [0, max_position), float32, grown on demand (never shrinks)."""

    def __init__(self, rotary_dim: int, theta: float, scaling: Mapping[str, Any] | None, max_position: int,
                 device: torch.device | str = "cpu"):
        self.inv = inv_frequencies(rotary_dim, theta, scaling)
        self.device = torch.device(device)
        self.cos = torch.empty(0)
        self.sin = torch.empty(0)
        self._grow(max_position)

    def _grow(self, n: int) -> None:
        angles = torch.outer(torch.arange(n, dtype=torch.float64), self.inv)  # (n, r/2)
        self.cos, self.sin = angles.cos().float().to(self.device), angles.sin().float().to(self.device)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 1, r/2) cos and sin in ``dtype`` for (N,) positions."""
        need = int(positions.max()) + 1 if positions.numel() else 0
        if need > self.cos.shape[0]:
            self._grow(max(need, 2 * self.cos.shape[0]))
        return (self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """Rotate x (N, heads, head_dim) by cos/sin (N, 1, r/2); returns a new tensor."""
    half = cos.shape[-1]
    rot = 2 * half
    if layout == "half":
        a, b = x[..., :half], x[..., half:rot]
        out = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    else:
        pairs = x[..., :rot].unflatten(-1, (half, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        out = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    if rot < x.shape[-1]:
        out = torch.cat((out, x[..., rot:]), dim=-1)
    return out
