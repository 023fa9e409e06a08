"""Batch-1 decode speed of quantized weights: tierlm against llama.cpp on the same GGUF files.

Model: the random Llama 1.1B (bench/make_models.py -> .cache/models/llama-1.1b). Its F16 GGUF
(bench/gguf_export.py) is quantized to Q8_0 and Q4_0 with llama-cpp-python's quantizer; then, each in
its own process, one after another in the same run:

* llama.cpp on the F16, Q8_0 and Q4_0 files (2 threads, mmap, the weights in the page cache);
* tierlm on the Q8_0 and Q4_0 files with ``quant="gguf"`` (the file's blocks, the VNNI kernel);
* tierlm bf16 and tierlm q8 / q6 / q5 / q4 / q3h / q3 / q2 quantized on load from the HF folder;
* named with ``--engines`` only: "<tierlm engine> layered", the same with ``fused_decode=False``
  (every decode step layer by layer in Python, what the fused step of tierlm.model.fused_decode
  replaces; bf16 always runs that way), reported as ``fused_vs_layered`` on the fused engine's row.

Each engine: a 16-token prompt, then ``--tokens`` greedy decode steps; the median step time after
2 warm-up steps. Every engine runs ``--rounds`` times, the engines taking turns (round 1 runs them
all, then round 2, ...), and each keeps its fastest round: this machine's speed drifts by tens of
percent over minutes (other tenants), and taking turns gives every engine the same chances at its
quiet stretches. Even rounds run the engines in reverse order, so that a drift across a round does
not always favour the same end of the list; ``round_speedup_vs_bf16`` (``round_vs_llama_cpp``) is
the median over rounds of each round's own ratio to bf16 (to llama.cpp on the same file), which a
fast or slow spell during one engine's best round does not move the way it moves the ratio of
fastest rounds (``speedup_vs_bf16``, ``vs_llama_cpp``). Achieved GB/s = bytes of weight matrices
read per step / step time, held against RAM read bandwidth measured in the same run (before every
round; the fastest).

    .venv/bin/python bench/quant.py [--tokens 24] [--rounds 3] [--engines ...] [--name quant]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import MODELS_DIR, REPO_ROOT, measure_memory_bandwidth, run_child, write_results

GGUF_DIR = REPO_ROOT / ".cache" / "gguf"
HF_MODEL = MODELS_DIR / "llama-1.1b"
ENGINES = ("llama.cpp F16", "llama.cpp Q8_0", "llama.cpp Q4_0", "tierlm gguf Q8_0", "tierlm gguf Q4_0",
           "tierlm bf16", "tierlm q8", "tierlm q6", "tierlm q5", "tierlm q4", "tierlm q3h", "tierlm q3", "tierlm q2")
# The same engines with fused_decode=False (every decode step layer by layer in Python): the fused
# decode step's baseline (tierlm.model.fused_decode); not run unless named.
LAYERED = tuple(f"{e} layered" for e in ENGINES if e.startswith("tierlm") and e != "tierlm bf16")
PROMPT = list(range(100, 116))


def gguf_file(kind: str) -> Path:
    """The 1.1B Llama as a GGUF of ``kind`` (F16, or any of llama.cpp's quantizer recipes: Q8_0, Q4_K_M,
    IQ4_XS, ...), made once."""
    f16 = GGUF_DIR / "llama-1.1b-f16.gguf"
    if not f16.exists():
        from bench.gguf_export import export

        GGUF_DIR.mkdir(parents=True, exist_ok=True)
        export(HF_MODEL, f16, "f16")
    if kind == "F16":
        return f16
    out = GGUF_DIR / f"llama-1.1b-{kind.lower()}.gguf"
    if not out.exists():
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
        params.nthread = 2
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {f16} to {kind}")
    return out


def llama_cpp_decode_steps(llm, prompt: list[int], num_tokens: int) -> list[float]:
    """Seconds of each of ``num_tokens`` greedy batch-1 decode steps of a llama_cpp.Llama after ``prompt``."""
    llm.eval(prompt)
    times = []
    for _ in range(num_tokens):
        tok = llm.sample(top_k=1)
        t0 = time.perf_counter()
        llm.eval([tok])
        times.append(time.perf_counter() - t0)
    return times


def tierlm_decode_steps(llm, prompt: list[int], num_tokens: int) -> list[float]:
    """Seconds between the outputs of ``num_tokens`` greedy decode steps of a tierlm LLM after ``prompt``
    (the first output, which comes after the prompt, is not counted)."""
    from tierlm import SamplingParams

    times, last = [], time.perf_counter()
    params = SamplingParams(max_tokens=num_tokens + 1, temperature=0, ignore_eos=True)
    for i, _ in enumerate(llm.stream(prompt, params)):
        now = time.perf_counter()
        if i:
            times.append(now - last)
        last = now
    return times


def _child(engine: str, num_tokens: int) -> dict:
    """Runs in a fresh process: load, decode, return step times and bytes read per step."""
    import torch

    if engine.startswith("llama.cpp"):
        import llama_cpp

        path = gguf_file(engine.split()[1])
        llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, n_batch=64, verbose=False)
        times = llama_cpp_decode_steps(llm, PROMPT, num_tokens)
        from tierlm.loader.gguf import parse_gguf

        _, infos = parse_gguf(path)
        weight_bytes = sum(t.nbytes for t in infos if t.name != "token_embd.weight")
        return {"step_s": times, "weight_bytes": weight_bytes}

    from tierlm import LLM

    kind = engine.split()[1]
    opts = dict(max_model_len=256, max_num_seqs=1, fused_decode=not engine.endswith(" layered"))
    if kind == "gguf":
        llm = LLM(gguf_file(engine.split()[2]), quant="gguf", **opts)
    elif kind == "bf16":
        llm = LLM(HF_MODEL, dtype="bfloat16", **opts)
    else:
        llm = LLM(HF_MODEL, quant=kind, quant_method="rtn", **opts)  # speed only: gptq's codes run the same
    w = llm.model.w

    def nbytes(t) -> int:
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else t.nbytes

    weight_bytes = sum(nbytes(getattr(lw, n)) for lw in w.layers for n in ("qkv", "o", "up", "down"))
    weight_bytes += nbytes(w.lm_head)
    return {"step_s": tierlm_decode_steps(llm, PROMPT, num_tokens), "weight_bytes": weight_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3, help="runs per engine, taking turns; the fastest is kept")
    parser.add_argument("--engines", nargs="+", choices=ENGINES + LAYERED, default=list(ENGINES))
    parser.add_argument("--name", default="quant", help="results file name under bench/results/")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.tokens)))
        return
    for kind in ("Q8_0", "Q4_0"):
        gguf_file(kind)  # made before any timing
    bandwidth = 0.0  # the fastest read seen in any round: the limit every engine's share is held against
    steps: dict[str, list[float]] = {e: [] for e in args.engines}  # median step time of each round, s
    weight_bytes: dict[str, int] = {}
    for i in range(args.rounds):
        bandwidth = max(bandwidth, measure_memory_bandwidth())
        for engine in (args.engines if i % 2 == 0 else args.engines[::-1]):
            r = run_child(__file__, engine, "--tokens", str(args.tokens))
            steps[engine].append(statistics.median(r["step_s"][2:]))
            weight_bytes[engine] = r["weight_bytes"]
            print(f"round {i + 1}: {engine}: {1 / steps[engine][-1]:.2f} tok/s", flush=True)
    rows = []
    for engine in args.engines:
        step, nbytes = min(steps[engine]), weight_bytes[engine]
        rows.append({"engine": engine, "decode_tok_s": round(1 / step, 2), "weight_mb": round(nbytes / 1e6),
                     "achieved_gbps": round(nbytes / step / 1e9, 1),
                     "share_of_bandwidth": round(nbytes / step / 1e9 / bandwidth, 2),
                     "rounds_tok_s": [round(1 / s, 2) for s in steps[engine]]})
        print(json.dumps(rows[-1]), flush=True)
    by = {r["engine"]: r for r in rows}
    for r in rows:
        for kind in ("Q8_0", "Q4_0"):
            if r["engine"] == f"tierlm gguf {kind}" and f"llama.cpp {kind}" in by:
                r["vs_llama_cpp"] = round(r["decode_tok_s"] / by[f"llama.cpp {kind}"]["decode_tok_s"], 2)
                r["round_vs_llama_cpp"] = round(statistics.median(
                    b / s for s, b in zip(steps[r["engine"]], steps[f"llama.cpp {kind}"], strict=True)), 2)
        layered = f"{r['engine']} layered"
        if layered in by:
            r["fused_vs_layered"] = round(r["decode_tok_s"] / by[layered]["decode_tok_s"], 2)
            r["round_fused_vs_layered"] = round(statistics.median(
                b / s for s, b in zip(steps[r["engine"]], steps[layered], strict=True)), 2)
        if r["engine"].startswith("tierlm") and "tierlm bf16" in by:
            bf = by["tierlm bf16"]
            r["speedup_vs_bf16"] = round(r["decode_tok_s"] / bf["decode_tok_s"], 2)
            r["round_speedup_vs_bf16"] = round(statistics.median(
                b / s for s, b in zip(steps[r["engine"]], steps["tierlm bf16"], strict=True)), 2)
            r["bytes_ratio_vs_bf16"] = round(bf["weight_mb"] / r["weight_mb"], 2)
    rounds = (f"{args.rounds}, engines taking turns (even rounds in reverse order); decode_tok_s is the "
              "fastest; round_* are medians of per-round ratios")
    write_results(args.name, rows, {"model": str(HF_MODEL.relative_to(REPO_ROOT)),
                                    "bandwidth_gbps": round(bandwidth, 1),
                                  "prompt_tokens": len(PROMPT), "decode_tokens": args.tokens, "threads": 2,
                                  "rounds": rounds},
                  columns=["engine", "decode_tok_s", "weight_mb", "achieved_gbps", "share_of_bandwidth",
                           "vs_llama_cpp", "round_vs_llama_cpp", "fused_vs_layered", "round_fused_vs_layered",
                           "speedup_vs_bf16", "round_speedup_vs_bf16",
                           "bytes_ratio_vs_bf16", "rounds_tok_s"])


if __name__ == "__main__":
    main()
