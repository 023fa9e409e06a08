"""The ``tierlm`` command: generate, chat, serve, info, perplexity, quantize, imatrix.

Every subcommand takes an optional MODEL (an HF folder or a .gguf file; default: the embedded
SmolLM2-135M-Instruct) and the engine flags generated from tierlm.engine_args.EngineArgs. Arguments
are parsed and every setting validated here, before torch is imported or a model byte is read; the
commands themselves live in tierlm.commands and import what they need.

User mistakes (bad values, paths, broken checkpoints, unknown architectures, prompts that do not fit)
end as one line ``tierlm: error: <message>`` on stderr with exit status 2; Ctrl-C ends with 130.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tierlm.config import FORMATS, METHODS, ConfigError
from tierlm.engine_args import add_cli_args, flag_of, from_cli_args
from tierlm.runtime import prepare_openmp
from tierlm.sampling_params import SamplingParams, SamplingParamsError

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130
# What each command overrides of EngineArgs' defaults (its flags' defaults, shown in its --help).
COMMAND_DEFAULTS = {
    "generate": dict(max_num_seqs=None),  # None: one sequence slot per prompt
    "serve": dict(max_num_batched_tokens="auto"),  # splitfuse measures its step budget at start-up
    "chat": dict(max_num_seqs=1),
    "perplexity": dict(max_num_seqs=1),
    "imatrix": dict(max_num_seqs=1),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    logging.getLogger("tierlm").setLevel(logging.INFO if args.verbose else logging.WARNING)
    prepare_openmp()  # before any command imports torch: libgomp reads its wait policy when it loads
    try:
        module = importlib.import_module(f"tierlm.commands.{args.module}")
        return module.run(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `tierlm generate ... | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except (ConfigError, SamplingParamsError) as err:
        print(f"tierlm: error: argument {flag_of(err.field)}: {err.reason}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, OSError) as err:
        # Every error class a user can cause is one of these (CheckpointError, GGUFError, SpecError,
        # TokenizerError, RequestError, ...), and anything reaching here is a bad value or path.
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"tierlm: error: {message}", file=sys.stderr)
        return EXIT_USAGE


def engine_config(args: argparse.Namespace, **overrides):
    """The validated config tree of the parsed engine flags (tierlm.config); raises ConfigError."""
    return from_cli_args(args, **overrides).create_config()


def sampling(args: argparse.Namespace) -> SamplingParams:
    """The sampling flags as SamplingParams; invalid values fail here, before the model loads."""
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos, logprobs=args.logprobs)


# -- arguments ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tierlm", description="Run language models larger than your memory.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, module: str | None = None, engine: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        if engine:  # each command its own actions: set_defaults changes an action's default in place
            p.add_argument("-v", "--verbose", action="store_true", help="log the configuration, progress and timings")
            add_cli_args(p, COMMAND_DEFAULTS.get(name))
        p.set_defaults(module=module or name)
        return p

    gen = command("generate", "complete prompts")
    gen.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                     help="a prompt (repeatable: batched); none: read one prompt from stdin")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template as a user turn")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    _add_sampling_args(gen, max_tokens=128, temperature=1.0)

    chat = command("chat", "interactive chat (/reset clears, /exit quits, Ctrl-C stops an answer)")
    chat.add_argument("--system", metavar="TEXT", help="system message")
    chat.add_argument("--once", metavar="TEXT", help="answer this one user turn and exit")
    _add_sampling_args(chat, max_tokens=512, temperature=0.7)

    srv = command("serve", "OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, ...)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    srv.add_argument("--port", type=_port, default=8000, help="port (default: 8000)")
    srv.add_argument("--max-queue", type=_positive, default=64, metavar="N",
                     help="requests waiting or running before new ones get 429 (default: 64)")
    srv.add_argument("--served-model-name", metavar="NAME", help="name in /v1/models and responses "
                     "(default: the model's file or folder name); requests may name any model")

    info = command("info", "describe a model from its metadata: architecture, sizes, tokenizer")
    info.add_argument("--config", action="store_true", help="print the engine configuration these flags resolve to")

    ppl = command("perplexity", "perplexity of a text (Brown protocol)")
    ppl.add_argument("--text", type=Path, metavar="FILE", help="UTF-8 text file (default: the Brown press excerpt)")
    ppl.add_argument("--ctx", type=_at_least(2), default=512, help="tokens per window, BOS included (default: 512)")
    ppl.add_argument("--windows", type=_at_least(0), default=6, help="number of windows; 0: all that fit (default: 6)")

    qz = command("quantize", "quantize a model's weights into a tierlm weight store", engine=False)
    qz.add_argument("model", metavar="IN", help="HF model folder or .gguf file")
    qz.add_argument("out", metavar="OUT", type=Path, help="folder for the weight store")
    qz.add_argument("--format", choices=FORMATS, default="q4", help="quantization format (default: q4)")
    qz.add_argument("--group", type=int, default=64, help="weights per group (default: 64)")
    qz.add_argument("--importance", type=Path, metavar="FILE", help="importance file from `tierlm imatrix`")
    qz.add_argument("--method", choices=("auto", *METHODS), default="auto",
                    help="gptq: calibrate on Brown text, one layer at a time; rtn: round each group; auto (default): "
                    "gptq where its one-off cost is small (tierlm.quant.methods)")
    qz.add_argument("--spec-dir", dest="spec_dirs", action="append", default=[], metavar="DIR",
                    help="folder of extra family files")
    qz.add_argument("-v", "--verbose", action="store_true", help="log progress")

    im = command("imatrix", "calibrate: per-matrix input importance for --quant-importance", module="quantize")
    im.set_defaults(action="imatrix")
    im.add_argument("out", metavar="OUT", type=Path, help="importance file to write (safetensors)")
    im.add_argument("--windows", type=_at_least(1), default=14, metavar="N",
                    help="calibration windows of 512 tokens, one per Brown category other than the press excerpt "
                    "(at most 14; default: 14)")
    return parser


def _add_sampling_args(p: argparse.ArgumentParser, *, max_tokens: int, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default: {max_tokens})")
    g.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default: {temperature})")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--logprobs", type=int, metavar="N", help="print each token's logprob and the N most likely")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")


def _at_least(low: int):
    def parse(text: str) -> int:
        n = int(text)  # a ValueError here becomes argparse's "invalid value" with the flag named
        if n < low:
            raise ValueError(text)
        return n

    parse.__name__ = f"integer >= {low}"
    return parse


_positive = _at_least(1)


def _port(text: str) -> int:
    n = int(text)
    if not 0 <= n <= 65535:
        raise ValueError(text)
    return n


_port.__name__ = "port (0-65535)"
