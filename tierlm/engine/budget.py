"""The SplitFuse step budget, chosen by measuring what a step costs on this machine. No torch.

A forward pass costs a fixed part (reading the weights, per-layer overhead) plus a part in
proportion to its tokens. Every running decode shares the step with the prompt chunk, so the chunk
sets how long each of them waits for its next token. The budget chosen here is the largest chunk
whose step costs at most ``LATENCY_FACTOR`` times a decode-only step, plus the decodes that shared
it: prompts advance as fast as they can while decodes keep within that factor of their lone pace.
It applies to steps that carry decodes.

The chunk comes from a line fitted to all the probed steps (cost = fixed + per_token * t, Theil-Sen:
the median of the pairwise slopes, then the median intercept), not from the probed points one by
one: each point is two timed steps on a machine whose speed drifts, and one slow step moved the
choice. On the 1.1B fp32 the 32-token step once measured 610 ms against 436-454 ms in other
probes, which took the pointwise rule from 32 to 16; the fit gives 36 on both probes (SmolLM2:
43-45, against 16 or 32 pointwise).

A step with none holds up no decode, so it has its own budget (``SchedulerConfig.
max_num_prefill_tokens``, tierlm.engine.scheduler): under `tierlm serve`'s auto, the budget the
engine was loaded with (2048), so a prompt that arrives while nothing decodes runs whole. The
probe's throughput knee (``throughput_budget``: the smallest chunk whose cost per token is within
``KNEE_TOLERANCE`` of the cheapest probed; what bench/step_cost.py reports) was tried there and
lost: the probe's chunks start at position 0, while a long prompt's later chunks also re-read their
cache and each step pays the fixed cost again. A lone 1,000-token SmolLM2 prompt took 2.09 s in
132-token chunks against 1.38 s whole, and the P95 time to first token at one client was 2.69 s
against 1.98 s (bench/results/serve_smollm2_auto.md, serve_smollm2_b36_p2048.md; 1.1B: 3.90
against 3.24 s).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tierlm.sampling_params import SamplingParams

PROBE_CHUNKS = (16, 32, 64, 128, 256)  # prompt-chunk sizes probed, in tokens
PROBE_DECODES = 4  # running decodes sharing each probed step
PROBE_REPEATS = 2  # steps timed per chunk size, after one warm-up; the median is kept
LATENCY_FACTOR = 2.0
KNEE_TOLERANCE = 0.15  # a chunk within 15% of the cheapest cost per token is at the knee
PROBE_PAIR_CHUNK = 64  # the chunk timed at the end of a long context (measure_pair_ms)
PROBE_CONTEXT = 1024  # how long a context, at most


@dataclass(frozen=True)
class StepCost:
    """What one engine step costs on this machine, in milliseconds (``step_cost`` builds it from the
    probed steps of ``measure_step_ms`` and the pair term of ``measure_pair_ms``):

        fixed_ms + per_token_ms * (tokens in the step) + per_pair_ms * (query-key pairs scored)

    where a chunk of n tokens starting at position s scores n * s + n * (n + 1) / 2 pairs (its
    attention over the cache and, causally, over itself). The pair term is why a long prompt's later
    chunks cost more than its first: the probe of chunks at position 0 alone does not see it.
    Invariant: every coefficient is finite and >= 0."""

    fixed_ms: float
    per_token_ms: float
    per_pair_ms: float

    def __post_init__(self) -> None:
        for name in ("fixed_ms", "per_token_ms", "per_pair_ms"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"StepCost.{name} must be finite and >= 0, got {v!r}")

    def chunk_ms(self, start: int, num_tokens: int) -> float:
        """The variable cost of ``num_tokens`` tokens at positions start.. (excluding fixed_ms)."""
        pairs = num_tokens * start + num_tokens * (num_tokens + 1) / 2
        return self.per_token_ms * num_tokens + self.per_pair_ms * pairs

    def max_chunk(self, start: int, time_ms: float) -> int:
        """The largest n >= 0 with chunk_ms(start, n) <= time_ms (``MAX_CHUNK`` when the cost does not
        grow with tokens)."""
        if time_ms <= 0:
            return 0
        a = self.per_pair_ms / 2  # chunk_ms = a n^2 + b n
        b = self.per_token_ms + self.per_pair_ms * (start + 0.5)
        if a == 0 and b == 0:
            return MAX_CHUNK
        n = int(time_ms / b) if a == 0 else int((-b + math.sqrt(b * b + 4 * a * time_ms)) / (2 * a))
        n = min(max(n, 0), MAX_CHUNK)
        while n > 0 and self.chunk_ms(start, n) > time_ms:  # float rounding of the root
            n -= 1
        while n < MAX_CHUNK and self.chunk_ms(start, n + 1) <= time_ms:
            n += 1
        return n


MAX_CHUNK = 1 << 30  # "no limit" for StepCost.max_chunk


def latency_budget(step_ms: Mapping[int, float], num_decodes: int, factor: float = LATENCY_FACTOR) -> int:
    """``step_ms[t]``: milliseconds of one step carrying ``num_decodes`` decodes and a t-token chunk
    (t = 0: decodes only, required). Returns the largest whole t whose fitted cost (module docstring)
    is at most ``factor`` times the fitted decode-only cost, kept within the probed chunk sizes, plus
    ``num_decodes``: a per-step token budget."""
    if 0 not in step_ms or len(step_ms) < 2:
        raise ValueError("step costs need the decode-only step (0) and at least one chunk size")
    fixed, per_token = fit_step_cost(step_ms)
    chunks = sorted(t for t in step_ms if t > 0)
    if per_token <= 0:  # steps do not get dearer with tokens (noise): the largest chunk probed
        return chunks[-1] + num_decodes
    t = int((factor - 1) * fixed / per_token)
    return min(max(t, chunks[0]), chunks[-1]) + num_decodes


def fit_step_cost(step_ms: Mapping[int, float]) -> tuple[float, float]:
    """Theil-Sen line through (t, step_ms[t]): (fixed ms, ms per token). Needs two sizes or more."""
    ts = sorted(step_ms)
    slopes = [(step_ms[b] - step_ms[a]) / (b - a) for i, a in enumerate(ts) for b in ts[i + 1:]]
    per_token = statistics.median(slopes)
    return statistics.median(step_ms[t] - per_token * t for t in ts), per_token


def throughput_budget(step_ms: Mapping[int, float], num_decodes: int, tolerance: float = KNEE_TOLERANCE) -> int:
    """``step_ms`` as for ``latency_budget``. Returns the smallest t > 0 whose cost per token,
    step_ms[t] / (t + num_decodes), is within ``tolerance`` of the lowest probed, plus ``num_decodes``."""
    per_token = {t: ms / (t + num_decodes) for t, ms in step_ms.items() if t > 0}
    if not per_token:
        raise ValueError("step costs need at least one chunk size")
    best = min(per_token.values())
    return min(t for t, c in per_token.items() if c <= best * (1 + tolerance)) + num_decodes


def measure_step_ms(engine, vocab_size: int, chunks: Sequence[int] = PROBE_CHUNKS,
                    num_decodes: int = PROBE_DECODES, repeats: int = PROBE_REPEATS) -> dict[int, float]:
    """Median milliseconds of an engine step carrying ``num_decodes`` decodes plus a t-token prompt
    chunk, for t = 0 and each of ``chunks``. The engine must be idle, admit num_decodes + 1
    sequences and take t + num_decodes tokens in one step; it is idle again afterwards."""
    if engine.has_unfinished():
        raise RuntimeError("measure step costs on an idle engine")
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    span = max(vocab_size - 10, 1)
    out: dict[int, float] = {}
    for t in (0, *chunks):
        times = []
        for r in range(repeats + 1):
            for k in range(num_decodes):
                engine.add_request([(97 * i + 13 * r + k) % span + 5 for i in range(8)], params)
            engine.step()  # the decodes' prompts, not timed: the next step decodes them
            if t:
                engine.add_request([(31 * i + r) % span + 5 for i in range(t)], SamplingParams(
                    max_tokens=1, temperature=0, ignore_eos=True))
            t0 = time.perf_counter()
            engine.step()
            if r:  # the first repeat warms up
                times.append(1000 * (time.perf_counter() - t0))
            while engine.has_unfinished():
                engine.step()
        out[t] = statistics.median(times)
    return out


def measure_pair_ms(engine, vocab_size: int, chunk: int, context: int, repeats: int = PROBE_REPEATS) -> float:
    """Milliseconds per query-key pair (``StepCost.per_pair_ms``): the median step of a lone
    ``chunk``-token prompt chunk at position ``context`` against the same chunk at position 0,
    divided by the chunk * context pairs the later one adds. The engine must be idle and take
    context + chunk tokens in one sequence; its token budgets are restored afterwards."""
    if engine.has_unfinished():
        raise RuntimeError("measure step costs on an idle engine")
    if chunk < 1 or context < 1:
        raise ValueError(f"chunk and context must be >= 1, got {chunk} and {context}")
    cfg = engine.scheduler.config
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    span = max(vocab_size - 10, 1)
    times: dict[int, list[float]] = {0: [], context: []}
    try:
        for r in range(repeats + 1):
            for start in (0, context):
                # budget `start` for the first step (the context, untimed), then the chunk alone
                engine.set_token_budget(max(start, chunk), max(start, chunk))  # and no SLO
                engine.add_request([(53 * i + 7 * r + start) % span + 5 for i in range(start + chunk)], params)
                if start:
                    engine.step()
                t0 = time.perf_counter()
                engine.step()
                if r:  # the first repeat warms up
                    times[start].append(1000 * (time.perf_counter() - t0))
                while engine.has_unfinished():
                    engine.step()
    finally:
        engine.set_token_budget(cfg.max_num_batched_tokens, cfg.max_num_prefill_tokens, cfg.slo_tokens_per_s,
                                cfg.step_cost)
    extra = statistics.median(times[context]) - statistics.median(times[0])
    return max(extra, 0.0) / (chunk * context)


def step_cost(step_ms: Mapping[int, float], num_decodes: int, per_pair_ms: float) -> StepCost:
    """The StepCost of the line fitted to ``step_ms`` (as for ``latency_budget``: steps of
    ``num_decodes`` decodes plus a t-token chunk), with the decodes taken out of the fixed part."""
    fixed, per_token = fit_step_cost(step_ms)
    per_token = max(per_token, 0.0)
    return StepCost(max(fixed - num_decodes * per_token, 0.0), per_token, per_pair_ms)
