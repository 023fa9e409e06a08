"""GPTQ error compensation for the group-wise formats (Frantar et al., 2022), calibrated on load.

Rounding column j of W alone leaves an output error (w_j - deq_j) * x_j. With H the second moment
of the inputs (in x in), the columns not yet quantized can absorb part of it: after quantizing
column j, every later column k moves by -err_j * U[j, k] / U[j, j], U the upper Cholesky factor of
H^-1 (the optimal update for the quadratic loss), so one column's error goes where the inputs
correlate with it. Columns run in blocks of ``BLOCK``; the update of later blocks is one product.

Two choices differ from the paper, both measured on the Brown press excerpt (SmolLM2, q4 g64):

* H sums each calibration token's input normalised to unit length. Unnormalised, this model's
  attention-sink (BOS) inputs, hundreds of times louder, dominate H and the fit trades every other
  token's error for theirs: +27.8% perplexity, worse than rounding alone; normalised: +15.5%.
* Each group's float16 step and min are picked when the pass reaches the group's first column, by
  tierlm's range search over the weights as updated by then, weighted by the unnormalised mean
  x^2 per column (the importance of tierlm.quant.imatrix): +5.3%, against +7.9% for that weighted
  search alone and +25% for the plain search.

The result is an ordinary QuantizedWeight of the format (same codes layout, same kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tierlm.quant.base import QuantError, QuantizedWeight, minmax_quantize

BLOCK = 128  # columns per batched update; groups must divide it
DAMP = 0.01  # fraction of H's mean diagonal added to it: keeps the factorisation stable


@dataclass
class InputMoments:
    """What GPTQ needs of one matrix's inputs, summed over calibration tokens."""

    normalized: torch.Tensor  # float64 (in, in): sum of u u^T, u = x / |x|
    squares: torch.Tensor  # float64 (in,): sum of x^2 per column
    num_tokens: int

    @property
    def importance(self) -> torch.Tensor:
        """float32 (in,): mean x^2 per column (the importance vector of tierlm.quant.imatrix)."""
        return (self.squares / self.num_tokens).float()

    def add(self, x: torch.Tensor) -> None:
        """x (N, in): one batch of inputs."""
        xd = x.detach().double()
        u = xd / xd.norm(dim=1, keepdim=True).clamp(min=1e-30)
        self.normalized += u.T @ u
        self.squares += xd.square().sum(dim=0)
        self.num_tokens += x.shape[0]

    @staticmethod
    def zeros(num_cols: int) -> InputMoments:
        return InputMoments(torch.zeros(num_cols, num_cols, dtype=torch.float64),
                            torch.zeros(num_cols, dtype=torch.float64), 0)


def gptq_quantize(quantizer, w: torch.Tensor, moments: InputMoments) -> QuantizedWeight:
    """float (out, in) -> the ``quantizer``'s format (a group-wise Quantizer: levels, group, search,
    pack), columns quantized in order with error compensation (module docstring)."""
    r, k = w.shape
    group, levels = quantizer.group, quantizer.levels
    if k % group or BLOCK % group:
        raise QuantError(f"GPTQ runs groups of at most {BLOCK} weights dividing the row: got {group} for {k}")
    if moments.normalized.shape != (k, k):
        raise QuantError(f"input moments of {moments.normalized.shape[0]} columns for a matrix of {k}")
    W = w.detach().double().clone()  # (R, K), updated as columns are quantized
    H = moments.normalized.clone()
    dead = torch.diag(H) == 0  # inputs that never fire: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    H += DAMP * torch.diag(H).mean() * torch.eye(k, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # (K, K)
    imp = moments.importance
    codes = torch.empty(r, k, dtype=torch.uint8)
    steps = torch.empty(r, k // group, dtype=torch.float16)
    mins = torch.empty(r, k // group, dtype=torch.float16)
    for b0 in range(0, k, BLOCK):
        b1 = min(k, b0 + BLOCK)
        wb = W[:, b0:b1].clone()  # (R, B)
        errs = torch.zeros_like(wb)
        ub = U[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % group == 0:  # this group's range, from its weights as updated so far
                _, s, m = minmax_quantize(wb[:, i:i + group].float(), levels, group, quantizer.search,
                                          imp[col:col + group])
                steps[:, col // group], mins[:, col // group] = s[:, 0], m[:, 0]
                step, low = s[:, 0].double(), m[:, 0].double()
                inv = torch.where(step > 0, 1.0 / step, torch.zeros_like(step))
            q = torch.round((wb[:, i] - low) * inv).clamp_(0, levels - 1)  # (R,)
            codes[:, col] = q.to(torch.uint8)
            e = (wb[:, i] - (q * step + low)) / ub[i, i]
            wb[:, i:] -= e[:, None] * ub[i, i:][None, :]
            errs[:, i] = e
        W[:, b1:] -= errs @ U[b0:b1, b1:]
    return QuantizedWeight(quantizer.name, (r, k), quantizer.pack(codes), group, steps, mins)


def gptq_quantize_layers_(llm, quantizer, sequences: list[list[int]]) -> None:
    """Calibrate on ``sequences`` with ``llm``'s float weights, then replace every layer matrix in
    place by its GPTQ quantization (one matrix's moments in memory at a time after calibration)."""
    from tierlm.model.linear import plain_weight
    from tierlm.quant.imatrix import MATRICES, record_inputs

    moments: dict[str, InputMoments] = {}

    def record(name: str, x: torch.Tensor) -> None:
        if name not in moments:
            moments[name] = InputMoments.zeros(x.shape[1])
        moments[name].add(x)

    record_inputs(llm, sequences, record)
    for i, lw in enumerate(llm.model.w.layers):
        for m in MATRICES:
            w = plain_weight(getattr(lw, m))
            setattr(lw, m, gptq_quantize(quantizer, w, moments.pop(f"layers.{i}.{m}")))
