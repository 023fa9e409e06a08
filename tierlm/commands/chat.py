"""``tierlm chat``: an interactive chat in the terminal, or one answer with --once.

The conversation is kept whole until it would not fit the context with room for an answer; then the
oldest turns are dropped (the system message stays), with a note. Ctrl-C stops the answer being
written and returns to the prompt; a second Ctrl-C at the prompt, /exit or Ctrl-D quits.
"""

from __future__ import annotations

import argparse
import sys
import time

from tierlm.cli import engine_config, sampling
from tierlm.sampling_params import SamplingParams


def run(args: argparse.Namespace) -> int:
    params = sampling(args)
    llm = load(engine_config(args))
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.once is not None:
        answer(llm, system + [{"role": "user", "content": args.once}], params)
        return 0
    return repl(llm, system, params, interactive=sys.stdin.isatty())


def load(config):
    from tierlm.api import LLM

    return LLM.from_config(config)


def repl(llm, system: list[dict], params: SamplingParams, interactive: bool) -> int:
    history = list(system)
    if interactive:
        print("tierlm chat: /reset clears the conversation, Ctrl-C stops an answer, /exit or Ctrl-D quits",
              file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            return 0
        except KeyboardInterrupt:  # at the prompt: quit
            print(file=sys.stderr)
            return 0
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            history = list(system)
            print("[history cleared]", file=sys.stderr)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        history.append({"role": "assistant", "content": answer(llm, history, params)})


def answer(llm, messages: list[dict], params: SamplingParams) -> str:
    """Stream one assistant turn to stdout, then ``[N tokens, X tok/s]``; returns its text (what was
    written before a Ctrl-C, if one stopped it)."""
    ids = llm.chat_token_ids(messages)
    t0 = time.perf_counter()
    out = None
    try:
        for out in llm.stream(ids, params):
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        print("\n[stopped]", end="", flush=True)
    elapsed = time.perf_counter() - t0
    num_tokens = len(out.token_ids) if out is not None else 0
    print(f"\n[{num_tokens} tokens, {num_tokens / elapsed:.1f} tok/s]", flush=True)
    return out.text if out is not None else ""
