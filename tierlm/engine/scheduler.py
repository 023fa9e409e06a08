"""Token-budget scheduler with continuous batching and preemption by recomputation. No torch.

Two policies (``SchedulerConfig.policy``):

"splitfuse" (default; DeepSpeed-FastGen's Dynamic SplitFuse, vLLM v1's scheduler). Each step:
  1. running requests each get min(tokens it has not computed, budget left): first the decoding ones,
     one token each, then those whose prompt is not done, a chunk each, oldest first in both. If the
     cache cannot hold a grant, the newest running request not yet granted this step is preempted
     (blocks freed, computed count reset to 0, put back at the head of the queue) until it can,
     possibly preempting itself.
  2. waiting requests, first come first served, join while there is budget, a sequence slot and
     cache room for their first chunk. Nobody new joins in a step that preempted.
Requests join and leave between steps; a step is any mix of prompt chunks and decodes, so every
forward pass carries about ``max_num_batched_tokens`` tokens while there is work.
A step in which no running request is decoding has the budget ``max_num_prefill_tokens`` instead
(when set, typically larger): the budget is there to bound how long each decode waits for its
next token, and a step of prompts only holds up no decode. Without it a lone long prompt is
chunked at the decode-friendly budget with nothing to gain: on SmolLM2 at budget 36 with one client,
P95 time to first token was 3.9 s (serve_smollm2_b36.md), and 2.0 s with a prefill budget of 2048
(serve_smollm2_b36_p2048.md; prefill-first 1.7 s).

With an SLO (``slo_tokens_per_s`` = g, the rate each stream is promised: its token i, first = 0, is
due i / g seconds after its first) a step that carries decodes may take more prompt tokens than
``max_num_batched_tokens``, up to the prefill budget: as many as the measured ``StepCost`` says fit,
at ``SLO_COST_MARGIN`` times that cost, before the earliest of the decodes' next tokens falls due. The
fixed budget is the floor, so a decode already behind schedule gets the shortest steps to catch up.
A stream that ran ahead of its schedule (decode-only steps are far faster than 1 / g) thus lends
its slack to the prompts waiting behind it, as prefill-first does, but only as much as it has.

The prompts' order (``prompt_order``): "fcfs" as above, or "shortest": after the decodes, running and
waiting prompts together, fewest tokens left to compute first. With a fixed budget a long prompt is
computed over many steps, and in arrival order every prompt that comes in behind it waits for all of
them; FastGen's SLA gives a prompt of L tokens L / R seconds to its first token, so the short prompt
misses its deadline while the long one had time to spare. Shortest-first follows those deadlines
without knowing R (the same order when all arrive together). In bench/serve_sim.py on the 1.1B at 4
clients it lifts the fixed budget's pass fraction from 0.69 to 0.93 at the same P95 per-token latency
(serve_sim_*.md). The price is the usual one of shortest-job-first: a long prompt waits as long as
shorter ones keep arriving. Aging (``prompt_aging_tokens_per_s`` = a) bounds that wait: a prompt with
n tokens left that arrived at t ranks by n - a * (now - t), so it outranks a newly arrived prompt of
m tokens once it has waited (n - m) / a seconds, at most n / a. Ranking by that key is ranking by
t + n / a: with a = R it is earliest deadline first under FastGen's SLA (a prompt of L tokens is due
L / R s after it arrives), counting for a partly computed prompt only what it has left.
Simulated (bench/serve_sim.py --agings, results/serve_sim_aging_*.md; 1.1B, R = 32 tokens/s), effective
throughput over prefill-first's and the longest wait for a first token:

    clients   no aging            a = 1                a = 4                a = R
    4         1.62x, 38 s         1.64x, 38 s          1.53x, 38 s          1.48x, 31 s
    8         6.7x, 464 s         6.0x, 269 s          4.5x, 136 s          0.64x, 55 s
    16        80x, 523 s          56x, 363 s           16x, 204 s           0x, 103 s

Past saturation every order misses deadlines, and shortest-first "passes" more requests by leaving
the long ones waiting for the whole run (a 600 s run: 464 s is starvation); the stuck request fails
once, while the short ones behind it keep passing. Aging trades that back for bounded waits, and at
a = R it is as bad as arrival order under overload (the deadline-first domino effect). Below
saturation (4 clients) a small rate costs little. Shortest-first, aged or not, is not the default.

"prefill_first" (the classic scheduler, kept for comparison): while a waiting prompt fits, a step
runs whole prompts only (first come first served, within the budget) and every decode waits;
otherwise it runs one token for every running request. Prompts are never split.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tierlm.config import POLICIES, PROMPT_ORDERS, SchedulerConfig  # noqa: F401  (re-exported for callers)
from tierlm.engine.block_manager import BlockManager
from tierlm.engine.budget import StepCost
from tierlm.engine.request import FinishReason, Request, RequestStatus

# Under an SLO a step is planned as if it cost this many times its measured StepCost: a step that runs
# past the deadline it was sized for fails every decode in it, and steps here vary by 10-30%. In a
# simulation of bench/serve.py's workloads with the real scheduler and 15% log-normal noise on each step
# (bench/serve_sim.py, results/serve_sim_*.md), 1.5 and 2 did about equally well and 1.2 worse: on the
# 1.1B at 4 clients 1.50x / 1.72x / 1.74x prefill-first's effective throughput at 1.2 / 1.5 / 2, at 8
# clients 2.4x / 3.7x / 3.2x; SmolLM2 at 8 clients 1.47x / 1.85x / 1.82x.
SLO_COST_MARGIN = 1.5


@dataclass(frozen=True)
class ScheduledChunk:
    """``num_new_tokens`` tokens of ``request``, starting at position ``start``."""

    request: Request
    start: int
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the request's tokens: the step samples its next one."""
        return self.start + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class StepBudget:
    """What one step may still take: up to ``num_tokens`` tokens, and past that, up to ``max_tokens``
    in all (None: ``num_tokens``), as many as ``step_cost`` says fit in ``time_ms`` (None: no time
    limit, ``num_tokens`` only). Each grant is charged to both."""

    def __init__(self, num_tokens: int, max_tokens: int | None = None, time_ms: float | None = None,
                 step_cost: StepCost | None = None):
        self.num_tokens, self.time_ms, self.step_cost = num_tokens, time_ms, step_cost
        self.max_tokens = num_tokens if max_tokens is None else max_tokens

    @property
    def has_room(self) -> bool:
        return self.num_tokens > 0 or (self.time_ms is not None and self.time_ms > 0 and self.max_tokens > 0)

    def grant(self, start: int, wanted: int) -> int:
        """How many of ``wanted`` tokens at positions start.. this step takes."""
        n = min(wanted, max(self.num_tokens, 0))
        if self.time_ms is not None:
            n = max(n, min(wanted, self.max_tokens, self.step_cost.max_chunk(start, self.time_ms)))
        return n

    def take(self, start: int, n: int) -> None:
        self.num_tokens -= n
        self.max_tokens -= n
        if self.time_ms is not None:
            self.time_ms -= self.step_cost.chunk_ms(start, n)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 clock: Callable[[], float] = time.perf_counter):
        if config.auto_budget:
            raise ValueError("the scheduler needs a token budget: max_num_batched_tokens='auto' is resolved at "
                             "start-up (tierlm.builder)")
        self.config = config
        self.blocks = block_manager
        self.clock = clock  # seconds, the clock of RequestMetrics: the SLO's deadlines are read on it
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    # -- queue management ---------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Mark finished and free its blocks at once (whatever state it was in)."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self.blocks.free(request.block_table)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.metrics.finished_time = self.clock()

    # -- one step -----------------------------------------------------------------------------
    @property
    def splits_prompts(self) -> bool:
        """Whether a prompt may be computed over several steps."""
        return self.config.policy == "splitfuse" and self.config.enable_chunked_prefill

    def schedule(self) -> SchedulerOutput:
        if self.config.policy == "prefill_first":
            out = SchedulerOutput()
            self._admit_waiting(out, StepBudget(self.config.max_num_batched_tokens))
            if out.chunks:
                return out  # decodes wait while prompts are being admitted
            return self._schedule_running(admit=False)
        return self._schedule_running(admit=True)

    def _schedule_running(self, admit: bool) -> SchedulerOutput:
        """Grant running requests their tokens, decodes first (preempting when blocks run out), then
        prompt chunks; then, if ``admit``, fill what is left of the budget from the queue."""
        out = SchedulerOutput()
        decodes = [r for r in self.running if r.is_decoding]
        prompts = [r for r in self.running if not r.is_decoding]
        budget = self._step_budget(admit, decodes)
        merged = admit and self.config.prompt_order == "shortest"
        if merged:  # running and waiting prompts compete for the budget, fewest tokens left first (stable:
            # running before waiting, then arrival order, among equals)
            prompts = sorted(prompts + list(self.waiting), key=self._prompt_rank())
        granted: set[str] = set()
        for req in decodes + prompts:
            if not budget.has_room:
                break
            if req.status is RequestStatus.WAITING:  # only when merged (or preempted earlier in this step)
                if not out.preempted:
                    self._admit(req, out, budget)
                continue
            n = budget.grant(req.num_computed_tokens, req.num_uncomputed_tokens)
            if n == 0:
                continue
            if not self._make_room(req, req.num_computed_tokens + n, granted, out):
                continue  # it preempted itself
            self.blocks.allocate(req.block_table, req.num_computed_tokens + n)
            out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
            budget.take(req.num_computed_tokens, n)
            granted.add(req.request_id)
        if admit and not merged and not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _prompt_rank(self) -> Callable[[Request], float]:
        """Sort key of "shortest": tokens left to compute, less the aging rate times the seconds waited."""
        rate = self.config.prompt_aging_tokens_per_s
        if rate is None:
            return lambda r: r.num_uncomputed_tokens
        now = self.clock()
        return lambda r: r.num_uncomputed_tokens - rate * (now - r.metrics.arrival_time)

    def _step_budget(self, admit: bool, decodes: list[Request]) -> StepBudget:
        """The budget of a step whose running decodes are ``decodes``."""
        cfg = self.config
        if not admit:  # prefill_first's decode step
            return StepBudget(cfg.max_num_batched_tokens)
        if not decodes:
            return StepBudget(cfg.prefill_budget)
        started = [r for r in decodes if r.metrics.first_token_time is not None]
        if cfg.slo_tokens_per_s is None or not started:
            return StepBudget(cfg.max_num_batched_tokens)
        # The decodes' next tokens: the step must end before the earliest falls due (a late one leaves
        # the fixed budget only, so that it catches up as fast as steps allow).
        due = min(r.metrics.first_token_time + r.num_output_tokens / cfg.slo_tokens_per_s for r in started)
        time_ms = 1000 * (due - self.clock()) / SLO_COST_MARGIN - cfg.step_cost.fixed_ms
        return StepBudget(cfg.max_num_batched_tokens, max(cfg.prefill_budget, cfg.max_num_batched_tokens),
                          time_ms, cfg.step_cost)

    def _make_room(self, req: Request, num_tokens: int, granted: set[str], out: SchedulerOutput) -> bool:
        """Preempt running requests not yet granted this step, newest first, until ``req`` can hold
        ``num_tokens``; False if it had to preempt itself."""
        while not self.blocks.can_allocate(req.block_table, num_tokens):
            victim = next(r for r in reversed(self.running) if r.request_id not in granted)
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                return False
        return True

    def _admit_waiting(self, out: SchedulerOutput, budget: StepBudget) -> None:
        """Move waiting requests (FCFS) into running while budget, sequence slots and blocks last."""
        while self.waiting and budget.has_room and self._admit(self.waiting[0], out, budget):
            pass

    def _admit(self, req: Request, out: SchedulerOutput, budget: StepBudget) -> bool:
        """Move waiting ``req`` into running with its first chunk, if a sequence slot, the budget and
        the blocks allow."""
        if len(self.running) >= self.config.max_num_seqs:
            return False
        n = budget.grant(req.num_computed_tokens, req.num_uncomputed_tokens)
        if n == 0 or (n < req.num_uncomputed_tokens and not self.splits_prompts):
            return False
        if self.blocks.allocate(req.block_table, req.num_computed_tokens + n) is None:
            return False
        self.waiting.remove(req)
        req.status = RequestStatus.RUNNING
        if req.metrics.first_scheduled_time is None:
            req.metrics.first_scheduled_time = self.clock()
        self.running.append(req)
        out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
        budget.take(req.num_computed_tokens, n)
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.free(req.block_table)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.metrics.num_preemptions += 1
        self.waiting.appendleft(req)

    def commit(self, out: SchedulerOutput) -> None:
        """After the step ran: the scheduled tokens are now in the cache."""
        for c in out.chunks:
            c.request.num_computed_tokens = c.start + c.num_new_tokens
