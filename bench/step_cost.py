"""How a forward pass's cost grows with the tokens it carries: the measurement behind the
Dynamic SplitFuse token budget (issue 5).

For T in a range of token counts, one engine step runs a T-token prompt chunk fused with D
running decodes (D = --decodes), and the step time is the median of --repeats. The budget worth
using is where the cost per token stops falling: the smallest T whose time per token is within
--tolerance of the best seen. Below it, passes are dominated by reading the weights (the same
bytes for 1 or 100 tokens); above it, they are compute-bound and a bigger chunk only makes the
decodes that share the pass wait longer.

That knee maximizes throughput. On a CPU a pass costs a fixed part (weights read, per-layer
overhead) plus a part in proportion to its tokens, and the fixed part is small against a GPU's,
so at the knee a fused step is several times a decode-only step and every decode sharing it waits
that long. The second budget reported, ``latency_budget``, is the largest T whose step costs at
most --latency-factor times the decode-only step (T = 0, always measured), on a line fitted to all
the steps (tierlm.engine.budget.fit_step_cost): the chunk that keeps decodes within that factor of
their lone pace, which is what a per-token latency SLA asks, and what `tierlm serve` picks at
start-up (tierlm.engine.budget).

    python bench/step_cost.py                       # SmolLM2 (fp32)
    python bench/step_cost.py --model .cache/models/llama-1.1b --dtype bfloat16
"""

from __future__ import annotations

import argparse

try:
    from common import write_results
except ImportError:  # pragma: no cover
    from bench.common import write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", default="16,32,64,128,192,256,384,512,1024")
    ap.add_argument("--decodes", type=int, default=4, help="running decodes fused into each measured pass")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tolerance", type=float, default=0.15)
    ap.add_argument("--latency-factor", type=float, default=2.0,
                    help="latency_budget: the largest chunk whose step is at most this x the decode-only step")
    ap.add_argument("--name", default="step_cost")
    a = ap.parse_args()

    import torch

    from tierlm import LLM
    from tierlm.engine.budget import latency_budget, measure_step_ms, throughput_budget

    torch.manual_seed(0)
    sizes = sorted({int(t) for t in a.tokens.split(",")} - {0})
    llm = LLM(a.model, a.dtype, max_num_seqs=a.decodes + 1, max_num_batched_tokens=max(sizes) + a.decodes,
              max_model_len=max(sizes) + 64, kv_cache_tokens=(a.decodes + 1) * (max(sizes) + 64))
    model = a.model or "smollm2-135m (GGUF)"
    # the same probe as `tierlm serve --max-num-batched-tokens auto`, over more sizes and repeats
    costs = measure_step_ms(llm.engine, llm.arch.vocab_size, sizes, a.decodes, a.repeats)
    rows = [{"model": model, "dtype": a.dtype, "chunk_tokens": t, "decodes": a.decodes, "step_ms": ms,
             "ms_per_token": ms / (t + a.decodes)} for t, ms in costs.items()]
    for r in rows:
        print(r, flush=True)
    best = min(r["ms_per_token"] for r in rows if r["chunk_tokens"])
    knee = throughput_budget(costs, a.decodes, a.tolerance) - a.decodes  # as `tierlm serve` picks it
    decode_ms = costs[0]
    chunk_budget = latency_budget(costs, 0, a.latency_factor)  # in chunk tokens: no decodes added
    for r in rows:
        r["step_over_decode_only"] = r["step_ms"] / decode_ms
        r["knee"] = r["chunk_tokens"] == knee
        r["latency_budget"] = r["chunk_tokens"] == chunk_budget
    print(f"cost per token stops falling at ~{knee} tokens (within {a.tolerance:.0%} of the best, {best:.2f} ms); "
          f"largest chunk within {a.latency_factor}x the decode-only step ({decode_ms:.0f} ms): {chunk_budget}")
    write_results(a.name, rows, {"model": model, "dtype": a.dtype, "decodes": a.decodes, "tolerance": a.tolerance,
                                 "knee_tokens": knee, "latency_factor": a.latency_factor,
                                 "latency_budget_tokens": chunk_budget, "decode_only_step_ms": decode_ms,
                                 "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
