"""``tierlm quantize`` (a checkpoint into a quantized weight store) and ``tierlm imatrix`` (calibrate the
per-matrix input importance that weights rtn's range search)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tierlm.cli import engine_config


def run(args: argparse.Namespace) -> int:
    return imatrix(args) if getattr(args, "action", None) == "imatrix" else quantize(args)


def quantize(args: argparse.Namespace) -> int:
    from tierlm.memory.store import WeightStore
    from tierlm.quant.store import quantize_to_store

    t0 = time.perf_counter()
    folder = quantize_to_store(args.model, args.out, args.format, args.group, tuple(Path(d) for d in args.spec_dirs),
                               importance=args.importance, method=args.method)
    store = WeightStore(folder)
    method = store.meta.get("method", "rtn")
    print(f"wrote {folder}: {len(store.meta['matrices'])} matrices in {args.format} (group {args.group}, {method}), "
          f"{store.data_bytes / 2**20:.1f} MiB, in {time.perf_counter() - t0:.1f} s")
    store.close()
    return 0


def imatrix(args: argparse.Namespace) -> int:
    from tierlm.quant.imatrix import CALIB_CATEGORIES

    if args.windows > len(CALIB_CATEGORIES):
        raise ValueError(f"--windows must be at most {len(CALIB_CATEGORIES)}")
    max_len = args.max_model_len or 512  # one calibration window
    config = engine_config(args, max_model_len=max_len, kv_cache_tokens=args.kv_cache_tokens or max_len,
                           quant="float")
    from tierlm.api import LLM
    from tierlm.quant.imatrix import calibration_sequences, collect_importance, save_importance

    t0 = time.perf_counter()
    llm = LLM.from_config(config)
    seqs = calibration_sequences(llm.tokenizer, args.windows)
    importance = collect_importance(llm, seqs)
    save_importance(args.out, importance, llm.checkpoint.path, sum(map(len, seqs)))
    print(f"wrote {args.out}: {len(importance)} matrices from {sum(map(len, seqs))} calibration tokens "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0
