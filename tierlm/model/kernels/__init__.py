"""Compiled CPU kernels, loaded with ctypes (no torch headers, so they build in about a second).

``make`` builds them (``python -m tierlm.model.kernels``); a machine whose CPU or compiler cannot
build them runs the portable torch paths instead (see tierlm.model.linear.default_linear_method).
Nothing is compiled or loaded at import.
"""

from __future__ import annotations

import ctypes
import functools
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("bf16_gemm.c")
LIBRARY = Path(__file__).with_name("libtierlm_bf16.so")
_FLAGS = ["-O3", "-march=x86-64-v4", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC"]


def cpu_has_avx512_bf16() -> bool:
    try:
        return " avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def build(force: bool = False) -> Path | None:
    """Compile the bf16 GEMM if this CPU runs it; returns the library path, or None."""
    if not cpu_has_avx512_bf16():
        return None
    if LIBRARY.exists() and not force and LIBRARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return LIBRARY
    subprocess.run(["gcc", *_FLAGS, str(SOURCE), "-o", str(LIBRARY)], check=True)
    return LIBRARY


@functools.cache
def bf16_gemm():
    """``f(x_ptr, w_ptr, y_ptr, M, N, K, num_threads)`` from bf16_gemm.c, or None when unavailable.

    The library links libgomp.so.1 by soname; torch has already loaded its own copy under that
    soname, so both share one OpenMP thread pool instead of fighting over the cores.
    """
    if not cpu_has_avx512_bf16() or not LIBRARY.exists() or LIBRARY.stat().st_mtime < SOURCE.stat().st_mtime:
        return None
    import torch  # noqa: F401  (load torch's libgomp first; see above)

    fn = ctypes.CDLL(str(LIBRARY)).tierlm_bf16_gemm
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int] * 4
    fn.restype = None
    return fn
