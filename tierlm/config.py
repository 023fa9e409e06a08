"""Engine configuration: one frozen, validated object, logged at start-up."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tierlm.engine.scheduler import POLICIES, PROMPT_ORDERS
from tierlm.memory.plan import LOCKINGS, ORDERS
from tierlm.quant import FORMATS, GGUF_NATIVE, KV_FORMATS

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
    max_num_prefill_tokens: int | None = None  # budget of a step with no decode (splitfuse); None: the above
    slo_tokens_per_s: float | None = None  # splitfuse: the rate each stream is promised (tierlm.engine.scheduler)
    enable_chunked_prefill: bool = True
    scheduling_policy: str = "splitfuse"  # or "prefill_first" (see tierlm.engine.scheduler)
    prompt_order: str = "fcfs"  # splitfuse: or "shortest", fewest prompt tokens left first (tierlm.engine.scheduler)
    prompt_aging_tokens_per_s: float | None = None  # "shortest": tokens left lowered per second waited; None: none
    weight_memory_bytes: int | None = None  # None: every weight resident; else see tierlm.memory.plan
    prefetch_window: int = 3
    tier_locking: str = "balanced"
    tier_order: str = "auto"
    quant: str | None = None  # weights: None (as loaded), a tierlm.quant format, or "gguf" (the file's blocks)
    quant_group: int = 64  # weights per group of the tierlm formats
    kv_quant: str | None = None  # KV cache: None (compute dtype), "q8" or "q4"
    # quantized products of prompt chunks (> 8 rows) by the int8 kernel too, as llama.cpp does: 3-4x the
    # prefill speed, activations rounded to int8 per 32 values (tierlm.quant.linear); else float
    quant_int8_prompts: bool = False
    # decode steps in one C call where the model and step allow it (tierlm.model.fused_decode); False:
    # layer by layer in Python, the path prompts take (for comparison)
    fused_decode: bool = True

    def __post_init__(self) -> None:
        if self.scheduling_policy not in POLICIES:
            raise ConfigError(f"scheduling_policy must be one of {POLICIES}, got {self.scheduling_policy!r}")
        if self.prompt_order not in PROMPT_ORDERS:
            raise ConfigError(f"prompt_order must be one of {PROMPT_ORDERS}, got {self.prompt_order!r}")
        if self.prompt_order != "fcfs" and self.scheduling_policy != "splitfuse":
            raise ConfigError("prompt_order applies to the splitfuse policy only")
        if self.prompt_aging_tokens_per_s is not None and not (
                self.prompt_order == "shortest" and 0 < self.prompt_aging_tokens_per_s < float("inf")):
            raise ConfigError(f"prompt_aging_tokens_per_s must be a finite number > 0 and needs prompt_order="
                              f"'shortest', got {self.prompt_aging_tokens_per_s} with {self.prompt_order!r}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.prefetch_window < 0:
            raise ConfigError(f"prefetch_window must be >= 0, got {self.prefetch_window}")
        if self.tier_locking not in LOCKINGS:
            raise ConfigError(f"tier_locking must be one of {LOCKINGS}, got {self.tier_locking!r}")
        if self.tier_order not in ORDERS:
            raise ConfigError(f"tier_order must be one of {ORDERS}, got {self.tier_order!r}")
        if self.quant is not None and self.quant not in (*FORMATS, GGUF_NATIVE):
            raise ConfigError(f"quant must be one of {(*FORMATS, GGUF_NATIVE)} or None, got {self.quant!r}")
        if self.quant_group < 32 or self.quant_group % 32:
            raise ConfigError(f"quant_group must be a positive multiple of 32, got {self.quant_group}")
        if self.kv_quant is not None and self.kv_quant not in KV_FORMATS:
            raise ConfigError(f"kv_quant must be one of {KV_FORMATS} or None, got {self.kv_quant!r}")
        for name in ("max_model_len", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_prefill_tokens is not None and self.max_num_prefill_tokens < 1:
            raise ConfigError(f"max_num_prefill_tokens must be >= 1 or None, got {self.max_num_prefill_tokens}")
        if self.slo_tokens_per_s is not None and not self.slo_tokens_per_s > 0:
            raise ConfigError(f"slo_tokens_per_s must be > 0 or None, got {self.slo_tokens_per_s}")
        if (self.num_kv_blocks - 1) * self.block_size < self.max_model_len:
            raise ConfigError(f"the KV cache ({self.num_kv_blocks - 1} blocks of {self.block_size} tokens) "
                              f"cannot hold one sequence of max_model_len={self.max_model_len} tokens")

    @property
    def kv_capacity_tokens(self) -> int:
        return (self.num_kv_blocks - 1) * self.block_size

    def describe(self) -> str:
        return "EngineConfig(" + ", ".join(f"{k}={v}" for k, v in asdict(self).items()) + ")"
