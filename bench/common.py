"""Shared helpers for the benchmarks: physical limits measured on the spot, machine facts, results files.

Every benchmark should hold its numbers against a limit measured in the same run (memory bandwidth,
matmul FLOP/s), because these machines are shared and vary ±10-25% from run to run.
No side effects at import: torch settings are never changed here.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
MODELS_DIR = REPO_ROOT / ".cache" / "models"


# --------------------------------------------------------------------------------------------------
# Physical limits


def measure_memory_bandwidth(num_bytes: int = 1 << 30, passes: int = 5) -> float:
    """Read bandwidth of RAM in GB/s (1e9 bytes/s), all threads: the fastest of three streaming reads of
    a 1 GiB buffer, each the best of ``passes`` passes after an excluded warm-up.

    The three: tierlm's read kernel (tierlm/memory/read_bandwidth.c: 256-bit loads and nothing else,
    OpenMP over every thread), torch's ``sum`` and MKL's matrix-vector product (``mv``, what batch-1
    decode is made of). The read kernel is the ceiling wherever it builds; the other two keep the limit
    at least as high as any torch-based engine can reach. Before 2026-12-04 this was the median of the
    last two alone, which read below what tierlm's own quantized decode kernels stream (shares of
    1.10-1.15); bench/results/README.md lists the figures computed against that lower limit.
    Best rather than median: a limit is what the machine can do, and interference only lowers a pass.
    """
    from tierlm.memory.hardware import read_kernel

    x = torch.ones(num_bytes // 4, dtype=torch.float32)
    cols = 4096
    mat = x[: (x.numel() // cols) * cols].view(-1, cols)
    vec = torch.ones(cols)
    rates = [_read_rate(x.sum, x.numel() * 4, passes),
             _read_rate(lambda: torch.mv(mat, vec), mat.numel() * 4, passes)]
    kernel = read_kernel()
    if kernel is not None:
        threads = torch.get_num_threads()
        rates.append(_read_rate(lambda: kernel(x.data_ptr(), x.numel() * 4, threads), x.numel() * 4, passes))
    return max(rates)


def _read_rate(read, nbytes: int, passes: int) -> float:
    """GB/s of ``read()``, which streams ``nbytes``: the best of ``passes`` after one warm-up."""
    from tierlm.memory.hardware import best_seconds

    return nbytes / best_seconds(read, passes) / 1e9


def measure_matmul_flops(dtype: torch.dtype, n: int = 2048, passes: int = 5) -> float:
    """Dense matmul throughput in FLOP/s for an n x n x n product in `dtype` (median, warm-up excluded).

    Counts 2*n^3 FLOPs per product. This is the compute ceiling used for batched decode limits.
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    torch.mm(a, b)  # warm-up: excluded
    times = []
    for _ in range(passes):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


# --------------------------------------------------------------------------------------------------
# Machine and code identity


def median_call_seconds(fn, reps: int, warmup: int = 2) -> float:
    """Median wall time of one ``fn()`` call in seconds, over ``reps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, RAM and torch build/threads of the machine running this process."""
    cpu_model = ""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu_model:
                cpu_model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    ram_bytes = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_bytes = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpu_model": cpu_model or platform.processor() or "unknown",
        "num_cpus": os.cpu_count(),
        "num_cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_features": sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_bf16", "avx512_vnni",
                                                         "amx_bf16", "amx_tile", "fma"}),
        "ram_bytes": ram_bytes,
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
    }


def git_commit() -> str:
    """HEAD's commit hash, with a "-dirty" suffix when the working tree differs from it.

    Files under bench/results/ are ignored for the dirty check (benchmarks write them).
    Returns "no-commit" before the first commit and "unknown" outside a git checkout.
    """
    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        inside = git("rev-parse", "--is-inside-work-tree")
        commit = "no-commit" if inside.returncode == 0 else "unknown"
    else:
        commit = head.stdout.strip()
    status = git("status", "--porcelain", "--", ".", ":!bench/results")
    if status.returncode == 0 and status.stdout.strip():
        commit += "-dirty"
    return commit


# --------------------------------------------------------------------------------------------------
# Peak memory


class PeakRSS:
    """Peak resident set size (high-water mark) in bytes.

    `PeakRSS.self_bytes()` is this process's peak so far (VmHWM; it never goes down).
    `PeakRSS.current_bytes()` is this process's RSS now (VmRSS).
    `PeakRSS.run_child(cmd)` runs a command and returns its exit code and that one child's peak RSS.
    """

    @staticmethod
    def _status_kb(field: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except OSError:
            pass
        return None

    @staticmethod
    def self_bytes() -> int:
        kb = PeakRSS._status_kb("VmHWM")
        if kb is None:  # no procfs: ru_maxrss is KiB on Linux
            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb * 1024

    @staticmethod
    def current_bytes() -> int:
        kb = PeakRSS._status_kb("VmRSS")
        return (kb or 0) * 1024

    @staticmethod
    def run_child(cmd: Sequence[str], env: dict[str, str] | None = None,
                  poll_s: float = 0.05) -> ChildResult:
        """Run `cmd` (stdout/stderr inherited), wait for it; return exit code, its peak RSS, wall time.

        The peak is the child's VmHWM read from /proc/<pid>/status every `poll_s` seconds (it only
        grows, so the last read is the peak up to `poll_s` before exit). wait4()'s ru_maxrss is no
        good here: Linux folds the parent's high-water mark at fork/exec time into the child's.
        A child that must be exact should also report its own `PeakRSS.self_bytes()`.
        """
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), env=env)
        status_path = Path(f"/proc/{proc.pid}/status")
        peak_kb = 0
        while proc.poll() is None:
            try:
                for line in status_path.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak_kb = max(peak_kb, int(line.split()[1]))
            except (OSError, ValueError):
                pass
            time.sleep(poll_s)
        return ChildResult(returncode=proc.returncode, peak_rss_bytes=peak_kb * 1024,
                           wall_s=time.perf_counter() - t0)


@dataclass(frozen=True)
class ChildResult:
    returncode: int
    peak_rss_bytes: int  # the child's own VmHWM, polled (see PeakRSS.run_child)
    wall_s: float


# --------------------------------------------------------------------------------------------------
# Results


def run_child(script: str | Path, engine: str, *args: str) -> dict[str, Any]:
    """Run ``script --child engine *args`` in a fresh process (one engine's measurement, so engines
    never share a process's memory or threads) and return the JSON of its last stdout line."""
    out = subprocess.run([sys.executable, str(script), "--child", engine, *args], capture_output=True, text=True,
                         cwd=REPO_ROOT, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{engine} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_results(name: str, rows: list[dict[str, Any]], meta: dict[str, Any],
                  columns: Sequence[str] | None = None) -> tuple[Path, Path]:
    """Write bench/results/<name>.json (rows + meta) and bench/results/<name>.md (table + meta).

    `meta` should hold what the benchmark measured its limits with (e.g. "bandwidth_gbps") and the
    model(s); machine, commit, command line and date are added here unless already present.
    `columns` selects and orders the markdown table's columns (default: keys of the first row);
    the JSON always keeps every field.
    """
    meta = {
        "machine": machine_info(),
        "commit": git_commit(),
        "command": [sys.executable, *sys.argv],
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **meta,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS_DIR / f"{name}.json"
    md_path = RESULTS_DIR / f"{name}.md"
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")

    cols = list(columns) if columns is not None else (list(rows[0]) if rows else [])
    lines = [f"# {name}", ""]
    if rows:
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for row in rows:
            lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
        lines.append("")
    lines.append("## Meta")
    lines.append("")
    for key, value in meta.items():
        if isinstance(value, dict):
            lines.append(f"- **{key}**:")
            lines.extend(f"  - {k}: {_fmt(v)}" for k, v in value.items())
        elif key == "command":
            lines.append(f"- **{key}**: `{' '.join(map(str, value))}`")
        else:
            lines.append(f"- **{key}**: {_fmt(value)}")
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e6:
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return f"{value:.3e}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)
