"""The config tree -> a running engine, one stage at a time. ``LLM`` and ``tierlm serve`` call ``build``.

    open_checkpoint   header, architecture and tokenizer; no weight is read       (tierlm.loader)
    use_chat_template the chat template setting, or plain for a model without one (tierlm.loader.chat_templates)
    resolve           "auto" settings, and every check that needs the checkpoint   (this module)
    load_weights      resident tensors, a cached quantized store, or tiered weights
    build_model       linear method (float or quantized kernels, tiered) -> Transformer   (tierlm.model)
    build_cache       the paged KV cache
    build_core        runner + block manager + scheduler -> EngineCore            (tierlm.engine)
    measure_budget    the SplitFuse step budget, when it is "auto"                (tierlm.engine.budget)

Each stage takes the resolved config and the previous stages' results and returns a typed value, so
a new feature adds a stage (or a case inside one), not a branch in ``LLM.__init__``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tierlm.config import AUTO, AUTO_LOAD_BUDGET, FLOAT, GGUF_NATIVE, ConfigError, TierlmConfig
from tierlm.engine.block_manager import BlockManager
from tierlm.engine.engine import EngineCore
from tierlm.loader.chat_templates import use_chat_template
from tierlm.loader.model_loader import OpenedCheckpoint, open_checkpoint
from tierlm.loader.tokenizer import IncrementalDetokenizer, Tokenizer
from tierlm.loader.weights import ModelWeights, load_weights
from tierlm.memory.host import return_free_memory
from tierlm.memory.plan import PlanError
from tierlm.memory.tiered import TieredWeights, TierSettings, load_tiered
from tierlm.model.attention import KVCache
from tierlm.model.linear import LinearMethod, default_linear_method
from tierlm.model.spec import ArchConfig
from tierlm.model.transformer import Transformer
from tierlm.quant import QuantError
from tierlm.runner import TorchModelRunner
from tierlm.runtime import apply_runtime

log = logging.getLogger("tierlm")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_KV_CACHE_TOKENS = 65536


@dataclass
class Built:
    """What ``build`` returns: the resolved config and every component, owned by the caller."""

    config: TierlmConfig  # resolved: no "auto" left
    checkpoint: OpenedCheckpoint  # its reader is closed
    model: Transformer
    cache: KVCache
    runner: TorchModelRunner
    core: EngineCore
    tiers: TieredWeights | None  # weights partly on disk: close() stops its I/O threads

    @property
    def arch(self) -> ArchConfig:
        return self.checkpoint.config

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.checkpoint.tokenizer


def build(config: TierlmConfig) -> Built:
    """Every stage in order; errors a user can fix (a bad setting, a budget that cannot work, a
    quantization that does not fit) come out as ConfigError naming the setting."""
    apply_runtime(config.runtime)
    t0 = time.perf_counter()
    opened = open_checkpoint(config.model.model, tuple(Path(d) for d in config.model.spec_dirs))
    try:
        use_chat_template(opened.tokenizer, config.model.chat_template)
        config = resolve(config, opened)
        log.info("configuration:\n%s", config.describe())
        weights = load_weights_stage(config, opened)
    finally:
        opened.reader.close()
    return_free_memory()  # the read bands and any dequantization temporaries (tierlm.memory.host)
    model = build_model(config, opened, weights)
    return_free_memory()  # the row-tile repacking's band temporaries (~130 MB of a 1.1B Q6_K's)
    cache = build_cache(config, opened.config)
    runner = TorchModelRunner(model, cache, config.model.device)
    core = build_core(config, opened, runner)
    tiers = weights if isinstance(weights, TieredWeights) else None
    built = Built(config, opened, model, cache, runner, core, tiers)
    kv_bytes = KVCache.bytes_per_token(opened.config.num_layers, opened.config.num_kv_heads, opened.config.head_dim,
                                       TORCH_DTYPES[config.model.dtype])
    log.info("model: %s", opened.config.summary())
    log.info("decode steps: %s", model.decode_plan().reason)
    log.info("loaded %s in %.2f s; KV cache %.1f MiB max (%d bytes/token)", opened.path, time.perf_counter() - t0,
             kv_bytes * config.kv_capacity_tokens / 2**20, kv_bytes)
    if config.scheduler.auto_budget:
        measure_budget(built, config.scheduler.slo_tokens_per_s)
    return built


# -- resolve ----------------------------------------------------------------------------------------

def resolve(config: TierlmConfig, opened: OpenedCheckpoint) -> TierlmConfig:
    """``config`` with its "auto" values decided for this checkpoint and machine, checked against the
    checkpoint: the model's context, the device, the format the file allows. Reads no weight."""
    m, arch = config.model, opened.config
    dtype = "float32" if m.dtype == AUTO else m.dtype
    if m.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"{m.device!r} was asked for but torch sees no CUDA device")
    max_len = arch.max_position if m.max_model_len is None else m.max_model_len
    if max_len > arch.max_position:
        raise ConfigError("max_model_len", f"{max_len} exceeds the model's context of {arch.max_position} positions")
    q = config.quant
    quant = q.quant
    if quant == AUTO:  # a GGUF file runs as stored unless a float dtype was asked for
        quant = GGUF_NATIVE if opened.source == "gguf" and m.dtype == AUTO else FLOAT
    if quant == GGUF_NATIVE and opened.source != "gguf":
        raise ConfigError("quant", f"'gguf' keeps a GGUF file's own blocks; {opened.path} is not a GGUF file")
    method = q.quant_method
    if q.produced and method == AUTO:
        from tierlm.quant.methods import default_method

        method, why = default_method(q.quant, arch, opened.tokenizer is not None, q.quant_importance is not None)
        log.info("quant_method=%s for %s: %s", method, q.quant, why)
    elif method == AUTO:
        method = "rtn"  # nothing is produced: the method is unused
    sched = config.scheduler
    if sched.auto_budget and sched.policy != "splitfuse":  # prefill_first runs whole prompts: no measurement
        sched = replace(sched, max_num_batched_tokens=AUTO_LOAD_BUDGET)
    if sched.auto_budget and sched.max_num_prefill_tokens is None:
        sched = replace(sched, max_num_prefill_tokens=AUTO_LOAD_BUDGET)
    kv_tokens = config.cache.kv_cache_tokens
    if kv_tokens is None:
        kv_tokens = max(max_len, min(sched.max_num_seqs * max_len, DEFAULT_KV_CACHE_TOKENS))
    elif kv_tokens < max_len:
        raise ConfigError("kv_cache_tokens", f"the KV cache ({kv_tokens} tokens) cannot hold one sequence of "
                                             f"max_model_len={max_len} tokens")
    return replace(config, model=replace(m, dtype=dtype, max_model_len=max_len, model=str(opened.path)),
                   quant=replace(q, quant=quant, quant_method=method), scheduler=sched,
                   cache=replace(config.cache, kv_cache_tokens=kv_tokens))


# -- weights ----------------------------------------------------------------------------------------

def load_weights_stage(config: TierlmConfig, opened: OpenedCheckpoint) -> ModelWeights | TieredWeights:
    """Weights as the config places them:

    * tiered (``weight_memory``/``device_memory``): a weight store on disk (built once, quantized when a
      format is asked for) of which the plan keeps a part resident and streams the rest;
    * a tierlm format by GPTQ: a cached quantized store, read whole (calibration is paid once);
    * otherwise the checkpoint read directly, a GGUF file's blocks kept when the format is "gguf", and a
      tierlm format by rtn quantized matrix by matrix as the model takes them (with an importance
      file: here, each matrix weighted by its own vector).
    """
    from tierlm.quant.store import StoreQuant, open_or_build_store, resident_weights

    q, dtype = config.quant, TORCH_DTYPES[config.model.dtype]
    store_quant = None
    if q.produced:
        store_quant = StoreQuant(q.quant, q.quant_group, q.quant_importance, q.quant_method)
    elif q.quant == GGUF_NATIVE:
        store_quant = StoreQuant(GGUF_NATIVE)
    t = config.tiers
    store_dir = None if t.store_dir is None else Path(t.store_dir)
    try:
        if t.tiered:
            settings = TierSettings("100%" if t.weight_memory is None else t.weight_memory, t.prefetch_window,
                                    t.tier_locking, t.tier_order, t.num_io_threads, config.model.device,
                                    t.device_memory)
            store = open_or_build_store(opened, dtype, store_dir, store_quant)
            return load_tiered(store, opened.config.num_layers, settings)
        if q.produced and q.quant_method == "gptq":
            return resident_weights(open_or_build_store(opened, dtype, store_dir, store_quant))
        weights = load_weights(opened.family, opened.config, opened.reader, dtype, q.quant == GGUF_NATIVE)
        if q.produced and q.quant_importance is not None:
            from tierlm.quant import get_quantizer
            from tierlm.quant.imatrix import load_importance, quantize_layers_

            importance = load_importance(q.quant_importance, opened.path)
            quantize_layers_(weights, get_quantizer(q.quant, q.quant_group), importance)
        return weights
    except (PlanError, QuantError) as e:
        raise ConfigError(_setting_of(e, config), str(e)) from e


def _setting_of(err: Exception, config: TierlmConfig) -> str:
    """Which setting a planning or quantization error is about, for its message."""
    if isinstance(err, PlanError):
        return "device_memory" if "device_memory" in str(err) else "weight_memory"
    return "quant_importance" if config.quant.quant_importance is not None else "quant"


# -- model, cache, engine ---------------------------------------------------------------------------

def linear_method(config: TierlmConfig) -> LinearMethod:
    """How matrices are multiplied on this machine: the float kernels, wrapped by the quantized kernels
    when the weights are quantized (a tierlm format or a GGUF file's blocks)."""
    from tierlm.quant.linear import quant_linear

    m, q = config.model, config.quant
    linear = default_linear_method(m.device, TORCH_DTYPES[m.dtype])
    if q.quant != FLOAT:
        linear = quant_linear(q.quant, q.quant_group, linear, m.device, q.quant_int8_prompts)
    return linear


def build_model(config: TierlmConfig, opened: OpenedCheckpoint, weights: ModelWeights | TieredWeights) -> Transformer:
    m = config.model
    linear, dtype = linear_method(config), TORCH_DTYPES[m.dtype]
    if isinstance(weights, TieredWeights):
        layer_linear, head_linear = weights.bind(linear, m.device)
        return Transformer(opened.config, weights.weights, dtype, layer_linear, m.device,
                           config.runtime.fused_decode, stream=weights, head_linear=head_linear)
    return Transformer(opened.config, weights, dtype, linear, m.device, config.runtime.fused_decode)


def build_cache(config: TierlmConfig, arch: ArchConfig) -> KVCache:
    return KVCache(arch.num_layers, config.num_kv_blocks, config.cache.block_size, arch.num_kv_heads, arch.head_dim,
                   TORCH_DTYPES[config.model.dtype], config.model.device, quant=config.cache.kv_quant)


def build_core(config: TierlmConfig, opened: OpenedCheckpoint, runner: TorchModelRunner) -> EngineCore:
    tok = opened.tokenizer
    detok = None if tok is None else (lambda prompt_ids: IncrementalDetokenizer(tok, prompt_ids))
    eos = tok.eos_token_ids if tok is not None else opened.config.eos_token_ids
    sched = config.scheduler
    if sched.auto_budget:  # loaded with a fixed budget; measure_budget sets the measured one (and the SLO)
        sched = replace(sched, max_num_batched_tokens=AUTO_LOAD_BUDGET, slo_tokens_per_s=None)
    return EngineCore(sched, BlockManager(config.num_kv_blocks, config.cache.block_size), runner,
                      max_model_len=config.model.max_model_len, eos_token_ids=eos, detokenizer_factory=detok)


def measure_budget(built: Built, slo_tokens_per_s: float | None) -> None:
    """Choose the step budget by measuring steps here (tierlm.engine.budget) and set it on the engine
    and in ``built.config``; with ``slo_tokens_per_s`` (None: no rate promise) also measure attention's
    cost for the SLO. The engine must be idle."""
    from tierlm.engine.budget import (
        PROBE_CHUNKS,
        PROBE_CONTEXT,
        PROBE_DECODES,
        PROBE_PAIR_CHUNK,
        latency_budget,
        measure_pair_ms,
        measure_step_ms,
        step_cost,
    )
    from tierlm.engine.scheduler import SLO_COST_MARGIN

    cfg, s = built.config, built.config.scheduler
    if s.policy != "splitfuse":
        raise ConfigError("max_num_batched_tokens", "the step budget is measured for the splitfuse policy only")
    num_decodes = min(PROBE_DECODES, s.max_num_seqs - 1)
    loaded_budget = built.core.scheduler.config.max_num_batched_tokens
    # Each probed step must take its whole chunk: within the context, the KV cache (a block per decode
    # and a spare) and the budget it was loaded with.
    room = min(cfg.model.max_model_len - 1, cfg.kv_capacity_tokens - cfg.cache.block_size * (num_decodes + 1),
               loaded_budget - num_decodes)
    chunks = [t for t in PROBE_CHUNKS if t <= room]
    if num_decodes < 1 or not chunks:
        raise ConfigError("max_num_batched_tokens", f"choosing the step budget by measurement needs max_num_seqs "
                          f">= 2 and room for a {PROBE_CHUNKS[0]}-token chunk (max_num_seqs={s.max_num_seqs}, "
                          f"max_model_len={cfg.model.max_model_len}); give the budget explicitly")
    vocab = built.arch.vocab_size
    costs = measure_step_ms(built.core, vocab, chunks, num_decodes)
    budget = latency_budget(costs, num_decodes)
    prefill = loaded_budget if s.max_num_prefill_tokens is None else s.max_num_prefill_tokens
    cost = None
    if slo_tokens_per_s is not None:  # the pair term: one chunk after as long a context as the engine takes
        context = min(PROBE_CONTEXT, cfg.model.max_model_len - 1 - PROBE_PAIR_CHUNK,
                      cfg.kv_capacity_tokens - cfg.cache.block_size - PROBE_PAIR_CHUNK, prefill)
        if context < PROBE_PAIR_CHUNK // 2:
            raise ConfigError("slo_tokens_per_s", f"an SLO needs the cost of attention over a context of at least "
                              f"{PROBE_PAIR_CHUNK // 2 + PROBE_PAIR_CHUNK + 1} tokens: max_model_len is "
                              f"{cfg.model.max_model_len}")
        cost = step_cost(costs, num_decodes, measure_pair_ms(built.core, vocab, PROBE_PAIR_CHUNK, context))
    built.core.set_token_budget(budget, prefill, slo_tokens_per_s, cost)
    built.config = replace(cfg, scheduler=built.core.scheduler.config)
    log.info("step budget: %d tokens, chosen by measurement (step ms with %d decodes, by chunk tokens: %s); "
             "%d in steps without decodes", budget, num_decodes,
             ", ".join(f"{t}: {ms:.0f}" for t, ms in costs.items()), prefill)
    if cost is not None:
        log.info("SLO: %.3g tokens/s a stream; steps may grow to %d tokens while every decode is ahead of it, "
                 "planned at %.3g x the measured step cost: %.1f ms + %.3f ms/token + %.2e ms/query-key pair",
                 slo_tokens_per_s, prefill, SLO_COST_MARGIN, cost.fixed_ms, cost.per_token_ms, cost.per_pair_ms)
