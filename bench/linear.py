"""Weight-matrix products the way a decode step does them: which kernel reads weights fastest?

For each model's matrix shapes (all layers, so the weights exceed the L3 cache and come from DRAM)
and each dtype and batch, times one pass over every matrix with:
  F.linear        plain (out, in) weights, what transformers does;
  onednn-packed   weights re-blocked once by oneDNN (torch.ops.mkldnn._reorder_linear_weight);
  tierlm          what tierlm uses on this machine (tierlm.model.linear.default_linear_method):
                  its AVX512-BF16 kernel for bf16 where the CPU has it, else oneDNN packing rules.
Reports ms per pass, achieved GB/s of weight reads, and the share of the memory bandwidth measured
in the same run. This is the evidence behind tierlm.model.linear's choices.

    python bench/linear.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import measure_memory_bandwidth, write_results  # noqa: E402
from tierlm.model.linear import default_linear_method  # noqa: E402

SHAPES = {  # (out, in) of qkv, o, gate+up, down; number of layers
    "llama-1.1b": ([(2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632)], 22),
    "smollm2-135m": ([(960, 576), (576, 576), (3072, 576), (576, 1536)], 30),
}


def _time(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _variants(plain, packed, chosen, method, xs):
    """One pass over every matrix, per kernel; xs maps input width -> (batch, width) activations."""
    return {
        "F.linear": lambda: [F.linear(xs[w.shape[1]], w) for w in plain],
        "onednn-packed": lambda: [torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [None], "")
                                  for w, p in zip(plain, packed)],
        "tierlm": lambda: [method.apply(xs[w.shape[1]], c, None) for w, c in zip(plain, chosen)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bandwidth = measure_memory_bandwidth()
    rows = []
    for model, (shapes, num_layers) in SHAPES.items():
        for dtype in (torch.bfloat16, torch.float32):
            plain = [torch.randn(s, dtype=dtype) for _ in range(num_layers) for s in shapes]
            nbytes = sum(w.numel() * w.element_size() for w in plain)
            packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in plain]
            method = default_linear_method("cpu", dtype)
            chosen = [method.prepare(w) for w in plain]
            for batch in (1, 16):
                xs = {k: torch.randn(batch, k, dtype=dtype) for k in {s[1] for s in shapes}}
                for name, fn in _variants(plain, packed, chosen, method, xs).items():
                    t = _time(fn, args.reps)
                    label = f"tierlm ({method.name})" if name == "tierlm" else name
                    rows.append({"model": model, "dtype": str(dtype).replace("torch.", ""), "batch": batch,
                                 "kernel": label, "ms": round(t * 1e3, 2), "weight_gb_s": round(nbytes / t / 1e9, 2),
                                 "share_of_bandwidth": round(nbytes / t / 1e9 / bandwidth, 3)})
                    print(rows[-1], flush=True)
            del plain, packed, chosen
    write_results("linear", rows, {"bandwidth_gbps": round(bandwidth, 2), "threads": args.threads,
                                   "statistic": f"best of {args.reps} passes after one warm-up",
                                   "models": {k: {"shapes": v[0], "layers": v[1]} for k, v in SHAPES.items()}})


if __name__ == "__main__":
    main()
