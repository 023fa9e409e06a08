"""The SplitFuse step budget chosen by measurement (tierlm.engine.budget, LLM.tune_token_budget,
`tierlm serve --max-num-batched-tokens auto`)."""

from __future__ import annotations

import pytest

from tierlm import LLM, SamplingParams
from tierlm.cli import build_parser, main
from tierlm.config import ConfigError
from tierlm.engine.budget import (
    MAX_CHUNK,
    StepCost,
    fit_step_cost,
    latency_budget,
    measure_pair_ms,
    measure_step_ms,
    step_cost,
    throughput_budget,
)
from tierlm.engine_args import token_budget


def test_throughput_budget_is_the_smallest_chunk_near_the_cheapest_per_token():
    costs = {0: 50.0, 16: 70.0, 32: 100.0, 64: 120.0, 128: 200.0, 256: 380.0}
    # ms per token with 4 decodes: 3.5, 2.78, 1.76, 1.52, 1.46: within 15% of 1.46 (1.68) from 128 on
    assert throughput_budget(costs, 4) == 128 + 4
    assert throughput_budget(costs, 4, tolerance=0.02) == 256 + 4
    assert throughput_budget({0: 10.0, 16: 20.0}, 0) == 16
    with pytest.raises(ValueError, match="chunk size"):
        throughput_budget({0: 10.0}, 4)


def test_latency_budget_comes_from_a_line_fitted_to_the_steps():
    costs = {0: 50.0, 16: 66.0, 32: 82.0, 64: 114.0, 128: 178.0}  # 50 ms + 1 ms a token
    assert fit_step_cost(costs) == (50.0, 1.0)
    assert latency_budget(costs, 4) == 50 + 4  # 50 + t <= 2 x 50
    assert latency_budget(costs, 2, factor=1.5) == 25 + 2
    assert latency_budget(costs, 4, factor=4.0) == 128 + 4  # 150 is past the probes: the largest probed
    assert latency_budget(costs, 4, factor=1.1) == 16 + 4  # 5 is below them: the smallest
    # one slow step does not move the fit (the pointwise rule would drop from 32 to 16 here)
    assert latency_budget({**costs, 32: 300.0}, 4) == 50 + 4
    assert latency_budget({0: 50.0, 16: 40.0, 64: 30.0}, 3) == 64 + 3  # no growth with tokens: the largest
    with pytest.raises(ValueError, match="decode-only"):
        latency_budget({16: 1.0, 32: 2.0}, 4)


def test_step_cost_charges_tokens_and_query_key_pairs():
    c = StepCost(fixed_ms=10.0, per_token_ms=1.0, per_pair_ms=0.01)
    # 4 tokens at positions 100..103 score 4 * 100 + 4 * 5 / 2 = 410 pairs
    assert c.chunk_ms(100, 4) == pytest.approx(4 + 4.1)
    pairs_only = StepCost(0.0, 0.0, 0.01)
    assert pairs_only.max_chunk(100, 10.0) == 9  # 945 pairs fit in 1000, 10 tokens would be 1055
    assert StepCost(0.0, 2.0, 0.0).max_chunk(7, 9.0) == 4
    assert StepCost(0.0, 2.0, 0.0).max_chunk(7, 8.0) == 4  # exactly on the limit
    assert c.max_chunk(0, 0.0) == 0 and c.max_chunk(0, -5.0) == 0
    assert StepCost(5.0, 0.0, 0.0).max_chunk(0, 1.0) == MAX_CHUNK  # tokens cost nothing: no limit
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="per_token_ms must be finite"):
            StepCost(0.0, bad, 0.0)
    # from probed steps with 3 decodes in each: the decodes come out of the fixed part
    assert step_cost({0: 40.0, 16: 56.0, 32: 72.0}, 3, 0.002) == StepCost(37.0, 1.0, 0.002)
    assert step_cost({0: 40.0, 16: 30.0}, 3, 0.0) == StepCost(40.0, 0.0, 0.0)  # no growth: no per-token cost


@pytest.fixture(scope="module")
def llm():
    return LLM(None, max_model_len=128, kv_cache_tokens=512, max_num_seqs=4)


def test_measure_step_ms_times_every_size_and_leaves_the_engine_idle(llm):
    costs = measure_step_ms(llm.engine, llm.arch.vocab_size, chunks=(16, 32), num_decodes=2, repeats=1)
    assert sorted(costs) == [0, 16, 32] and all(ms > 0 for ms in costs.values())
    assert not llm.engine.has_unfinished() and not llm.engine.requests


def test_tune_token_budget_sets_the_budget_the_costs_give(llm, monkeypatch):
    seen = {}

    def fake(engine, vocab_size, chunks, num_decodes):
        seen.update(chunks=list(chunks), num_decodes=num_decodes)
        return {0: 40.0, 16: 56.0, 32: 72.0, 64: 104.0}  # 40 ms + 1 ms a token

    monkeypatch.setattr("tierlm.engine.budget.measure_step_ms", fake)
    assert llm.tune_token_budget() == 40 + 3
    # 3 decodes (max_num_seqs 4 leaves one slot for the chunk); chunks that fit max_model_len 128 and the
    # KV cache (512 tokens less a 16-token block per decode and a spare: 448)
    assert seen == {"chunks": [16, 32, 64], "num_decodes": 3}
    sched = llm.engine.scheduler.config
    assert sched.max_num_batched_tokens == 43 and llm.config.scheduler.max_num_batched_tokens == 43
    # steps without decodes keep the budget the engine was loaded with (LLM's default, 2048)
    assert sched.max_num_prefill_tokens == 2048 and llm.config.scheduler.max_num_prefill_tokens == 2048
    # the new budgets schedule: beside a decoding request, a 100-token prompt goes in chunks of 42 (+ 1
    # decode); alone, in one step
    dec = llm.engine.requests[llm.add_request([5, 6, 7], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))]
    llm.engine.step()
    assert dec.is_decoding
    assert _computed_per_step(llm, 100) == [42, 84, 100]  # the third chunk: 16 left, and still a decode beside it
    while llm.engine.has_unfinished():
        llm.engine.step()
    assert _computed_per_step(llm, 100) == [100]


def test_tune_with_an_slo_measures_attention_and_sets_the_step_cost(llm, monkeypatch):
    seen = {}

    def fake_pairs(engine, vocab_size, chunk, context):
        seen.update(chunk=chunk, context=context)
        return 0.001

    monkeypatch.setattr("tierlm.engine.budget.measure_step_ms",
                        lambda engine, vocab_size, chunks, num_decodes: {0: 40.0, 16: 56.0, 32: 72.0, 64: 104.0})
    monkeypatch.setattr("tierlm.engine.budget.measure_pair_ms", fake_pairs)
    try:
        assert llm.tune_token_budget(slo_tokens_per_s=4.0) == 43
        # the longest context the engine takes with a 64-token chunk after it: max_model_len 128 - 1 - 64
        assert seen == {"chunk": 64, "context": 63}
        sched = llm.engine.scheduler.config
        assert sched.slo_tokens_per_s == 4.0 and llm.config.scheduler.slo_tokens_per_s == 4.0
        assert sched.step_cost == StepCost(37.0, 1.0, 0.001)  # 3 decodes' tokens out of the fixed 40 ms
    finally:
        llm.tune_token_budget()  # the module's other tests run without an SLO
    assert llm.engine.scheduler.config.slo_tokens_per_s is None and llm.config.scheduler.slo_tokens_per_s is None


def test_measure_pair_ms_times_a_chunk_after_a_context_and_restores_the_budget(llm):
    before = llm.engine.scheduler.config
    per_pair = measure_pair_ms(llm.engine, llm.arch.vocab_size, chunk=16, context=64, repeats=1)
    assert per_pair >= 0 and per_pair < 1.0  # ms per pair: far below a millisecond on any machine
    assert llm.engine.scheduler.config == before
    assert not llm.engine.has_unfinished() and not llm.engine.requests


def _computed_per_step(llm, num_prompt_tokens: int) -> list[int]:
    """Add a prompt of that many tokens and step until it finishes: its computed tokens after each step."""
    req = llm.engine.requests[llm.add_request(list(range(5, 5 + num_prompt_tokens)),
                                              SamplingParams(max_tokens=1, temperature=0))]
    computed = []
    while not req.is_finished:
        llm.engine.step()
        computed.append(req.num_computed_tokens)
    return computed


def test_the_budget_changes_only_while_idle(llm):
    llm.add_request([5, 6, 7], SamplingParams(max_tokens=1))
    with pytest.raises(RuntimeError, match="idle"):
        llm.engine.set_token_budget(64)
    while llm.engine.has_unfinished():
        llm.engine.step()


def test_tune_needs_room_for_a_decode_and_a_chunk():
    one_seq = LLM(None, max_model_len=128, kv_cache_tokens=512, max_num_seqs=1)
    with pytest.raises(ConfigError, match="max_num_seqs >= 2"):
        one_seq.tune_token_budget()


def test_serve_budget_argument():
    assert token_budget("auto") == "auto" and token_budget("36") == 36
    for bad in ("0", "-3", "many"):
        with pytest.raises(ValueError):
            token_budget(bad)
    assert build_parser().parse_args(["serve"]).max_num_batched_tokens == "auto"
    assert build_parser().parse_args(["serve", "--max-num-batched-tokens", "64"]).max_num_batched_tokens == 64
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-num-batched-tokens", "lots"])


def _serve_error(capsys, *argv: str) -> str:
    """The one-line error `tierlm serve ARGV` ends with, before loading anything."""
    capsys.readouterr()
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tierlm: error: argument "), err
    return err


def test_serve_slo_needs_splitfuse_and_the_measured_budget(capsys):
    assert build_parser().parse_args(["serve", "--slo-tokens-per-s", "5"]).slo_tokens_per_s == 5.0
    for argv in (["--slo-tokens-per-s", "5", "--scheduling-policy", "prefill_first"],
                 ["--slo-tokens-per-s", "5", "--max-num-batched-tokens", "64"],
                 ["--slo-tokens-per-s", "0"]):
        assert "--slo-tokens-per-s" in _serve_error(capsys, *argv)


def test_prompt_order_reaches_the_scheduler_and_is_validated(capsys):
    assert build_parser().parse_args(["serve"]).prompt_order == "fcfs"
    assert build_parser().parse_args(["serve", "--prompt-order", "shortest"]).prompt_order == "shortest"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--prompt-order", "longest"])
    err = _serve_error(capsys, "--prompt-order", "shortest", "--scheduling-policy", "prefill_first")
    assert "--prompt-order: prompt_order applies to the splitfuse policy only" in err
    llm = LLM(None, max_model_len=64, kv_cache_tokens=256, prompt_order="shortest")
    assert llm.config.scheduler.prompt_order == "shortest" and llm.engine.scheduler.config.prompt_order == "shortest"
    with pytest.raises(ConfigError, match="prompt_order applies to the splitfuse policy only"):
        LLM(None, max_model_len=64, kv_cache_tokens=256, prompt_order="shortest", scheduling_policy="prefill_first")
    with pytest.raises(ConfigError, match="prompt_order must be one of"):
        LLM(None, max_model_len=64, kv_cache_tokens=256, prompt_order="longest")


def test_prompt_aging_reaches_the_scheduler_and_is_validated(capsys):
    assert build_parser().parse_args(["serve"]).prompt_aging_tokens_per_s is None
    args = build_parser().parse_args(["serve", "--prompt-order", "shortest", "--prompt-aging", "32"])
    assert args.prompt_aging_tokens_per_s == 32.0
    assert "--prompt-aging: prompt_aging_tokens_per_s applies to prompt_order='shortest' only" in _serve_error(
        capsys, "--prompt-aging", "32")
    assert "--prompt-aging: prompt_aging_tokens_per_s must be a finite number > 0" in _serve_error(
        capsys, "--prompt-order", "shortest", "--prompt-aging", "0")
    llm = LLM(None, max_model_len=64, kv_cache_tokens=256, prompt_order="shortest", prompt_aging_tokens_per_s=32.0)
    assert llm.config.scheduler.prompt_aging_tokens_per_s == 32.0
    assert llm.engine.scheduler.config.prompt_aging_tokens_per_s == 32.0
    with pytest.raises(ConfigError, match="applies to prompt_order='shortest' only"):
        LLM(None, max_model_len=64, kv_cache_tokens=256, prompt_aging_tokens_per_s=32.0)
    with pytest.raises(ConfigError, match="must be a finite number > 0"):
        LLM(None, max_model_len=64, kv_cache_tokens=256, prompt_order="shortest", prompt_aging_tokens_per_s=-1.0)
