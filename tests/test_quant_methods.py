"""The default quantization method (tierlm.quant.methods): which method for which format, model,
tokenizer and importance file, exactly; and that ``LLM(model, quant="q4")`` with the default method
calibrates GPTQ once and reuses its cached store on the next load."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.conftest import SMOLLM2_Q4
from tierlm import LLM
from tierlm.loader.model_loader import default_model_path, open_checkpoint
from tierlm.quant import FORMATS
from tierlm.quant.methods import (
    GPTQ_MAX_MINUTES,
    GPTQ_SECONDS_PER_M_LAYER_PARAMS,
    RTN_FORMATS,
    default_method,
    gptq_minutes,
    layer_parameters,
)
from tierlm.quant.store import StoreQuant, default_store_dir


@pytest.fixture(scope="module")
def smollm2_arch():
    opened = open_checkpoint(default_model_path())
    opened.reader.close()
    return opened.config


@pytest.fixture(scope="module")
def llama_1b_arch(smollm2_arch):
    """The random Llama 1.1B of bench/make_models.py (TinyLlama's shape): only its sizes matter here."""
    return replace(smollm2_arch, vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                   num_heads=32, num_kv_heads=4, head_dim=64, tie_embeddings=False)


def test_layer_parameters_count_the_matrices_gptq_solves(smollm2_arch, llama_1b_arch):
    # SmolLM2: 30 x (576 x (576 + 2 x 192) qkv + 576 x 576 o + 3 x 576 x 1536 MLP); tied embeddings
    assert layer_parameters(smollm2_arch) == 30 * (576 * 960 + 576 * 576 + 3 * 576 * 1536) == 106_168_320
    # Llama 1.1B: 22 x (2048 x (2048 + 2 x 256) + 2048 x 2048 + 3 x 2048 x 5632); untied head
    assert layer_parameters(llama_1b_arch) == 22 * (2048 * 2560 + 2048 * 2048 + 3 * 2048 * 5632) == 968_884_224
    assert gptq_minutes(smollm2_arch) == pytest.approx(106.16832 * GPTQ_SECONDS_PER_M_LAYER_PARAMS / 60)


def test_default_method_by_format_tokenizer_and_importance(smollm2_arch):
    for fmt in FORMATS:
        want = "rtn" if fmt in RTN_FORMATS else "gptq"
        assert default_method(fmt, smollm2_arch, True, False).method == want, fmt
        assert default_method(fmt, smollm2_arch, True, True).method == "rtn", fmt  # an importance file: rtn's
        assert default_method(fmt, smollm2_arch, False, False).method == "rtn", fmt  # nothing to calibrate on
    assert default_method("q4", smollm2_arch, False, False).reason == (
        "gptq calibrates on text and this model has no tokenizer")
    method, reason = default_method("q4", smollm2_arch, True, False)  # unpacks as a pair
    assert (method, reason) == ("gptq", "calibrated once (about 7 minutes) and cached as a weight store")


def test_default_method_by_estimated_cost(smollm2_arch, llama_1b_arch):
    assert gptq_minutes(smollm2_arch) <= GPTQ_MAX_MINUTES < gptq_minutes(llama_1b_arch)
    choice = default_method("q4", llama_1b_arch, True, False)
    assert choice.method == "rtn"
    assert choice.reason == ("gptq's one-off calibration would take about 65 minutes here (more than 15); "
                             "quant_method='gptq' asks for it")
    # a model of twice SmolLM2's layers is still calibrated by default
    assert default_method("q4", replace(smollm2_arch, num_layers=60), True, False).method == "gptq"


def test_q4_by_default_is_gptq_and_a_second_load_reuses_its_store(smollm2_q4, caplog):
    assert smollm2_q4.config.quant.quant_method == "gptq"
    folder = default_store_dir(smollm2_q4.checkpoint, torch.float32, StoreQuant("q4", 64, method="gptq"))
    assert folder.parent.parent == Path(os.environ["TIERLM_CACHE"])  # conftest's session cache
    built = (folder / "manifest.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="tierlm"):
        again = LLM(None, **SMOLLM2_Q4)
    assert "quant_method=gptq for q4" in caplog.text
    assert f"reusing the weight store {folder}" in caplog.text and "building the weight store" not in caplog.text
    assert (folder / "manifest.json").stat().st_mtime_ns == built
    ids = smollm2_q4.tokenizer.encode("The capital of France is Paris, and the capital of Germany is")
    assert torch.equal(again.score(ids), smollm2_q4.score(ids))
