"""``tierlm chat``: an interactive chat in the terminal, or one answer with --once.

The conversation is kept whole until it would not fit the context with room for an answer; then the
oldest user/assistant turns are dropped (the system message stays), with a note on stderr, as llama.cpp's
and Ollama's chats do. A user message that cannot fit even alone is refused with an error line and the
chat goes on. Ctrl-C stops the answer being written (the request is aborted and its KV blocks freed; what
was written stays as the assistant turn) and returns to the prompt; Ctrl-C at the prompt, /exit or
Ctrl-D quits.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

from tierlm.cli import engine_config, sampling
from tierlm.sampling_params import SamplingParams

BANNER = "tierlm chat: /reset clears the conversation, Ctrl-C stops an answer, /exit or Ctrl-D quits"


class ContextFullError(ValueError):
    """The system message and the newest user message alone leave no room for an answer."""


@dataclass(frozen=True)
class Fitted:
    """A conversation cut to fit the context.

    messages: the system message (if any), then the newest turns, ending with the user's message.
    prompt_ids: ``messages`` rendered by the chat template with the assistant's generation prompt;
        ``len(prompt_ids) + answer_room(...) <= max_model_len``.
    num_dropped: messages (turns) dropped from the front, 0 when the whole conversation fit.
    """

    messages: list[dict]
    prompt_ids: list[int]
    num_dropped: int


def run(args: argparse.Namespace) -> int:
    params = sampling(args)
    llm = load(engine_config(args))
    params = with_template_stops(llm, params)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.once is not None:  # a message that does not fit is a user error here: one line, exit 2
        fitted = fit_context(llm, system + [{"role": "user", "content": args.once}], params.max_tokens)
        answer(llm, fitted.prompt_ids, params)
        return 0
    return repl(llm, system, params, interactive=sys.stdin.isatty())


def load(config):
    from tierlm.api import LLM

    return LLM.from_config(config)


def with_template_stops(llm, params: SamplingParams) -> SamplingParams:
    """``params`` plus the stop strings the chat template needs (the plain transcript's next "User:")."""
    from tierlm.loader.chat_templates import with_template_stops as add_stops

    return add_stops(llm.tokenizer, params)


def answer_room(max_tokens: int, max_model_len: int) -> int:
    """Tokens kept free for the answer when fitting the conversation: ``max_tokens``, but at most half the
    context, so a ``max_tokens`` near or past the context still leaves room for the conversation (the
    answer is then cut where the context ends)."""
    return max(1, min(max_tokens, max_model_len // 2))


def fit_context(llm, messages: list[dict], max_tokens: int) -> Fitted:
    """``messages`` less their oldest turns, as few as needed for the rendering plus ``answer_room`` to fit
    ``llm.config.model.max_model_len``. A leading system message always stays; turns go by whole
    exchanges (a user message and the assistant's answer to it); the last message (the user's) always
    stays. Raises ContextFullError when the system and last user message alone do not fit."""
    max_len = llm.config.model.max_model_len
    room = answer_room(max_tokens, max_len)
    first = 1 if messages and messages[0]["role"] == "system" else 0
    kept = list(messages)
    while True:
        ids = llm.chat_token_ids(kept)
        if len(ids) + room <= max_len:
            return Fitted(kept, ids, len(messages) - len(kept))
        if len(kept) - first <= 1:
            raise ContextFullError(
                f"the message does not fit: it renders to {len(ids)} tokens"
                f"{' with the system message' if first else ''}, and the context of {max_len} tokens must "
                f"also keep {room} for the answer; shorten it or raise --max-model-len")
        del kept[first]  # the oldest user message, then the answers to it
        while len(kept) - first > 1 and kept[first]["role"] == "assistant":
            del kept[first]


def repl(llm, system: list[dict], params: SamplingParams, interactive: bool) -> int:
    """Read user lines from stdin and answer each, keeping the conversation; returns the exit status."""
    history = list(system)
    if interactive:
        print(BANNER, file=sys.stderr)
    while True:
        line = read_line(interactive)
        if line is None or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            history = list(system)
            print("[history cleared]", file=sys.stderr)
            continue
        if not line.strip():
            continue
        try:
            fitted = fit_context(llm, history + [{"role": "user", "content": line}], params.max_tokens)
        except ContextFullError as err:
            print(f"[error: {err}]", file=sys.stderr)
            continue
        if fitted.num_dropped:
            print(f"[context full: dropped the {fitted.num_dropped} oldest turns]", file=sys.stderr)
        history = fitted.messages + [{"role": "assistant", "content": answer(llm, fitted.prompt_ids, params)}]


def read_line(interactive: bool) -> str | None:
    """The next user line; None when the user quits (Ctrl-D, or Ctrl-C at the prompt)."""
    try:
        return input(">>> " if interactive else "")
    except EOFError:
        return None
    except KeyboardInterrupt:
        print(file=sys.stderr)  # end the prompt's line
        return None


def answer(llm, prompt_ids: list[int], params: SamplingParams) -> str:
    """Stream one assistant turn to stdout, then ``[N tokens, X tok/s]``; returns the text written (up to a
    Ctrl-C, if one stopped it). However it ends, the request is gone from the engine on return."""
    t0 = time.perf_counter()
    written: list[str] = []
    num_tokens = 0
    stream = llm.stream(prompt_ids, params)
    try:
        for out in stream:
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
            written.append(out.new_text)
            num_tokens = len(out.token_ids)
    except KeyboardInterrupt:
        print("\n[stopped]", end="", flush=True)
    finally:
        # A Ctrl-C outside the engine leaves the generator suspended: closing it runs LLM.stream's
        # abort now, freeing the request's KV blocks before the next turn, not whenever it is collected.
        stream.close()
    elapsed = time.perf_counter() - t0
    print(f"\n[{num_tokens} tokens, {num_tokens / elapsed:.1f} tok/s]", flush=True)
    return "".join(written)
