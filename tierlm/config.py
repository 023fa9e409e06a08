"""Engine configuration: one frozen, validated object, logged at start-up."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tierlm.engine.scheduler import POLICIES

_DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """An invalid engine setting; the message names it."""


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs one model.

    num_kv_blocks counts the null block (see tierlm.model.attention), so the cache holds
    (num_kv_blocks - 1) * block_size tokens, and that must be >= max_model_len.
    """

    model: str
    dtype: str
    device: str
    max_model_len: int
    block_size: int
    num_kv_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool = True
    scheduling_policy: str = "splitfuse"  # or "prefill_first" (see tierlm.engine.scheduler)

    def __post_init__(self) -> None:
        if self.scheduling_policy not in POLICIES:
            raise ConfigError(f"scheduling_policy must be one of {POLICIES}, got {self.scheduling_policy!r}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        for name in ("max_model_len", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if (self.num_kv_blocks - 1) * self.block_size < self.max_model_len:
            raise ConfigError(f"the KV cache ({self.num_kv_blocks - 1} blocks of {self.block_size} tokens) "
                              f"cannot hold one sequence of max_model_len={self.max_model_len} tokens")

    @property
    def kv_capacity_tokens(self) -> int:
        return (self.num_kv_blocks - 1) * self.block_size

    def describe(self) -> str:
        return "EngineConfig(" + ", ".join(f"{k}={v}" for k, v in asdict(self).items()) + ")"
