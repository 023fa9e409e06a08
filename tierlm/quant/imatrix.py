"""Activation-weighted quantization: an importance vector per matrix (llama.cpp's "imatrix").

The error a quantized weight adds to a layer's output is (w - deq) * x; over calibration text its
expected square, per input column j, is (w_j - deq_j)^2 * E[x_j^2]. So the range search of the
group-wise formats (tierlm.quant.base.minmax_quantize, ``importance=``) minimises
sum_j E[x_j^2] (w_j - deq_j)^2 instead of the plain squared error: the levels go where the inputs
are loud. Measured on the Brown press excerpt (bench/results/quant_quality.md), it cuts q4 g64's
perplexity cost by about 3x.

The vectors come from one calibration run of the float model (``collect_importance``) over text that
is not the evaluated excerpt: by default the start of the 14 other Brown categories, 7,168 tokens.
They are saved as safetensors (``layers.{i}.{qkv,o,up,down}``: float32 (in,), the store's names)
with the model's file names and sizes, and used by ``LLM(..., quant="q4", quant_importance=FILE)``,
``tierlm quantize --importance FILE`` and the tiered store (whose name and meta carry the file's
digest, so a store quantized without it, or with another, is rebuilt).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from tierlm.quant.base import QuantError

# Every Brown category but "ca", the evaluated press text. Measured with GPTQ in column order, q4: 8 gave
# +5.4% perplexity on SmolLM2 and +6.8% on Gemma-3, all 14 +4.2% and +7.3% (q5: +0.9/+1.3% against
# +1.5/+0.4%), three windows of each of the 14 (42) +4.3% on SmolLM2. So the choice of text moves
# these results by about a point either way; more windows of the same text did not help.
CALIB_CATEGORIES = ("cb", "cc", "cd", "ce", "cf", "cg", "ch", "cj", "ck", "cl", "cm", "cn", "cp", "cr")
CALIB_CHARS = 4000  # characters read per category: comfortably more than one window of tokens
MATRICES = ("qkv", "o", "up", "down")


class ImportanceError(QuantError):
    """An importance file that is missing, corrupt or made for another model; the message says which."""


def calibration_sequences(tokenizer, num_windows: int | None = None, ctx: int = 512) -> list[list[int]]:
    """[BOS] + (ctx - 1) tokens from the start of each of the first ``num_windows`` (default: all)
    calibration categories, encoded with ``tokenizer`` (a model's tierlm tokenizer)."""
    from tierlm.eval import brown

    if tokenizer is None:
        raise ImportanceError("calibration text needs the model's tokenizer")
    seqs = []
    for cat in CALIB_CATEGORIES[:num_windows]:  # [:None]: all
        ids = tokenizer.encode(brown.press_text(cat, max_chars=CALIB_CHARS), add_special_tokens=False)
        bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        seqs.append([*bos, *ids[:ctx - len(bos)]])
    return seqs


class _Recorder:
    """A LinearMethod wrapper that hands the inputs of the matrices it is told about to ``record``
    (matrices keyed by the weight object: the model holds each matrix once)."""

    def __init__(self, inner, names: dict[int, str], record: Callable[[str, torch.Tensor], None]):
        self.inner, self.names, self.record, self.name = inner, names, record, f"record+{inner.name}"

    def prepare(self, weight):
        return self.inner.prepare(weight)

    def apply(self, x: torch.Tensor, weight, bias):
        name = self.names.get(id(weight))
        if name is not None:
            self.record(name, x)  # x (N, in)
        return self.inner.apply(x, weight, bias)


def record_inputs(llm, sequences: list[list[int]], record: Callable[[str, torch.Tensor], None]) -> None:
    """Score ``sequences`` with ``llm`` (float weights, all resident), calling record(name, x) with the
    input x (N, in) of every layer matrix ``layers.{i}.{qkv,o,up,down}`` it multiplies."""
    model = llm.model
    if model.tiers is not None:
        raise ImportanceError("calibrate on the float model with all weights resident (no weight_memory)")
    from tierlm.progress import progress_bar

    names = {id(getattr(lw, m)): f"layers.{i}.{m}" for i, lw in enumerate(model.w.layers) for m in MATRICES}
    base = model.linear
    model.linear = _Recorder(base, names, record)
    try:
        with progress_bar(len(sequences), "calibrating", "sequence") as bar:
            for seq in sequences:
                llm.score(seq)
                bar.update(1)
    finally:
        model.linear = base


def collect_importance(llm, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """Per layer matrix, the mean of x^2 over the calibration tokens per input column: float32 (in,)."""
    sum_sq: dict[str, torch.Tensor] = {}  # float64 (in,)
    num_tokens: dict[str, int] = {}

    def record(name: str, x: torch.Tensor) -> None:
        sum_sq[name] = sum_sq.get(name, 0) + x.detach().double().square().sum(dim=0)
        num_tokens[name] = num_tokens.get(name, 0) + x.shape[0]

    record_inputs(llm, sequences, record)
    return {n: (s / num_tokens[n]).float() for n, s in sorted(sum_sq.items())}


def checkpoint_identity(model_path: str | Path) -> list[list]:
    """[[file name, size], ...] of a checkpoint (a GGUF file or an HF folder's safetensors): what an
    importance file records of its model. Paths and times are left out: a copied model is the same."""
    p = Path(model_path)
    files = [p] if p.is_file() else sorted(p.glob("*.safetensors"))
    return [[f.name, f.stat().st_size] for f in files]


def save_importance(path: str | Path, importance: dict[str, torch.Tensor], model_path: str | Path,
                    num_tokens: int) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    save_file({n: t.contiguous() for n, t in importance.items()}, str(path),
              metadata={"tierlm": "importance-v1", "model": json.dumps(checkpoint_identity(model_path)),
                        "calibration_tokens": str(num_tokens)})
    return path


def load_importance(path: str | Path, model_path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The vectors in ``path``; with ``model_path``, checked to come from that checkpoint."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ImportanceError(f"importance file {path} does not exist (make one with `tierlm imatrix`)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            out = {n: f.get_tensor(n).float() for n in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # safetensors raises several types for a corrupt file
        raise ImportanceError(f"importance file {path} cannot be read: {e}") from e
    if meta.get("tierlm") != "importance-v1":
        raise ImportanceError(f"{path} is not a tierlm importance file")
    if model_path is not None and json.loads(meta.get("model", "[]")) != checkpoint_identity(model_path):
        raise ImportanceError(f"importance file {path} was made for another checkpoint: {meta.get('model')}")
    for n, t in out.items():
        if t.dim() != 1 or not torch.isfinite(t).all() or (t < 0).any():
            raise ImportanceError(f"importance file {path}: {n} is not a finite non-negative vector")
    return out


def file_digest(path: str | Path) -> str:
    """First 10 hex digits of the file's SHA-1: names a store quantized with this importance."""
    path = Path(path)
    if not path.is_file():
        raise ImportanceError(f"importance file {path} does not exist (make one with `tierlm imatrix`)")
    try:
        return hashlib.sha1(path.read_bytes()).hexdigest()[:10]
    except OSError as e:
        raise ImportanceError(f"importance file {path} cannot be read: {e.strerror}") from e


def importance_for(importance: dict[str, torch.Tensor] | None, name: str, num_cols: int) -> torch.Tensor | None:
    """The vector for matrix ``name`` (None without importance); a missing or mis-sized one is an error."""
    if importance is None:
        return None
    t = importance.get(name)
    if t is None or t.numel() != num_cols:
        raise ImportanceError(f"the importance file has no vector of {num_cols} for {name}: made for another model?")
    return t


def quantize_layers_(weights, quantizer, importance: dict[str, torch.Tensor]) -> None:
    """Quantize every layer matrix of ``weights`` (tierlm.loader.weights.ModelWeights) in place, one at
    a time, each with its importance vector (the quantized linear method then uses them as they are)."""
    for i, lw in enumerate(weights.layers):
        for m in MATRICES:
            w = getattr(lw, m)
            setattr(lw, m, quantizer.quantize(w, importance_for(importance, f"layers.{i}.{m}", w.shape[1])))
