"""How much perplexity llama.cpp's own 4-bit formats lose on the same float models as tierlm's q4.

bench/quant_quality.py holds tierlm's formats to "q4 (group 64) within 3% of float". This asks what
the reference tool gets on the same starting point: each model's GGUF is requantized by llama.cpp
(``llama_model_quantize`` with ``allow_requantize``: the file's blocks dequantized to float, the
float model of quant_quality, then quantized again) to Q4_0 (symmetric, blocks of 32, 4.5 bits per
weight) and Q4_1 (asymmetric min-max, blocks of 32, 5 bits per weight), every layer matrix in that
type (``pure``) and the embeddings kept in Q8_0 as in both files (Q8_0 of a dequantized Q8_0 block
is the same block), so only the layer matrices change, as with tierlm's q4. Perplexity is
llama.cpp's, same protocol and text as tests/data/llamacpp_reference.json (tools/llamacpp_reference.py),
and the delta is against llama.cpp on the original file. In the same run tierlm's round-to-nearest
q4 at group 32 (Q4_1's layout with float16 step and min) and group 64 are measured against tierlm's
float model; tierlm's q4 by its default method is quoted from bench/results/quant_quality.json (run
that first), and bench/results/quant_table.md is rewritten with the Q4_0 rows.

    flock /tmp/tierlm-bench.lock .venv/bin/python bench/llamacpp_q4_quality.py [--models smollm2 gemma3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO_ROOT, RESULTS_DIR, write_results
from bench.quant_quality import MODELS, REFERENCE, measure, write_tables
from tierlm.eval import brown

NAME = "llamacpp_q4_quality"
GGML_Q8_0 = 8  # ggml_type of the embeddings, as in both files
TYPES = {"Q4_0": (2, 4.5), "Q4_1": (3, 5.0)}  # llama_ftype, bits per weight (blocks of 32 with fp16 d (and m))


def requantize(src: Path, kind: str, out_dir: Path) -> Path:
    import llama_cpp

    out = out_dir / f"{src.stem}-requant-{kind.lower()}.gguf"
    if out.exists():
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = TYPES[kind][0]
    params.allow_requantize = True
    params.pure = True
    params.token_embedding_type = GGML_Q8_0
    params.nthread = 2
    tmp = out.with_suffix(".tmp")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not requantize {src} to {kind}")
    tmp.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS, reverse=True))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import llamacpp_reference

    reference = json.loads(REFERENCE.read_text())
    quality = json.loads((RESULTS_DIR / "quant_quality.json").read_text())["rows"]
    text = brown.excerpt()
    out_dir = REPO_ROOT / ".cache" / "gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for key in args.models:
        ref_key, locate = MODELS[key]
        src = locate()
        base = reference["models"][ref_key]["ppl"]
        for kind, (_, bits) in TYPES.items():
            t0 = time.perf_counter()
            path = requantize(src, kind, out_dir)
            ppl = llamacpp_reference.measure(f"{key} {kind}", str(path), text, threads=2)["ppl"]
            rows.append({"model": key, "engine": "llama.cpp", "format": f"{kind} (pure, g32)", "bits_per_weight": bits,
                         "ppl": round(ppl, 4), "baseline_ppl": round(base, 4), "baseline": "llama.cpp, original file",
                         "delta_pct": round(100 * (ppl / base - 1), 3), "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
        float_ppl = measure(src, text, quant="float")["ppl"]
        for group in (32, 64):
            m = measure(src, text, quant="q4", quant_group=group, quant_method="rtn")
            rows.append({"model": key, "engine": "tierlm", "format": f"q4 g{group} (round to nearest)",
                         "bits_per_weight": 4 + 32 / group, "ppl": round(m["ppl"], 4),
                         "baseline_ppl": round(float_ppl, 4), "baseline": "tierlm float",
                         "delta_pct": round(100 * (m["ppl"] / float_ppl - 1), 3),
                         "seconds": round(m["load_s"] + m["eval_s"], 1)})
            print(json.dumps(rows[-1]), flush=True)
        default = next(r for r in quality if r["model"] == key and r["setting"] == f"q4 {r['method']}" and r["default"])
        rows.append({"model": key, "engine": "tierlm",
                     "format": f"q4 g64, default method: {default['method']} (quoted from quant_quality.json)",
                     "bits_per_weight": default["bits_per_weight"], "ppl": default["ppl"],
                     "baseline_ppl": round(float_ppl, 4), "baseline": "tierlm float", "delta_pct": default["delta_pct"],
                     "seconds": round(default["load_s"] + default["eval_s"], 1)})
    write_results(NAME, rows, {"protocol": "Brown ca excerpt, 6 windows x 512 tokens (BOS + 511)",
                               "requantized_files": str(out_dir)})
    write_tables()  # quant_table.md quotes the Q4_0 rows


if __name__ == "__main__":
    main()
