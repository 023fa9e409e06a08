"""Path -> (family, config, weights, tokenizer). Knows HF folders and GGUF files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tierlm.loader.checkpoint import CheckpointReader, GGUFFile, SafetensorsReader, read_hf_config
from tierlm.loader.paths import default_model_path, model_path  # noqa: F401 (default_model_path: its callers import it from here)
from tierlm.loader.tokenizer import Tokenizer
from tierlm.loader.weights import ModelWeights, load_weights
from tierlm.memory.host import return_free_memory
from tierlm.model.spec import ArchConfig, FamilySpec, find_family


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
    path = model_path(path)
    if path.is_file():
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
