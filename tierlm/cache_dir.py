"""Where tierlm keeps what it derives once and reuses: ``$TIERLM_CACHE``, default ``~/.cache/tierlm``.

Under it: ``stores/`` (weight stores, tierlm.quant.store) and ``tokenizers/`` (tokenizers rebuilt
from GGUF metadata, tierlm.loader.tokenizer). Everything there can be deleted; the next run that
needs it rebuilds it. Torch-free.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("TIERLM_CACHE") or Path.home() / ".cache" / "tierlm")
