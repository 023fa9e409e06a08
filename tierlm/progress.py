"""Progress bars for one-off work that takes minutes: building a weight store, calibrating, GPTQ.

One rule for all of them, so no caller decides it again: a bar goes to stderr only when stderr is a
terminal (tqdm's ``disable=None``), so logs written to a file or a pipe (a server's structured logs,
a test's captured output) never carry one, and it appears only once the work has run ``DELAY_S``
seconds (tqdm's ``delay``), so quick work prints nothing. It is erased when done (``leave=False``):
the log line that follows says what was built and how long it took. While a bar is shown, log records
of the console handlers are written above it (tqdm's ``logging_redirect_tqdm``) instead of through it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

DELAY_S = 3.0  # seconds of work before a bar appears


@contextmanager
def progress_bar(total: int, desc: str, unit: str, enabled: bool = True) -> Iterator[tqdm]:
    """A bar of ``total`` ``unit``s (call ``update``); a no-op bar where the rule above hides it, or
    when not ``enabled``."""
    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None if enabled else True, delay=DELAY_S,
               leave=False, dynamic_ncols=True)
    # Only loggers that write to the console: tqdm would give the others a console handler of their own.
    loggers = [lg for lg in (logging.root, logging.getLogger("tierlm")) if any(_on_console(h) for h in lg.handlers)]
    try:
        with nullcontext() if bar.disable else logging_redirect_tqdm(loggers=loggers):
            yield bar
    finally:
        bar.close()


def _on_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr)
