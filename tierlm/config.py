"""Configuration: one tree of frozen groups, built and validated before anything is loaded.

    TierlmConfig
      model      ModelConfig       what to run and where: checkpoint, compute dtype, device, context
      cache      CacheConfig       the paged KV cache
      scheduler  SchedulerConfig   continuous batching: sequence slots, token budgets, policy
      tiers      TierConfig        weights beyond RAM (FlexInfer): budget, prefetch, locking, store
      quant      QuantConfig       the weights' format and how it is produced
      runtime    RuntimeConfig     threads and kernel paths

Each group checks its own fields in ``__post_init__`` and raises a ``ConfigError`` naming the field.
``EngineArgs`` (tierlm.engine_args) is the flat view users type, ``LLM(**kwargs)`` and the CLI flags;
it builds this tree. Values that depend on the checkpoint ("auto" dtype and format, the model's
context length, the KV cache size) are resolved by tierlm.builder once the checkpoint's header is
read, before any weight is; the resolved tree is what is logged at start-up.

No torch here, nor in anything imported from here: ``tierlm --help`` and argument errors answer
without it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields

from tierlm.engine.budget import StepCost
from tierlm.memory.plan import LOCKINGS, ORDERS

DTYPES = ("auto", "float32", "bfloat16")
POLICIES = ("splitfuse", "prefill_first")
PROMPT_ORDERS = ("fcfs", "shortest")
FORMATS = ("q8", "q6", "q5", "q4", "q3h", "q3", "q2")  # tierlm.quant's own formats, most bits first
GGUF_NATIVE = "gguf"  # a GGUF file's own blocks
FLOAT = "float"  # weights expanded to the compute dtype
AUTO = "auto"
QUANTS = (AUTO, FLOAT, GGUF_NATIVE, *FORMATS)
KV_FORMATS = ("q8", "q4")
METHODS = ("rtn", "gptq")  # rtn: each group rounded on its own; gptq: tierlm.quant.gptq
AUTO_LOAD_BUDGET = 2048  # max_num_batched_tokens="auto": the budget the engine loads with, before measuring
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
_SIZE = re.compile(r"^\s*(\d+(\.\d*)?|\.\d+)\s*(%|b|k|m|g|t|kb|mb|gb|tb|kib|mib|gib|tib)?\s*$", re.IGNORECASE)


class ConfigError(ValueError):
    """An invalid setting. ``field`` is the setting's name as the user spelled it (a keyword of ``LLM``;
    the CLI shows the matching flag), ``reason`` what is wrong with it."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(reason if reason.startswith(field_name) else f"{field_name}: {reason}")
        self.field, self.reason = field_name, reason


def _require(ok: bool, field_name: str, reason: str) -> None:
    if not ok:
        raise ConfigError(field_name, reason)


def _positive_int(value: object, field_name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    _require(isinstance(value, int) and not isinstance(value, bool), field_name,
             f"{field_name} must be an integer, got {value!r}")
    _require(value >= 1, field_name, f"{field_name} must be >= 1{' or None' if allow_none else ''}, got {value!r}")


def _finite_positive(value: object, field_name: str) -> None:
    if value is None:
        return
    _require(isinstance(value, (int, float)) and math.isfinite(value) and value > 0, field_name,
             f"{field_name} must be a finite number > 0 or None, got {value!r}")


def _choice(value: object, choices: tuple, field_name: str) -> None:
    _require(value in choices, field_name, f"{field_name} must be one of {', '.join(map(str, choices))}; "
             f"got {value!r}")


def check_size(value: object, field_name: str) -> None:
    """A memory size: bytes (an integer), or text such as "2GiB", "500MB", "1.5G", "25%" (of the model)."""
    if isinstance(value, int) and not isinstance(value, bool):
        _require(value >= 0, field_name, f"{field_name} must be >= 0 bytes, got {value}")
        return
    _require(isinstance(value, str) and _SIZE.match(value) is not None, field_name,
             f"{field_name} {value!r} is not a size: use e.g. 2GiB, 500MB, 25% or a byte count")


@dataclass(frozen=True)
class ModelConfig:
    """What to run and where. ``model`` None: the embedded SmolLM2-135M-Instruct."""

    model: str | None = None  # an HF model folder or a .gguf file
    dtype: str = AUTO  # compute dtype; auto: float32 (the fastest on CPU for these kernels)
    device: str = "cpu"  # cpu, cuda or cuda:N
    max_model_len: int | None = None  # tokens a sequence may reach; None: the model's context
    spec_dirs: tuple[str, ...] = ()  # folders of extra family files, searched before the built-ins
    chat_template: str | None = None  # a Jinja file, or a name (tierlm.loader.chat_templates); None: the model's

    def __post_init__(self) -> None:
        object.__setattr__(self, "spec_dirs", tuple(str(d) for d in self.spec_dirs))
        if self.model is not None:
            object.__setattr__(self, "model", str(self.model))
        _choice(self.dtype, DTYPES, "dtype")
        _require(isinstance(self.device, str) and _DEVICE.match(self.device) is not None, "device",
                 f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        _positive_int(self.max_model_len, "max_model_len", allow_none=True)


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: ``kv_cache_tokens`` tokens in blocks of ``block_size``. None: room for
    max_num_seqs sequences of max_model_len, capped at 65,536 tokens, never below max_model_len
    (memory is committed by the OS as blocks are first written)."""

    block_size: int = 16
    kv_cache_tokens: int | None = None
    kv_quant: str | None = None  # None: the compute dtype; q8 or q4 (tierlm.quant.kv)

    def __post_init__(self) -> None:
        _positive_int(self.block_size, "block_size")
        _positive_int(self.kv_cache_tokens, "kv_cache_tokens", allow_none=True)
        _choice(self.kv_quant, (None, *KV_FORMATS), "kv_quant")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching (tierlm.engine.scheduler explains the policies)."""

    max_num_seqs: int = 16
    # the per-step token budget; "auto": measured at start-up (splitfuse, tierlm.engine.budget)
    max_num_batched_tokens: int | str = 2048
    enable_chunked_prefill: bool = True  # False: a prompt is scheduled whole or not at all
    policy: str = "splitfuse"  # or "prefill_first"
    # splitfuse: the budget of a step with no decode in it; None: max_num_batched_tokens
    max_num_prefill_tokens: int | None = None
    # splitfuse: the rate every stream is promised, tokens/s: its token i (first = 0) is due i / rate
    # seconds after its first. With it (and step_cost), a step may go past max_num_batched_tokens, up to
    # the prefill budget, by as many prompt tokens as fit before the most urgent decode's next token
    # falls due. None: the fixed budget alone.
    slo_tokens_per_s: float | None = None
    step_cost: StepCost | None = None  # what a step costs here (tierlm.engine.budget); needed by the SLO
    # splitfuse: which prompts get the budget the decodes leave. "fcfs": running prompts oldest first,
    # then the queue in arrival order; "shortest": running and waiting prompts together, fewest tokens
    # left to compute first
    prompt_order: str = "fcfs"
    # "shortest": a prompt's count of tokens left is lowered by this many per second it has waited since
    # arrival, so a long prompt outranks any newer one in bounded time. None: no aging
    prompt_aging_tokens_per_s: float | None = None

    def __post_init__(self) -> None:
        _choice(self.policy, POLICIES, "policy")
        _positive_int(self.max_num_seqs, "max_num_seqs")
        if self.max_num_batched_tokens != AUTO:
            _positive_int(self.max_num_batched_tokens, "max_num_batched_tokens")
        _positive_int(self.max_num_prefill_tokens, "max_num_prefill_tokens", allow_none=True)
        _choice(self.prompt_order, PROMPT_ORDERS, "prompt_order")
        _require(self.prompt_order == "fcfs" or self.policy == "splitfuse", "prompt_order",
                 "prompt_order applies to the splitfuse policy only")
        if self.slo_tokens_per_s is not None:
            _finite_positive(self.slo_tokens_per_s, "slo_tokens_per_s")
            _require(self.policy == "splitfuse", "slo_tokens_per_s",
                     "slo_tokens_per_s applies to the splitfuse policy only")
            _require(self.step_cost is not None or self.max_num_batched_tokens == AUTO, "slo_tokens_per_s",
                     "slo_tokens_per_s needs the measured step_cost: the budget must be chosen by measurement "
                     "(max_num_batched_tokens='auto')")
        if self.prompt_aging_tokens_per_s is not None:
            _finite_positive(self.prompt_aging_tokens_per_s, "prompt_aging_tokens_per_s")
            _require(self.prompt_order == "shortest", "prompt_aging_tokens_per_s",
                     "prompt_aging_tokens_per_s applies to prompt_order='shortest' only")

    @property
    def auto_budget(self) -> bool:
        """Whether the step budget is still to be measured (tierlm.builder does it at start-up)."""
        return self.max_num_batched_tokens == AUTO

    @property
    def prefill_budget(self) -> int:
        """The token budget of a step with no decode in it."""
        return self.max_num_batched_tokens if self.max_num_prefill_tokens is None else self.max_num_prefill_tokens


@dataclass(frozen=True)
class TierConfig:
    """Weights beyond ``weight_memory`` stay in a weight store on disk and stream in (tierlm.memory);
    ``device_memory`` keeps that part of the off-disk weights on the device."""

    weight_memory: str | int | None = None  # None: every weight resident
    device_memory: str | int | None = None  # a part of weight_memory (all of the model when that is None)
    prefetch_window: int = 3  # layers read ahead of the one computing; 0: synchronous reads
    tier_locking: str = "balanced"
    tier_order: str = "auto"
    num_io_threads: int = 4
    store_dir: str | None = None  # None: under $TIERLM_CACHE (default ~/.cache/tierlm)

    def __post_init__(self) -> None:
        for name in ("weight_memory", "device_memory"):
            if getattr(self, name) is not None:
                check_size(getattr(self, name), name)
        _require(isinstance(self.prefetch_window, int) and self.prefetch_window >= 0, "prefetch_window",
                 f"prefetch_window must be an integer >= 0, got {self.prefetch_window!r}")
        _choice(self.tier_locking, LOCKINGS, "tier_locking")
        _choice(self.tier_order, ORDERS, "tier_order")
        _positive_int(self.num_io_threads, "num_io_threads")
        if self.store_dir is not None:
            object.__setattr__(self, "store_dir", str(self.store_dir))

    @property
    def tiered(self) -> bool:
        return self.weight_memory is not None or self.device_memory is not None


@dataclass(frozen=True)
class QuantConfig:
    """The weights' format. ``quant``: auto (a GGUF file's own blocks, float for an HF folder; float when
    a dtype is asked for explicitly), float, gguf, or a tierlm format produced at load (tierlm.quant)."""

    quant: str = AUTO
    quant_group: int = 64  # weights per group of the tierlm formats (a multiple of 32)
    quant_method: str = AUTO  # rtn or gptq; auto: tierlm.quant.methods.default_method
    quant_importance: str | None = None  # an importance file (`tierlm imatrix`) weighting the range search
    # quantized products of prompt chunks (> 8 rows) by the int8 kernel too, as llama.cpp does (activations
    # rounded to int8 per 32 or 256 values; tierlm.quant.linear): True everywhere it can (3-4x the prefill
    # of tierlm's formats on AVX512-VNNI), False never (float), None where it is the faster path (the AVX2
    # build's 8-row tiles of GGUF K-quants and IQ4_XS: 1.1-1.9x)
    quant_int8_prompts: bool | None = None

    def __post_init__(self) -> None:
        if self.quant is None:
            object.__setattr__(self, "quant", AUTO)
        _choice(self.quant, QUANTS, "quant")
        _require(isinstance(self.quant_group, int) and self.quant_group >= 32 and self.quant_group % 32 == 0,
                 "quant_group", f"quant_group must be a positive multiple of 32, got {self.quant_group!r}")
        _choice(self.quant_method, (AUTO, *METHODS), "quant_method")
        _require(self.quant_int8_prompts in (None, True, False), "quant_int8_prompts",
                 f"quant_int8_prompts must be true, false or unset, got {self.quant_int8_prompts!r}")
        produced = self.quant in FORMATS
        _require(self.quant_method in (AUTO, "rtn") or produced, "quant_method",
                 f"{self.quant_method!r} produces a tierlm format (quant='q4', ...); quant is {self.quant!r}")
        if self.quant_importance is not None:
            object.__setattr__(self, "quant_importance", str(self.quant_importance))
            _require(produced, "quant_importance", "weights how a tierlm format (quant='q4', ...) is produced "
                     f"from float weights; quant is {self.quant!r}")
            _require(self.quant_method != "gptq", "quant_importance",
                     "quant_method='gptq' computes its own importance; it takes no importance file")

    @property
    def produced(self) -> bool:
        """Whether tierlm quantizes the weights itself (a tierlm format)."""
        return self.quant in FORMATS


@dataclass(frozen=True)
class RuntimeConfig:
    """How the machine is used."""

    # decode steps in one C call where the model and step allow it (tierlm.model.fused_decode); False:
    # layer by layer in Python, the path prompts take (for comparison)
    fused_decode: bool = True
    num_threads: int | None = None  # compute threads; None: the cores this process may run on

    def __post_init__(self) -> None:
        _positive_int(self.num_threads, "num_threads", allow_none=True)


GROUPS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig, "tiers": TierConfig,
          "quant": QuantConfig, "runtime": RuntimeConfig}


@dataclass(frozen=True)
class TierlmConfig:
    """The whole configuration of one engine. Invariants that span groups are checked here."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    tiers: TierConfig = field(default_factory=TierConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        m = self.model
        if m.model is not None and self.quant.quant == GGUF_NATIVE:
            _require(m.model.endswith(".gguf"), "quant", f"'gguf' keeps a GGUF file's own blocks; {m.model} is not "
                     "a .gguf file")
        if m.max_model_len is not None and self.cache.kv_cache_tokens is not None:
            _require(self.cache.kv_cache_tokens >= m.max_model_len, "kv_cache_tokens",
                     f"the KV cache ({self.cache.kv_cache_tokens} tokens) cannot hold one sequence of "
                     f"max_model_len={m.max_model_len} tokens")

    @property
    def num_kv_blocks(self) -> int:
        """Blocks of the KV cache, the null block included (tierlm.model.attention); resolved trees only."""
        return 1 + -(-self.cache.kv_cache_tokens // self.cache.block_size)

    @property
    def kv_capacity_tokens(self) -> int:
        return (self.num_kv_blocks - 1) * self.cache.block_size

    def describe(self) -> str:
        """One line per group, every field: what the start-up log and ``tierlm info --config`` print."""
        lines = []
        for name in GROUPS:
            group = getattr(self, name)
            values = ", ".join(f"{f.name}={_show(getattr(group, f.name))}" for f in fields(group))
            lines.append(f"{name}: {values}")
        return "\n".join(lines)


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)
