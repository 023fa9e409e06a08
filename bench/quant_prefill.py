"""Prompt (prefill) speed of quantized weights: ``quant_int8_prompts=True`` (prompt chunks through the
int8 VNNI kernel) against the default float path (prompt chunks dequantized tile by tile for
``F.linear``: the feature off) and against llama.cpp on the same GGUF files, in the same run.

Model: the random Llama 1.1B (bench/quant.py makes its Q8_0 and Q4_0 files). Each engine in its own
process: a ``--prompt``-token prompt, time to the first token (the whole prompt in one step), best of
3 after a warm-up; engines take turns for ``--rounds`` rounds and keep their fastest. Achieved G
multiply-adds/s = weights of the matrices x prompt tokens / time, against the float32 matmul rate
measured here (torch, 2048^3) as the float path's compute limit.

    .venv/bin/python bench/quant_prefill.py [--prompt 256] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO_ROOT, measure_matmul_flops, run_child, write_results
from bench.quant import HF_MODEL, gguf_file

ENGINES = ("llama.cpp Q4_0", "tierlm gguf Q4_0 int8 prompts", "tierlm gguf Q4_0", "llama.cpp Q8_0",
           "tierlm gguf Q8_0 int8 prompts", "tierlm gguf Q8_0", "tierlm q4 int8 prompts", "tierlm q4")


def _child(engine: str, num_prompt: int) -> dict:
    """Runs in a fresh process: load, then the best of 3 prefills (after one warm-up)."""
    import torch

    prompt = [1 + (i * 7919) % 31000 for i in range(num_prompt)]
    if engine.startswith("llama.cpp"):
        import llama_cpp

        llm = llama_cpp.Llama(str(gguf_file(engine.split()[1])), n_ctx=num_prompt + 8, n_threads=2,
                              n_batch=num_prompt, verbose=False)
        times = []
        for _ in range(4):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            times.append(time.perf_counter() - t0)
        return {"prefill_s": min(times[1:]), "weights": _weights_llama()}

    from tierlm import LLM, SamplingParams

    kind = engine.split()[1]
    kw = {"max_model_len": num_prompt + 8, "max_num_seqs": 1, "max_num_batched_tokens": num_prompt,
          "quant_int8_prompts": engine.endswith("int8 prompts")}
    if kind == "gguf":
        llm = LLM(gguf_file(engine.split()[2]), quant="gguf", **kw)
    else:
        llm = LLM(HF_MODEL, quant=kind, quant_method="rtn", **kw)  # speed only: gptq's codes run the same
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        llm.generate([prompt], params)
        times.append(time.perf_counter() - t0)
    del torch
    return {"prefill_s": min(times[1:]), "weights": _weights_llama()}


def _weights_llama() -> int:
    """Multiply-adds per token of the 1.1B's matrices (the head for the last token only, not counted)."""
    cfg = json.loads((HF_MODEL / "config.json").read_text())
    d, f, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    return n * (d * (d + 2 * kv) + d * d + 3 * d * f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--name", default="quant_prefill")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.prompt)))
        return
    import torch

    for kind in ("Q8_0", "Q4_0"):
        gguf_file(kind)
    flops = measure_matmul_flops(torch.float32)
    best: dict[str, float] = {}
    weights = 0
    for i in range(args.rounds):
        for engine in args.engines:
            r = run_child(__file__, engine, "--prompt", str(args.prompt))
            best[engine] = min(best.get(engine, float("inf")), r["prefill_s"])
            weights = r["weights"]
            print(f"round {i + 1}: {engine}: {args.prompt / r['prefill_s']:.1f} tok/s", flush=True)
    rows = []
    for engine in args.engines:
        s = best[engine]
        rows.append({"engine": engine, "prefill_tok_s": round(args.prompt / s, 1), "ttft_s": round(s, 3),
                     "g_mac_s": round(weights * args.prompt / s / 1e9, 1),
                     "share_of_f32_matmul": round(2 * weights * args.prompt / s / flops, 2)})
    by = {r["engine"]: r for r in rows}
    for r in rows:
        name = r["engine"]
        base = name.removesuffix(" int8 prompts")
        if name != base and base in by:
            r["vs_float_path"] = round(r["prefill_tok_s"] / by[base]["prefill_tok_s"], 2)
        for kind in ("Q8_0", "Q4_0"):
            if name.startswith(f"tierlm gguf {kind}") and f"llama.cpp {kind}" in by:
                r["vs_llama_cpp"] = round(r["prefill_tok_s"] / by[f"llama.cpp {kind}"]["prefill_tok_s"], 2)
    for r in rows:
        print(json.dumps(r))
    write_results(args.name, rows, {"model": str(HF_MODEL.relative_to(REPO_ROOT)), "prompt_tokens": args.prompt,
                                    "f32_matmul_gflops": round(flops / 1e9, 1), "threads": 2,
                                    "rounds": f"{args.rounds}, engines taking turns; the fastest kept"},
                  columns=["engine", "prefill_tok_s", "ttft_s", "g_mac_s", "share_of_f32_matmul", "vs_float_path",
                           "vs_llama_cpp"])


if __name__ == "__main__":
    main()
