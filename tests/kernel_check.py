"""The one check every compiled-kernel test starts with."""

from __future__ import annotations


def built_or_none(kernel, supported: bool, what: str):
    """``kernel`` (a loader's result) when this CPU runs it, where it must then have been built (a missing
    build step fails loudly instead of skipping); None when the CPU cannot, where the loader must say so."""
    if not supported:
        assert kernel is None
        return None
    assert kernel is not None, f"the {what} was not built: run `make setup` (python -m tierlm.model.kernels)"
    return kernel
