"""``tierlm info``: what a model is, from its header: architecture, sizes by tensor type, tokenizer.
Reads no weight. ``--config`` also prints the engine configuration the given flags resolve to."""

from __future__ import annotations

import argparse
from pathlib import Path

from tierlm.cli import engine_config


def run(args: argparse.Namespace) -> int:
    config = engine_config(args)
    from tierlm.loader.model_loader import open_checkpoint

    opened = open_checkpoint(config.model.model, tuple(Path(d) for d in config.model.spec_dirs))
    try:
        rows = describe(opened)
        if args.config:
            from tierlm.builder import resolve

            rows.append(("config", "\n" + resolve(config, opened).describe()))
    finally:
        opened.reader.close()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def describe(opened) -> list[tuple[str, str]]:
    reader, arch = opened.reader, opened.config
    num_params = sum(_numel(reader.shape(n)) for n in reader.names())
    groups = _bytes_by_group(opened)
    rows = [("model", str(opened.path)),
            ("family", f"{opened.family.name} ({opened.family.source})"),
            ("architecture", arch.summary()),
            ("context", f"{arch.max_position} positions"),
            ("parameters", f"{num_params:,} ({num_params / 1e6:.1f} M)"),
            ("bytes (stored)", ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in groups.items() if v)
             + f"; total {sum(groups.values()) / 2**20:.1f} MiB, "
             f"{8 * sum(groups.values()) / max(num_params, 1):.2f} bits per parameter"
             + ("" if "lm_head" in groups else " (lm_head tied to embedding)")),
            ("source", f"{opened.source}; tensor types: "
             + ", ".join(f"{k} x{n}" for k, n in sorted(opened.tensor_types().items(), key=lambda kv: -kv[1])))]
    tok = opened.tokenizer
    if tok is None:
        rows.append(("tokenizer", "none (prompts must be token ids)"))
    else:
        eos = ", ".join(f"{i} {tok.id_to_token(i)!r}" for i in tok.eos_token_ids) or "none"
        bos = "none" if tok.bos_token_id is None else f"{tok.bos_token_id} {tok.id_to_token(tok.bos_token_id)!r}"
        rows.append(("tokenizer", f"vocab {tok.vocab_size}, bos {bos}, eos {eos}, "
                                  f"chat template {'yes' if tok.chat_template else 'no'}"))
    return rows


def _bytes_by_group(opened) -> dict[str, int]:
    """Stored bytes of the checkpoint's tensors by part of the model, following the family's name table."""
    groups = {"embedding": 0, "attention": 0, "mlp": 0, "norms": 0, "lm_head": 0, "other": 0}
    table = opened.family.tensor_names(opened.source)
    names = opened.reader.names()
    owner = {}
    for canonical, pattern in table.items():
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
        for i in range(opened.config.num_layers) if "{i}" in pattern else [None]:
            owner[pattern if i is None else pattern.replace("{i}", str(i))] = group
    for name in names:
        groups[owner.get(name, "other")] += _stored_bytes(opened.reader, name)
    if not groups["lm_head"]:
        del groups["lm_head"]
    return groups


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _stored_bytes(reader, name: str) -> int:
    info = getattr(reader, "info", None)  # GGUF: the tensor's bytes in the file
    if info is not None:
        return info(name).nbytes
    return _numel(reader.shape(name)) * reader.dtype(name).itemsize
