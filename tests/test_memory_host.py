"""tierlm.memory.host: freed heap goes back to the OS when asked (glibc, as on every supported Linux)."""

from __future__ import annotations

from pathlib import Path

from tierlm.memory.host import return_free_memory

MIB = 2**20


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_freed_heap_between_live_blocks_is_returned():
    # 64 MiB of 4 KiB heap blocks (below glibc's mmap threshold), every 16th kept alive: free() alone
    # cannot shrink a heap whose top is still in use, so the freed pages stay resident until a trim.
    blocks = [bytearray(4096) for _ in range(16384)]
    kept = blocks[::16]
    del blocks
    before = _rss_anon()
    assert return_free_memory()
    released = before - _rss_anon()
    assert released > 32 * MIB, f"released {released / MIB:.1f} MiB of 60 MiB freed"
    assert len(kept) == 1024
