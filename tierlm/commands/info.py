"""``tierlm info``: what a model is, from its header: architecture, sizes by tensor type, tokenizer.

Metadata only: the GGUF header, or config.json and the safetensors headers; the tokenizer's facts
(vocabulary size, bos, eos, chat template) are read from the GGUF metadata or tokenizer.json /
tokenizer_config.json, not built (Gemma-3's 262k-entry vocabulary takes seconds to build); torch is
not imported. ``--config`` also prints the engine configuration the flags resolve to, which opens the
checkpoint as the engine does (tokenizer and torch included).
"""

from __future__ import annotations

import argparse
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierlm.cli import engine_config
from tierlm.loader.paths import model_path
from tierlm.model.spec import ArchConfig, FamilySpec, find_family

# ggml type ids -> names (gguf.GGMLQuantizationType; importing the gguf package takes ~0.5 s)
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
              11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
              18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
              26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16"}
# safetensors dtype -> (torch's name for it, bytes per element)
ST_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
             "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
             "BOOL": ("bool", 1)}
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (tierlm.loader.tokenizer)


class HeaderError(ValueError):
    """A model path or header that cannot be described; the message names the file."""


@dataclass(frozen=True)
class Tensor:
    shape: tuple[int, ...]
    type_name: str  # GGUF quant type (Q4_1, F32, ...) or torch dtype name (bfloat16, ...)
    nbytes: int  # stored bytes


@dataclass(frozen=True)
class TokenizerFacts:
    vocab_size: int  # token ids, added tokens included
    bos: tuple[int, str] | None  # (id, vocabulary piece)
    eos: tuple[tuple[int, str], ...]  # end-of-generation ids: the eos first, then end-of-turn tokens
    chat_template: bool


@dataclass(frozen=True)
class Header:
    """A checkpoint described from its metadata; no tensor data read."""

    path: Path
    family: FamilySpec
    arch: ArchConfig
    source: str  # "gguf" or "hf"
    tensors: dict[str, Tensor]
    tokenizer: TokenizerFacts | None


def run(args: argparse.Namespace) -> int:
    config = engine_config(args)
    spec_dirs = tuple(Path(d) for d in config.model.spec_dirs)
    rows = describe(read_header(config.model.model, spec_dirs))
    if args.config:
        from tierlm.builder import resolve
        from tierlm.loader.model_loader import open_checkpoint

        opened = open_checkpoint(config.model.model, spec_dirs)
        try:
            rows.append(("config", "\n" + resolve(config, opened).describe()))
        finally:
            opened.reader.close()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def describe(header: Header) -> list[tuple[str, str]]:
    arch, tensors = header.arch, header.tensors
    num_params = sum(_numel(t.shape) for t in tensors.values())
    groups = _bytes_by_group(header)
    total = sum(groups.values())
    types: dict[str, int] = {}
    for t in tensors.values():
        types[t.type_name] = types.get(t.type_name, 0) + 1
    rows = [("model", str(header.path)),
            ("family", f"{header.family.name} ({header.family.source})"),
            ("architecture", arch.summary()),
            ("context", f"{arch.max_position} positions"),
            ("parameters", f"{num_params:,} ({num_params / 1e6:.1f} M)"),
            ("bytes (stored)", ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in groups.items() if v)
             + f"; total {total / 2**20:.1f} MiB, {8 * total / max(num_params, 1):.2f} bits per parameter"
             + ("" if "lm_head" in groups else " (lm_head tied to embedding)")),
            ("source", f"{header.source}; tensor types: "
             + ", ".join(f"{k} x{n}" for k, n in sorted(types.items(), key=lambda kv: -kv[1])))]
    tok = header.tokenizer
    if tok is None:
        rows.append(("tokenizer", "none (prompts must be token ids)"))
    else:
        eos = ", ".join(f"{i} {piece!r}" for i, piece in tok.eos) or "none"
        bos = "none" if tok.bos is None else f"{tok.bos[0]} {tok.bos[1]!r}"
        rows.append(("tokenizer", f"vocab {tok.vocab_size}, bos {bos}, eos {eos}, "
                                  f"chat template {'yes' if tok.chat_template else 'no'}"))
    return rows


# -- headers ------------------------------------------------------------------------------------------

def read_header(model: str | None, spec_dirs: tuple[Path, ...] = ()) -> Header:
    """The checkpoint at ``model`` (None: the default model) described from its metadata."""
    path = model_path(model)  # as the engine resolves it (tierlm.loader.paths), torch-free
    return _gguf_header(path, spec_dirs) if path.is_file() else _hf_header(path, spec_dirs)


def _gguf_header(path: Path, spec_dirs: tuple[Path, ...]) -> Header:
    from tierlm.loader.gguf import parse_gguf

    meta, infos = parse_gguf(path)
    arch_name = meta.get("general.architecture")
    if not isinstance(arch_name, str):
        raise HeaderError(f"{path}: GGUF has no general.architecture")
    tensors = {t.name: Tensor(t.shape, GGML_TYPES.get(t.ggml_type) or t.type_name, t.nbytes) for t in infos}
    if "token_embd.weight" in tensors:  # as tierlm.loader.checkpoint.GGUFFile: the vocab when metadata lacks it
        meta.setdefault("tierlm.embedding_rows", tensors["token_embd.weight"].shape[0])
    family = find_family(gguf_arch=arch_name, extra_dirs=spec_dirs)
    return Header(path, family, family.resolve_gguf(meta, arch_name), "gguf", tensors, _gguf_tokenizer(meta))


def _gguf_tokenizer(meta: Mapping[str, Any]) -> TokenizerFacts | None:
    """What tierlm.loader.tokenizer.Tokenizer.from_gguf would hold, without building it."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None or meta.get("tokenizer.ggml.model") is None:
        return None
    from tierlm.loader.tokenizer import _EOG_TOKEN_TEXTS

    types = meta.get("tokenizer.ggml.token_type")
    eos_ids = [int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                      "tokenizer.ggml.eom_token_id") if k in meta]
    eos_ids += [i for i, text in enumerate(tokens) if text in _EOG_TOKEN_TEXTS and types is not None
                and types[i] in (GGUF_CONTROL, GGUF_USER_DEFINED)]
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return TokenizerFacts(len(tokens), None if bos is None else (int(bos), tokens[int(bos)]),
                          tuple((i, tokens[i]) for i in dict.fromkeys(eos_ids)),
                          meta.get("tokenizer.chat_template") is not None)


def _hf_header(folder: Path, spec_dirs: tuple[Path, ...]) -> Header:
    config = _read_json(folder / "config.json", required=True)
    family = find_family(hf_config=config, extra_dirs=spec_dirs)
    arch = family.resolve_hf(config)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise HeaderError(f"no *.safetensors files in {folder}")
    tensors: dict[str, Tensor] = {}
    for file in files:
        tensors.update(_safetensors_header(file))
    has_tokenizer = (folder / "tokenizer.json").is_file()
    return Header(folder, family, arch, "hf", tensors, _hf_tokenizer(folder) if has_tokenizer else None)


def _safetensors_header(path: Path) -> dict[str, Tensor]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        (header_len,) = struct.unpack("<Q", head) if len(head) == 8 else (size,)
        if header_len > size - 8:
            raise HeaderError(f"{path}: truncated safetensors file ({size} bytes, header says {header_len})")
        try:
            header = json.loads(f.read(header_len))
            entries = {name: (ST_DTYPES[m["dtype"]], tuple(int(d) for d in m["shape"]), m["data_offsets"])
                       for name, m in header.items() if name != "__metadata__"}
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise HeaderError(f"{path}: corrupt safetensors header ({err})") from None
    tensors = {}
    for name, ((type_name, itemsize), shape, (start, end)) in entries.items():
        if 8 + header_len + end > size:
            raise HeaderError(f"{path}: truncated: tensor {name!r} ends at byte {8 + header_len + end} "
                              f"but the file has {size} bytes")
        if end - start != _numel(shape) * itemsize:
            raise HeaderError(f"{path}: tensor {name!r} has {end - start} bytes, its shape needs "
                              f"{_numel(shape) * itemsize}")
        tensors[name] = Tensor(shape, type_name, end - start)
    return tensors


def _hf_tokenizer(folder: Path) -> TokenizerFacts:
    """What tierlm.loader.tokenizer.Tokenizer.from_hf_dir would hold, from the JSON files."""
    from tierlm.loader.tokenizer import _EOG_TOKEN_TEXTS

    tok = _read_json(folder / "tokenizer.json", required=True)
    vocab = tok.get("model", {}).get("vocab") or {}
    ids = dict(vocab) if isinstance(vocab, dict) else {piece[0]: i for i, piece in enumerate(vocab)}  # Unigram
    added = tok.get("added_tokens") or []
    ids.update({a["content"]: a["id"] for a in added})
    pieces = {i: text for text, i in ids.items()}
    config = _read_json(folder / "tokenizer_config.json")

    def token_id(entry: Any) -> int | None:
        text = entry.get("content") if isinstance(entry, dict) else entry
        return ids.get(text) if isinstance(text, str) else None

    bos_id, eos_id = token_id(config.get("bos_token")), token_id(config.get("eos_token"))
    eos_ids = [eos_id] if eos_id is not None else []
    gen_eos = _read_json(folder / "generation_config.json").get("eos_token_id")
    eos_ids += gen_eos if isinstance(gen_eos, list) else [gen_eos] if isinstance(gen_eos, int) else []
    eos_ids += [a["id"] for a in added if a.get("special") and a["content"] in _EOG_TOKEN_TEXTS]
    template = (config.get("chat_template") is not None or (folder / "chat_template.jinja").is_file()
                or _read_json(folder / "chat_template.json").get("chat_template") is not None)
    return TokenizerFacts(len(pieces), None if bos_id is None else (bos_id, pieces[bos_id]),
                          tuple((i, pieces.get(i, "")) for i in dict.fromkeys(eos_ids)), template)


def _read_json(path: Path, required: bool = False) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise HeaderError(f"{path.parent} has no {path.name} (expected an HF model folder or a .gguf file)")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HeaderError(f"{path}: invalid JSON: {err}") from None


# -- sizes --------------------------------------------------------------------------------------------

def _bytes_by_group(header: Header) -> dict[str, int]:
    """Stored bytes of the checkpoint's tensors by part of the model, following the family's name table."""
    groups = {"embedding": 0, "attention": 0, "mlp": 0, "norms": 0, "lm_head": 0, "other": 0}
    owner = {}
    for canonical, pattern in header.family.tensor_names(header.source).items():
        part = canonical.split(".")[-2] if canonical.endswith((".bias", ".weight")) else canonical.split(".")[-1]
        if canonical in ("embed", "pos_embed"):
            group = "embedding"
        elif canonical.startswith("lm_head"):
            group = "lm_head"
        elif "norm" in part:
            group = "norms"
        elif part in ("q", "k", "v", "qkv", "o"):
            group = "attention"
        else:
            group = "mlp"
        for i in range(header.arch.num_layers) if "{i}" in pattern else [None]:
            owner[pattern if i is None else pattern.replace("{i}", str(i))] = group
    for name, tensor in header.tensors.items():
        groups[owner.get(name, "other")] += tensor.nbytes
    if not groups["lm_head"]:
        del groups["lm_head"]
    return groups


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
