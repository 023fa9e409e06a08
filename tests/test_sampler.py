"""Sampler: exact values on tiny vocabularies (V = 5..10), hand-computed."""

from __future__ import annotations

import math

import pytest
import torch

from tierlm.model.sampler import Sampler, SampleResult, TokenLogprobs, apply_penalties, filtered_probs
from tierlm.sampling_params import SamplingParams as SP

# probs (0.1, 0.4, 0.2, 0.25, 0.05): descending order is ids 1, 3, 2, 0, 4.
PROBS = [0.1, 0.4, 0.2, 0.25, 0.05]
LOGITS = torch.tensor([math.log(p) for p in PROBS])


def run(logits, params, prompt=None, output=None, gens=None) -> SampleResult:
    n = len(params)
    return Sampler()(logits, params, prompt or [[]] * n, output or [[]] * n, gens or [None] * n)


def support(probs_row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(probs_row > 0).flatten().tolist())


# --- greedy -------------------------------------------------------------------------------------

def test_greedy_picks_argmax_and_lowest_id_on_ties():
    logits = torch.tensor([[0.1, 2.0, 0.5, 2.0, -1.0, 0.0],
                           [5.0, 1.0, 0.0, 0.0, 0.0, 0.0],
                           [-3.0, -2.0, -1.0, -1.0, -4.0, -1.5]])
    res = run(logits, [SP(temperature=0)] * 3)
    assert res.token_ids == [1, 0, 2]
    assert res.logprobs == [None, None, None]


def test_greedy_slow_path_matches_fast_path():
    # logprobs forces the general path; the choice must not change.
    logits = torch.tensor([[0.1, 2.0, 0.5, 2.0, -1.0, 0.0], [5.0, 1.0, 0.0, 0.0, 0.0, 7.0]])
    res = run(logits, [SP(temperature=0, logprobs=1), SP(temperature=0)])
    assert res.token_ids == [1, 5]


def test_input_logits_are_not_modified():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 0.0]] * 3)
    before = logits.clone()
    run(logits, [SP(temperature=0, repetition_penalty=2.0), SP(temperature=0.7, top_k=2, top_p=0.5),
                 SP(temperature=1.0, min_p=0.5, frequency_penalty=1.0)],
        prompt=[[0, 1]] * 3, output=[[3, 4]] * 3)
    assert torch.equal(logits, before)


# --- penalties ----------------------------------------------------------------------------------

BASE = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 0.0]])


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    out = apply_penalties(BASE, [[0, 1]], [[1, 4]], [2.0], [0.0], [0.0])
    # seen = {0, 1, 4}: 2/2, -1*2, -2*2; ids 2, 3, 5 untouched.
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0, -4.0, 0.0]]
    assert BASE.tolist() == [[2.0, -1.0, 0.5, 3.0, -2.0, 0.0]]  # input not modified


def test_repetition_penalty_below_one_boosts():
    out = apply_penalties(BASE, [[3]], [[4]], [0.5], [0.0], [0.0])
    assert out.tolist() == [[2.0, -1.0, 0.5, 6.0, -1.0, 0.0]]


def test_frequency_and_presence_count_output_tokens_only():
    out = apply_penalties(BASE, [[0, 1]], [[2, 2, 3]], [1.0], [0.25], [0.5])
    # id 2: 0.5 - (0.5*2 + 0.25) = -0.75; id 3: 3 - (0.5*1 + 0.25) = 2.25; prompt ids 0, 1 untouched.
    assert out.tolist() == [[2.0, -1.0, -0.75, 2.25, -2.0, 0.0]]


def test_negative_presence_and_frequency_raise_logits():
    out = apply_penalties(BASE, [[]], [[5, 5, 5]], [1.0], [-0.5], [-1.0])
    assert out.tolist() == [[2.0, -1.0, 0.5, 3.0, -2.0, 3.5]]


def test_repetition_then_frequency_presence():
    out = apply_penalties(BASE, [[0]], [[3, 3]], [2.0], [0.5], [1.0])
    # id 0: 2/2 = 1; id 3: 3/2 = 1.5, then - (1*2 + 0.5) = -1.0.
    assert out.tolist() == [[1.0, -1.0, 0.5, -1.0, -2.0, 0.0]]


def test_penalties_stay_in_their_row():
    # Row 0 uses the last id (V-1), row 1 the first: an off-by-one in the flat indexing would leak.
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    out = apply_penalties(logits, [[3], []], [[], [0, 0]], [4.0, 1.0], [0.0, 0.0], [0.0, 0.25])
    assert out.tolist() == [[1.0, 1.0, 1.0, 0.25], [0.5, 1.0, 1.0, 1.0]]


def test_penalty_rejects_out_of_vocabulary_ids():
    with pytest.raises(ValueError, match="vocabulary"):
        apply_penalties(BASE, [[6]], [[]], [2.0], [0.0], [0.0])
    with pytest.raises(ValueError, match="vocabulary"):
        apply_penalties(BASE, [[]], [[-1]], [1.0], [0.0], [1.0])


def test_greedy_sees_penalties():
    # Raw argmax is id 3 (3.0); repetition 4 makes it 0.75 < 2.0, so id 0 wins; the row without
    # penalties in the same batch keeps id 3.
    logits = torch.cat([BASE, BASE])
    res = run(logits, [SP(temperature=0, repetition_penalty=4.0), SP(temperature=0)],
              prompt=[[3], [3]], output=[[], []])
    assert res.token_ids == [0, 3]
    # presence 1.5 on id 3 (3.0 -> 1.5) leaves id 0 (2.0) on top as well
    res = run(BASE, [SP(temperature=0, presence_penalty=1.5)], output=[[3]])
    assert res.token_ids == [0]


# --- filters: exact surviving sets --------------------------------------------------------------

@pytest.mark.parametrize("top_k, kept", [(1, {1}), (3, {1, 3, 2}), (4, {1, 3, 2, 0}),
                                         (5, {0, 1, 2, 3, 4}), (99, {0, 1, 2, 3, 4})])
def test_top_k_support(top_k, kept):
    assert support(filtered_probs(LOGITS[None], [SP(top_k=top_k)])[0]) == kept


def test_top_k_keeps_ties_at_the_threshold():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])
    assert support(filtered_probs(logits, [SP(top_k=2)])[0]) == {1, 2, 3}


@pytest.mark.parametrize("top_p, kept", [(0.3, {1}), (0.39, {1}), (0.41, {1, 3}), (0.6, {1, 3}),
                                         (0.66, {1, 3, 2}),
                                         (0.9, {1, 3, 2, 0}), (0.97, {0, 1, 2, 3, 4}),
                                         (1.0, {0, 1, 2, 3, 4})])
def test_top_p_keeps_smallest_prefix_reaching_top_p(top_p, kept):
    # cumulative in descending order: 0.4, 0.65, 0.85, 0.95, 1.0
    assert support(filtered_probs(LOGITS[None], [SP(top_p=top_p)])[0]) == kept


def test_top_p_keeps_ties_at_the_cut():
    # probs 0.4, 0.2, 0.2, 0.1, 0.1: top_p = 0.5 is reached after one of the 0.2s; both stay.
    logits = torch.tensor([[math.log(p) for p in (0.1, 0.2, 0.4, 0.2, 0.1)]])
    assert support(filtered_probs(logits, [SP(top_p=0.5)])[0]) == {1, 2, 3}


@pytest.mark.parametrize("scale, top_p", [(3.0, 0.9), (0.3, 0.5), (0.05, 0.95), (0.05, 0.999)])
def test_top_p_matches_full_sort_reference(scale, top_p):
    # Flat rows (small scale) put hundreds or thousands of tokens in the nucleus, so the candidate
    # search must widen past its first 128 (and 1024) candidates.
    logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(11)) * scale
    probs = torch.softmax(logits, -1).double()
    kept = [support(r) for r in filtered_probs(logits, [SP(top_p=top_p)] * 3)]
    for row, got in zip(probs, kept):
        order = sorted(range(5000), key=lambda t: -row[t].item())
        mass, expected = 0.0, set()
        for t in order:
            if mass >= top_p:
                break
            expected.add(t)
            mass += row[t].item()
        assert got == expected
    assert max(len(k) for k in kept) > 128


def test_top_p_applies_to_top_k_renormalized_distribution():
    # Alone, top_p=0.67 keeps {1, 3, 2} (mass before id 2 is 0.65). After top_k=4 the kept mass is
    # 0.95, so the mass before id 2 becomes 0.65/0.95 = 0.684 >= 0.67 and id 2 goes.
    assert support(filtered_probs(LOGITS[None], [SP(top_p=0.67)])[0]) == {1, 3, 2}
    assert support(filtered_probs(LOGITS[None], [SP(top_k=4, top_p=0.67)])[0]) == {1, 3}


@pytest.mark.parametrize("min_p, kept", [(0.0, {0, 1, 2, 3, 4}), (0.1, {0, 1, 2, 3, 4}),
                                         (0.15, {0, 1, 2, 3}),
                                         (0.3, {1, 3, 2}), (0.55, {1, 3}), (0.9, {1}),
                                         (1.0, {1})])
def test_min_p_drops_below_fraction_of_max(min_p, kept):
    # max prob 0.4: thresholds 0.04, 0.06, 0.12, 0.22, 0.36, 0.4
    assert support(filtered_probs(LOGITS[None], [SP(min_p=min_p)])[0]) == kept


def test_filtered_probs_values_with_temperature_and_top_k():
    # T = 0.5 squares the probabilities; top_k = 3 keeps ids 1, 3, 2: 0.16, 0.0625, 0.04 over 0.2625.
    probs = filtered_probs(LOGITS[None], [SP(temperature=0.5, top_k=3)])[0]
    expected = torch.tensor([0.0, 0.16, 0.04, 0.0625, 0.0]) / 0.2625
    torch.testing.assert_close(probs, expected)


def test_rows_filter_independently():
    logits = torch.stack([LOGITS, LOGITS, LOGITS])
    probs = filtered_probs(logits, [SP(top_k=1), SP(top_p=0.6), SP(min_p=0.3)])
    assert [support(r) for r in probs] == [{1}, {1, 3}, {1, 2, 3}]


# --- randomness ---------------------------------------------------------------------------------

def _draw_sequence(seed: int, batch_others: int, position: int, steps: int = 50) -> list[int]:
    """Tokens of one seeded row over `steps` calls, `batch_others` unrelated random rows around it."""
    noise = torch.Generator().manual_seed(1000 + batch_others)  # makes the other rows' logits
    row_logits = torch.Generator().manual_seed(7)  # the tracked row's logits: same in every setting
    vocab = 64
    mine = torch.Generator().manual_seed(seed)
    others = [torch.Generator().manual_seed(99 + j) if j % 2 else None for j in range(batch_others)]
    other_params = [SP(temperature=0.5 + 0.3 * j, top_k=1 + 7 * j, repetition_penalty=1.0 + 0.1 * j)
                    for j in range(batch_others)]
    tracked = SP(temperature=0.9, top_p=0.95, min_p=0.01, frequency_penalty=0.3)
    out: list[int] = []
    sampler = Sampler()
    for _ in range(steps):
        row = torch.randn(vocab, generator=row_logits)
        rows = [torch.randn(vocab, generator=noise) for _ in range(batch_others)]
        rows.insert(position, row)
        params = list(other_params)
        params.insert(position, tracked)
        gens = list(others)
        gens.insert(position, mine)
        prompts = [[1, 2, 3]] * (batch_others + 1)
        outputs = [[5, 5]] * (batch_others + 1)
        outputs[position] = list(out)
        res = sampler(torch.stack(rows), params, prompts, outputs, gens)
        out.append(res.token_ids[position])
    return out


def test_same_seed_same_tokens_regardless_of_batch():
    alone = _draw_sequence(seed=123, batch_others=0, position=0)
    assert _draw_sequence(seed=123, batch_others=4, position=2) == alone
    assert _draw_sequence(seed=123, batch_others=4, position=4) == alone
    assert len(set(alone)) > 5  # the row really samples, not a greedy-in-disguise


def test_different_seeds_differ():
    assert _draw_sequence(seed=1, batch_others=0, position=0) != \
        _draw_sequence(seed=2, batch_others=0, position=0)


def test_global_rng_rows_follow_torch_manual_seed():
    logits = torch.zeros(3, 50)
    params = [SP(temperature=1.0)] * 3
    torch.manual_seed(5)
    first = run(logits, params).token_ids
    torch.manual_seed(5)
    assert run(logits, params).token_ids == first


@pytest.mark.parametrize("params, expected", [
    # top_k = 3 keeps ids 1, 3, 2 -> 0.4, 0.25, 0.2 over 0.85
    (SP(temperature=1.0, top_k=3), [0.0, 0.4 / 0.85, 0.2 / 0.85, 0.25 / 0.85, 0.0]),
    # T = 0.5 squares: 0.01, 0.16, 0.04, 0.0625, 0.0025 over 0.275; min_p 0.2 of 0.16 drops ids 0, 4
    (SP(temperature=0.5, min_p=0.2), [0.0, 0.16 / 0.2625, 0.04 / 0.2625, 0.0625 / 0.2625, 0.0]),
    (SP(temperature=1.0), PROBS),
])
def test_sampling_frequencies_match_filtered_distribution(params, expected):
    num_rows, num_calls = 4000, 5
    gen = torch.Generator().manual_seed(2024)
    logits = LOGITS.expand(num_rows, -1).contiguous()
    counts = [0] * 5
    for _ in range(num_calls):
        for t in run(logits, [params] * num_rows, gens=[gen] * num_rows).token_ids:
            counts[t] += 1
    total = num_rows * num_calls
    for i, p in enumerate(expected):
        if p == 0.0:
            assert counts[i] == 0, f"filtered id {i} was sampled"
    chi2 = sum((counts[i] - total * p) ** 2 / (total * p) for i, p in enumerate(expected) if p > 0)
    # chi-square 99.9th percentile for 4 degrees of freedom is 18.47 (fewer dof -> smaller).
    assert chi2 < 18.47, (counts, chi2)


# --- logprobs -----------------------------------------------------------------------------------

def test_logprobs_come_from_raw_logits():
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0, 0.0, 3.0, -2.0]])
    raw = torch.log_softmax(logits, -1)[0]
    # Penalties and temperature change the choice, never the reported logprobs.
    res = run(logits, [SP(temperature=0.3, top_k=2, repetition_penalty=6.0, logprobs=3)],
              prompt=[[5]], gens=[torch.Generator().manual_seed(0)])
    lp = res.logprobs[0]
    assert isinstance(lp, TokenLogprobs)
    assert lp.token_id == res.token_ids[0]
    assert lp.token_id in (1, 3)  # 5 is penalized 3.0 -> 0.5; top 2 after that: 2.0 (id 1), 1.0 (id 3)
    assert lp.logprob == pytest.approx(raw[lp.token_id].item(), abs=1e-6)
    assert [t for t, _ in lp.top] == [5, 1, 3]
    for t, v in lp.top:
        assert v == pytest.approx(raw[t].item(), abs=1e-6)
    assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


def test_logprobs_exact_values_and_counts():
    # logits = log(probs) of a normalized distribution, so log_softmax gives them back.
    res = run(torch.stack([LOGITS, LOGITS, LOGITS]),
              [SP(temperature=0, logprobs=2), SP(temperature=0, logprobs=0), SP(temperature=0)])
    first, second, third = res.logprobs
    assert res.token_ids == [1, 1, 1]
    assert first.token_id == 1 and first.logprob == pytest.approx(math.log(0.4), abs=1e-6)
    assert [t for t, _ in first.top] == [1, 3]
    assert [v for _, v in first.top] == pytest.approx([math.log(0.4), math.log(0.25)], abs=1e-6)
    assert second.top == () and second.logprob == pytest.approx(math.log(0.4), abs=1e-6)
    assert third is None


def test_logprobs_ties_list_lowest_id_first():
    logits = torch.tensor([[0.0, 1.0, 0.0, 1.0, 1.0, 0.0]])
    lp = run(logits, [SP(temperature=0, logprobs=4)]).logprobs[0]
    assert [t for t, _ in lp.top] == [1, 3, 4, 0]
    assert lp.token_id == 1


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="rows"):
        Sampler()(torch.zeros(2, 5), [SP()], [[]], [[]], [None])
