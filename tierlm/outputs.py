"""What callers get back. No torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from tierlm.engine.request import RequestMetrics


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float  # natural log, of the model's raw distribution (before penalties/temperature)
    top: tuple[tuple[int, float], ...] = ()  # the most likely (id, logprob), descending


@dataclass
class RequestOutput:
    """A request's state after a step. ``text``/``token_ids`` are cumulative; ``new_text`` and
    ``new_token_ids`` are what this step added (for streaming)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    new_text: str = ""
    new_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    metrics: RequestMetrics | None = None
