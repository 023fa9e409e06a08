"""Quick on-the-spot bandwidth measurements, so a plan's predicted speed is about this machine."""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import threading
import time
from pathlib import Path

import torch

from tierlm.memory.store import WeightStore, align_down, aligned_buffer

READ_SOURCE = Path(__file__).with_name("read_bandwidth.c")
READ_LIBRARY = Path(__file__).with_name("libtierlm_read.so")
_READ_FLAGS = ["-O3", "-mavx2", "-fopenmp", "-shared", "-fPIC"]


def memory_read_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes/s reading RAM with every compute thread: the best of ``repeats`` passes over an
    ``nbytes`` buffer (far beyond the caches), after a warm-up pass.

    Read by tierlm's read kernel (read_bandwidth.c: 256-bit loads, nothing else) where it builds; the
    earlier measure, torch's float32 ``sum``, read 10-15% below what the quantized decode kernels
    themselves stream on an AMD EPYC (bench/results/README.md), which made plans pessimistic and shares
    of the limit exceed 1. Without AVX2 or gcc: the faster of torch's ``sum`` and ``mv``.
    """
    x = torch.ones(nbytes // 4, dtype=torch.float32)  # written once: its pages are resident
    kernel = read_kernel()
    if kernel is not None:
        num_threads = torch.get_num_threads()
        return nbytes / best_seconds(lambda: kernel(x.data_ptr(), x.numel() * 4, num_threads), repeats)
    mat = x[: x.numel() // 4096 * 4096].view(-1, 4096)
    vec = torch.ones(4096)
    return max(nbytes / best_seconds(x.sum, repeats), mat.numel() * 4 / best_seconds(lambda: mat @ vec, repeats))


def best_seconds(fn, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn()``, after one excluded warm-up call."""
    fn()  # warm-up: excluded
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
def read_kernel():
    """``f(buf_ptr, nbytes, num_threads) -> int`` from read_bandwidth.c, compiled on first use (about
    a second; the library sits beside the source, rebuilt when older), or None when this CPU lacks
    AVX2 or the library cannot be built."""
    from tierlm.model.kernels import cpu_has_avx2

    if not cpu_has_avx2():
        return None
    if not READ_LIBRARY.exists() or READ_LIBRARY.stat().st_mtime < READ_SOURCE.stat().st_mtime:
        # built under a temporary name and renamed: processes starting together never load a half-written file
        tmp = READ_LIBRARY.with_name(f"{READ_LIBRARY.name}.{os.getpid()}.tmp")
        try:
            subprocess.run(["gcc", *_READ_FLAGS, str(READ_SOURCE), "-o", str(tmp)], check=True, capture_output=True)
            os.replace(tmp, READ_LIBRARY)
        except (OSError, subprocess.CalledProcessError):
            tmp.unlink(missing_ok=True)
            return None
    # torch is loaded (imported above), so the library's libgomp.so.1 is torch's: one OpenMP pool
    fn = ctypes.CDLL(str(READ_LIBRARY)).tierlm_read_bytes
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int], ctypes.c_uint64
    return fn


def disk_read_bandwidth(store: WeightStore, nbytes: int = 256 << 20, num_threads: int = 4,
                        chunk: int = 4 << 20) -> float:
    """Bytes/s reading the store's data file the way the streamer does (direct I/O, parallel
    4 MiB chunks), from its middle so that a just-loaded head or tail is not what is measured."""
    nbytes = min(nbytes, align_down(store.data_bytes, chunk))
    if nbytes < chunk:
        return float("nan")
    start = align_down((store.data_bytes - nbytes) // 2, chunk)
    bufs = [aligned_buffer(chunk) for _ in range(num_threads)]
    offsets = list(range(start, start + nbytes, chunk))

    def work(k: int) -> None:
        for off in offsets[k::num_threads]:
            store.read_range(bufs[k], off)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(k,)) for k in range(num_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return nbytes / (time.perf_counter() - t0)


def available_memory_bytes() -> int | None:
    """What this process may still allocate: MemAvailable, lowered by a cgroup (v1 or v2) limit."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        return None
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit_text = Path(limit_file).read_text().strip()
            if limit_text != "max" and int(limit_text) < 1 << 60:
                room = int(limit_text) - int(Path(usage_file).read_text().strip())
                avail = room if avail is None else min(avail, room)
        except (OSError, ValueError):
            continue
    return avail
