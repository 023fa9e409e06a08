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
    stored = sum(_stored_bytes(reader, n) for n in reader.names())
    rows = [("model", str(opened.path)),
            ("family", f"{opened.family.name} ({opened.family.source})"),
            ("architecture", arch.summary()),
            ("context", f"{arch.max_position} positions"),
            ("parameters", f"{num_params:,} ({num_params / 1e6:.1f} M)"),
            ("stored", f"{stored / 2**20:.1f} MiB ({8 * stored / max(num_params, 1):.2f} bits per parameter)"),
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
