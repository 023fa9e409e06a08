"""The public Python API: ``LLM`` and its ``generate`` / ``stream`` / ``chat`` / ``score``.

``LLM(model, **settings)`` takes every engine setting as a keyword (tierlm.engine_args.EngineArgs lists
them, with the CLI flag of each); tierlm.builder builds the engine from the validated config tree.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from tierlm.builder import Built, build, measure_budget
from tierlm.config import TierlmConfig
from tierlm.engine.engine import EngineCore, RequestError
from tierlm.engine_args import EngineArgs
from tierlm.loader.model_loader import OpenedCheckpoint
from tierlm.loader.tokenizer import Tokenizer
from tierlm.memory.tiered import TieredWeights
from tierlm.model.spec import ArchConfig
from tierlm.model.transformer import Transformer
from tierlm.outputs import RequestOutput
from tierlm.runner import TorchModelRunner
from tierlm.sampling_params import SamplingParams

Prompt = str | Sequence[int]


class LLM:
    """Load a model (an HF folder or a GGUF file; None: the embedded SmolLM2) and generate.

    Every keyword is an engine setting (``EngineArgs``; ``tierlm generate --help`` describes each, as a
    flag). The common ones: ``dtype``, ``max_model_len``, ``max_num_seqs``, ``quant`` (a GGUF file
    runs as stored by default; "q4" etc. quantize at load), ``weight_memory`` (keep at most that much of
    the weights in RAM, e.g. "2GiB" or "25%", and stream the rest from disk). Invalid settings raise
    ``ConfigError`` naming the setting before any weight is read.
    """

    def __init__(self, model: str | None = None, dtype: str = "auto", **settings):
        config = EngineArgs.from_kwargs(model=None if model is None else str(model), dtype=dtype,
                                        **settings).create_config()
        self._built: Built = build(config)

    @classmethod
    def from_config(cls, config: TierlmConfig) -> LLM:
        """An LLM built from a config tree (``EngineArgs(...).create_config()``)."""
        llm = cls.__new__(cls)
        llm._built = build(config)
        return llm

    # -- the parts, for callers that go below generate() -------------------------------------------
    @property
    def config(self) -> TierlmConfig:
        """The resolved config tree (no "auto" left); replaced when the step budget is measured."""
        return self._built.config

    @property
    def checkpoint(self) -> OpenedCheckpoint:
        return self._built.checkpoint

    @property
    def arch(self) -> ArchConfig:
        return self._built.arch

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self._built.tokenizer

    @property
    def model(self) -> Transformer:
        return self._built.model

    @property
    def runner(self) -> TorchModelRunner:
        return self._built.runner

    @property
    def engine(self) -> EngineCore:
        return self._built.core

    @property
    def tiers(self) -> TieredWeights | None:
        return self._built.tiers

    # -- prompts ------------------------------------------------------------------------------
    def _encode(self, prompt: Prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer; pass prompts as lists of token ids")
            return self.tokenizer.encode(prompt), prompt
        ids = [int(t) for t in prompt]
        vocab = self.arch.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return ids, None

    def tune_token_budget(self, slo_tokens_per_s: float | None = None) -> int:
        """Measure what an engine step costs here and set the per-step token budget from it
        (tierlm.builder.measure_budget; ``max_num_batched_tokens="auto"`` does this at load). With
        ``slo_tokens_per_s`` steps may grow past it while every stream is ahead of that rate. The
        engine must be idle; returns the budget."""
        measure_budget(self._built, slo_tokens_per_s)
        return self.config.scheduler.max_num_batched_tokens

    def add_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None) -> str:
        ids, text = self._encode(prompt)
        return self.engine.add_request(ids, params, request_id=request_id, prompt=text).request_id

    # -- generation ---------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
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
        built = getattr(self, "_built", None)
        if built is not None and built.tiers is not None:
            built.tiers.close()
            built.tiers = None

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
        if len(ids) > self.config.model.max_model_len:
            raise RequestError(f"{len(ids)} tokens exceed max_model_len={self.config.model.max_model_len}")
        table: list[int] = []
        if self.engine.blocks.allocate(table, len(ids)) is None:
            raise RequestError(f"the KV cache cannot hold {len(ids)} tokens")
        try:
            return self.runner.score(ids, table, self.config.scheduler.max_num_batched_tokens)
        finally:
            self.engine.blocks.free(table)
