"""Kernel-only speed of the quantized GEMV (tierlm/model/kernels/quant_gemv.c) per tierlm format,
batch 1, one 5632 x 2048 matrix, in both layouts the engine uses: row tiles (resident matrices,
tierlm.quant.tiles) and the file's rows (streamed matrices).

* dram: copies of the matrix totalling ~400 MB, each multiplied once per pass, so every weight
  comes from DRAM; held against the RAM read bandwidth measured in the same run.
* cache: one copy multiplied over and over (5.8 MB at q4: it stays in L3), which is the kernel's
  compute rate.

Layouts and formats take turns for ``--rounds`` rounds; each keeps its fastest. Reports GB/s (bytes
of the quantized matrices) and G weights/s. No engine baseline here: the end-to-end comparison with
llama.cpp and bf16 is bench/quant.py.

    .venv/bin/python bench/quant_kernel.py [--rounds 3] [--formats q8 q6 ...] [--name quant_kernel]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import measure_memory_bandwidth, write_results  # noqa: E402
from tierlm.model.kernels import quant_gemv  # noqa: E402
from tierlm.quant import get_quantizer  # noqa: E402
from tierlm.quant.linear import kernel_matmul  # noqa: E402
from tierlm.quant.tiles import RowTiles, tile_rows  # noqa: E402

FORMATS = ("q8", "q6", "q5", "q4", "q3h", "q3", "q2")
N, K = 5632, 2048
DRAM_BYTES = 400e6
DRAM_PASSES = 3  # passes over the ~400 MB of copies per round
CACHE_PASSES = 40


def _seconds_per_pass(kernel, x: torch.Tensor, weights: list, passes: int) -> float:
    t0 = time.perf_counter()
    for _ in range(passes):
        for w in weights:
            kernel_matmul(kernel, x, w)
    return (time.perf_counter() - t0) / passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--name", default="quant_kernel", help="results file name under bench/results/")
    args = parser.parse_args()
    kernel = quant_gemv()
    if kernel is None:
        raise SystemExit("the quantized kernel is not built (or this CPU lacks AVX512-VNNI): run `make setup`")
    torch.manual_seed(0)
    w = torch.randn(N, K)
    x = torch.randn(1, K)
    cases = {}  # (format, layout) -> one copy of the matrix in that layout
    for fmt in args.formats:
        qw = get_quantizer(fmt, 64, search=False).quantize(w)
        cases[fmt, "rows"] = qw
        cases[fmt, "tiles"] = tile_rows(qw)
    best: dict[tuple[str, str, str], float] = {}  # (format, layout, where) -> fastest seconds per matrix
    bandwidth = 0.0
    for _ in range(args.rounds):
        bandwidth = max(bandwidth, measure_memory_bandwidth())
        for (fmt, layout), one in cases.items():
            copies = [one] + [_clone(one) for _ in range(max(1, int(DRAM_BYTES // one.nbytes)) - 1)]
            kernel_matmul(kernel, x, one)  # warm
            for where, weights, passes in (("dram", copies, DRAM_PASSES), ("cache", [one], CACHE_PASSES)):
                s = _seconds_per_pass(kernel, x, weights, passes) / len(weights)
                best[fmt, layout, where] = min(best.get((fmt, layout, where), float("inf")), s)
            del copies
    rows = []
    for (fmt, layout), one in cases.items():
        row = {"format": fmt, "layout": layout, "mb": round(one.nbytes / 1e6, 2)}
        for where in ("dram", "cache"):
            s = best[fmt, layout, where]
            row[f"{where}_gbps"] = round(one.nbytes / s / 1e9, 1)
            row[f"{where}_gweights_s"] = round(N * K / s / 1e9, 1)
        row["share_of_bandwidth"] = round(row["dram_gbps"] / bandwidth, 2)
        rows.append(row)
        print(row, flush=True)
    write_results(args.name, rows, {"matrix": f"{N} x {K}, batch 1, group 64", "bandwidth_gbps": round(bandwidth, 1),
                                  "threads": torch.get_num_threads(),
                                  "rounds": f"{args.rounds}, formats and layouts taking turns; the fastest is kept"})


def _clone(one):
    """A copy of a QuantizedWeight or RowTiles in its own memory."""
    if isinstance(one, RowTiles):
        return replace(one, tiles=one.tiles.clone())
    return replace(one, codes=one.codes.clone(), scales=one.scales.clone(), mins=one.mins.clone())


if __name__ == "__main__":
    main()
