"""Kernel-only speed of the quantized GEMV (tierlm/model/kernels/quant_gemv.c) per format, against what
runs without it, at decode batch sizes (``--rows``, default 1 and 8), on one 5632 x 2048 matrix:

* kernel: the build of quant_gemv.c this CPU runs (``--isa`` picks another: "avx512-vnni", "avx2"),
  on the file's rows; with row tiles too (``tiles``) where the build has them (AVX512-VNNI).
* fallback: what QuantLinear runs without the kernel, tierlm.quant.base.tiled_matmul (dequantize a
  band of rows in torch/numpy per call, then F.linear on it).
* F.linear on the float32 matrix: the float baseline (it does not depend on the format, so it is
  measured once per batch size and round, and repeated on every format's row).

Every weight comes from DRAM: each measurement cycles through copies of its matrix totalling at least
``--dram-mb`` (several times the L3), held against the RAM read bandwidth measured in the same
rounds; the fallback, 100x slower than the bandwidth, through ``--fallback-mb`` (still 3x the L3 of
the machines so far). ``kernel_cache`` is the kernel on one copy over and over (a few MB: in L3), its compute rate.
Methods, formats and batch sizes take turns for ``--rounds`` rounds, the bandwidth measured in each;
each number is the median over the rounds. GB/s counts the bytes of the weights each method reads
(the quantized matrix; 4 bytes a weight for F.linear); G weights/s is the same work for all three
(weights of the matrix per second: at M rows of x, M times as many multiply-adds).

``*_core_gweights_s``: the same DRAM measurements on one thread timed by that thread's CPU time, which
the machine's other work does not inflate by preempting it (sharing caches and memory still counts):
what one core does, for machines as shared as this project's.

    .venv/bin/python bench/quant_kernel.py [--rounds 5] [--rows 1 8] [--formats q8 gguf:Q4_0 ...]
        [--isa avx2] [--threads 2] [--name quant_kernel]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import measure_memory_bandwidth, write_results
from tierlm.model.kernels import quant_gemv
from tierlm.quant import QuantizedWeight, get_quantizer, method_for
from tierlm.quant.gguf import GGUFFormat
from tierlm.quant.linear import KERNEL_FORMATS, kernel_matmul
from tierlm.quant.tiles import TILE_FORMATS, RowTiles, tile_rows

FORMATS = ("q8", "q6", "q5", "q4", "q3h", "q3", "q2", "gguf:Q8_0", "gguf:Q6_K", "gguf:Q5_K", "gguf:Q5_1",
           "gguf:Q5_0", "gguf:Q4_K", "gguf:Q4_1", "gguf:Q4_0")
N, K = 5632, 2048
GROUP = 64  # tierlm's formats
CACHE_CALLS = 20


def _gguf_weight(type_name: str, rng: np.random.Generator) -> QuantizedWeight:
    """Random blocks with sane float16 scales: the kernel's and the fallback's work does not depend on
    the values (no data-dependent branches), and the gguf package cannot make K-quants."""
    fmt = GGUFFormat(type_name)
    raw = rng.integers(0, 256, (N, K // fmt.block * fmt.type_size), dtype=np.uint8)
    blocks = raw.reshape(N, -1, fmt.type_size)
    halves = blocks[..., -2:] if type_name == "Q6_K" else blocks[..., :4]  # d (and m / dmin, or data bytes)
    halves.view(np.float16)[...] = rng.uniform(1e-3, 1e-2, halves.view(np.float16).shape).astype(np.float16)
    return fmt.weight(torch.from_numpy(raw), (N, K))


def _clone(one):
    """A copy of a QuantizedWeight, RowTiles or float tensor in its own memory."""
    if isinstance(one, torch.Tensor):
        return one.clone()
    if isinstance(one, RowTiles):
        return replace(one, tiles=one.tiles.clone())
    return replace(one, codes=one.codes.clone(), scales=None if one.scales is None else one.scales.clone(),
                   mins=None if one.mins is None else one.mins.clone())


def _nbytes(one) -> int:
    return one.numel() * one.element_size() if isinstance(one, torch.Tensor) else one.nbytes


def _seconds_per_matrix(run, x: torch.Tensor, weights: list, clock=time.perf_counter) -> float:
    """One pass over ``weights`` (after one untimed call), seconds per matrix."""
    run(x, weights[0])
    t0 = clock()
    for w in weights:
        run(x, w)
    return (clock() - t0) / len(weights)


def _dram(run, x: torch.Tensor, one, dram_bytes: float, clock=time.perf_counter) -> float:
    copies = [one] + [_clone(one) for _ in range(max(1, int(-(-dram_bytes // _nbytes(one)))) - 1)]
    return _seconds_per_matrix(run, x, copies, clock)


def _core(run, x: torch.Tensor, one, dram_bytes: float) -> float:
    """``_dram`` on one thread (torch's, and so the kernel's, which then runs in this thread), in CPU seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _dram(run, x, one, dram_bytes, time.thread_time)
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="rows of x (decode batch sizes)")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--isa", choices=["avx512-vnni", "avx2"], default=None,
                        help="the kernel build (default: the one this CPU runs best)")
    parser.add_argument("--dram-mb", type=float, default=96.0, help="copies of each matrix totalling this much")
    parser.add_argument("--fallback-mb", type=float, default=24.0, help="the same for the fallback")
    parser.add_argument("--threads", type=int, default=None, help="torch's (and so the kernel's) threads")
    parser.add_argument("--name", default="quant_kernel", help="results file name under bench/results/")
    args = parser.parse_args()
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    kernel = quant_gemv(args.isa)
    if kernel is None:
        raise SystemExit("the quantized kernel is not built for this CPU (or it cannot run that build): "
                         "run `make setup`")
    dram_bytes = args.dram_mb * 1e6
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    w = torch.randn(N, K)
    weights = {}  # format -> its (N, K) matrix in the file's layout
    for fmt in args.formats:
        weights[fmt] = _gguf_weight(fmt[5:], rng) if fmt.startswith("gguf:") else \
            get_quantizer(fmt, GROUP, search=False).quantize(w)
        assert weights[fmt].format in KERNEL_FORMATS
    tiles = {fmt: tile_rows(qw) for fmt, qw in weights.items() if kernel.row_tiles and fmt in TILE_FORMATS}
    w_f32 = w.contiguous()

    def run_kernel(x, qw):
        return kernel_matmul(kernel, x, qw)

    def run_fallback(x, qw):
        return method_for(qw.format, qw.group).matmul(x, qw)

    def run_flinear(x, weight):
        return F.linear(x, weight)

    times: dict[tuple, list[float]] = {}  # (method, format or None, rows) -> seconds per matrix, per round
    bandwidths = []
    t_start = time.perf_counter()
    for r in range(args.rounds):
        bandwidths.append(measure_memory_bandwidth())
        for m in args.rows:
            x = torch.randn(m, K, generator=torch.Generator().manual_seed(m))
            times.setdefault(("flinear", None, m), []).append(_dram(run_flinear, x, w_f32, dram_bytes))
            times.setdefault(("flinear_core", None, m), []).append(_core(run_flinear, x, w_f32, dram_bytes))
            for fmt, qw in weights.items():
                times.setdefault(("kernel", fmt, m), []).append(_dram(run_kernel, x, qw, dram_bytes))
                times.setdefault(("kernel_core", fmt, m), []).append(_core(run_kernel, x, qw, dram_bytes))
                if fmt in tiles:
                    times.setdefault(("tiles", fmt, m), []).append(_dram(run_kernel, x, tiles[fmt], dram_bytes))
                in_cache = _seconds_per_matrix(run_kernel, x, [qw] * CACHE_CALLS)
                times.setdefault(("kernel_cache", fmt, m), []).append(in_cache)
                fallback_bytes = args.fallback_mb * 1e6
                times.setdefault(("fallback", fmt, m), []).append(_dram(run_fallback, x, qw, fallback_bytes))
                times.setdefault(("fallback_core", fmt, m), []).append(_core(run_fallback, x, qw, fallback_bytes))
        print(f"round {r + 1}/{args.rounds} done, {time.perf_counter() - t_start:.0f} s, "
              f"bandwidth {bandwidths[-1]:.1f} GB/s", flush=True)
    bandwidth = statistics.median(bandwidths)

    def gweights(key) -> float:
        return N * K / statistics.median(times[key]) / 1e9

    rows = []
    for m in args.rows:
        f32_gw, f32_core_gw = gweights(("flinear", None, m)), gweights(("flinear_core", None, m))
        for fmt, qw in weights.items():
            kernel_gw, fallback_gw = gweights(("kernel", fmt, m)), gweights(("fallback", fmt, m))
            kernel_core_gw, fallback_core_gw = gweights(("kernel_core", fmt, m)), gweights(("fallback_core", fmt, m))
            bytes_per_weight = qw.nbytes / (N * K)
            row = {"format": fmt, "rows": m, "bits_per_weight": round(8 * bytes_per_weight, 2),
                   "kernel_gbps": round(kernel_gw * bytes_per_weight, 2), "kernel_gweights_s": round(kernel_gw, 2),
                   "kernel_share_of_bandwidth": round(kernel_gw * bytes_per_weight / bandwidth, 2),
                   "kernel_cache_gweights_s": round(gweights(("kernel_cache", fmt, m)), 2)}
            if fmt in tiles:
                tiles_gw = gweights(("tiles", fmt, m))
                row |= {"tiles_gbps": round(tiles_gw * bytes_per_weight, 2), "tiles_gweights_s": round(tiles_gw, 2)}
            row |= {"fallback_gbps": round(fallback_gw * bytes_per_weight, 3),
                    "fallback_gweights_s": round(fallback_gw, 3),
                    "flinear_f32_gbps": round(4 * f32_gw, 2), "flinear_f32_gweights_s": round(f32_gw, 2),
                    "kernel_vs_fallback": round(kernel_gw / fallback_gw, 1),
                    "kernel_vs_flinear": round(kernel_gw / f32_gw, 2),
                    "kernel_core_gbps": round(kernel_core_gw * bytes_per_weight, 2),
                    "kernel_core_gweights_s": round(kernel_core_gw, 2),
                    "fallback_core_gweights_s": round(fallback_core_gw, 3),
                    "flinear_f32_core_gbps": round(4 * f32_core_gw, 2),
                    "flinear_f32_core_gweights_s": round(f32_core_gw, 2),
                    "kernel_core_vs_fallback": round(kernel_core_gw / fallback_core_gw, 1),
                    "kernel_core_vs_flinear": round(kernel_core_gw / f32_core_gw, 2)}
            rows.append(row)
            print(row, flush=True)
    columns = list(dict.fromkeys(c for row in rows for c in row))  # tiles columns only where measured
    write_results(args.name, rows, {
        "kernel_build": kernel.isa,
        "matrix": f"{N} x {K} (out x in), tierlm formats in groups of {GROUP}; x float32",
        "bandwidth_gbps": round(bandwidth, 1),
        "bandwidth_gbps_per_round": [round(b, 1) for b in bandwidths],
        "threads": torch.get_num_threads(),
        "dram_bytes_per_measurement": f"copies of the matrix totalling >= {args.dram_mb:g} MB (fallback: "
                                      f"{args.fallback_mb:g} MB), one pass",
        "rounds": f"{args.rounds}, interleaved (per round: each batch size, F.linear then each format's kernel, "
                  "tiles, kernel in cache and fallback, each also on one core); every figure is the median over "
                  "the rounds",
    }, columns=columns)


if __name__ == "__main__":
    main()
