"""RoPE: the compiled in-place rotation (tierlm/model/kernels/rope.c) against torch's apply_rope, the
path bfloat16 models took before the kernel had a bf16 version, in the same run.

Per layer call, on q and k as they sit side by side in the fused qkv output: SmolLM2-135M (9 + 3
heads of 64) and the 1.1B Llama (32 + 4 heads of 64), float32 and bfloat16, at 1 row (batch-1
decode), 8 (a batch of decodes), 38 (a SplitFuse step at SmolLM2's measured budget) and 512 (a
prompt). GB/s counts q and k read and written once plus the cos/sin tables read; the data sits
in cache, so that is a rate, not a share of DRAM bandwidth.

Then through the engine, embedded SmolLM2 in bfloat16, kernel on and off (the model's table of
RoPE kernels emptied), interleaved rounds: batch-1 decode tokens/s and a 1000-token prompt's time to
first token under a 38-token step budget (27 SplitFuse chunks).

    python bench/rope.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import median_call_seconds, write_results  # noqa: E402
from tierlm.model.kernels import rope_bf16_kernel, rope_kernel  # noqa: E402
from tierlm.model.rope import RotaryTable, apply_rope  # noqa: E402

HEADS = {"smollm2-135m": (9, 3, 64), "llama-1.1b": (32, 4, 64)}  # q heads, KV heads, head size
ROWS = (1, 8, 38, 512)


def _engine_rates(kernel: bool, rounds: int) -> tuple[list[float], list[float]]:
    """(decode tok/s per round, 1000-token TTFT s per round) of embedded SmolLM2 in bfloat16."""
    from tierlm import LLM
    from tierlm.sampling_params import SamplingParams

    llm = LLM(None, "bfloat16", max_num_seqs=2, max_num_batched_tokens=38, max_model_len=1100)
    if not kernel:
        llm.engine.runner.model._rope_kernels = {}
    decode, ttft = [], []
    for r in range(rounds + 1):  # round 0 warms up
        e = llm.engine
        e.add_request([(31 * i + r) % 40000 + 5 for i in range(16)], SamplingParams(max_tokens=65, ignore_eos=True))
        e.step()  # the prompt and the first token
        t0 = time.perf_counter()
        while e.has_unfinished():
            e.step()
        tok_s = 64 / (time.perf_counter() - t0)
        e.add_request([(17 * i + r) % 40000 + 5 for i in range(1000)], SamplingParams(max_tokens=1, ignore_eos=True))
        t0 = time.perf_counter()
        while e.has_unfinished():
            e.step()
        if r:
            decode.append(tok_s)
            ttft.append(time.perf_counter() - t0)
    return decode, ttft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--name", default="rope")
    a = ap.parse_args()
    if a.rounds < 1 or a.reps < 1:
        ap.error("--rounds and --reps must be at least 1")
    kernels = {torch.float32: rope_kernel(), torch.bfloat16: rope_bf16_kernel()}
    if None in kernels.values():
        raise SystemExit("the RoPE kernels are not built or this CPU lacks AVX2: run `make setup`")
    rows = []
    for model, (h, hkv, d) in HEADS.items():
        for dtype, kernel in kernels.items():
            for n in ROWS:
                g = torch.Generator().manual_seed(n)
                qkv = torch.randn(n, (h + 2 * hkv) * d, generator=g).to(dtype)
                qk = qkv[:, :(h + hkv) * d].view(n, h + hkv, d)
                cos, sin = RotaryTable(d, 10000.0, None, 4096).lookup(torch.randint(0, 4096, (n,), generator=g), dtype)
                cos_c, sin_c = cos.contiguous(), sin.contiguous()
                def rotate_in_place(kernel=kernel, n=n, d=d, qk=qk, cos_c=cos_c, sin_c=sin_c):
                    kernel(qk.data_ptr(), qk.stride(0), n, qk.shape[1], d, d, cos_c.data_ptr(), sin_c.data_ptr(), 1)

                def rotate_with_torch(qk=qk, cos=cos, sin=sin):
                    return apply_rope(qk, cos, sin, "interleaved")

                torch_us = 1e6 * median_call_seconds(rotate_with_torch, a.reps, warmup=3)
                kernel_us = 1e6 * median_call_seconds(rotate_in_place, a.reps, warmup=3)
                moved = qk.element_size() * (2 * qk.numel() + 2 * cos.numel())
                row = {"case": model, "dtype": str(dtype).removeprefix("torch."), "rows": n,
                       "torch_us": round(torch_us, 1), "kernel_us": round(kernel_us, 1),
                       "speedup": round(torch_us / kernel_us, 2), "kernel_gbps": round(moved / kernel_us / 1e3, 2)}
                print(row, flush=True)
                rows.append(row)
    on_dec, on_ttft, off_dec, off_ttft = [], [], [], []
    for _ in range(a.rounds):  # alternate so that the machine's drift hits both alike
        d, t = _engine_rates(True, 1)
        on_dec += d
        on_ttft += t
        d, t = _engine_rates(False, 1)
        off_dec += d
        off_ttft += t
    for what, on, off, better in (("decode tok/s, batch 1", on_dec, off_dec, max),
                                  ("TTFT s, 1000 tokens, budget 38", on_ttft, off_ttft, min)):
        row = {"case": "smollm2-135m engine: " + what, "dtype": "bfloat16", "rows": None,
               "torch_us": better(off), "kernel_us": better(on),
               "speedup": (better(on) / better(off)) if better is max else (better(off) / better(on)),
               "kernel_gbps": None, "rounds_kernel": on, "rounds_torch": off}
        print(row, flush=True)
        rows.append(row)
    write_results(a.name, rows, {"threads": torch.get_num_threads(), "layout": "interleaved (llama.cpp's)",
                                 "engine_rows": "torch_us / kernel_us hold the engine figure (tok/s or s) "
                                                "without / with the kernel, best of the rounds",
                                 "model": "embedded SmolLM2-135M-Instruct"},
                  columns=["case", "dtype", "rows", "torch_us", "kernel_us", "speedup", "kernel_gbps"])


if __name__ == "__main__":
    main()
