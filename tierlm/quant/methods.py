"""Which method makes a tierlm format when the user names only the format (``quant_method="auto"``).

GPTQ (tierlm.quant.gptq) loses far less than rounding each group on its own (rtn) below 8 bits:
q4 g64 on the Brown press excerpt, SmolLM2-135M +3.5% perplexity against +25.1% for rtn,
Gemma-3-270m +6.4% against +31.5% (llama.cpp's Q4_0 at the same 4.5 bits: +17.4% and +48.3%);
q8 rtn is within 0.4% on both (bench/results/quant_quality.md, quant_table.md).

Its price is a one-off calibration (7,168 tokens of Brown text through the model layer by layer, each
layer on the quantized output of the ones before, a Cholesky solve per matrix). On the 2-core AMD EPYC
with AVX2 of 2026-12-05 a q4 store took 427 s (SmolLM2, 106 M layer parameters) and 425 s (Gemma-3,
100 M), 4.0-4.25 s per million layer parameters, hence ``GPTQ_SECONDS_PER_M_LAYER_PARAMS``; an
AVX-512 EPYC took a quarter of that for the earlier, one-pass calibration (commit d1d103f). So both
real models get GPTQ (about 7 minutes, once) and a 1.1B model (969 M layer parameters, about an hour)
gets rtn unless asked. The result is cached as a weight store (tierlm.quant.store): a second load of
the same model, format and group reads it in under a second.

Rule, in this order:

* an importance file was given: rtn (rtn's weighted range search is what that file is for; GPTQ
  computes its own);
* the model has no tokenizer: rtn (GPTQ calibrates on text);
* the format is one of ``RTN_FORMATS``, where GPTQ measured no better than rtn: rtn;
* GPTQ's estimated one-off cost (``gptq_minutes``) above ``GPTQ_MAX_MINUTES``: rtn, with a log line
  saying that ``quant_method="gptq"`` (or ``tierlm quantize --method gptq``) buys the quality;
* otherwise GPTQ, its store cached under ``$TIERLM_CACHE`` (tierlm.quant.store), so the cost is paid
  once per model, format and group.
"""

from __future__ import annotations

from typing import NamedTuple

RTN_FORMATS = frozenset({"q8"})  # rtn already within 0.5% of float
GPTQ_MAX_MINUTES = 15.0  # the longest first load tierlm takes on by itself for a better format
GPTQ_SECONDS_PER_M_LAYER_PARAMS = 4.0


class MethodChoice(NamedTuple):
    """The method ``default_method`` picked and, for the log, why (unpacks as ``method, reason``)."""

    method: str  # "rtn" or "gptq"
    reason: str


def layer_parameters(arch) -> int:
    """Weights of the layer matrices (q/k/v, o, the MLP) of ``arch`` (tierlm.model.spec.ArchConfig):
    what GPTQ calibrates and solves; the embeddings and an untied head are copied or rounded."""
    embeddings = arch.vocab_size * arch.hidden_size * (1 if arch.tie_embeddings else 2)
    return arch.num_parameters() - embeddings


def gptq_minutes(arch) -> float:
    """Estimated minutes of GPTQ's one-off calibration and quantization of ``arch`` into a store, on
    the 2-core machine of the module docstring (a faster machine takes less)."""
    return layer_parameters(arch) / 1e6 * GPTQ_SECONDS_PER_M_LAYER_PARAMS / 60


def default_method(quant: str, arch, has_tokenizer: bool, has_importance: bool) -> MethodChoice:
    """The method for producing tierlm format ``quant`` from a model of architecture ``arch``
    (tierlm.model.spec.ArchConfig) by the rule of the module docstring."""
    if has_importance:
        return MethodChoice("rtn", "an importance file weights rtn's range search")
    if not has_tokenizer:
        return MethodChoice("rtn", "gptq calibrates on text and this model has no tokenizer")
    if quant in RTN_FORMATS:
        return MethodChoice("rtn", f"gptq measured no better than rtn at {quant}")
    minutes = gptq_minutes(arch)
    if minutes > GPTQ_MAX_MINUTES:
        return MethodChoice("rtn", f"gptq's one-off calibration would take about {minutes:.0f} minutes here "
                                   f"(more than {GPTQ_MAX_MINUTES:.0f}); quant_method='gptq' asks for it")
    return MethodChoice("gptq", f"calibrated once (about {max(minutes, 1):.0f} minutes) and cached as a weight store")
