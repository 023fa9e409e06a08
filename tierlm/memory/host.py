"""Host memory the process holds but no longer uses: handing freed heap back to the OS.

glibc keeps freed heap in its arenas for reuse, so RSS stays at a transient peak after the peak's
memory is freed. Loading has two such peaks that later, long-lived allocations would stack on: the
tokenizer build (Gemma-3's 262k-entry vocabulary: about 40 MiB stays in the arenas after the build)
and dequantizing or repacking weights in bands. ``return_free_memory`` after each keeps generate's
peak RSS near the file's size (bench/results/gguf_memory.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None on another C library."""
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def return_free_memory() -> bool:
    """Release the heap's free pages to the OS (glibc ``malloc_trim(0)``); False where that is not
    available or nothing was released. Costs a few milliseconds; call after a transient peak."""
    trim = _malloc_trim()
    return bool(trim is not None and trim(0))
