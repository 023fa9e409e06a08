"""Engine bookkeeping with exact values: block manager, scheduler, step loop (no model)."""

from __future__ import annotations

import pytest

from tierlm.engine.block_manager import BlockManager
from tierlm.engine.budget import StepCost
from tierlm.engine.engine import EngineCore, RequestError, SampledToken
from tierlm.engine.request import FinishReason, Request, RequestMetrics, RequestStatus
from tierlm.engine.scheduler import SLO_COST_MARGIN, Scheduler, SchedulerConfig
from tierlm.sampling_params import SamplingParams


def _req(rid: str, n: int, max_tokens: int = 8) -> Request:
    return Request(request_id=rid, prompt_token_ids=list(range(10, 10 + n)),
                   params=SamplingParams(max_tokens=max_tokens))


# -- block manager ----------------------------------------------------------------------------

def test_block_manager_allocates_in_order_and_never_block_zero():
    bm = BlockManager(num_blocks=5, block_size=4)
    table: list[int] = []
    assert bm.allocate(table, 5) == [1, 2]
    assert bm.allocate(table, 8) == []  # still fits in 2 blocks
    assert bm.allocate(table, 9) == [3]
    assert table == [1, 2, 3] and bm.num_free_blocks == 1
    other: list[int] = []
    assert bm.allocate(other, 5) is None and other == [] and bm.num_free_blocks == 1  # all or nothing
    bm.free(table)
    assert table == [] and list(bm.free_blocks) == [1, 2, 3, 4]  # back at the front, in table order
    assert bm.allocate(other, 5) == [1, 2]
    assert bm.ref_counts == [0, 1, 1, 0, 0]


def test_block_manager_reuses_the_most_recently_freed_blocks():
    # Freed blocks go to the front, so ids past the most ever held at once are never touched.
    bm = BlockManager(num_blocks=9, block_size=4)
    a: list[int] = []
    b: list[int] = []
    assert bm.allocate(a, 8) == [1, 2] and bm.allocate(b, 4) == [3]
    bm.free(a)
    assert list(bm.free_blocks) == [1, 2, 4, 5, 6, 7, 8]
    c: list[int] = []
    assert bm.allocate(c, 12) == [1, 2, 4]
    bm.free(b)
    bm.free(c)
    assert list(bm.free_blocks) == [1, 2, 4, 3, 5, 6, 7, 8]
    assert bm.allocate(a, 16) == [1, 2, 4, 3]


def test_block_manager_rejects_double_free_and_tiny_caches():
    bm = BlockManager(num_blocks=3, block_size=2)
    table: list[int] = []
    bm.allocate(table, 3)
    copy = list(table)
    bm.free(table)
    with pytest.raises(ValueError, match="double free"):
        bm.free(copy)
    with pytest.raises(ValueError, match="at least 2 blocks"):
        BlockManager(num_blocks=1, block_size=16)


# -- scheduler --------------------------------------------------------------------------------

def _chunks(out):
    return [(c.request.request_id, c.start, c.num_new_tokens, c.samples) for c in out.chunks]


def _finish_step(sched: Scheduler, out, token: int = 7) -> None:
    """What the engine does after the runner: commit, then append a token where a chunk sampled."""
    sched.commit(out)
    for c in out.chunks:
        if c.samples:
            c.request.output_token_ids.append(token)


def test_budget_chunks_long_prompt_and_fuses_short_ones():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8), BlockManager(64, 4))
    a, b, c = _req("a", 13), _req("b", 3), _req("c", 2)
    for r in (a, b, c):
        sched.add(r)
    out = sched.schedule()
    assert _chunks(out) == [("a", 0, 8, False)]  # a takes the whole budget
    _finish_step(sched, out)
    out = sched.schedule()
    assert _chunks(out) == [("a", 8, 5, True), ("b", 0, 3, True)]  # a finishes its prompt, b fits whole
    _finish_step(sched, out)
    out = sched.schedule()
    # decodes first (1 token each: the token sampled last step), then c's whole prompt
    assert _chunks(out) == [("a", 13, 1, True), ("b", 3, 1, True), ("c", 0, 2, True)]
    assert a.block_table == [1, 2, 3, 4] and b.block_table == [5] and c.block_table == [6]


def test_chunked_prefill_off_waits_for_room_for_whole_prompt():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, enable_chunked_prefill=False),
                      BlockManager(64, 4))
    a, b = _req("a", 6), _req("b", 5)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert _chunks(out) == [("a", 0, 6, True)]  # b (5) does not fit in the 2 tokens left
    _finish_step(sched, out)
    out = sched.schedule()
    assert _chunks(out) == [("a", 6, 1, True), ("b", 0, 5, True)]


def test_prefill_first_runs_whole_prompts_while_decodes_wait():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, policy="prefill_first"),
                      BlockManager(64, 4))
    a, b, c = _req("a", 5), _req("b", 3), _req("c", 4)
    for r in (a, b):
        sched.add(r)
    out = sched.schedule()
    assert _chunks(out) == [("a", 0, 5, True), ("b", 0, 3, True)]  # both whole, budget 8 used
    _finish_step(sched, out)
    sched.add(c)
    out = sched.schedule()
    assert _chunks(out) == [("c", 0, 4, True)]  # a and b wait while c's prompt runs
    _finish_step(sched, out)
    out = sched.schedule()
    assert _chunks(out) == [("a", 5, 1, True), ("b", 3, 1, True), ("c", 4, 1, True)]  # queue empty: decodes


def test_splitfuse_fuses_decodes_with_a_chunk_of_a_new_prompt():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8), BlockManager(64, 4))
    a, b, c = _req("a", 5), _req("b", 3), _req("c", 12)
    for r in (a, b):
        sched.add(r)
    _finish_step(sched, sched.schedule())
    sched.add(c)
    out = sched.schedule()
    # the two decodes first, then 6 of c's 12 prompt tokens: every step carries the full budget
    assert _chunks(out) == [("a", 5, 1, True), ("b", 3, 1, True), ("c", 0, 6, False)]
    _finish_step(sched, out)
    assert _chunks(sched.schedule()) == [("a", 6, 1, True), ("b", 4, 1, True), ("c", 6, 6, True)]


def test_steps_without_decodes_take_the_prefill_budget():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=4, max_num_prefill_tokens=16),
                      BlockManager(64, 4))
    a, b = _req("a", 10), _req("b", 9)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    # nobody is decoding: 16 tokens, a whole and 6 of b
    assert _chunks(out) == [("a", 0, 10, True), ("b", 0, 6, False)]
    _finish_step(sched, out)
    c = _req("c", 20)
    sched.add(c)
    out = sched.schedule()
    # a decodes now: the step budget is 4 again, a's token first, then 3 more of b's prompt
    assert _chunks(out) == [("a", 10, 1, True), ("b", 6, 3, True)]
    _finish_step(sched, out)
    out = sched.schedule()
    assert _chunks(out) == [("a", 11, 1, True), ("b", 9, 1, True), ("c", 0, 2, False)]
    _finish_step(sched, out)
    sched.finish(a, FinishReason.LENGTH)
    sched.finish(b, FinishReason.LENGTH)
    out = sched.schedule()  # c alone, mid-prompt, not decoding: the prefill budget again
    assert _chunks(out) == [("c", 2, 16, False)]
    _finish_step(sched, out)
    out = sched.schedule()
    assert _chunks(out) == [("c", 18, 2, True)]
    _finish_step(sched, out)
    assert c.is_decoding and _chunks(sched.schedule()) == [("c", 20, 1, True)]


def _slo_scheduler(cost: StepCost, num_tokens: int, num_prefill_tokens: int, slo: float):
    """A splitfuse scheduler under an SLO, and the list whose item 0 is its clock (seconds)."""
    now = [0.0]
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=num_tokens, max_num_prefill_tokens=num_prefill_tokens,
                          slo_tokens_per_s=slo, step_cost=cost)
    return Scheduler(cfg, BlockManager(128, 4), clock=lambda: now[0]), now


def test_slo_stretches_steps_while_the_decodes_are_ahead_of_schedule():
    # 10 ms a step + 1 ms a token; a stream is promised 10 tokens/s (token i due 0.1 * i s after its first)
    sched, now = _slo_scheduler(StepCost(fixed_ms=10.0, per_token_ms=1.0, per_pair_ms=0.0), 8, 100, 10.0)
    assert SLO_COST_MARGIN == 1.5  # the numbers below plan each step at 1.5x its cost
    a, b = _req("a", 4, max_tokens=10), _req("b", 200)
    sched.add(a)
    out = sched.schedule()
    assert _chunks(out) == [("a", 0, 4, True)]  # nobody decodes: the prefill budget
    _finish_step(sched, out)
    a.metrics.first_token_time = 0.0  # what the engine records
    sched.add(b)
    # a's token 1 is due at 0.1 s: 100 / 1.5 - 10 = 56.7 ms for tokens; a's decode takes 1 ms of it and
    # b gets the 55 tokens that fit in the rest, against 7 under the fixed budget of 8
    out = sched.schedule()
    assert _chunks(out) == [("a", 4, 1, True), ("b", 0, 55, False)]
    _finish_step(sched, out)
    now[0] = 0.09  # token 2 due at 0.2 s: 110 / 1.5 - 10 = 63.3 ms, 1 for a, 62 for b
    out = sched.schedule()
    assert _chunks(out) == [("a", 5, 1, True), ("b", 55, 62, False)]
    _finish_step(sched, out)
    now[0] = 0.5  # a is late (token 3 was due at 0.3 s): the fixed budget, so that steps stay short
    out = sched.schedule()
    assert _chunks(out) == [("a", 6, 1, True), ("b", 117, 7, False)]
    _finish_step(sched, out)
    a.metrics.first_token_time = 0.2  # as if a had started later: its token 4 is due at 0.6 s, 0.1 s ahead
    out = sched.schedule()  # 100 / 1.5 - 10 = 56.7 ms again: 1 for a, 55 for b
    assert _chunks(out) == [("a", 7, 1, True), ("b", 124, 55, False)]


def test_slo_steps_never_pass_the_prefill_budget_and_count_attention():
    # 0.01 ms per query-key pair: a chunk of n at position s costs 0.01 * (n * s + n (n + 1) / 2) ms
    sched, _ = _slo_scheduler(StepCost(fixed_ms=0.0, per_token_ms=0.0, per_pair_ms=0.01), 2, 30, 1.0)
    a, b = _req("a", 100, max_tokens=10), _req("b", 300)
    sched.add(a)
    for _ in range(4):  # a's prompt, 30 tokens a step
        _finish_step(sched, sched.schedule())
    a.metrics.first_token_time = 0.0
    sched.add(b)
    # a's token 1 is due in 1 s: 1000 / 1.5 = 666.7 ms; a's decode at position 100 costs 0.01 * 101 = 1.01;
    # b would fit 35 tokens at position 0 (0.01 * 35 * 36 / 2 = 6.3 ms) but the step stops at 30 in all
    assert _chunks(sched.schedule()) == [("a", 100, 1, True), ("b", 0, 29, False)]


def test_slo_is_validated():
    cost = StepCost(1.0, 1.0, 0.0)
    assert SchedulerConfig(slo_tokens_per_s=5.0, step_cost=cost).slo_tokens_per_s == 5.0
    with pytest.raises(ValueError, match="measured step_cost"):
        SchedulerConfig(slo_tokens_per_s=5.0)
    with pytest.raises(ValueError, match="slo_tokens_per_s must be a finite number > 0"):
        SchedulerConfig(slo_tokens_per_s=0.0, step_cost=cost)
    with pytest.raises(ValueError, match="splitfuse policy only"):
        SchedulerConfig(slo_tokens_per_s=5.0, step_cost=cost, policy="prefill_first")


def test_prefill_budget_defaults_to_the_step_budget_and_is_validated():
    assert SchedulerConfig(max_num_batched_tokens=8).prefill_budget == 8
    assert SchedulerConfig(max_num_batched_tokens=8, max_num_prefill_tokens=64).prefill_budget == 64
    with pytest.raises(ValueError, match="max_num_prefill_tokens must be >= 1"):
        SchedulerConfig(max_num_prefill_tokens=0)
    # prefill_first ignores it: prompts are admitted whole within max_num_batched_tokens
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, max_num_prefill_tokens=64,
                                      policy="prefill_first"), BlockManager(64, 4))
    a, b = _req("a", 5), _req("b", 5)
    sched.add(a)
    sched.add(b)
    assert _chunks(sched.schedule()) == [("a", 0, 5, True)]


def _long_prompt_then_two_short(prompt_order: str) -> tuple[Scheduler, list]:
    """a (20 tokens) has had its first chunk of 8; then b (5) and c (3) arrive, in that order."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, prompt_order=prompt_order),
                      BlockManager(64, 4))
    a = _req("a", 20)
    sched.add(a)
    out = sched.schedule()
    assert _chunks(out) == [("a", 0, 8, False)]
    _finish_step(sched, out)
    sched.add(_req("b", 5))
    sched.add(_req("c", 3))
    return sched, [_step(sched) for _ in range(4)]


def _step(sched: Scheduler):
    """Schedule one step and finish it; returns its chunks (as ``_chunks``, read before the finish)."""
    out = sched.schedule()
    chunks = _chunks(out)
    _finish_step(sched, out)
    return chunks


def test_fcfs_makes_short_prompts_wait_for_a_long_one_being_chunked():
    _, steps = _long_prompt_then_two_short("fcfs")
    assert steps == [
        [("a", 8, 8, False)],
        [("a", 16, 4, True), ("b", 0, 4, False)],  # a's prompt done; b gets what is left
        [("a", 20, 1, True), ("b", 4, 1, True), ("c", 0, 3, True)],
        [("a", 21, 1, True), ("b", 5, 1, True), ("c", 3, 1, True)],
    ]  # b's first token after 3 steps, c's after 3


def test_shortest_runs_short_prompts_ahead_of_a_long_one_being_chunked():
    _, steps = _long_prompt_then_two_short("shortest")
    assert steps == [
        # left to compute: c 3, b 5, a 12: both short prompts whole, a waits
        [("c", 0, 3, True), ("b", 0, 5, True)],
        # decodes first, in running order (c was admitted before b), then a's chunk
        [("c", 3, 1, True), ("b", 5, 1, True), ("a", 8, 6, False)],
        [("c", 4, 1, True), ("b", 6, 1, True), ("a", 14, 6, True)],
        [("a", 20, 1, True), ("c", 5, 1, True), ("b", 7, 1, True)],  # a joined running first
    ]  # b's and c's first tokens after 1 step, not 3; a's after 3, as in arrival order


def test_shortest_counts_what_a_running_prompt_has_left():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, prompt_order="shortest"),
                      BlockManager(64, 4))
    sched.add(_req("a", 20))
    assert _step(sched) == [("a", 0, 8, False)]
    sched.add(_req("b", 14))  # 14 tokens against a's 12 left: a goes on first
    assert _step(sched) == [("a", 8, 8, False)]
    assert _step(sched) == [("a", 16, 4, True), ("b", 0, 4, False)]
    sched.add(_req("c", 10))  # 10 against b's 10 left: a tie keeps running before waiting
    assert _step(sched) == [("a", 20, 1, True), ("b", 4, 7, False)]
    assert _step(sched) == [("a", 21, 1, True), ("b", 11, 3, True), ("c", 0, 4, False)]


def test_shortest_skips_a_prompt_with_no_room_and_admits_the_next():
    # max_num_seqs 2: once a runs, one slot is left; b (2 tokens) takes it, c (4) must wait for a slot
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=8, prompt_order="shortest"),
                      BlockManager(64, 4))
    sched.add(_req("a", 6))
    assert _step(sched) == [("a", 0, 6, True)]
    sched.add(_req("c", 4))
    sched.add(_req("b", 2))
    assert _step(sched) == [("a", 6, 1, True), ("b", 0, 2, True)]
    assert [r.request_id for r in sched.waiting] == ["c"]


def _aged(rid: str, n: int, arrival: float) -> Request:
    return Request(request_id=rid, prompt_token_ids=list(range(10, 10 + n)), params=SamplingParams(max_tokens=8),
                   metrics=RequestMetrics(arrival_time=arrival))


def test_aging_ranks_by_tokens_left_less_rate_times_wait():
    now = 10.0
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, prompt_order="shortest",
                                      prompt_aging_tokens_per_s=1.0), BlockManager(64, 4), clock=lambda: now)
    sched.add(_aged("a", 20, 0.0))
    now = 0.0
    assert _step(sched) == [("a", 0, 8, False)]
    now = 10.0
    sched.add(_aged("b", 5, 9.0))
    sched.add(_aged("c", 3, 10.0))
    # ranks: a 12 - 10 = 2, c 3 - 0 = 3, b 5 - 1 = 4 (without aging: c, b, then a)
    assert _step(sched) == [("a", 8, 8, False)]
    now = 11.0
    # a 4 - 11, c 3 - 1 = 2, b 5 - 2 = 3
    assert _step(sched) == [("a", 16, 4, True), ("c", 0, 3, True), ("b", 0, 1, False)]


def _long_prompt_among_a_stream_of_short_ones(aging: float | None) -> list:
    """a (20 tokens) arrives at t = 0 with the first of 8-token prompts that keep coming, one a second;
    each step takes a second and a short prompt is done (finished) once its prompt is. Returns each
    step's chunks as (id, start, tokens)."""
    now = 0.0
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, prompt_order="shortest",
                                      prompt_aging_tokens_per_s=aging), BlockManager(256, 4), clock=lambda: now)
    sched.add(_aged("a", 20, 0.0))
    steps = []
    for t in range(16):
        now = float(t)
        sched.add(_aged(f"s{t}", 8, now))
        out = sched.schedule()
        steps.append([(c.request.request_id, c.start, c.num_new_tokens) for c in out.chunks])
        done = [c.request for c in out.chunks if c.samples and c.request.request_id != "a"]
        _finish_step(sched, out)
        for r in done:
            sched.finish(r, FinishReason.LENGTH)
    return steps


def test_without_aging_a_long_prompt_waits_while_short_ones_keep_coming():
    steps = _long_prompt_among_a_stream_of_short_ones(None)
    assert steps == [[(f"s{t}", 0, 8)] for t in range(16)]  # a never gets a token


def test_aging_serves_a_long_prompt_within_its_tokens_over_the_rate():
    steps = _long_prompt_among_a_stream_of_short_ones(2.0)
    # a ranks 20 - 2t against a fresh short prompt's 8: it ties at t = 6 and, earlier in the queue, goes
    # first; from then on the waiting short ones age too (s6 ranks 8 - 2 at t = 7)
    assert steps[:6] == [[(f"s{t}", 0, 8)] for t in range(6)]
    assert steps[6:10] == [
        [("a", 0, 8)],
        [("a", 8, 8)],
        [("a", 16, 4), ("s6", 0, 4)],
        [("a", 20, 1), ("s6", 4, 4), ("s7", 0, 3)],
    ]


def test_prompt_order_is_validated():
    assert SchedulerConfig(prompt_order="shortest").prompt_order == "shortest"
    with pytest.raises(ValueError, match="prompt_order must be one of"):
        SchedulerConfig(prompt_order="longest")
    with pytest.raises(ValueError, match="splitfuse policy only"):
        SchedulerConfig(prompt_order="shortest", policy="prefill_first")
    with pytest.raises(ValueError, match="prompt_aging_tokens_per_s applies to prompt_order='shortest' only"):
        SchedulerConfig(prompt_aging_tokens_per_s=1.0)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="must be a finite number > 0"):
            SchedulerConfig(prompt_order="shortest", prompt_aging_tokens_per_s=bad)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="policy must be one of"):
        SchedulerConfig(policy="fastest")


def test_max_num_seqs_limits_running():
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100), BlockManager(64, 4))
    for i in range(3):
        sched.add(_req(f"r{i}", 2))
    out = sched.schedule()
    assert [c[0] for c in _chunks(out)] == ["r0", "r1"]
    assert [r.request_id for r in sched.waiting] == ["r2"]


@pytest.mark.parametrize("prompt_order", ["fcfs", "shortest"])
def test_preemption_frees_newest_and_requeues_it_first(prompt_order):
    # 4 usable blocks of 2 tokens. a: 3 tokens (2 blocks), b: 3 tokens (2 blocks): cache full.
    bm = BlockManager(num_blocks=5, block_size=2)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, prompt_order=prompt_order), bm)
    a, b = _req("a", 3), _req("b", 3)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert _chunks(out) == [("a", 0, 3, True), ("b", 0, 3, True)]
    _finish_step(sched, out)
    out = sched.schedule()  # 4 tokens each still fit in 2 blocks
    assert _chunks(out) == [("a", 3, 1, True), ("b", 3, 1, True)] and out.preempted == []
    _finish_step(sched, out)
    out = sched.schedule()  # a's 5th token needs a 3rd block: the newest, b, is preempted
    assert _chunks(out) == [("a", 4, 1, True)]
    assert [r.request_id for r in out.preempted] == ["b"]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert b.metrics.num_preemptions == 1 and list(sched.waiting) == [b]
    assert a.block_table == [1, 2, 3]  # b's blocks came back to the front of the free list: [3, 4]
    _finish_step(sched, out)
    # Once a finishes, b recomputes its prompt and its 2 output tokens in one chunk.
    sched.finish(a, FinishReason.LENGTH)
    out = sched.schedule()
    assert _chunks(out) == [("b", 0, 5, True)] and b.block_table == [1, 2, 3]


def test_request_preempts_itself_when_alone_and_cache_is_short():
    bm = BlockManager(num_blocks=3, block_size=2)  # 4 tokens total
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=16), bm)
    a = _req("a", 4)
    sched.add(a)
    out = sched.schedule()
    _finish_step(sched, out)
    out = sched.schedule()  # needs a 3rd block, nobody else to preempt
    assert out.chunks == [] and [r.request_id for r in out.preempted] == ["a"]


# -- step loop with a fake runner -------------------------------------------------------------

class ScriptedRunner:
    """Returns tokens from a per-request script; records what it was asked to run."""

    def __init__(self, script: dict[str, list[int]]):
        self.script = {k: list(v) for k, v in script.items()}
        self.calls: list[list[tuple[str, int, int]]] = []
        self.released: list[str] = []

    def execute(self, out):
        self.calls.append([(c.request.request_id, c.start, c.num_new_tokens) for c in out.chunks])
        return {c.request.request_id: SampledToken(self.script[c.request.request_id].pop(0))
                for c in out.chunks if c.samples}

    def release(self, request_id: str) -> None:
        self.released.append(request_id)


class CharDetok:
    """token id t -> chr(t)."""

    def add(self, token_id: int) -> str:
        return chr(token_id)


def _engine(script, **kw):
    runner = ScriptedRunner(script)
    eng = EngineCore(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), BlockManager(32, 4), runner,
                     max_model_len=kw.pop("max_model_len", 64), eos_token_ids=(3,),
                     detokenizer_factory=lambda ids: CharDetok())
    return eng, runner


def _run(eng):
    finals = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                finals[o.request_id] = o
    return finals


def test_stop_reasons_eos_stop_token_stop_string_and_length():
    script = {"eos": [ord("a"), 3, ord("z")], "stopid": [ord("a"), ord("b"), ord("c")],
              "stopstr": [ord("x"), ord("E"), ord("N"), ord("D"), ord("y")], "len": [ord("q")] * 5}
    eng, runner = _engine(script)
    eng.add_request([5, 6], SamplingParams(max_tokens=10), request_id="eos")
    eng.add_request([5], SamplingParams(max_tokens=10, stop_token_ids=[ord("b")]), request_id="stopid")
    eng.add_request([5], SamplingParams(max_tokens=10, stop=["END"]), request_id="stopstr")
    eng.add_request([5], SamplingParams(max_tokens=3), request_id="len")
    f = _run(eng)
    assert (f["eos"].finish_reason, f["eos"].token_ids, f["eos"].text) == ("stop", [ord("a"), 3], "a")
    assert (f["stopid"].finish_reason, f["stopid"].token_ids) == ("stop", [ord("a"), ord("b")])
    assert (f["stopstr"].finish_reason, f["stopstr"].text) == ("stop", "x")
    assert (f["len"].finish_reason, len(f["len"].token_ids)) == ("length", 3)
    assert sorted(runner.released) == ["eos", "len", "stopid", "stopstr"]
    assert eng.blocks.num_used_blocks == 0


def test_streaming_holds_back_possible_stop_string_prefix():
    eng, _ = _engine({"r": [ord(c) for c in "abEN"] + [ord("D")]})
    eng.add_request([5], SamplingParams(max_tokens=10, stop=["END"]), request_id="r")
    deltas = []
    while eng.has_unfinished():
        deltas += [o.new_text for o in eng.step()]
    assert "".join(deltas) == "ab" and deltas == ["", "", "a", "b", ""]


def test_ignore_eos_and_context_limit():
    eng, _ = _engine({"r": [3] * 10}, max_model_len=6)
    eng.add_request([5, 6, 7], SamplingParams(max_tokens=10, ignore_eos=True), request_id="r")
    f = _run(eng)["r"]
    assert f.finish_reason == "length" and f.token_ids == [3, 3, 3]  # 3 prompt + 3 = max_model_len


def test_abort_frees_blocks_at_once():
    eng, runner = _engine({"r": [ord("a")] * 10})
    eng.add_request(list(range(20)), SamplingParams(max_tokens=10), request_id="r")
    eng.step()
    assert eng.blocks.num_used_blocks == 5  # 20 prompt tokens cached; the sampled one is not yet
    eng.abort("r")
    assert eng.blocks.num_used_blocks == 0 and not eng.has_unfinished() and runner.released == ["r"]


def test_bad_requests_are_rejected_clearly():
    eng, _ = _engine({}, max_model_len=8)
    with pytest.raises(RequestError, match="empty"):
        eng.add_request([], SamplingParams())
    with pytest.raises(RequestError, match="8"):
        eng.add_request(list(range(8)), SamplingParams())
    eng.add_request([1], SamplingParams(), request_id="x")
    with pytest.raises(RequestError, match="already in use"):
        eng.add_request([1], SamplingParams(), request_id="x")
