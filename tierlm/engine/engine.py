"""The step loop: ``schedule -> run -> postprocess``. No torch: the model runner is a protocol.

    out = scheduler.schedule()          # which tokens of which requests this step
    sampled = runner.execute(out)       # model forward + sampling (torch lives there)
    outputs = self._postprocess(out, sampled)   # append tokens, detokenize, stop checks
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from tierlm.engine.block_manager import BlockManager
from tierlm.engine.budget import StepCost
from tierlm.engine.request import FinishReason, Request
from tierlm.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from tierlm.outputs import RequestOutput, TokenLogprob
from tierlm.sampling_params import SamplingParams


class RequestError(ValueError):
    """A request that cannot be served as given (empty prompt, longer than the context, ...)."""


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: TokenLogprob | None = None


class ModelRunner(Protocol):
    def execute(self, out: SchedulerOutput) -> dict[str, SampledToken]:
        """Run the scheduled chunks; return a token for every request whose chunk ``samples``."""
        ...

    def release(self, request_id: str) -> None:
        """Forget per-request state (RNG) of a finished request."""
        ...


class Detokenizer(Protocol):
    def add(self, token_id: int) -> str: ...


class EngineCore:
    """Owns the requests; one ``step()`` advances every scheduled request by one forward pass."""

    def __init__(self, scheduler_config: SchedulerConfig, block_manager: BlockManager, runner: ModelRunner,
                 max_model_len: int, eos_token_ids: Sequence[int] = (), detokenizer_factory=None):
        capacity = (block_manager.num_blocks - 1) * block_manager.block_size
        if capacity < max_model_len:
            raise ValueError(f"the KV cache holds {capacity} tokens, fewer than max_model_len={max_model_len}; "
                             f"give it more blocks or lower max_model_len")
        self.scheduler = Scheduler(scheduler_config, block_manager)
        self.blocks = block_manager
        self.runner = runner
        self.max_model_len = max_model_len
        self.eos_token_ids = tuple(eos_token_ids)
        self.detokenizer_factory = detokenizer_factory  # (prompt_ids) -> Detokenizer, or None: no text
        self.requests: dict[str, Request] = {}
        self._detok: dict[str, Detokenizer] = {}
        self._emitted: dict[str, tuple[int, int]] = {}  # request id -> (chars, tokens) already reported
        self._ids = itertools.count()

    # -- requests -----------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams, request_id: str | None = None,
                    prompt: str | None = None) -> Request:
        ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise RequestError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; the context holds {self.max_model_len} "
                               f"(prompt plus at least one generated token)")
        cfg = self.scheduler.config
        if not self.scheduler.splits_prompts and len(ids) > cfg.max_num_batched_tokens:
            raise RequestError(f"the prompt has {len(ids)} tokens, more than the step budget "
                               f"{cfg.max_num_batched_tokens}, and this scheduler does not split prompts")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise RequestError(f"request id {rid!r} is already in use")
        req = Request(request_id=rid, prompt_token_ids=ids, params=params, prompt=prompt,
                      eos_token_ids=() if params.ignore_eos else self.eos_token_ids)
        self.requests[rid] = req
        if self.detokenizer_factory is not None:
            self._detok[rid] = self.detokenizer_factory(ids)
        self._emitted[rid] = (0, 0)
        self.scheduler.add(req)
        return req

    def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is not None and not req.is_finished:
            self._finish(req, FinishReason.ABORT)
        self.requests.pop(request_id, None)
        self._emitted.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def set_token_budget(self, num_tokens: int, num_prefill_tokens: int | None = None,
                         slo_tokens_per_s: float | None = None, step_cost: StepCost | None = None) -> None:
        """Change the per-step token budgets and the SLO (``SchedulerConfig.max_num_batched_tokens``,
        ``max_num_prefill_tokens``, ``slo_tokens_per_s``, ``step_cost``, validated the same way); only
        while idle, so no scheduled request sees the budget change under it."""
        if self.has_unfinished():
            raise RuntimeError("the step budget changes only while the engine is idle")
        self.scheduler.config = replace(self.scheduler.config, max_num_batched_tokens=num_tokens,
                                        max_num_prefill_tokens=num_prefill_tokens,
                                        slo_tokens_per_s=slo_tokens_per_s, step_cost=step_cost)

    # -- the loop -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        sampled = self.runner.execute(out)
        self.scheduler.commit(out)
        return self._postprocess(out, sampled)

    def _postprocess(self, out: SchedulerOutput, sampled: dict[str, SampledToken]) -> list[RequestOutput]:
        now = time.perf_counter()
        outputs = []
        for chunk in out.chunks:
            req = chunk.request
            tok = sampled.get(req.request_id)
            if tok is None:
                continue  # a prompt chunk that did not reach the end: nothing to report yet
            req.output_token_ids.append(tok.token_id)
            if tok.logprob is not None:
                req.logprobs.append(tok.logprob)
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            req.metrics.token_times.append(now)
            self._check_stop(req, tok.token_id)
            outputs.append(self._make_output(req))
        return outputs

    def _check_stop(self, req: Request, token_id: int) -> None:
        p = req.params
        if token_id in req.eos_token_ids or token_id in p.stop_token_ids:
            self._finish(req, FinishReason.STOP)
            return
        detok = self._detok.get(req.request_id)
        if detok is not None:
            before = len(req.output_text)
            req.output_text += detok.add(token_id)
            if p.stop:
                # Only text that the new delta could complete needs searching.
                longest = max(len(s) for s in p.stop)
                window_start = max(0, before - longest + 1)
                hits = [(req.output_text.find(s, window_start), s) for s in p.stop]
                hits = [(i, s) for i, s in hits if i >= 0]
                if hits:
                    idx, stop = min(hits)
                    req.output_text = req.output_text[:idx + (len(stop) if p.include_stop_str_in_output else 0)]
                    self._finish(req, FinishReason.STOP)
                    return
        if req.num_output_tokens >= p.max_tokens or req.num_tokens >= self.max_model_len:
            self._finish(req, FinishReason.LENGTH)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        self.scheduler.finish(req, reason)
        self._forget(req)

    def _forget(self, req: Request) -> None:
        self.runner.release(req.request_id)
        self._detok.pop(req.request_id, None)

    def _make_output(self, req: Request) -> RequestOutput:
        sent_chars, sent_tokens = self._emitted[req.request_id]
        text = req.output_text
        visible = len(text)
        if not req.is_finished and req.params.stop:
            # Hold back a tail that could still grow into a stop string.
            visible = max(sent_chars, len(text) - (max(len(s) for s in req.params.stop) - 1))
        self._emitted[req.request_id] = (visible, req.num_output_tokens)
        if req.is_finished:
            del self._emitted[req.request_id]
            self.requests.pop(req.request_id, None)
        return RequestOutput(
            request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
            text=text[:visible], token_ids=list(req.output_token_ids), finished=req.is_finished,
            finish_reason=None if req.finish_reason is None else req.finish_reason.value,
            new_text=text[sent_chars:visible], new_token_ids=req.output_token_ids[sent_tokens:],
            logprobs=list(req.logprobs) if req.params.logprobs is not None else None, metrics=req.metrics)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

