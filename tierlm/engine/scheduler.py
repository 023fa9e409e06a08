"""Token-budget scheduler with continuous batching and preemption by recomputation. No torch.

Two policies (``SchedulerConfig.policy``):

"splitfuse" (default; DeepSpeed-FastGen's Dynamic SplitFuse, vLLM v1's scheduler). Each step:
  1. running requests, oldest first, each get min(tokens it has not computed, budget left): one
     token for a request that is decoding, a chunk for one whose prompt is not done. If the cache
     cannot hold the grant, the newest running request is preempted (blocks freed, computed count
     reset to 0, put back at the head of the queue) until it can, possibly preempting itself.
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

"prefill_first" (the classic scheduler, kept for comparison): while a waiting prompt fits, a step
runs whole prompts only (first come first served, within the budget) and every decode waits;
otherwise it runs one token for every running request. Prompts are never split.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from tierlm.engine.block_manager import BlockManager
from tierlm.engine.request import FinishReason, Request, RequestStatus

POLICIES = ("splitfuse", "prefill_first")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048  # the per-step token budget
    enable_chunked_prefill: bool = True  # False: a prompt is scheduled whole or not at all
    policy: str = "splitfuse"  # or "prefill_first"; see the module docstring
    # splitfuse: the budget of a step with no decode in it; None: max_num_batched_tokens
    max_num_prefill_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_prefill_tokens is not None and self.max_num_prefill_tokens < 1:
            raise ValueError(f"max_num_prefill_tokens must be >= 1 or None, got {self.max_num_prefill_tokens}")

    @property
    def prefill_budget(self) -> int:
        """The token budget of a step with no decode in it."""
        return self.max_num_batched_tokens if self.max_num_prefill_tokens is None else self.max_num_prefill_tokens


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


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.blocks = block_manager
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
        request.metrics.finished_time = time.perf_counter()

    # -- one step -----------------------------------------------------------------------------
    @property
    def splits_prompts(self) -> bool:
        """Whether a prompt may be computed over several steps."""
        return self.config.policy == "splitfuse" and self.config.enable_chunked_prefill

    def schedule(self) -> SchedulerOutput:
        if self.config.policy == "prefill_first":
            out = SchedulerOutput()
            self._admit_waiting(out, self.config.max_num_batched_tokens)
            if out.chunks:
                return out  # decodes wait while prompts are being admitted
            return self._schedule_running(admit=False)
        return self._schedule_running(admit=True)

    def _schedule_running(self, admit: bool) -> SchedulerOutput:
        """Grant running requests their tokens (preempting when blocks run out), then, if ``admit``,
        fill what is left of the budget from the queue."""
        out = SchedulerOutput()
        decoding = any(r.is_decoding for r in self.running)
        budget = self.config.max_num_batched_tokens if decoding or not admit else self.config.prefill_budget
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_uncomputed_tokens, budget)
            while not self.blocks.can_allocate(req.block_table, req.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break  # it preempted itself: nothing older is left to schedule after it
            self.blocks.allocate(req.block_table, req.num_computed_tokens + n)
            out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
            budget -= n
            i += 1
        if admit and not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        """Move waiting requests (FCFS) into running while budget, sequence slots and blocks last."""
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            n = min(req.num_uncomputed_tokens, budget)
            if n < req.num_uncomputed_tokens and not self.splits_prompts:
                break
            if self.blocks.allocate(req.block_table, req.num_computed_tokens + n) is None:
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = time.perf_counter()
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
            budget -= n

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
