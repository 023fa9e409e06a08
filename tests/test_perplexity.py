"""Perplexity (tierlm/eval/perplexity.py): the window/NLL arithmetic against transformers on a toy
model, and SmolLM2 on the Brown excerpt against llama.cpp (tests/data/llamacpp_reference.json)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.hf_models import VOCAB
from tierlm import LLM
from tierlm.eval import brown
from tierlm.eval.perplexity import nll_rows, perplexity, perplexity_from_ids, text_ids
from tierlm.loader.checkpoint import CheckpointError
from tierlm.loader.model_loader import default_model_path

REFERENCE = Path(__file__).parent / "data" / "llamacpp_reference.json"
SMOLLM2 = "smollm2-135m-instruct-q4_1"


def _ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_window_nll(model, seq: list[int]) -> torch.Tensor:
    """Direct float64 NLL of seq[1:] from transformers' logits of one fresh sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0].float().double()  # (T, vocab)
    targets = torch.tensor(seq[1:])
    return torch.logsumexp(logits[:-1], -1) - logits[:-1].gather(1, targets[:, None])[:, 0]


def test_nll_rows_exact():
    # Exact in float32, and large enough that a naive exp() would overflow.
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1000.0, 1000.0, 1000.0, 1000.0], [1000.0, 999.0, -1e4, -1e4]])
    got = nll_rows(logits, torch.tensor([2, 1, 1]))
    assert got.dtype == torch.float64
    expected = [math.log(4.0), math.log(4.0), 1.0 + math.log1p(math.exp(-1.0))]
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-13, atol=0)


@pytest.mark.parametrize("bos_id", [1, None])
def test_windows_and_nll_match_transformers(hf_model, bos_id):
    model, folder = hf_model("llama")
    llm = LLM(folder, dtype="float32", max_model_len=64, max_num_batched_tokens=8)  # chunks through the cache
    ctx, num_windows = 17, 3
    ids = _ids(60)
    got = perplexity_from_ids(llm, ids, bos_id, ctx=ctx, num_windows=num_windows)

    stride = ctx - 1 if bos_id is not None else ctx
    windows = [ids[w * stride:(w + 1) * stride] for w in range(num_windows)]
    ref = [_hf_window_nll(model, ([bos_id] if bos_id is not None else []) + win) for win in windows]
    ref_mean = torch.cat(ref).mean().item()
    assert (got.num_windows, got.num_predictions, got.num_tokens) == (3, 3 * (ctx - 1), 60)
    assert got.window_mean_nll == pytest.approx([r.mean().item() for r in ref], rel=1e-4)
    assert got.mean_nll == pytest.approx(ref_mean, rel=1e-4)
    assert got.ppl == pytest.approx(math.exp(ref_mean), rel=1e-4)

    every = perplexity_from_ids(llm, ids, bos_id, ctx=ctx, num_windows=None)
    assert every.num_windows == 60 // stride


def test_too_short_names_the_tokens_needed(hf_model):
    _, folder = hf_model("llama")
    llm = LLM(folder, dtype="float32", max_model_len=64)
    with pytest.raises(ValueError, match=r"the text has 40 tokens; 3 windows of ctx=17 need 48"):
        perplexity_from_ids(llm, _ids(40), 1, ctx=17, num_windows=3)
    with pytest.raises(ValueError, match="exceeds the engine's max_model_len=64"):
        perplexity_from_ids(llm, _ids(400), 1, ctx=128, num_windows=1)
    with pytest.raises(ValueError, match="no tokenizer"):
        perplexity(llm, "text")


def test_smollm2_brown_perplexity_matches_llamacpp():
    try:
        corpus = brown.find_corpus()
    except FileNotFoundError as err:
        pytest.fail(f"{err}")
    try:
        model_path = default_model_path()
    except CheckpointError as err:
        pytest.fail(f"{err}")
    reference = json.loads(REFERENCE.read_text())
    ref = reference["models"][SMOLLM2]
    protocol = reference["protocol"]
    text = brown.excerpt(corpus)
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == reference["excerpt"]["sha256"]

    llm = LLM(model_path, dtype="float32", max_model_len=protocol["ctx"], kv_cache_tokens=protocol["ctx"])
    assert llm.tokenizer.bos_token_id == ref["bos_token_id"]
    ids = text_ids(llm, text)
    used = np.asarray(ids[:ref["used_tokens"]], dtype="<i4")  # the reference hashes int32 little-endian
    assert len(ids) == ref["excerpt_tokens"]
    assert used[:len(ref["first_ids"])].tolist() == ref["first_ids"]
    assert hashlib.sha256(used.tobytes()).hexdigest() == ref["used_ids_sha256"], "tokenizer disagrees with llama.cpp"

    got = perplexity(llm, text, ctx=protocol["ctx"], num_windows=protocol["num_windows"])
    gap = got.ppl / ref["ppl"] - 1
    window_gaps = [f"{g - r:+.4f}" for g, r in zip(got.window_mean_nll, ref["window_mean_nll"])]
    print(f"\nSmolLM2 Brown PPL: tierlm {got.ppl:.4f}, llama.cpp {ref['ppl']:.4f}, gap {100 * gap:+.2f}%; "
          f"per-window NLL gaps {window_gaps}")
    assert got.num_predictions == protocol["predictions"]
    # llama.cpp quantizes activations to 8 bits inside its Q4_1 matmuls; tierlm dequantizes weights
    # to float32 and keeps activations exact, so the two differ by a fraction of a percent.
    assert abs(gap) < 0.01, f"PPL {got.ppl:.4f} vs llama.cpp {ref['ppl']:.4f} ({100 * gap:+.2f}%)"
