"""How tierlm uses the cores: compute threads and how OpenMP threads wait, decided once and logged.

torch's intra-op pool and the C kernels (tierlm.model.kernels, which get ``torch.get_num_threads()``)
share one libgomp. At every barrier of a parallel region a libgomp thread that arrives early spins
before it sleeps: about 3 ms (300,000 spins) by default. Alone on the machine that costs nothing;
beside other work it burns the time slice a descheduled partner thread needs to reach the barrier,
and a decode step is hundreds of such regions. bench/contention.py measures batch-1 decode of the default
model alone and beside two busy processes on this project's 2-core AMD EPYC (fair share: 0.5 of
alone). With libgomp's defaults it kept 0.07-0.27 of its alone speed on the GGUF blocks and 0.33-0.37
in float32; spinning 10,000 times 0.16 and 0.62; spinning 1,000 times 0.50 and 0.66, as good as not
spinning at all (OMP_WAIT_POLICY=passive: 0.52-0.55 and 0.65-0.69). ``OPENMP_SETTINGS`` spins 1,000
times (a few microseconds, about what putting a thread to sleep and waking it costs) before sleeping.
The price, alone on the machine: the GGUF decode in-process (generate, chat) ran 15-27% slower than
with the default spin, which bridges the Python overhead between its many small parallel regions;
float32 decode and the server showed no difference beyond the noise (bench/results/contention.md,
contention_spin.md, contention_passive_spin10k.md). A 14x collapse beside other work weighs more than
that; on a machine that runs nothing else, GOMP_SPINCOUNT=300000 (libgomp's default) restores it.

libgomp reads these variables once, when it is loaded, which is when torch is imported:

* ``tierlm`` (the CLI) calls ``prepare_openmp()`` before any command imports torch, so they apply;
* the Python API cannot: ``import tierlm.api`` imports torch. ``apply_runtime`` then reports the
  settings in effect and, when they are libgomp's defaults, logs how to set them (in the environment,
  or ``tierlm.runtime.prepare_openmp()`` before importing torch). A variable the user has set,
  either of the two, is never overridden.

Nothing happens at import; ``apply_runtime`` changes torch's process-wide thread count.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from tierlm.config import RuntimeConfig

log = logging.getLogger("tierlm")

# The variables that decide how libgomp threads wait; a user who set either chose the policy.
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# What tierlm sets when the user set neither (bench/results/contention.md: why these values).
OPENMP_SETTINGS: Mapping[str, str] = {"GOMP_SPINCOUNT": "1000"}


@dataclass(frozen=True)
class RuntimeSettings:
    """What ``apply_runtime`` applied and found."""

    num_threads: int  # torch's intra-op threads, also the C kernels' num_threads
    num_usable_cpus: int  # cores this process may run on (its affinity mask)
    threads_from: str  # "num_threads", "OMP_NUM_THREADS" or "affinity"
    openmp: dict[str, str]  # the wait variables of the environment; {}: libgomp's defaults
    openmp_from: str  # "tierlm" (prepare_openmp set them), "environment" or "defaults"

    def describe(self) -> str:
        """One line for the start-up log."""
        waits = ", ".join(f"{k}={v}" for k, v in self.openmp.items()) or "spin ~3 ms, then sleep"
        return (f"{self.num_threads} compute threads (from {self.threads_from}; {self.num_usable_cpus} usable "
                f"cores); OpenMP waits: {waits} ({self.openmp_from})")


# Which wait settings prepare_openmp put in the environment before libgomp was loaded, so that
# apply_runtime can tell the log what is in effect; process state, like the environment itself.
_prepared: dict[str, str] = {}


def openmp_additions(environ: Mapping[str, str]) -> dict[str, str]:
    """The wait variables tierlm would add to ``environ``: all of ``OPENMP_SETTINGS``, or nothing when
    the user set any of ``WAIT_VARIABLES`` (they interact, so a user's one choice is kept whole)."""
    if any(name in environ for name in WAIT_VARIABLES):
        return {}
    return dict(OPENMP_SETTINGS)


def libgomp_loaded(maps: Path = Path("/proc/self/maps")) -> bool:
    """Whether a libgomp (torch's bundled copy or the system's) is mapped into this process; without
    /proc, whether torch was imported (the usual way it comes in)."""
    try:
        return "libgomp" in maps.read_text()
    except OSError:
        import sys

        return "torch" in sys.modules


def prepare_openmp(environ: MutableMapping[str, str] = os.environ, loaded: bool | None = None) -> dict[str, str]:
    """Put tierlm's wait settings in ``environ`` if libgomp is not loaded yet (``loaded``: None checks
    this process) and the user set none; returns what was added. Call before importing torch."""
    if loaded if loaded is not None else libgomp_loaded():
        return {}
    added = openmp_additions(environ)
    environ.update(added)
    if environ is os.environ:
        _prepared.update(added)
    return added


def resolve_num_threads(runtime: RuntimeConfig, environ: Mapping[str, str], num_usable_cpus: int) -> tuple[int, str]:
    """(threads, where the number came from): ``runtime.num_threads``; else OMP_NUM_THREADS when it
    is a positive integer (the standard way to ask; torch reads it too); else every usable core."""
    if runtime.num_threads is not None:
        return runtime.num_threads, "num_threads"
    text = environ.get("OMP_NUM_THREADS", "").strip()
    if text.isdigit() and int(text) >= 1:
        return int(text), "OMP_NUM_THREADS"
    return num_usable_cpus, "affinity"


def apply_runtime(runtime: RuntimeConfig) -> RuntimeSettings:
    """Set torch's thread count (which the C kernels follow) and log the threading in effect. The
    builder calls this first. Threads beyond the usable cores are allowed (a user's explicit choice)
    and warned about: each would wait for a core at every barrier."""
    num_cpus = len(os.sched_getaffinity(0))
    prepare_openmp()  # a no-op once torch is in (libgomp is loaded then): the usual case here
    num_threads, threads_from = resolve_num_threads(runtime, os.environ, num_cpus)
    import torch

    torch.set_num_threads(num_threads)
    # A variable found in the environment is taken as in effect: users set them before starting Python.
    current = {name: os.environ[name] for name in WAIT_VARIABLES if name in os.environ}
    openmp_from = "defaults" if not current else "tierlm" if current == _prepared else "environment"
    settings = RuntimeSettings(num_threads, num_cpus, threads_from, current, openmp_from)
    log.info("runtime: %s", settings.describe())
    if num_threads > num_cpus:
        log.warning("%d compute threads on %d usable cores: threads will wait for a core at every barrier",
                    num_threads, num_cpus)
    if not current:
        log.info("on cores shared with other work, OpenMP's spinning slows decode 2-7x: set %s in the environment "
                 "before Python starts, or call tierlm.runtime.prepare_openmp() before importing torch (the tierlm "
                 "command does this)", " ".join(f"{k}={v}" for k, v in OPENMP_SETTINGS.items()))
    return settings
