"""Which method makes a tierlm format when the user names only the format (``quant_method="auto"``).

GPTQ (tierlm.quant.gptq) loses far less than rounding each group on its own (rtn): q4 g64 on the
Brown press excerpt, SmolLM2-135M +2.70% perplexity against +26% for rtn, Gemma-3-270m +8.0%
against +43% (bench/results/quant_quality.md). Its price is a one-off calibration: a few forward
passes of 7,168 calibration tokens plus a Cholesky solve per matrix, about 1.5 minutes for
SmolLM2 on two cores, growing with the parameter count. The result is cached as a weight store
(tierlm.quant.store), so it is paid once per model and format.

Rule: GPTQ when the model has a tokenizer (the calibration text must be encoded), no importance
file was given (rtn's weighted search is what that asks for), and at most
``GPTQ_MAX_PARAMETERS`` parameters, where the one-off cost stays within minutes; rtn otherwise.
"""

from __future__ import annotations

GPTQ_MAX_PARAMETERS = 1_500_000_000


def default_method(quant: str, arch, has_tokenizer: bool, has_importance: bool) -> tuple[str, str]:
    """(method, why) for producing ``quant`` from a model of architecture ``arch``
    (tierlm.model.spec.ArchConfig)."""
    if has_importance:
        return "rtn", "an importance file weights rtn's range search"
    if not has_tokenizer:
        return "rtn", "gptq calibrates on text and this model has no tokenizer"
    num_params = arch.num_parameters()
    if num_params > GPTQ_MAX_PARAMETERS:
        return "rtn", (f"{num_params / 1e9:.1f} B parameters: gptq's one-off calibration would take long "
                       f"(above {GPTQ_MAX_PARAMETERS / 1e9:.1f} B rtn is the default; ask for quant_method='gptq')")
    return "gptq", (f"{num_params / 1e6:.0f} M parameters: calibrated once on Brown text and cached as a "
                    "weight store")
