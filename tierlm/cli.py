"""The ``tierlm`` command: generate, chat, info, perplexity, serve.

Every subcommand takes an optional MODEL (an HF folder or a .gguf file; default: the embedded
SmolLM2-135M-Instruct). User mistakes (bad paths, broken checkpoints, unknown architectures, invalid
sampling values, prompts that do not fit) end as one line ``tierlm: error: <message>`` on stderr
with exit status 2; Ctrl-C ends with 130. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tierlm.config import ConfigError
from tierlm.engine.engine import RequestError
from tierlm.loader.checkpoint import CheckpointError
from tierlm.loader.gguf import GGUFError
from tierlm.loader.tokenizer import TokenizerError
from tierlm.model.spec import SpecError, UnknownArchitectureError
from tierlm.sampling_params import SamplingParams, SamplingParamsError

# Listed for the reader; all but OSError are ValueErrors, and any ValueError reaching the top is a bad
# value the user gave (a number out of range, a text too short for perplexity).
USER_ERRORS = (CheckpointError, GGUFError, UnknownArchitectureError, SpecError, SamplingParamsError, RequestError,
               ConfigError, TokenizerError, OSError, ValueError)
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130
QUANT_FORMATS = ("q8", "q6", "q5", "q4", "q3h", "q3", "q2")  # tierlm.quant.FORMATS, without importing torch
QUANT_METHODS = ("rtn", "gptq")  # tierlm.quant.METHODS, likewise
# serve --max-num-batched-tokens auto: the budget a server loads with (prefill_first keeps it: a prompt
# must fit one step whole), before splitfuse measures its own.
AUTO_LOAD_BUDGET = 2048


def token_budget(text: str) -> int | str:
    """A --max-num-batched-tokens value: a positive count of tokens, or "auto"."""
    if text == "auto":
        return text
    n = int(text)  # a ValueError here becomes argparse's "invalid token_budget value"
    if n < 1:
        raise ValueError(text)
    return n


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    logging.getLogger("tierlm").setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `tierlm generate ... | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except USER_ERRORS as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"tierlm: error: {message}", file=sys.stderr)
        return EXIT_USAGE


# -- arguments ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model", nargs="?", metavar="MODEL",
                        help="HF model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    common.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    common.add_argument("--spec-dir", action="append", default=[], metavar="DIR",
                        help="folder of extra family files (*.toml); repeatable, searched before the built-ins")
    common.add_argument("--max-model-len", type=int, metavar="N", help="context length (default: the model's)")
    common.add_argument("--device", default="cpu", help="where the model computes: cpu or cuda[:N] (default: cpu)")
    common.add_argument("-v", "--verbose", action="store_true", help="log the engine configuration and timings")
    t = common.add_argument_group("tiered weights (tierlm.memory)")
    t.add_argument("--weight-memory", metavar="SIZE",
                   help="keep at most SIZE of weights resident (e.g. 2GiB, 500MB, 25%%) and stream the rest from a "
                   "weight store on disk (default: all resident)")
    t.add_argument("--prefetch-window", type=int, default=3, metavar="N",
                   help="layers prefetched ahead of the one computing; 0 = synchronous reads (default: 3)")
    t.add_argument("--device-memory", metavar="SIZE",
                   help="keep SIZE of the weights in device memory and copy the rest in per layer, overlapped "
                   "with compute (a part of --weight-memory when both are given)")
    t.add_argument("--store-dir", metavar="DIR", help="weight store folder (default: under $TIERLM_CACHE or "
                   "~/.cache/tierlm)")

    quant = argparse.ArgumentParser(add_help=False)
    g = quant.add_argument_group("quantization (tierlm.quant)")
    g.add_argument("--quant", choices=(*QUANT_FORMATS, "gguf"), metavar="FORMAT",
                   help=f"quantize weights on load: {', '.join(QUANT_FORMATS)}; or gguf: keep a GGUF file's own "
                   "quantized blocks (default: float weights)")
    g.add_argument("--quant-group", type=int, default=64, metavar="N", help="weights per group (default: 64)")
    g.add_argument("--kv-quant", choices=("q8", "q4"), help="store the KV cache 8- or 4-bit (default: compute dtype)")
    g.add_argument("--quant-int8-prompts", action="store_true",
                   help="prompt chunks through the int8 kernel too, as llama.cpp (3-4x faster prefill on CPU; "
                   "activations rounded to int8 per 32 values; default: float activations for prompts)")
    g.add_argument("--quant-importance", type=Path, metavar="FILE",
                   help="weight --quant's range search by an importance file from `tierlm imatrix`")
    g.add_argument("--quant-method", choices=QUANT_METHODS, default="rtn",
                   help="rtn: round each group (default); gptq: calibrate on Brown text and compensate each "
                   "column's error in the next ones (at load, or once into the store with --weight-memory)")

    parser = argparse.ArgumentParser(prog="tierlm", description="Run language models with tierlm.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", parents=[common, quant], help="complete prompts")
    gen.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                     help="a prompt (repeatable: batched); none: read one prompt from stdin")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template as a user turn")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    _add_sampling_args(gen, max_tokens=128, temperature=1.0)
    gen.set_defaults(run=cmd_generate)

    chat = sub.add_parser("chat", parents=[common, quant], help="interactive chat (/reset clears, /exit quits)")
    chat.add_argument("--system", metavar="TEXT", help="system message")
    chat.add_argument("--once", metavar="TEXT", help="answer this one user turn and exit")
    _add_sampling_args(chat, max_tokens=512, temperature=0.7)
    chat.set_defaults(run=cmd_chat)

    info = sub.add_parser("info", parents=[common], help="describe a model: architecture, sizes, tokenizer")
    info.set_defaults(run=cmd_info)

    ppl = sub.add_parser("perplexity", parents=[common, quant], help="perplexity of a text (Brown protocol)")
    ppl.add_argument("--text", type=Path, metavar="FILE", help="UTF-8 text file (default: the Brown press excerpt)")
    ppl.add_argument("--ctx", type=int, default=512, help="tokens per window, BOS included (default: 512)")
    ppl.add_argument("--windows", type=int, default=6, help="number of windows; 0: all that fit (default: 6)")
    ppl.set_defaults(run=cmd_perplexity)

    srv = sub.add_parser("serve", parents=[common, quant], help="OpenAI-compatible HTTP server (/v1/completions, ...)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    srv.add_argument("--max-queue", type=int, default=64, metavar="N",
                     help="requests waiting or running before new ones get 429 (default: 64)")
    srv.add_argument("--max-num-seqs", type=int, default=16, metavar="N", help="batch slots (default: 16)")
    srv.add_argument("--max-num-batched-tokens", type=token_budget, default="auto", metavar="N",
                     help="tokens per engine step, or auto (default): for splitfuse, measured at start-up as the "
                     "largest prompt chunk whose step costs at most 2x a decode-only step; for prefill_first, 2048")
    srv.add_argument("--max-num-prefill-tokens", type=int, default=None, metavar="N",
                     help="splitfuse: tokens in a step that carries no decode (nothing waits on it, so prompts "
                     "need not be chunked small); default: 2048 when --max-num-batched-tokens is auto, else that "
                     "budget")
    srv.add_argument("--slo-tokens-per-s", type=float, default=None, metavar="G",
                     help="splitfuse with --max-num-batched-tokens auto: the rate every stream is promised (its "
                     "token i is due i/G s after its first); steps then take more prompt tokens while every decode "
                     "is ahead of that schedule. Measures attention's cost at start-up too (default: none)")
    srv.add_argument("--scheduling-policy", choices=("splitfuse", "prefill_first"), default="splitfuse",
                     help="splitfuse: prompt chunks and decodes share each step; prefill_first: whole prompts "
                     "first, decodes wait (default: splitfuse)")
    srv.add_argument("--prompt-order", choices=("fcfs", "shortest"), default="fcfs",
                     help="splitfuse: which prompts get the step's tokens left after the decodes: fcfs, in arrival "
                     "order (default), or shortest, fewest prompt tokens left first (meets more time-to-first-token "
                     "deadlines that grow with the prompt; a long prompt waits while shorter ones keep coming)")
    srv.add_argument("--prompt-aging", type=float, default=None, metavar="A",
                     help="with --prompt-order shortest: a waiting prompt counts A fewer tokens left for every second "
                     "since it arrived, so a long one is served within (its tokens)/A s of any newer prompt; A = the "
                     "prefill rate a prompt is promised (tokens/s) makes the order earliest-deadline-first "
                     "(default: no aging)")
    srv.add_argument("--served-model-name", metavar="NAME", help="name in /v1/models and responses "
                     "(default: the model's file or folder name); requests may name any model")
    srv.set_defaults(run=cmd_serve)

    qz = sub.add_parser("quantize", help="quantize a model's weights into a tierlm weight store")
    qz.add_argument("model", metavar="IN", help="HF model folder or .gguf file")
    qz.add_argument("out", metavar="OUT", type=Path, help="folder for the weight store")
    qz.add_argument("--format", choices=QUANT_FORMATS, default="q4", help="quantization format (default: q4)")
    qz.add_argument("--group", type=int, default=64, help="weights per group (default: 64)")
    qz.add_argument("--importance", type=Path, metavar="FILE", help="importance file from `tierlm imatrix`")
    qz.add_argument("--method", choices=QUANT_METHODS, default="rtn",
                    help="rtn: round each group (default); gptq: calibrate on Brown text, one layer at a time")
    qz.add_argument("--spec-dir", action="append", default=[], metavar="DIR", help="folder of extra family files")
    qz.add_argument("-v", "--verbose", action="store_true", help="log progress")
    qz.set_defaults(run=cmd_quantize)

    im = sub.add_parser("imatrix", parents=[common], help="calibrate: per-matrix input importance for --quant-importance")
    im.add_argument("out", metavar="OUT", type=Path, help="importance file to write (safetensors)")
    im.add_argument("--windows", type=int, default=14, metavar="N",
                    help="calibration windows of 512 tokens, one per Brown category other than the press "
                    "excerpt (at most 14; default: 14)")
    im.set_defaults(run=cmd_imatrix)
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


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos, logprobs=args.logprobs)


def _load_llm(args: argparse.Namespace, **kwargs):
    from tierlm.api import LLM  # torch is imported here, after the arguments are known to be valid

    return LLM(args.model, args.dtype, device=args.device, device_memory=args.device_memory,
               max_model_len=args.max_model_len, spec_dirs=args.spec_dir,
               quant=getattr(args, "quant", None), quant_group=getattr(args, "quant_group", 64),
               kv_quant=getattr(args, "kv_quant", None), quant_importance=getattr(args, "quant_importance", None),
               quant_method=getattr(args, "quant_method", "rtn"),
               quant_int8_prompts=getattr(args, "quant_int8_prompts", False),
               weight_memory=args.weight_memory, prefetch_window=args.prefetch_window, store_dir=args.store_dir,
               **kwargs)


# -- generate -----------------------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling(args)  # invalid values fail before the model loads
    texts = args.prompt or [sys.stdin.read()]
    llm = _load_llm(args, max_num_seqs=max(1, len(texts)))
    prompts = [llm.chat_token_ids([{"role": "user", "content": t}]) if args.chat else t for t in texts]
    t0 = time.perf_counter()
    if args.stream:
        outputs = []
        for prompt in prompts:
            for out in llm.stream(prompt, params):
                sys.stdout.write(out.new_text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            outputs.append(out)
            _print_logprobs(llm, out)
    else:
        outputs = llm.generate(prompts, params)
        for i, out in enumerate(outputs):
            if i:
                print()
            print(out.text)
            _print_logprobs(llm, out)
    elapsed = time.perf_counter() - t0
    num_tokens = sum(len(o.token_ids) for o in outputs)
    ttfts = [o.metrics.ttft for o in outputs if o.metrics is not None and o.metrics.ttft is not None]
    ttft = f", TTFT {1000 * sum(ttfts) / len(ttfts):.0f} ms" if ttfts else ""
    reasons = ",".join(sorted({str(o.finish_reason) for o in outputs}))
    print(f"[{num_tokens} tokens in {elapsed:.2f} s, {num_tokens / elapsed:.1f} tok/s{ttft}, finish: {reasons}]",
          file=sys.stderr)
    return 0


def _print_logprobs(llm, out) -> None:
    if not out.logprobs:
        return
    for lp in out.logprobs:
        top = "  ".join(f"{llm.tokenizer.decode([t], skip_special_tokens=False)!r}={v:.3f}" for t, v in lp.top)
        piece = llm.tokenizer.decode([lp.token_id], skip_special_tokens=False)
        print(f"  {lp.token_id:>7} {piece!r:<16} {lp.logprob:9.4f}" + (f"   top: {top}" if top else ""))


# -- chat ---------------------------------------------------------------------------------------------

def cmd_chat(args: argparse.Namespace) -> int:
    params = _sampling(args)
    llm = _load_llm(args, max_num_seqs=1)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.once is not None:
        _answer(llm, system + [{"role": "user", "content": args.once}], params)
        return 0
    interactive = sys.stdin.isatty()
    history = list(system)
    if interactive:
        print("tierlm chat: /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
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
        history.append({"role": "assistant", "content": _answer(llm, history, params)})


def _answer(llm, messages: list[dict], params: SamplingParams) -> str:
    """Stream one assistant turn to stdout, then ``[N tokens, X tok/s]``; returns its text."""
    ids = llm.chat_token_ids(messages)
    t0 = time.perf_counter()
    out = None
    for out in llm.stream(ids, params):
        sys.stdout.write(out.new_text)
        sys.stdout.flush()
    elapsed = time.perf_counter() - t0
    num_tokens = len(out.token_ids) if out is not None else 0
    print(f"\n[{num_tokens} tokens, {num_tokens / elapsed:.1f} tok/s]", flush=True)
    return out.text if out is not None else ""


# -- info ---------------------------------------------------------------------------------------------

def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from tierlm.loader.model_loader import load_model

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    m = load_model(args.model, dtype, tuple(Path(d) for d in args.spec_dir))
    groups = m.weights.nbytes_by_group()
    num_params = m.weights.num_parameters()
    rows = [("model", str(m.path)),
            ("family", f"{m.family.name} ({m.family.source})"),
            ("architecture", m.config.summary()),
            ("context", f"{m.config.max_position} positions"),
            ("parameters", f"{num_params:,} ({num_params / 1e6:.1f} M)"),
            (f"bytes ({args.dtype})", ", ".join(f"{k} {_mib(v)}" for k, v in groups.items())
             + f"; total {_mib(sum(groups.values()))}" + (" (lm_head tied to embedding)" if m.weights.tied else "")),
            ("source", f"{m.source}; tensor types: "
             + ", ".join(f"{k} x{n}" for k, n in sorted(m.tensor_types.items(), key=lambda kv: -kv[1])))]
    tok = m.tokenizer
    if tok is None:
        rows.append(("tokenizer", "none (prompts must be token ids)"))
    else:
        eos = ", ".join(f"{i} {tok.id_to_token(i)!r}" for i in tok.eos_token_ids) or "none"
        bos = "none" if tok.bos_token_id is None else f"{tok.bos_token_id} {tok.id_to_token(tok.bos_token_id)!r}"
        rows.append(("tokenizer", f"vocab {tok.vocab_size}, bos {bos}, eos {eos}, "
                                  f"chat template {'yes' if tok.chat_template else 'no'}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB"


# -- perplexity ---------------------------------------------------------------------------------------

def cmd_perplexity(args: argparse.Namespace) -> int:
    from tierlm.eval import brown
    from tierlm.eval.perplexity import perplexity

    if args.ctx < 2 or args.windows < 0:
        raise ValueError("--ctx must be >= 2 and --windows >= 0")
    text = args.text.read_text(encoding="utf-8") if args.text is not None else brown.excerpt()
    if args.max_model_len is None:
        args.max_model_len = args.ctx  # a KV cache for one window is all scoring needs
    llm = _load_llm(args, max_num_seqs=1, kv_cache_tokens=args.ctx)
    result = perplexity(llm, text, ctx=args.ctx, num_windows=args.windows or None, progress=True)
    print("per-window mean NLL: " + " ".join(f"{n:.4f}" for n in result.window_mean_nll))
    print(result.describe())
    return 0


# -- quantize -----------------------------------------------------------------------------------------

def cmd_quantize(args: argparse.Namespace) -> int:
    from tierlm.memory.store import WeightStore
    from tierlm.quant.store import quantize_to_store

    t0 = time.perf_counter()
    folder = quantize_to_store(args.model, args.out, args.format, args.group, tuple(Path(d) for d in args.spec_dir),
                               importance=args.importance, method=args.method)
    store = WeightStore(folder)
    print(f"wrote {folder}: {len(store.meta['matrices'])} matrices in {args.format} (group {args.group}, "
          f"{args.method}), "
          f"{store.data_bytes / 2**20:.1f} MiB, in {time.perf_counter() - t0:.1f} s")
    store.close()
    return 0


# -- imatrix ------------------------------------------------------------------------------------------

def cmd_imatrix(args: argparse.Namespace) -> int:
    from tierlm.quant.imatrix import CALIB_CATEGORIES, calibration_sequences, collect_importance, save_importance

    if not 1 <= args.windows <= len(CALIB_CATEGORIES):
        raise ValueError(f"--windows must be in [1, {len(CALIB_CATEGORIES)}]")
    t0 = time.perf_counter()
    args.max_model_len = args.max_model_len or 512  # one calibration window
    llm = _load_llm(args, max_num_seqs=1, kv_cache_tokens=args.max_model_len)
    seqs = calibration_sequences(llm.tokenizer, args.windows)
    importance = collect_importance(llm, seqs)
    save_importance(args.out, importance, llm.loaded.path, sum(map(len, seqs)))
    print(f"wrote {args.out}: {len(importance)} matrices from {sum(map(len, seqs))} calibration tokens "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


# -- serve --------------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    if args.max_queue < 1 or not 0 <= args.port <= 65535:
        raise ValueError("--max-queue must be >= 1 and --port in [0, 65535]")
    from tierlm.serve.server import serve  # fastapi and uvicorn load only for this command

    auto = args.max_num_batched_tokens == "auto"
    if args.slo_tokens_per_s is not None and not (auto and args.scheduling_policy == "splitfuse"
                                                  and args.slo_tokens_per_s > 0):
        raise ValueError("--slo-tokens-per-s must be > 0 and needs --scheduling-policy splitfuse with "
                         "--max-num-batched-tokens auto (the step cost is measured)")
    if args.prompt_order != "fcfs" and args.scheduling_policy != "splitfuse":
        raise ValueError("--prompt-order applies to --scheduling-policy splitfuse only (prefill_first never splits "
                         "a prompt and runs the queue in arrival order)")
    if args.prompt_aging is not None and not (args.prompt_order == "shortest" and 0 < args.prompt_aging < float("inf")):
        raise ValueError("--prompt-aging must be a finite number > 0 and needs --prompt-order shortest")
    llm = _load_llm(args, max_num_seqs=args.max_num_seqs,
                    max_num_batched_tokens=AUTO_LOAD_BUDGET if auto else args.max_num_batched_tokens,
                    max_num_prefill_tokens=args.max_num_prefill_tokens,
                    scheduling_policy=args.scheduling_policy, prompt_order=args.prompt_order,
                    prompt_aging_tokens_per_s=args.prompt_aging)
    if auto and args.scheduling_policy == "splitfuse":
        llm.tune_token_budget(args.slo_tokens_per_s)
    serve(llm, args.host, args.port, max_queue=args.max_queue, served_model_name=args.served_model_name,
          access_log=args.verbose)
    return 0
