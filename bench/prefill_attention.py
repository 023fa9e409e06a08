"""Prompt attention: tierlm's kernel (tierlm/model/kernels/prefill_attention.c) against the path it
replaced (gather the context out of the paged cache, torch's scaled_dot_product_attention), in the
same run, on SmolLM2's and Gemma-3's head shapes: whole prompts and SplitFuse-sized chunks late in
a long context. Then a whole prompt through the engine with the kernel and without it.

Reports ms per layer call, GFLOP/s (4 * heads * head_dim per query-key pair scored: QK^T and PV,
causal pairs only), the ratio of the two paths, and the kernel's rate over torch's float32 matmul
rate measured on the spot (2048^3; all the kernel's arithmetic is float32). That is a reference,
not a ceiling: this CPU's float32 FMA peak is about twice it, and the kernel passes it at
Gemma-3's head size (256), where each loaded key block meets more arithmetic.

    python bench/prefill_attention.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import measure_matmul_flops, median_call_seconds, write_results  # noqa: E402
from tierlm.model.attention import PrefillAttention, SeqSlice, build_attention_batch, paged_attention  # noqa: E402

HEADS = {"smollm2-135m": (9, 3, 64), "gemma3-270m": (4, 1, 256)}  # heads, KV heads, head size
CASES = ((512, 512), (1000, 1000), (23, 700), (64, 1000))  # (new tokens, context after the step)


def _prefill_s(dtype: str, prompt_len: int, kernel: bool, reps: int) -> float:
    """Seconds of a lone prompt's step through the engine (embedded SmolLM2), median of reps after one."""
    from tierlm import LLM
    from tierlm.sampling_params import SamplingParams

    llm = LLM(None, dtype, max_num_seqs=2, max_num_batched_tokens=prompt_len, max_model_len=prompt_len + 16)
    if not kernel:
        llm.engine.runner.model.prefill_attention = None
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    times = []
    for r in range(reps + 1):
        llm.engine.add_request([(31 * i + r) % 40000 + 5 for i in range(prompt_len)], params)
        t0 = time.perf_counter()
        while llm.engine.has_unfinished():
            llm.engine.step()
        if r:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--prompt-len", type=int, default=1000)
    ap.add_argument("--name", default="prefill_attention")
    a = ap.parse_args()
    windows = {"full": None}
    prefill = PrefillAttention.for_model(torch.device("cpu"), None, None, windows)
    if prefill is None:
        raise SystemExit("the prompt attention kernel is not built or this CPU lacks AVX-512F: run `make setup`")
    peak = measure_matmul_flops(torch.float32) / 1e9
    rows = []
    for model, (h, hkv, d) in HEADS.items():
        for dtype in (torch.float32, torch.bfloat16):
            for q_len, ctx in CASES:
                g = torch.Generator().manual_seed(q_len + ctx)
                block = 16
                num_blocks = -(-ctx // block) + 1
                kc = torch.randn(num_blocks * block, hkv, d, generator=g).to(dtype)
                vc = torch.randn(num_blocks * block, hkv, d, generator=g).to(dtype)
                q = torch.randn(q_len, h, d, generator=g).to(dtype)
                k = torch.randn(q_len, hkv, d, generator=g).to(dtype)
                v = torch.randn(q_len, hkv, d, generator=g).to(dtype)
                batch = build_attention_batch([SeqSlice(0, q_len, ctx, list(range(1, num_blocks)))], block, windows)
                flop = 4 * h * d * (q_len * (ctx - q_len) + q_len * (q_len + 1) / 2)

                def attend(use=None, q=q, k=k, v=v, kc=kc, vc=vc, batch=batch, d=d):
                    return paged_attention(q, k, v, kc, vc, batch, "full", d ** -0.5, prefill=use)

                ref_ms = 1e3 * median_call_seconds(attend, a.reps)
                ker_ms = 1e3 * median_call_seconds(lambda: attend(prefill), a.reps)
                row = {"model": model, "dtype": str(dtype).removeprefix("torch."), "new_tokens": q_len,
                       "context": ctx, "sdpa_ms": ref_ms, "kernel_ms": ker_ms, "speedup": ref_ms / ker_ms,
                       "sdpa_gflops": flop / ref_ms / 1e6, "kernel_gflops": flop / ker_ms / 1e6,
                       "kernel_share_of_f32_matmul": flop / ker_ms / 1e6 / peak}
                print(row, flush=True)
                rows.append(row)
    for dtype in ("float32", "bfloat16"):
        with_s = _prefill_s(dtype, a.prompt_len, True, 3)
        without_s = _prefill_s(dtype, a.prompt_len, False, 3)
        row = {"model": "smollm2-135m engine", "dtype": dtype, "new_tokens": a.prompt_len, "context": a.prompt_len,
               "sdpa_ms": 1000 * without_s, "kernel_ms": 1000 * with_s, "speedup": without_s / with_s}
        print(row, flush=True)
        rows.append(row)
    write_results(a.name, rows, {"f32_matmul_gflops": peak, "threads": torch.get_num_threads(),
                                 "engine_rows": "a whole prompt's step through the engine, ms (kernel_ms: with, "
                                                "sdpa_ms: without the kernel)"})


if __name__ == "__main__":
    main()
