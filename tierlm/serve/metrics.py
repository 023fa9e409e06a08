"""Prometheus metrics of one server, in its own registry (nothing global, nothing at import).

Written by the engine thread (prometheus_client's metrics are thread-safe), read by ``/metrics``.
Gauges are a snapshot taken after every engine step and every batch of add/abort commands, so an
aborted request's blocks show as free before the engine goes idle. Times are seconds.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tierlm.outputs import RequestOutput

FINISH_REASONS = ("stop", "length", "abort", "error")
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.num_waiting = Gauge("tierlm_num_requests_waiting", "Requests queued, not yet scheduled", registry=r)
        self.num_running = Gauge("tierlm_num_requests_running", "Requests holding a batch slot", registry=r)
        self.kv_blocks_used = Gauge("tierlm_kv_blocks_used", "KV cache blocks allocated to requests", registry=r)
        self.kv_blocks_free = Gauge("tierlm_kv_blocks_free", "KV cache blocks free", registry=r)
        self.ttft = Histogram("tierlm_time_to_first_token_seconds",
                              "From the request reaching the engine queue to its first generated token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("tierlm_inter_token_latency_seconds", "Between consecutive generated tokens",
                             buckets=_ITL_BUCKETS, registry=r)
        # The engine's own time per step, forward pass and bookkeeping: against the inter-token latency the
        # clients see, it separates the model's cost from the server's (event loop, streaming) and the queue's.
        self.step_time = Histogram("tierlm_engine_step_seconds", "Wall time of one engine step (schedule, "
                                   "forward pass, sampling), in the engine thread", buckets=_ITL_BUCKETS, registry=r)
        # Counters get the _total suffix; rate() of them is tokens/s.
        self.prompt_tokens = Counter("tierlm_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("tierlm_generation_tokens", "Generated tokens", registry=r)
        self.requests_finished = Counter("tierlm_requests_finished", "Requests ended, by finish reason",
                                         ["finish_reason"], registry=r)
        for reason in FINISH_REASONS:
            self.requests_finished.labels(reason)  # export every reason at 0 from the start

    # -- written by the engine thread ---------------------------------------------------------
    def set_engine_state(self, *, num_waiting: int, num_running: int, num_used_blocks: int,
                         num_free_blocks: int) -> None:
        self.num_waiting.set(num_waiting)
        self.num_running.set(num_running)
        self.kv_blocks_used.set(num_used_blocks)
        self.kv_blocks_free.set(num_free_blocks)

    def record_step(self, seconds: float) -> None:
        self.step_time.observe(seconds)

    def record_added(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)

    def record_output(self, out: RequestOutput, arrival_time: float) -> None:
        """``arrival_time``: perf_counter() when the request was submitted (same clock as the engine's)."""
        num_new = len(out.new_token_ids)
        self.generation_tokens.inc(num_new)
        m = out.metrics
        if m is not None and num_new:
            times = m.token_times
            first_new = len(times) - num_new
            if first_new == 0 and m.first_token_time is not None:
                self.ttft.observe(max(0.0, m.first_token_time - arrival_time))
            for i in range(max(1, first_new), len(times)):
                self.itl.observe(times[i] - times[i - 1])
        if out.finished and out.finish_reason is not None:
            self.record_finished(out.finish_reason)

    def record_finished(self, reason: str) -> None:
        self.requests_finished.labels(reason).inc()

    # -- read by /metrics ---------------------------------------------------------------------
    def render(self) -> bytes:
        return generate_latest(self.registry)
