"""The one-off cost of producing a tierlm format, by rtn and by GPTQ, and of every later load.

``LLM(model, quant=f)`` with GPTQ builds a quantized weight store on first load (calibration on the
Brown text, then GPTQ layer by layer; tierlm.quant.store) and reads it back on every later load. This
times both, through the same function (``open_or_build_store``), into a fresh folder per row:

* ``build_s``: the store built from the checkpoint (rtn: each matrix rounded; gptq: calibrated and
  solved), written to disk;
* ``reload_s``: the store found again (its manifest matches) and read whole into memory
  (``resident_weights``), which is what a second ``LLM(model, quant=f)`` pays instead;
* ``s_per_m_layer_params``: build seconds per million parameters of the layer matrices (the
  embeddings are copied, not calibrated), the figure tierlm.quant.methods estimates from;
* ``build_cpu_s``: the process's CPU time over the build (all threads), which a machine shared with
  other work inflates less than the wall time; ``load_average`` says how shared it was.

With ``--max-layers N`` a GPTQ build stops after N layers (every layer of these models has the same
shape) and the rest is extrapolated from the median layer (``complete`` false; no reload then).
Rows of earlier runs for other (model, format, method) are kept in the results; each row has its own
date, commit and load average, the meta is the last run's.

Models: SmolLM2-135M and Gemma-3-270m (the GGUF files of bench/quant_quality.py) and the random
Llama 1.1B of bench/make_models.py (``python bench/make_models.py llama-1.1b``). That one has no
tokenizer, so its GPTQ calibrates on random token ids, as many sequences and tokens as the Brown
calibration text (the cost does not depend on which ids they are).

    flock /tmp/tierlm-bench.lock .venv/bin/python bench/gptq_cost.py [--models smollm2 gemma3 llama-1.1b]
        [--formats q4 q8 q3h] [--methods rtn gptq] [--max-layers N] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.common import MODELS_DIR, REPO_ROOT, RESULTS_DIR, git_commit, write_results
from bench.quant_quality import MODELS
from tierlm.loader.model_loader import open_checkpoint
from tierlm.quant import imatrix
from tierlm.quant.gptq import SequentialGPTQ
from tierlm.quant.store import StoreQuant, open_or_build_store, resident_weights

NAME = "gptq_cost"
WORK_DIR = REPO_ROOT / ".cache" / "gptq_cost"
ALL_MODELS = {**{k: locate for k, (_, locate) in MODELS.items()}, "llama-1.1b": lambda: MODELS_DIR / "llama-1.1b"}


def layer_parameters(arch) -> int:
    """Parameters of the layer matrices: what calibration runs through and GPTQ solves."""
    return arch.num_parameters() - arch.vocab_size * arch.hidden_size * (1 if arch.tie_embeddings else 2)


def random_calibration(vocab_size: int):
    """A stand-in for imatrix.calibration_sequences for a model without a tokenizer: the same number of
    sequences and tokens, random ids."""
    def sequences(_tokenizer, num_windows: int | None = None, ctx: int = 512) -> list[list[int]]:
        g = torch.Generator().manual_seed(0)
        n = len(imatrix.CALIB_CATEGORIES[:num_windows])
        return torch.randint(0, vocab_size, (n, ctx), generator=g).tolist()

    return sequences


class _Enough(Exception):
    """Raised after ``--max-layers`` GPTQ layers: the rest of the build is extrapolated."""


def timed_build(opened, folder: Path, quant: StoreQuant, max_layers: int | None) -> dict:
    """Build the store, timing each GPTQ layer (``SequentialGPTQ.quantize_layer``); with ``max_layers``
    stop after that many and extrapolate: elapsed + remaining layers x the median layer."""
    layer_s: list[float] = []
    quantize_layer = SequentialGPTQ.quantize_layer

    def timed(self, i: int) -> None:
        t = time.perf_counter()
        quantize_layer(self, i)
        layer_s.append(time.perf_counter() - t)
        if max_layers is not None and len(layer_s) >= max_layers:
            raise _Enough

    SequentialGPTQ.quantize_layer = timed
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        open_or_build_store(opened, torch.float32, folder, quant).close()
        complete = True
    except _Enough:
        complete = False
    finally:
        SequentialGPTQ.quantize_layer = quantize_layer
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    median = statistics.median(layer_s) if layer_s else None
    remaining = opened.config.num_layers - len(layer_s)
    if not complete:  # the same shape every layer: the rest cost what the timed ones did
        wall, cpu = wall + remaining * median, cpu * (1 + remaining * median / wall)
    return {"build_s": round(wall, 1), "build_cpu_s": round(cpu, 1), "complete": complete,
            "gptq_layers_timed": len(layer_s), "median_layer_s": None if median is None else round(median, 2)}


def measure(opened, key: str, fmt: str, method: str, max_layers: int | None) -> dict:
    folder = WORK_DIR / f"{key}-{fmt}-{method}"
    shutil.rmtree(folder, ignore_errors=True)
    quant = StoreQuant(fmt, 64, method=method)
    build = timed_build(opened, folder, quant, max_layers if method == "gptq" else None)
    params = layer_parameters(opened.config)
    row = {"model": key, "layer_params_m": round(params / 1e6, 1), "format": fmt, "method": method, **build,
           "s_per_m_layer_params": round(build["build_s"] / (params / 1e6), 3),
           "cpu_s_per_m_layer_params": round(build["build_cpu_s"] / (params / 1e6), 3),
           "reload_s": None, "reused": None, "load_average": round(os.getloadavg()[0], 1),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": git_commit()}
    if build["complete"]:
        built = (folder / "manifest.json").stat().st_mtime_ns
        t0 = time.perf_counter()
        resident_weights(open_or_build_store(opened, torch.float32, folder, quant))
        row["reload_s"] = round(time.perf_counter() - t0, 2)
        row["reused"] = (folder / "manifest.json").stat().st_mtime_ns == built  # not rebuilt by the second call
    shutil.rmtree(folder, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(ALL_MODELS), default=["smollm2", "gemma3", "llama-1.1b"])
    parser.add_argument("--formats", nargs="+", default=["q4", "q8", "q3h"])
    parser.add_argument("--methods", nargs="+", choices=("rtn", "gptq"), default=["rtn", "gptq"])
    parser.add_argument("--max-layers", type=int, metavar="N",
                        help="time only the first N GPTQ layers of each model and extrapolate the rest")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); on a machine shared with "
                        "other work one thread is not held up waiting for a descheduled second one")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = []
    for key in args.models:
        opened = open_checkpoint(ALL_MODELS[key]())
        original = imatrix.calibration_sequences
        if opened.tokenizer is None:
            imatrix.calibration_sequences = random_calibration(opened.config.vocab_size)
        try:
            for fmt in args.formats:
                for method in args.methods:
                    rows.append(measure(opened, key, fmt, method, args.max_layers))
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            imatrix.calibration_sequences = original
            opened.reader.close()
    # rows of other models, formats or methods from earlier runs are kept (each row names its own load)
    path = RESULTS_DIR / f"{NAME}.json"
    fresh = {(r["model"], r["format"], r["method"]) for r in rows}
    earlier = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = [r for r in earlier if (r["model"], r["format"], r["method"]) not in fresh] + rows
    write_results(NAME, rows, {"calibration": f"{len(imatrix.CALIB_CATEGORIES)} sequences of BOS + 511 tokens "
                                              "(Brown; random ids for llama-1.1b)",
                               "store_dtype": "float32"})


if __name__ == "__main__":
    main()
