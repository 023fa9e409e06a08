"""Per-request sampling settings. No torch here: this is request bookkeeping."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class SamplingParamsError(ValueError):
    """An invalid sampling value: ``field`` names it, ``reason`` says what is wrong; the message says both."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field_name, reason


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
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens",
               f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _check(_finite(self.temperature) and self.temperature >= 0, "temperature",
               f"temperature must be a finite number >= 0, got {self.temperature!r}")
        _check(self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= 1), "top_k",
               f"top_k must be None or an integer >= 1, got {self.top_k!r}")
        _check(0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(0 <= self.min_p <= 1, "min_p", f"min_p must be in [0, 1], got {self.min_p!r}")
        _check(_finite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
               f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty",
               f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty",
               f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20), "logprobs",
               f"logprobs must be None or an integer in [0, 20], got {self.logprobs!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise SamplingParamsError(field_name, message)


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
