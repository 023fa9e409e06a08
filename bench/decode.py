"""Prefill and decode throughput of tierlm against transformers, held against bandwidth and FLOP/s limits.

Grid: model x dtype x batch, each point run by every engine in the same invocation.
Workload per point: B prompts of `--prompt-len` random token ids (seeded, identical for both engines),
`--new-tokens` new tokens, greedy, EOS ignored.

Timing (identical for both engines):
  t_N   = wall time of one generate call producing N new tokens per sequence (best of up to `--reps`
          repetitions, fewer once a point has used `--rep-budget-s`; after an excluded warm-up call that
          uses the full batch with a 32-token prompt and 2 new tokens);
  prefill tok/s = B * prompt_len / t_1;     decode tok/s = B * (N - 1) / (t_N - t_1).
Per-token latencies (TTFT, TPOT, P50/P95 of the gaps between a sequence's successive tokens) come from
the best t_N run: tierlm's `RequestOutput.metrics`, transformers' timestamps taken by a logits processor
(it runs once per generated token, right before the token is chosen).

Limits, measured in this run (see bench/common.py):
  weight bytes per decode step = every weight a step reads, in the run dtype: all layers, final norm,
  lm_head (the tied embedding for SmolLM2) and B embedding rows;
  flops per decode step = 2 * B * matmul params + attention (4 * ctx * heads * head_dim * layers * B,
  ctx = prompt_len + N/2);
  step time >= max(bytes / bandwidth, flops / matmul FLOP/s of a 2048^3 product in the run dtype),
  each the better of a measurement at the start and one at the end of the run (meta "limits_use");
  limit tok/s = B / that bound; share = decode tok/s / limit tok/s; achieved GB/s = bytes / step time.

Each (engine, model, dtype) runs in its own subprocess so peak RSS is that engine's alone; batches run
in ascending order, so a point's peak RSS is the child's high-water mark up to the end of that point.

    python bench/decode.py                                   # full grid, both engines
    python bench/decode.py --engines transformers --models llama-1.1b --dtypes bfloat16 --batches 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

try:  # run as a script (bench/ on sys.path) or imported as bench.decode
    from common import PeakRSS, measure_matmul_flops, measure_memory_bandwidth, write_results
    from make_models import model_dir, smollm2_gguf_path
except ImportError:  # pragma: no cover
    from bench.common import PeakRSS, measure_matmul_flops, measure_memory_bandwidth, write_results
    from bench.make_models import model_dir, smollm2_gguf_path

MODEL_ALIASES = {"llama": "llama-1.1b", "llama-1.1b": "llama-1.1b",
                 "smollm2": "smollm2-135m", "smollm2-135m": "smollm2-135m"}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
ENGINES = ("tierlm", "transformers")
WARMUP_PROMPT_LEN = 32  # warm-up: full batch, short prompt, 2 tokens; enough to start threads and caches
WARMUP_NEW_TOKENS = 2


# --------------------------------------------------------------------------------------------------
# Child side: one engine, one model, one dtype, several batch sizes. Writes JSON to spec["out"].


def _run_tierlm(spec: dict[str, Any]) -> dict[str, Any]:
    from tierlm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(spec["model_path"], dtype=spec["dtype"], max_num_seqs=max(spec["batches"]))
    load_s = time.perf_counter() - t0
    rss_loaded = PeakRSS.current_bytes()

    def generate(prompts: list[list[int]],
                 num_tokens: int) -> tuple[float, list[list[float]], list[list[int]], list[float]]:
        params = SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        wall = time.perf_counter() - t
        times = [list(o.metrics.token_times) for o in outs]
        ids = [list(o.token_ids) for o in outs]
        ttfts = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs]
        return wall, times, ids, ttfts

    return _run_points(spec, generate, load_s, rss_loaded)


def _run_transformers(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    class TokenTimer(LogitsProcessor):
        """Records perf_counter once per generated token (called right before the token is picked)."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            self.times.append(time.perf_counter())
            return scores

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=DTYPES[spec["dtype"]])
    model.eval()
    load_s = time.perf_counter() - t0
    rss_loaded = PeakRSS.current_bytes()

    def generate(prompts: list[list[int]],
                 num_tokens: int) -> tuple[float, list[list[float]], list[list[int]], list[float]]:
        input_ids = torch.tensor(prompts, dtype=torch.long)  # (B, T): equal lengths, no padding
        attention_mask = torch.ones_like(input_ids)
        timer = TokenTimer()
        t = time.perf_counter()
        out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=num_tokens,
                             min_new_tokens=num_tokens, do_sample=False, pad_token_id=0,
                             logits_processor=LogitsProcessorList([timer]))
        wall = time.perf_counter() - t
        ids = out[:, input_ids.shape[1]:].tolist()
        # One shared clock per step for the whole batch; TTFT measured from the call's start.
        return wall, [list(timer.times) for _ in prompts], ids, [timer.times[0] - t for _ in prompts]

    with torch.inference_mode():
        return _run_points(spec, generate, load_s, rss_loaded)


def _run_points(spec: dict[str, Any], generate, load_s: float, rss_loaded: int) -> dict[str, Any]:
    num_new = spec["new_tokens"]
    points = []
    for batch in spec["batches"]:
        prompts = spec["prompts"][str(batch)]
        generate([p[:WARMUP_PROMPT_LEN] for p in prompts], WARMUP_NEW_TOKENS)  # warm-up: excluded
        t1s, tns = [], []
        best_n: tuple[float, list[list[float]], list[list[int]], list[float]] | None = None
        t_point = time.perf_counter()
        for _ in range(spec["reps"]):
            t1s.append(generate(prompts, 1)[0])
            run = generate(prompts, num_new)
            tns.append(run[0])
            if best_n is None or run[0] < best_n[0]:
                best_n = run
            # Long points (batch 16 of a 1B model: ~1 min of prefill per rep on 2 cores) stop early;
            # their 63 decode steps already average out most noise.
            if time.perf_counter() - t_point >= spec["rep_budget_s"]:
                break
        assert best_n is not None
        _, token_times, token_ids, ttfts = best_n
        if any(len(ids) != num_new for ids in token_ids):
            raise RuntimeError(f"expected {num_new} tokens per sequence, got {[len(i) for i in token_ids]}")
        gaps = [b - a for times in token_times for a, b in zip(times, times[1:])]
        tpots = [(times[-1] - times[0]) / (len(times) - 1) for times in token_times]
        points.append({
            "batch": batch,
            "t1_s": t1s, "tn_s": tns, "reps": len(tns),
            "ttft_s": statistics.mean(ttfts),
            "tpot_s": statistics.mean(tpots),
            "token_gap_p50_s": _percentile(gaps, 50),
            "token_gap_p95_s": _percentile(gaps, 95),
            "token_ids": token_ids,
            "peak_rss_bytes": PeakRSS.self_bytes(),
        })
        print(f"[decode] {spec['engine']} {spec['model']} {spec['dtype']} B={batch}: "
              f"t1={min(t1s):.2f}s t{num_new}={min(tns):.2f}s", flush=True)
    return {"load_s": load_s, "rss_loaded_bytes": rss_loaded, "points": points}


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    runner = {"tierlm": _run_tierlm, "transformers": _run_transformers}[spec["engine"]]
    result = runner(spec)
    Path(spec["out"]).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------------
# Parent side: limits, children, rows.


def model_shape(path: Path) -> dict[str, Any]:
    """Parameter counts of an HF safetensors folder, read from tensor headers (no weights loaded)."""
    from safetensors import safe_open

    config = json.loads((path / "config.json").read_text())
    counts: dict[str, int] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                numel = 1
                for dim in f.get_slice(name).get_shape():
                    numel *= dim
                counts[name] = numel
    embed = counts["model.embed_tokens.weight"]
    lm_head = counts.get("lm_head.weight", embed)  # tied: lm_head reads the embedding table
    body = sum(n for k, n in counts.items() if k not in ("model.embed_tokens.weight", "lm_head.weight"))
    norms = sum(n for k, n in counts.items() if "norm" in k)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return {
        "hidden_size": config["hidden_size"],
        "num_layers": config["num_hidden_layers"],
        "num_heads": config["num_attention_heads"],
        "head_dim": head_dim,
        "vocab_size": config["vocab_size"],
        "tied": "lm_head.weight" not in counts,
        "params_total": sum(counts.values()),
        "params_read_per_step": body + lm_head,  # + B embedding rows, added per batch
        "params_matmul": body - norms + lm_head,
    }


def make_prompts(batch: int, prompt_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """B prompts of random ids in [100, vocab) (skipping the low ids where special tokens live)."""
    gen = torch.Generator().manual_seed(seed * 1000 + batch)
    return torch.randint(100, vocab_size, (batch, prompt_len), generator=gen).tolist()


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tierlm-bench-") as tmp:
        spec = {**spec, "out": str(Path(tmp) / "result.json")}
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        child = PeakRSS.run_child([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)])
        if child.returncode != 0:
            raise SystemExit(f"[decode] {spec['engine']} child failed (exit {child.returncode}) for "
                             f"{spec['model']} {spec['dtype']}; see its traceback above")
        result = json.loads(Path(spec["out"]).read_text())
    result["child_peak_rss_bytes"] = child.peak_rss_bytes
    result["child_wall_s"] = child.wall_s
    return result


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="llama-1.1b,smollm2-135m")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3,
                        help="most timed repetitions per point (each: one t_1 and one t_N call); the best is kept")
    parser.add_argument("--rep-budget-s", type=float, default=30.0,
                        help="no further repetition once a point's timed calls have taken this long")
    parser.add_argument("--engines", default="tierlm,transformers")
    parser.add_argument("--smollm2-source", choices=("gguf", "hf"), default="gguf",
                        help="what tierlm loads for SmolLM2: the Q4_1 GGUF or the dequantized HF folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads for the limits and both engines (0: torch's default)")
    parser.add_argument("--name", default="decode", help="results file stem under bench/results/")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child)
        return

    t_start = time.perf_counter()
    models = [MODEL_ALIASES[m] for m in args.models.split(",")]
    dtypes = args.dtypes.split(",")
    batches = sorted(int(b) for b in args.batches.split(","))
    engines = args.engines.split(",")
    for d in dtypes:
        assert d in DTYPES, f"unknown dtype {d}"
    for e in engines:
        assert e in ENGINES, f"unknown engine {e}"
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (decode time is t_N - t_1)")

    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    if load_start > 0.5 * (os.cpu_count() or 1):
        print(f"[decode] WARNING: load average {load_start:.1f} on {os.cpu_count()} CPUs: other work is "
              "running, numbers will be low and noisy", flush=True)
    paths = {m: model_dir(m) for m in models}
    bandwidth = measure_memory_bandwidth()
    matmul_flops = {d: measure_matmul_flops(DTYPES[d]) for d in dtypes}
    print(f"[decode] bandwidth {bandwidth:.1f} GB/s; matmul "
          + ", ".join(f"{d} {f / 1e9:.0f} GFLOP/s" for d, f in matmul_flops.items()), flush=True)

    model_meta: dict[str, Any] = {}
    runs: list[tuple[str, str, dict[str, Any], dict[str, dict[str, Any]]]] = []  # (model, dtype, shape, results)

    def rows_with(bw: float, flops: dict[str, float]) -> list[dict[str, Any]]:
        return [row for model, dtype, shape, results in runs
                for row in _rows_for(model, dtype, shape, results, args, bw, flops[dtype])]

    for model in models:
        shape = model_shape(paths[model])
        prompts = {str(b): make_prompts(b, args.prompt_len, shape["vocab_size"], args.seed) for b in batches}
        source = {"transformers": str(paths[model]), "tierlm": str(paths[model])}
        if model == "smollm2-135m" and args.smollm2_source == "gguf":
            source["tierlm"] = smollm2_gguf_path()
        model_meta[model] = {"sources": source, **shape}
        for dtype in dtypes:
            results = {}
            for engine in engines:
                results[engine] = run_child({
                    "engine": engine, "model": model, "model_path": source[engine], "dtype": dtype,
                    "batches": batches, "prompts": prompts, "new_tokens": args.new_tokens, "reps": args.reps,
                    "threads": args.threads, "rep_budget_s": args.rep_budget_s,
                })
            runs.append((model, dtype, shape, results))
            meta = _meta(args, bandwidth, matmul_flops, model_meta, t_start, load_start)
            # After every model/dtype, so a crash keeps what ran.
            write_results(args.name, rows_with(bandwidth, matmul_flops), meta, columns=TABLE_COLUMNS)

    # Measured again at the end. On a shared machine one measurement can land in a busy moment and
    # make the limit too low (share > 1), so the limits use the better of the two; a large drift
    # between them means the machine was shared during the run.
    bandwidth_end = measure_memory_bandwidth()
    matmul_end = {d: measure_matmul_flops(DTYPES[d]) for d in dtypes}
    meta = _meta(args, bandwidth, matmul_flops, model_meta, t_start, load_start)
    meta["bandwidth_gbps_end"] = bandwidth_end
    meta["matmul_gflops_end"] = {d: f / 1e9 for d, f in matmul_end.items()}
    bandwidth = max(bandwidth, bandwidth_end)
    matmul_flops = {d: max(matmul_flops[d], matmul_end[d]) for d in dtypes}
    meta["limits_use"] = {"bandwidth_gbps": bandwidth, "matmul_gflops": {d: f / 1e9 for d, f in matmul_flops.items()}}
    path = write_results(args.name, rows_with(bandwidth, matmul_flops), meta, columns=TABLE_COLUMNS)[1]
    print(path.read_text())


TABLE_COLUMNS = ("model", "dtype", "batch", "engine", "prefill_tok_s", "decode_tok_s", "decode_ratio",
                 "prefill_ratio", "weight_mb_per_step", "achieved_gbps", "limit_tok_s", "bound",
                 "share_of_limit", "ttft_s", "tpot_ms", "gap_p50_ms", "gap_p95_ms", "peak_rss_mb",
                 "agree_prefix", "reps")


def _rows_for(model: str, dtype: str, shape: dict[str, Any], results: dict[str, dict[str, Any]],
              args: argparse.Namespace, bandwidth_gbps: float, flops_per_s: float) -> list[dict[str, Any]]:
    elem = torch.empty((), dtype=DTYPES[dtype]).element_size()
    n_new, n_prompt = args.new_tokens, args.prompt_len
    rows = []
    by_batch: dict[int, dict[str, dict[str, Any]]] = {}
    for engine, result in results.items():
        for p in result["points"]:
            by_batch.setdefault(p["batch"], {})[engine] = p
    for batch, per_engine in by_batch.items():
        weight_bytes = (shape["params_read_per_step"] + batch * shape["hidden_size"]) * elem
        ctx = n_prompt + n_new / 2
        flops = batch * (2 * shape["params_matmul"]
                         + 4 * ctx * shape["num_heads"] * shape["head_dim"] * shape["num_layers"])
        t_bw, t_fl = weight_bytes / (bandwidth_gbps * 1e9), flops / flops_per_s
        limit_tok_s = batch / max(t_bw, t_fl)
        stats = {}
        for engine, p in per_engine.items():
            t1, tn = min(p["t1_s"]), min(p["tn_s"])
            step_s = (tn - t1) / (n_new - 1)
            stats[engine] = {
                "prefill_tok_s": batch * n_prompt / t1,
                "decode_tok_s": batch / step_s,
                "achieved_gbps": weight_bytes / step_s / 1e9,
            }
        for engine, p in per_engine.items():
            s = stats[engine]
            row = {
                "model": model, "dtype": dtype, "batch": batch, "engine": engine,
                **s,
                "decode_ratio": None, "prefill_ratio": None,
                "weight_mb_per_step": weight_bytes / 1e6,
                "flops_per_step": flops,
                "limit_tok_s": limit_tok_s,
                "bound": "bandwidth" if t_bw >= t_fl else "compute",
                "share_of_limit": s["decode_tok_s"] / limit_tok_s,
                "ttft_s": p["ttft_s"],
                "tpot_ms": p["tpot_s"] * 1e3,
                "gap_p50_ms": p["token_gap_p50_s"] * 1e3,
                "gap_p95_ms": p["token_gap_p95_s"] * 1e3,
                "peak_rss_mb": p["peak_rss_bytes"] / 1e6,
                "child_peak_rss_mb": results[engine]["child_peak_rss_bytes"] / 1e6,
                "rss_loaded_mb": results[engine]["rss_loaded_bytes"] / 1e6,
                "load_s": results[engine]["load_s"],
                "t1_s": p["t1_s"], "tn_s": p["tn_s"], "reps": p["reps"],
                "agree_prefix": None,
            }
            if engine == "tierlm" and "transformers" in per_engine:
                ref = stats["transformers"]
                row["decode_ratio"] = s["decode_tok_s"] / ref["decode_tok_s"]
                row["prefill_ratio"] = s["prefill_tok_s"] / ref["prefill_tok_s"]
                # Mean length of the greedy prefix both engines agree on (out of new_tokens).
                row["agree_prefix"] = statistics.mean(
                    common_prefix(a, b) for a, b in zip(p["token_ids"], per_engine["transformers"]["token_ids"]))
            rows.append(row)
    return rows


def _meta(args: argparse.Namespace, bandwidth_gbps: float, matmul_flops: dict[str, float],
          model_meta: dict[str, Any], t_start: float, load_start: float) -> dict[str, Any]:
    return {
        "load_average_start": load_start,
        "threads": torch.get_num_threads(),
        "models": model_meta,
        "bandwidth_gbps": bandwidth_gbps,  # measured at the start
        "matmul_gflops": {d: f / 1e9 for d, f in matmul_flops.items()},
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "rep_budget_s": args.rep_budget_s,
        "statistic": (f"best (minimum wall time) of 1..{args.reps} timed repetitions (fewer once a point has "
                      f"run {args.rep_budget_s:g} s; count in column reps), after one excluded warm-up call"),
        "seed": args.seed,
        "elapsed_s": time.perf_counter() - t_start,
    }


if __name__ == "__main__":
    main()
