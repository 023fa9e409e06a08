"""Quick on-the-spot bandwidth measurements, so a plan's predicted speed is about this machine."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from tierlm.memory.store import WeightStore, align_down, aligned_buffer


def memory_read_bandwidth(nbytes: int = 256 << 20, repeats: int = 3) -> float:
    """Bytes/s of a large fp32 reduction (an underestimate of peak; fine for a prediction)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


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
