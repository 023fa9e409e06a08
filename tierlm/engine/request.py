"""A request's bookkeeping. No torch: the engine package only counts tokens and blocks.

A request has no prefill or decode phase (vLLM v1's idea): it has ``all_token_ids`` (prompt then
output) and ``num_computed_tokens``, the prefix whose K/V is in the cache. Each step the scheduler
grants it some of the rest; when the grant reaches the end of ``all_token_ids`` the step also
samples its next token. Preemption by recomputation just resets ``num_computed_tokens`` to 0.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from tierlm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # cancelled by the caller


@dataclass
class RequestMetrics:
    """perf_counter() timestamps, seconds."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = field(default_factory=list)  # one per generated token
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.perf_counter()))
    # filled by the output processor: text so far (stop strings already cut off), logprobs per token
    output_text: str = ""
    logprobs: list = field(default_factory=list)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """Its prompt is in the cache: each step computes the one token it sampled last. (A request
        preempted by recomputation is not decoding again until its prompt is recomputed.)"""
        return self.num_computed_tokens >= len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
