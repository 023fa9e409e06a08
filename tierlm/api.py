"""The public Python API: ``LLM`` and its ``generate`` / ``stream`` / ``chat`` / ``score``."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Union

import torch

from tierlm.config import ConfigError, EngineConfig
from tierlm.engine.block_manager import BlockManager
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
from tierlm.engine.engine import EngineCore, RequestError
from tierlm.engine.scheduler import SLO_COST_MARGIN, SchedulerConfig
from tierlm.loader.model_loader import LoadedModel, default_model_path, load_model, open_checkpoint
from tierlm.loader.tokenizer import IncrementalDetokenizer
from tierlm.memory.plan import PlanError
from tierlm.memory.tiered import StoreQuant, TieredWeights, TierSettings, load_tiered
from tierlm.model.attention import KVCache
from tierlm.model.linear import default_linear_method, plain_weight
from tierlm.model.transformer import Transformer
from tierlm.outputs import RequestOutput
from tierlm.quant import GGUF_NATIVE, QuantError, check_method, get_quantizer
from tierlm.quant.imatrix import load_importance, quantize_layers_
from tierlm.quant.linear import quant_linear
from tierlm.runner import TorchModelRunner
from tierlm.sampling_params import SamplingParams

log = logging.getLogger("tierlm")

Prompt = Union[str, Sequence[int]]
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_KV_CACHE_TOKENS = 65536


class LLM:
    """Load a model (HF folder or GGUF file; None = the embedded SmolLM2) and generate.

    The KV cache is sized for ``kv_cache_tokens`` tokens (default: enough for max_num_seqs
    sequences of max_model_len, capped at 65,536 tokens, never below max_model_len).
    Its memory is allocated lazily by the OS as blocks are first written.

    Weights beyond ``weight_memory`` (bytes or "25%" of the model) stay on disk and stream in
    (tierlm.memory). ``device_memory`` keeps that part of the off-disk weights on ``device`` and
    copies the rest in per layer, overlapped with compute (tierlm.memory.device); without
    ``weight_memory`` everything else is in RAM.
    """

    def __init__(self, model: str | Path | None = None, dtype: str = "float32", *, device: str = "cpu",
                 max_num_seqs: int = 16, max_num_batched_tokens: int = 2048, max_num_prefill_tokens: int | None = None,
                 max_model_len: int | None = None,
                 block_size: int = 16, kv_cache_tokens: int | None = None, enable_chunked_prefill: bool = True,
                 scheduling_policy: str = "splitfuse", prompt_order: str = "fcfs",
                 prompt_aging_tokens_per_s: float | None = None, spec_dirs: Sequence[str | Path] = (),
                 weight_memory: str | int | None = None, prefetch_window: int = 3, tier_locking: str = "balanced",
                 tier_order: str = "auto", num_io_threads: int = 4, store_dir: str | Path | None = None,
                 quant: str | None = None, quant_group: int = 64, kv_quant: str | None = None,
                 device_memory: str | int | None = None, quant_importance: str | Path | None = None,
                 quant_method: str = "rtn", quant_int8_prompts: bool = False, fused_decode: bool = True):
        if dtype not in _TORCH_DTYPES:
            raise ConfigError(f"dtype must be one of {tuple(_TORCH_DTYPES)}, got {dtype!r}")
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} was asked for but torch sees no CUDA device")
        if quant == GGUF_NATIVE and (model is not None and not str(model).endswith(".gguf")):
            raise ConfigError(f"quant={GGUF_NATIVE!r} keeps a GGUF file's own blocks; {model} is not a .gguf file")
        try:
            check_method(quant_method, quant, quant_importance is not None)
        except QuantError as e:
            raise ConfigError(str(e)) from e
        importance = None
        if quant_importance is not None:
            if quant is None or quant == GGUF_NATIVE:
                raise ConfigError("quant_importance weights how a tierlm format (quant='q4', ...) quantizes the "
                                  "float weights; it needs one")
            try:  # checked before anything is loaded or built
                importance = load_importance(quant_importance, default_model_path() if model is None else model)
            except QuantError as e:
                raise ConfigError(str(e)) from e
        t0 = time.perf_counter()
        tiers: TieredWeights | None = None
        if device_memory is not None and weight_memory is None:
            weight_memory = "100%"  # everything off disk: in RAM, or on the device up to device_memory
        if weight_memory is None:
            loaded: LoadedModel = load_model(model, _TORCH_DTYPES[dtype], tuple(Path(d) for d in spec_dirs),
                                             native_quant=quant == GGUF_NATIVE)
            if importance is not None:  # quantized here, each matrix with its own weighting
                try:
                    quantize_layers_(loaded.weights, get_quantizer(quant, quant_group), importance)
                except QuantError as e:
                    raise ConfigError(str(e)) from e
        else:
            # Weights beyond the budget stay in a weight store on disk and stream in (tierlm.memory).
            opened = open_checkpoint(model, tuple(Path(d) for d in spec_dirs))
            # Quantized matrices are stored (and streamed) quantized: fewer bytes per token from disk.
            settings = TierSettings(weight_memory, prefetch_window, tier_locking, tier_order, num_io_threads,
                                    None if store_dir is None else str(store_dir),
                                    None if quant is None else StoreQuant(
                                        quant, quant_group, None if quant_importance is None else str(quant_importance),
                                        quant_method),
                                    str(torch.device(device)), device_memory)
            try:
                tiers = load_tiered(opened, _TORCH_DTYPES[dtype], settings)
            except (PlanError, QuantError) as e:
                raise ConfigError(str(e)) from e
            finally:
                opened.reader.close()
            loaded = LoadedModel(opened.path, opened.family, opened.config, tiers.weights, opened.tokenizer,
                                 opened.source, opened.tensor_types())
        self.loaded = loaded
        self.tiers = tiers
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        max_len = loaded.config.max_position if max_model_len is None else int(max_model_len)
        if max_len > loaded.config.max_position and loaded.config.position == "learned":
            raise ConfigError(f"max_model_len={max_len} exceeds the model's {loaded.config.max_position} "
                              f"learned positions")
        if kv_cache_tokens is None:
            kv_cache_tokens = max(max_len, min(max_num_seqs * max_len, DEFAULT_KV_CACHE_TOKENS))
        num_blocks = 1 + -(-int(kv_cache_tokens) // block_size)
        self.config = EngineConfig(model=str(loaded.path), dtype=dtype, device=device, max_model_len=max_len,
                                   block_size=block_size, num_kv_blocks=num_blocks, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens,
                                   max_num_prefill_tokens=max_num_prefill_tokens,
                                   enable_chunked_prefill=enable_chunked_prefill,
                                   scheduling_policy=scheduling_policy, prompt_order=prompt_order,
                                   prompt_aging_tokens_per_s=prompt_aging_tokens_per_s,
                                   weight_memory_bytes=None if tiers is None else tiers.plan.budget_bytes,
                                   prefetch_window=prefetch_window, tier_locking=tier_locking, tier_order=tier_order,
                                   quant=quant, quant_group=quant_group, kv_quant=kv_quant,
                                   quant_int8_prompts=quant_int8_prompts, fused_decode=fused_decode)
        linear = default_linear_method(device, _TORCH_DTYPES[dtype])
        # Matrices are quantized as the model takes them, or come quantized from a store (GPTQ ones too);
        # a resident model's GPTQ runs below, once the float model is built.
        if quant is not None and (quant_method == "rtn" or tiers is not None):
            linear = quant_linear(quant, quant_group, linear, device, quant_int8_prompts)
        self.model = Transformer(loaded.config, loaded.weights if tiers is None else tiers, _TORCH_DTYPES[dtype],
                                 linear, device, fused_decode=fused_decode)
        if kv_quant is None:
            cache = self.model.new_kv_cache(num_blocks, block_size, device)
        else:
            c = loaded.config
            cache = KVCache(c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim, _TORCH_DTYPES[dtype],
                            device, quant=kv_quant)
        self.runner = TorchModelRunner(self.model, cache, device)
        detok = None
        if self.tokenizer is not None:
            tok = self.tokenizer
            detok = lambda prompt_ids: IncrementalDetokenizer(tok, prompt_ids)
        eos = loaded.tokenizer.eos_token_ids if loaded.tokenizer is not None else loaded.config.eos_token_ids
        self.engine = EngineCore(
            SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                            max_num_prefill_tokens=max_num_prefill_tokens,
                            enable_chunked_prefill=enable_chunked_prefill, policy=scheduling_policy,
                            prompt_order=prompt_order, prompt_aging_tokens_per_s=prompt_aging_tokens_per_s),
            BlockManager(num_blocks, block_size), self.runner, max_model_len=max_len,
            eos_token_ids=eos, detokenizer_factory=detok)
        if quant_method == "gptq" and tiers is None:
            self._quantize_gptq(quant, quant_group, device)
        kv_bytes = KVCache.bytes_per_token(loaded.config.num_layers, loaded.config.num_kv_heads,
                                           loaded.config.head_dim, _TORCH_DTYPES[dtype])
        log.info("model: %s", loaded.config.summary())
        log.info("%s", self.config.describe())
        log.info("decode steps: %s", self.model.decode_plan().reason)
        log.info("loaded %s in %.2f s; KV cache %.1f MiB max (%d bytes/token)", loaded.path,
                 time.perf_counter() - t0, kv_bytes * self.config.kv_capacity_tokens / 2**20, kv_bytes)

    def _quantize_gptq(self, quant: str, group: int, device: str) -> None:
        """Calibrate the float model on Brown text (tierlm.quant.imatrix), quantize every layer matrix
        with GPTQ (tierlm.quant.gptq) in place, and switch the model to the quantized method."""
        from tierlm.quant.gptq import gptq_quantize_layers_
        from tierlm.quant.imatrix import calibration_sequences

        t0 = time.perf_counter()
        ctx = min(512, self.model_config.max_position)  # as for a GPTQ store: its own cache, not the engine's
        try:
            method = quant_linear(quant, group, self.model.linear, device, self.config.quant_int8_prompts)
            gptq_quantize_layers_(self, method, calibration_sequences(self.tokenizer, ctx=ctx))
        except QuantError as e:
            raise ConfigError(str(e)) from e
        if not self.model.w.tied:  # an untied head is quantized as with quant_method="rtn" (no calibration)
            head = self.model.w.lm_head
            self.model.w.lm_head = method.prepare(plain_weight(head))
            self.model.lm_head_linear = method
        log.info("GPTQ %s g%d: calibrated and quantized in %.1f s", quant, group, time.perf_counter() - t0)

    # -- prompts ------------------------------------------------------------------------------
    def _encode(self, prompt: Prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer; pass prompts as lists of token ids")
            return self.tokenizer.encode(prompt), prompt
        ids = [int(t) for t in prompt]
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return ids, None

    def tune_token_budget(self, slo_tokens_per_s: float | None = None) -> int:
        """Measure what an engine step costs on this machine and set the per-step token budget from it
        (``tierlm.engine.budget``: the largest chunk whose step, on a line fitted to the probed steps,
        stays within 2x a decode-only step, plus the decodes). Steps with no decode in them keep the
        budget the engine was loaded with, unless ``max_num_prefill_tokens`` was given (why:
        ``tierlm.engine.budget``).

        ``slo_tokens_per_s``: the rate every stream is promised (``SchedulerConfig.slo_tokens_per_s``):
        steps then stretch past the budget, up to the prefill budget, while every decode is ahead of
        that schedule. It also measures what attention over a long context costs (a few long steps).

        Returns the step budget; the engine must be idle. Takes a few dozen steps."""
        cfg = self.config
        if cfg.scheduling_policy != "splitfuse":
            raise ConfigError("the step budget is measured for the splitfuse policy only")
        num_decodes = min(PROBE_DECODES, cfg.max_num_seqs - 1)
        # Each probed step must take its whole chunk: within the context, the KV cache (a block per decode
        # and a spare) and the budget it was loaded with.
        room = min(cfg.max_model_len - 1, cfg.kv_capacity_tokens - cfg.block_size * (num_decodes + 1),
                   cfg.max_num_batched_tokens - num_decodes)
        chunks = [t for t in PROBE_CHUNKS if t <= room]
        if num_decodes < 1 or not chunks:
            raise ConfigError(f"choosing the step budget by measurement needs max_num_seqs >= 2 and room for a "
                              f"{PROBE_CHUNKS[0]}-token chunk (max_num_seqs={cfg.max_num_seqs}, "
                              f"max_model_len={cfg.max_model_len}); give the budget explicitly")
        costs = measure_step_ms(self.engine, self.model_config.vocab_size, chunks, num_decodes)
        budget = latency_budget(costs, num_decodes)
        prefill = cfg.max_num_batched_tokens if cfg.max_num_prefill_tokens is None else cfg.max_num_prefill_tokens
        cost = None
        if slo_tokens_per_s is not None:
            # the pair term, from one chunk at the end of as long a context as the engine takes
            context = min(PROBE_CONTEXT, cfg.max_model_len - 1 - PROBE_PAIR_CHUNK,
                          cfg.kv_capacity_tokens - cfg.block_size - PROBE_PAIR_CHUNK, prefill)
            if context < PROBE_PAIR_CHUNK // 2:
                raise ConfigError(f"an SLO needs the cost of attention over a context of at least "
                                  f"{PROBE_PAIR_CHUNK // 2 + PROBE_PAIR_CHUNK + 1} tokens: max_model_len is "
                                  f"{cfg.max_model_len}")
            pair_ms = measure_pair_ms(self.engine, self.model_config.vocab_size, PROBE_PAIR_CHUNK, context)
            cost = step_cost(costs, num_decodes, pair_ms)
        self.engine.set_token_budget(budget, prefill, slo_tokens_per_s, cost)
        self.config = replace(cfg, max_num_batched_tokens=budget, max_num_prefill_tokens=prefill,
                              slo_tokens_per_s=slo_tokens_per_s)
        log.info("step budget: %d tokens, chosen by measurement (step ms with %d decodes, by chunk tokens: %s); "
                 "%d in steps without decodes", budget, num_decodes,
                 ", ".join(f"{t}: {ms:.0f}" for t, ms in costs.items()), prefill)
        if cost is not None:
            log.info("SLO: %.3g tokens/s a stream; steps may grow to %d tokens while every decode is ahead of "
                     "it, planned at %.3g x the measured step cost: %.1f ms + %.3f ms/token + %.2e ms/query-key pair",
                     slo_tokens_per_s, prefill, SLO_COST_MARGIN, cost.fixed_ms, cost.per_token_ms, cost.per_pair_ms)
        return budget

    def add_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None) -> str:
        ids, text = self._encode(prompt)
        return self.engine.add_request(ids, params, request_id=request_id, prompt=text).request_id

    # -- generation ---------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Run every prompt to completion with continuous batching; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt, as text or as token ids
        prompts = list(prompts)
        params = params if params is not None else SamplingParams()
        param_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(param_list) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts but {len(param_list)} SamplingParams")
        encoded = [self._encode(p) for p in prompts]  # validate all before queueing any
        ids = [self.engine.add_request(e[0], sp, prompt=e[1]).request_id for e, sp in zip(encoded, param_list)]
        final: dict[str, RequestOutput] = {}
        try:
            while len(final) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
        finally:
            for rid in ids:
                if rid not in final:
                    self.engine.abort(rid)
        return [final[rid] for rid in ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield a RequestOutput each time the request gets new tokens (``new_text`` is the delta)."""
        rid = self.add_request(prompt, params or SamplingParams())
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort(rid)  # no-op when it finished; frees the blocks if the caller stopped early

    def close(self) -> None:
        """Stop the weight streamer's I/O threads (tiered weights); the LLM is unusable afterwards.
        Called when the LLM is garbage-collected, and for live streamers at interpreter exit."""
        tiers = getattr(self, "tiers", None)
        if tiers is not None:
            tiers.close()
            self.tiers = None

    def __del__(self) -> None:
        self.close()

    def chat_prompt(self, messages: list[dict]) -> str:
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer, so it has no chat template")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        return self.generate([self.chat_token_ids(messages)], params)[0]

    def chat_token_ids(self, messages: list[dict]) -> list[int]:
        rendered = self.chat_prompt(messages)  # raises the user-facing error when there is no tokenizer
        # The rendered template already holds BOS where the model wants it.
        return self.tokenizer.encode(rendered, add_special_tokens=False)

    # -- scoring ------------------------------------------------------------------------------
    def score(self, prompt: Prompt) -> torch.Tensor:
        """Logits (T, vocab) float32 at every position of one prompt (for parity and perplexity).

        Runs through the same paged cache, in chunks of the step budget; the engine must be idle.
        """
        ids, _ = self._encode(prompt)
        if self.engine.has_unfinished():
            raise RequestError("score() needs an idle engine")
        if len(ids) > self.config.max_model_len:
            raise RequestError(f"{len(ids)} tokens exceed max_model_len={self.config.max_model_len}")
        table: list[int] = []
        if self.engine.blocks.allocate(table, len(ids)) is None:
            raise RequestError(f"the KV cache cannot hold {len(ids)} tokens")
        try:
            return self.runner.score(ids, table, self.config.max_num_batched_tokens)
        finally:
            self.engine.blocks.free(table)
