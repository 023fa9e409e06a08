"""tierlm against transformers on random-weight models of every built-in family (float32)."""

from __future__ import annotations

import pytest
import torch

from tests.hf_models import FAMILIES, VOCAB
from tierlm import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    # No EOS at all: HF's min_new_tokens would instead mask the EOS logit, changing the argmax.
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_at_every_position(hf_model, family):
    model, folder = hf_model(family)
    llm = LLM(folder, dtype="float32", max_num_batched_tokens=16)  # 40 tokens -> 3 chunks through the cache
    ids = _prompt(40, seed=1)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float()
    got = llm.score(ids)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-4, rtol=0), (got - ref).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_identical(hf_model, family):
    model, folder = hf_model(family)
    llm = LLM(folder, dtype="float32")
    ids = _prompt(12, seed=2)
    expected = _hf_greedy(model, ids, 32)
    assert len(set(expected)) > 3, "degenerate reference: the test model repeats itself"
    assert llm.generate([ids], GREEDY)[0].token_ids == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_alone_and_preemption_is_invisible(hf_model, family):
    _, folder = hf_model(family)
    prompts = [_prompt(n, seed=10 + n) for n in (5, 17, 9, 30)]
    alone_llm = LLM(folder, dtype="float32", max_num_seqs=1)
    alone = [alone_llm.generate([p], GREEDY)[0].token_ids for p in prompts]

    batched = LLM(folder, dtype="float32", max_num_seqs=4).generate(prompts, GREEDY)
    assert [o.token_ids for o in batched] == alone
    # A small budget splits prompts into chunks fused with decodes; the classic policy does not.
    split = LLM(folder, dtype="float32", max_num_seqs=4, max_num_batched_tokens=12).generate(prompts, GREEDY)
    assert [o.token_ids for o in split] == alone
    classic = LLM(folder, dtype="float32", max_num_seqs=4, scheduling_policy="prefill_first").generate(prompts, GREEDY)
    assert [o.token_ids for o in classic] == alone
    # Shortest prompt first reorders the chunks (5, 9 and 17 before 30), not the results.
    shortest = LLM(folder, dtype="float32", max_num_seqs=4, max_num_batched_tokens=12,
                   prompt_order="shortest").generate(prompts, GREEDY)
    assert [o.token_ids for o in shortest] == alone

    # 4 blocks of 16 tokens hold one sequence (62 tokens at most) but not four: requests must be
    # preempted and recomputed, and nobody may notice.
    tight = LLM(folder, dtype="float32", max_num_seqs=4, block_size=16, kv_cache_tokens=64, max_model_len=64)
    outs = tight.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == alone
    assert sum(o.metrics.num_preemptions for o in outs) > 0
