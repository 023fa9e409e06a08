"""Activation-weighted quantization (tierlm.quant.imatrix): the recorded importance equals the
inputs' mean square, the same file gives the same weights resident and streamed from a store, a
store quantized without it is not reused, and bad files are clear errors."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.test_tiered import PROMPT, mid_model  # noqa: F401 - mid_model is a fixture
from tierlm import LLM
from tierlm.config import ConfigError
from tierlm.quant.imatrix import collect_importance, load_importance, save_importance

SEQS = [list(range(3, 40)), list(range(100, 164))]


@pytest.fixture(scope="module")
def importance_file(mid_model, tmp_path_factory):  # noqa: F811
    llm = LLM(mid_model, max_model_len=256, kv_cache_tokens=256)
    imp = collect_importance(llm, SEQS)
    path = tmp_path_factory.mktemp("imatrix") / "imp.safetensors"
    save_importance(path, imp, mid_model, sum(map(len, SEQS)))
    return path, imp, llm


def test_importance_is_the_mean_square_of_each_matrix_input(importance_file):
    _, imp, llm = importance_file
    assert sorted(imp) == sorted(f"layers.{i}.{m}" for i in range(4) for m in ("qkv", "o", "up", "down"))
    # Layer 0's qkv input is the attention norm of the embedding rows, over both sequences' tokens.
    w = llm.model.w
    x = F.embedding(torch.tensor(SEQS[0] + SEQS[1]), w.embed)  # (101, 256)
    h = F.rms_norm(x, (256,), w.layers[0].attn_norm, llm.arch.norm_eps)
    torch.testing.assert_close(imp["layers.0.qkv"], h.square().mean(dim=0), rtol=1e-5, atol=1e-7)
    assert imp["layers.2.down"].shape == (704,) and (imp["layers.2.down"] > 0).all()


def _logits(llm):
    return llm.score(PROMPT)


def test_the_file_gives_the_same_model_resident_and_streamed(importance_file, mid_model, tmp_path, caplog):  # noqa: F811
    path, _, _ = importance_file
    plain = _logits(LLM(mid_model, max_model_len=256, kv_cache_tokens=256, quant="q4", quant_method="rtn"))
    weighted = _logits(LLM(mid_model, max_model_len=256, kv_cache_tokens=256, quant="q4", quant_importance=path))
    assert not torch.equal(plain, weighted)  # the weighting changed the codes
    store = tmp_path / "store"
    _logits(LLM(mid_model, max_model_len=256, kv_cache_tokens=256, quant="q4", quant_method="rtn", weight_memory="50%",
                store_dir=store))
    with caplog.at_level(logging.WARNING, logger="tierlm"):
        streamed = _logits(LLM(mid_model, max_model_len=256, kv_cache_tokens=256, quant="q4", quant_importance=path,
                               weight_memory="50%", store_dir=store))
    assert "building the weight store" in caplog.text  # the unweighted store was not reused
    assert (streamed - weighted).abs().max().item() <= 1e-4 * weighted.abs().max().item()


def test_bad_importance_files_are_config_errors(importance_file, mid_model, tmp_path):  # noqa: F811
    path, imp, _ = importance_file
    with pytest.raises(ConfigError, match="does not exist"):
        LLM(mid_model, max_model_len=256, quant="q4", quant_importance=tmp_path / "none.safetensors")
    with pytest.raises(ConfigError, match="weights how a tierlm format .* is produced"):
        LLM(mid_model, max_model_len=256, quant_importance=path)
    other = tmp_path / "other.safetensors"
    save_importance(other, imp, path, 1)  # "made" for a different checkpoint (the importance file itself)
    with pytest.raises(ConfigError, match="made for another checkpoint"):
        LLM(mid_model, max_model_len=256, quant="q4", quant_importance=other)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="cannot be read"):
        LLM(mid_model, max_model_len=256, quant="q4", quant_importance=broken)
    # The tiered path checks the file before it builds a store.
    with pytest.raises(ConfigError, match="does not exist"):
        LLM(mid_model, max_model_len=256, quant="q4", quant_importance=tmp_path / "none.safetensors",
            weight_memory="50%", store_dir=tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_cli_imatrix_calibrates_the_embedded_model_on_brown_text(tmp_path):
    out = tmp_path / "smollm2.imatrix"
    run = subprocess.run([sys.executable, "-m", "tierlm", "imatrix", str(out), "--windows", "1"],
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr
    # 30 layers x (qkv, o, up, down); one window of BOS + 511 tokens.
    assert "wrote" in run.stdout and "120 matrices from 512 calibration tokens" in run.stdout
    from tierlm.loader.model_loader import default_model_path

    imp = load_importance(out, default_model_path())
    assert imp["layers.0.up"].shape == (576,)
