"""GPTQ (tierlm.quant.gptq): with uncorrelated inputs it is exactly the importance-weighted search;
with correlated inputs its output error is far below rounding alone; on load it gives a working
quantized model, read from a store built one layer at a time, which `tierlm quantize` finds again.

The SmolLM2 model is conftest's ``smollm2_q4``: calibrated once a session, on 2 of the 14 windows."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import SMOLLM2_Q4
from tierlm import LLM, SamplingParams
from tierlm.cli import main
from tierlm.config import ConfigError
from tierlm.loader.model_loader import default_model_path
from tierlm.memory.store import WeightStore
from tierlm.quant import get_quantizer
from tierlm.quant.base import QuantError, minmax_dequantize
from tierlm.quant.gptq import InputMoments, gptq_quantize
from tierlm.quant.imatrix import MATRICES
from tierlm.quant.store import StoreQuant, default_store_dir, read_quantized
from tierlm.quant.tiles import RowTiles, tile_rows


@pytest.mark.parametrize("act_order", [True, False])
def test_uncorrelated_inputs_give_exactly_the_weighted_search(act_order):
    torch.manual_seed(0)
    w = torch.randn(48, 256)
    squares = torch.rand(256, dtype=torch.float64) * 10
    # H diagonal: U is diagonal, so no error moves to other columns, in whatever order they go (distinct
    # diagonal values: act-order really permutes them).
    moments = InputMoments(torch.diag(torch.rand(256, dtype=torch.float64) + 0.5), squares, 4)
    for fmt in ("q4", "q3h", "q3"):
        q = get_quantizer(fmt, 64)
        got = gptq_quantize(q, w, moments, act_order=act_order)
        want = q.quantize(w, (squares / 4).float())
        assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
        assert torch.equal(got.mins, want.mins)


@pytest.mark.parametrize("act_order", [True, False])
def test_correlated_inputs_lower_the_output_error(act_order):
    torch.manual_seed(0)
    k = 256
    x = torch.randn(2048, k) @ (torch.randn(k, k) / k**0.5) + 0.1 * torch.randn(2048, k)  # (N, K)
    w = torch.randn(64, k)
    moments = InputMoments.zeros(k)
    moments.add(x)
    q = get_quantizer("q4", 64)
    u = x.double() / x.double().norm(dim=1, keepdim=True)

    def output_error(qw) -> float:
        d = minmax_dequantize(q.unpack(qw.codes, k), qw.scales, qw.mins).double() - w.double()
        return (u @ d.T).square().sum().item()

    rounded = output_error(q.quantize(w, moments.importance))
    # measured: 0.56 act-order, 0.53 in order
    assert output_error(gptq_quantize(q, w, moments, act_order=act_order)) < 0.6 * rounded


@pytest.fixture(scope="module")
def resident(smollm2_q4):
    assert smollm2_q4.config.quant.quant_method == "gptq"  # the default for this model (tierlm.quant.methods)
    return smollm2_q4


def test_gptq_on_load_runs_and_rejects_what_it_cannot_do(resident, tmp_path):
    from tierlm.model.kernels import quant_gemv

    # q4 matrices, repacked into row tiles where the kernel takes them (not the AVX2 build)
    kernel = quant_gemv()
    tiled = kernel is not None and kernel.row_tiles
    assert type(resident.model.w.layers[0].qkv).__name__ == ("RowTiles" if tiled else "QuantizedWeight")
    out = resident.generate(["The capital of France is"], SamplingParams(max_tokens=4, temperature=0))[0]
    assert len(out.token_ids) == 4
    with pytest.raises(ConfigError, match="computes its own importance"):
        LLM(None, max_model_len=128, quant="q4", quant_method="gptq", quant_importance=tmp_path / "im.safetensors")
    with pytest.raises(ConfigError, match="quant_method must be one of auto, rtn, gptq; got 'awq'"):
        LLM(None, max_model_len=128, quant="q4", quant_method="awq")
    with pytest.raises(QuantError, match="takes neither gguf"):
        StoreQuant("gguf", method="gptq")


def test_quantize_command_finds_the_store_the_model_was_loaded_from(resident):
    """`tierlm quantize` (method auto) picks GPTQ for this model as the load did and, pointed at the
    store the load built (calibrated layer by layer from the checkpoint), reuses it; the resident model
    holds exactly that store's codes, steps and mins, and a model streaming it (weight_memory)
    generates what the resident one does."""
    folder = default_store_dir(resident.checkpoint, torch.float32, StoreQuant("q4", 64, method="gptq"))
    built = (folder / "manifest.json").stat().st_mtime_ns
    assert main(["quantize", str(default_model_path()), str(folder), "--format", "q4"]) == 0
    assert (folder / "manifest.json").stat().st_mtime_ns == built  # reused, not rebuilt
    store = WeightStore(folder)
    assert store.meta["method"] == "gptq" and store.meta["quant"] == "q4"
    assert store.meta["calibration"]["categories"] == ["cb", "cc"]  # conftest's short calibration
    for i, lw in enumerate(resident.model.w.layers):
        for m in MATRICES:
            got, want = read_quantized(store, f"layers.{i}.{m}"), getattr(lw, m)
            if isinstance(want, RowTiles):  # the same codes, steps and mins, repacked for the kernel
                assert torch.equal(tile_rows(got).tiles, want.tiles), f"layers.{i}.{m}"
                continue
            assert torch.equal(got.codes, want.codes), f"layers.{i}.{m}"
            assert torch.equal(got.scales, want.scales) and torch.equal(got.mins, want.mins)
    store.close()
    streamed = LLM(None, **SMOLLM2_Q4, weight_memory="30%", store_dir=folder)
    assert (folder / "manifest.json").stat().st_mtime_ns == built
    ids = resident.tokenizer.encode("The capital of France is Paris, and the capital of Germany is")
    torch.testing.assert_close(streamed.score(ids), resident.score(ids), rtol=0, atol=1e-4)
    params = SamplingParams(max_tokens=8, temperature=0)
    assert streamed.generate([ids], params)[0].token_ids == resident.generate([ids], params)[0].token_ids
    # an RTN store is another store: its name and meta differ
    assert StoreQuant("q4", 64).tag != StoreQuant("q4", 64, method="gptq").tag
