"""``tierlm perplexity``: perplexity of a text over fixed windows (the Brown protocol, tierlm.eval)."""

from __future__ import annotations

import argparse

from tierlm.cli import engine_config


def run(args: argparse.Namespace) -> int:
    text = args.text.read_text(encoding="utf-8") if args.text is not None else None
    # A KV cache for one window is all scoring needs.
    max_len = args.max_model_len or args.ctx
    config = engine_config(args, max_model_len=max_len, kv_cache_tokens=args.kv_cache_tokens or max_len)
    from tierlm.api import LLM
    from tierlm.eval import brown
    from tierlm.eval.perplexity import perplexity

    llm = LLM.from_config(config)
    result = perplexity(llm, brown.excerpt() if text is None else text, ctx=args.ctx,
                        num_windows=args.windows or None, progress=True)
    print("per-window mean NLL: " + " ".join(f"{n:.4f}" for n in result.window_mean_nll))
    print(result.describe())
    return 0
