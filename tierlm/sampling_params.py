"""Per-request sampling settings. No torch here: this is request bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass, field


class SamplingParamsError(ValueError):
    """An invalid sampling value; the message names the field."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    Invariants (checked at construction):
      temperature >= 0 (0 means greedy); top_k is None or >= 1; 0 < top_p <= 1;
      0 <= min_p <= 1; repetition_penalty > 0; max_tokens >= 1;
      logprobs is None (none returned) or >= 0 (the sampled token's logprob plus that many top ones).
    Penalties follow vLLM/OpenAI: repetition over prompt+output (divide positive logits, multiply
    negative ones), presence/frequency over output tokens only (subtract from logits).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        # Accept lists/strings from callers; store tuples so the object stays hashable and frozen.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
               f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature!r}")
        _check(self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= 1),
               f"top_k must be None or an integer >= 1, got {self.top_k!r}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        _check(self.repetition_penalty > 0,
               f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        _check(-2 <= self.presence_penalty <= 2,
               f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        _check(-2 <= self.frequency_penalty <= 2,
               f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
               f"logprobs must be None or an integer in [0, 20], got {self.logprobs!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SamplingParamsError(message)
