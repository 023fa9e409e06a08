"""Perplexity of a text under a model, by the protocol in ``tierlm.eval.brown`` (llama.cpp's reference).

The text is tokenized once, without BOS, and cut into consecutive, non-overlapping windows of
``ctx - 1`` tokens. Each window runs as a fresh sequence of ``ctx`` tokens, ``[BOS] + window``,
and every window token is scored by the logits one position earlier::

    position   0     1     2    ...  ctx-2   ctx-1
    input     BOS    t0    t1   ...  t_{c-3} t_{c-2}      (c = ctx; window = t0 .. t_{c-2})
    predicts   t0    t1    t2   ...  t_{c-2}  (unused)

so a window gives ``ctx - 1`` predictions. A model without a BOS token has no neutral first
position: its windows are ``ctx`` tokens and the first one is context only (still ``ctx - 1``
predictions, and the stride is ``ctx``).

``NLL_i = logsumexp(logits_i) - logits_i[target_i]`` in float64 over float32 logits;
``PPL = exp(mean NLL)`` over all predictions of all windows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tierlm.progress import progress_bar

if TYPE_CHECKING:
    from tierlm.api import LLM

__all__ = ["PerplexityResult", "perplexity", "perplexity_from_ids", "nll_rows", "text_ids"]

_NLL_CHUNK_ROWS = 64  # float64 copies of 64 rows: 25 MiB for a 49k vocab, 128 MiB for Gemma's 262k


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    mean_nll: float  # natural log, per predicted token
    window_mean_nll: tuple[float, ...]  # one per window, in window order
    num_predictions: int  # scored tokens, all windows together
    num_windows: int
    num_tokens: int  # tokens of the whole text (windows use a prefix of them)

    def describe(self) -> str:
        return (f"PPL {self.ppl:.4f} (mean NLL {self.mean_nll:.5f}) over {self.num_predictions} predictions "
                f"in {self.num_windows} windows; text has {self.num_tokens} tokens")


def nll_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per row, float64. logits (N, vocab) float32, targets (N,) int."""
    out = torch.empty(len(targets), dtype=torch.float64)
    for i0 in range(0, len(targets), _NLL_CHUNK_ROWS):
        x = logits[i0:i0 + _NLL_CHUNK_ROWS].to(torch.float32).to(torch.float64)  # (n, vocab)
        t = targets[i0:i0 + _NLL_CHUNK_ROWS].to(torch.int64)  # (n,)
        out[i0:i0 + len(t)] = torch.logsumexp(x, dim=-1) - x.gather(1, t[:, None])[:, 0]
    return out


def text_ids(llm: LLM, text: str) -> list[int]:
    """Protocol step 1: the whole text in one call, no BOS.

    llama.cpp's reference tokenizes with special-token parsing off; tierlm's tokenizer always parses
    it, so the two agree only for text without special-token strings (true of the Brown excerpt).
    """
    if llm.tokenizer is None:
        raise ValueError("this model has no tokenizer; use perplexity_from_ids with token ids")
    return llm.tokenizer.encode(text, add_special_tokens=False)


def perplexity(llm: LLM, text: str, ctx: int = 512, num_windows: int | None = 6,
               progress: bool = False) -> PerplexityResult:
    """Perplexity of ``text`` (see the module docstring); ``num_windows=None`` uses every full window;
    ``progress``: a bar on a terminal (tierlm.progress)."""
    ids = text_ids(llm, text)
    return perplexity_from_ids(llm, ids, llm.tokenizer.bos_token_id, ctx, num_windows, progress)


def perplexity_from_ids(llm: LLM, ids: Sequence[int], bos_id: int | None, ctx: int = 512,
                        num_windows: int | None = 6, progress: bool = False) -> PerplexityResult:
    """The protocol on already tokenized text; ``bos_id=None`` means the model has no BOS."""
    if ctx < 2:
        raise ValueError(f"ctx must be >= 2 (one context token and one prediction), got {ctx}")
    if ctx > llm.config.model.max_model_len:
        raise ValueError(f"ctx={ctx} exceeds the engine's max_model_len={llm.config.model.max_model_len}")
    stride = ctx - 1 if bos_id is not None else ctx  # text tokens per window
    available = len(ids) // stride
    if num_windows is None:
        num_windows = available
        if num_windows == 0:
            raise ValueError(f"the text has {len(ids)} tokens; one window of ctx={ctx} needs {stride}")
    if num_windows < 1:
        raise ValueError(f"num_windows must be >= 1 or None, got {num_windows}")
    if available < num_windows:
        raise ValueError(f"the text has {len(ids)} tokens; {num_windows} windows of ctx={ctx} need "
                         f"{num_windows * stride}")

    window_nll: list[torch.Tensor] = []
    with progress_bar(num_windows, "perplexity", "window", enabled=progress) as bar:
        for w in range(num_windows):
            window = [int(t) for t in ids[w * stride:(w + 1) * stride]]
            seq = [bos_id, *window] if bos_id is not None else window  # (ctx,)
            logits = llm.score(seq)  # (ctx, vocab) float32
            targets = torch.tensor(seq[1:], dtype=torch.int64)  # position i predicts seq[i + 1]
            window_nll.append(nll_rows(logits[:-1], targets))
            bar.set_postfix(ppl=f"{math.exp(torch.cat(window_nll).mean().item()):.3f}", refresh=False)
            bar.update(1)
    all_nll = torch.cat(window_nll)  # (num_windows * (ctx - 1),) float64
    mean_nll = all_nll.mean().item()
    return PerplexityResult(ppl=math.exp(mean_nll), mean_nll=mean_nll,
                            window_mean_nll=tuple(n.mean().item() for n in window_nll),
                            num_predictions=len(all_nll), num_windows=num_windows, num_tokens=len(ids))
