"""Decode speed under a RAM budget smaller than the model (issue 3): tierlm's tiered weights
(FlexInfer's design and its ablations) against llama.cpp's mmap and accelerate's disk offload.

Every point runs in a fresh child process after the page cache is dropped (os.sync + drop_caches),
so streamed bytes come from the disk, not from a cache left by the previous point. Baselines run in
a child memory cgroup (v1) whose limit is the peak RSS tierlm's full design reached at the same
budget, so all engines get the same RAM; the page cache counts against that limit, which is what
stops mmap from quietly keeping the whole model.

Variants (tierlm): full (balanced locking, Algorithm 1, window 3), sync (window 0: no prefetch),
whole_layer (unbalanced locking), attn_first and ffn_first (forced preservation order).
Limit: min(memory bandwidth / resident bytes, disk bandwidth / streamed bytes) per pass, both
measured in this run (disk: the store read with O_DIRECT by 4 threads, page cache dropped, best
of 3 reads at the start and again at the end; the faster of the two).

    python bench/offload.py                                  # 1.1B bf16, budgets 0..100%, batch 1 and 16
    python bench/offload.py --budgets 25,50 --batches 1 --variants full,sync

Quantized (``--quant q4``): tierlm's variants store and stream the q4 rows; ``gguf`` streams the
blocks of the GGUF file given by ``--gguf`` (e.g. llama.cpp's Q4_0 of the same model), which is
also the file llama.cpp maps, so both engines read the same bytes per token:

    python bench/offload.py --quant q4 --gguf .cache/gguf/llama-1.1b-q4_0.gguf --budgets 0,25,50 \
        --batches 1 --variants full,sync,gguf,llamacpp --name offload_q4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

try:
    from common import MODELS_DIR, REPO_ROOT, RESULTS_DIR, machine_info, measure_memory_bandwidth, write_results
except ImportError:  # pragma: no cover
    from bench.common import MODELS_DIR, REPO_ROOT, RESULTS_DIR, machine_info, measure_memory_bandwidth, write_results

TIERLM_VARIANTS = {
    "full": {},
    "sync": {"prefetch_window": 0},
    "whole_layer": {"tier_locking": "whole_layer"},
    "attn_first": {"tier_order": "attn_first"},
    "ffn_first": {"tier_order": "ffn_first"},
}

_CHILD_PRELUDE = """
import json, sys, time
from pathlib import Path
def peak_rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
args = json.loads(sys.argv[1])
batch, steps = args["batch"], args["steps"]
prompts = [[(7 * b + 11 * i) % 30000 + 100 for i in range(16)] for b in range(batch)]
"""

_TIERLM_CHILD = _CHILD_PRELUDE + """
import hashlib
from tierlm import LLM, SamplingParams
t0 = time.perf_counter()
llm = LLM(args["model"], dtype="bfloat16", kv_cache_tokens=4096, max_model_len=512, max_num_seqs=batch,
          weight_memory=args["budget"], store_dir=args["store"], **args["kw"])
load_s = time.perf_counter() - t0
llm.generate(prompts, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))  # warm-up
for p in prompts:
    llm.add_request(p, SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True))
times = []
t0 = time.perf_counter()
while llm.engine.has_unfinished():
    llm.engine.step()
    times.append(time.perf_counter())
plan = llm.tiers.plan
decode_s = times[-1] - times[0]
print("RESULT " + json.dumps({
    "tok_s": batch * (len(times) - 1) / decode_s, "ttft_s": times[0] - t0,
    "tpot_ms": 1000 * decode_s / (len(times) - 1),
    "peak_rss": peak_rss(), "load_s": load_s, "resident_bytes": plan.resident_bytes, "ring_bytes": plan.ring_bytes,
    "streamed_bytes": plan.streamed_bytes_per_pass, "total_bytes": plan.total_bytes,
    "stalls": llm.tiers.streamer.num_stalls if llm.tiers.streamer else 0, "window": plan.window,
    # which rows stay resident: an ablation whose placement equals the full design's differs from it
    # only by noise (e.g. ffn_first where Algorithm 1 chose FFN-first itself; any order at 0%)
    "placement": hashlib.sha1(repr([(s.tensor.name, s.row_start, s.row_end, s.resident_end)
                                    for u in plan.units for s in u.segments]).encode()).hexdigest()[:8]}))
"""

_LLAMACPP_CHILD = _CHILD_PRELUDE + """
import llama_cpp
t0 = time.perf_counter()
llm = llama_cpp.Llama(args["gguf"], n_ctx=512, n_batch=512, n_threads=2, n_seq_max=1, use_mmap=True,
                      use_mlock=False, verbose=False)
load_s = time.perf_counter() - t0
# One sequence (llama-cpp-python's high-level API decodes one); batch > 1 is not measured here.
llm.eval(prompts[0])
tok = llm.sample(top_k=1)
llm.eval([tok])  # warm-up token
times = [time.perf_counter()]
for _ in range(steps):
    tok = llm.sample(top_k=1)
    llm.eval([tok])
    times.append(time.perf_counter())
decode_s = times[-1] - times[0]
print("RESULT " + json.dumps({"tok_s": steps / decode_s, "tpot_ms": 1000 * decode_s / steps,
                              "peak_rss": peak_rss(), "load_s": load_s}))
"""

_ACCELERATE_CHILD = _CHILD_PRELUDE + """
import torch, transformers
t0 = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(
    args["model"], dtype=torch.bfloat16, device_map="auto", max_memory={"cpu": args["budget_bytes"]},
    offload_folder=args["offload"], offload_state_dict=True)
load_s = time.perf_counter() - t0
ids = torch.tensor(prompts)
with torch.inference_mode():
    out = model(ids, use_cache=True)
    past = out.past_key_values
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    out = model(tok, past_key_values=past, use_cache=True)  # warm-up token
    past = out.past_key_values
    times = [time.perf_counter()]
    for _ in range(steps):
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        out = model(tok, past_key_values=past, use_cache=True)
        past = out.past_key_values
        times.append(time.perf_counter())
decode_s = times[-1] - times[0]
print("RESULT " + json.dumps({"tok_s": batch * steps / decode_s, "tpot_ms": 1000 * decode_s / steps,
                              "peak_rss": peak_rss(), "load_s": load_s}))
"""


def drop_page_cache() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _cgroup_root() -> Path | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            root = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            return root if root.exists() else None
    return None


def run_child(code: str, args: dict, limit_bytes: int | None = None, timeout: int = 900) -> dict:
    """Run ``code`` in a fresh interpreter (optionally inside a memory cgroup of ``limit_bytes``)."""
    group = None
    if limit_bytes is not None:
        root = _cgroup_root()
        if root is None:
            raise RuntimeError("no cgroup v1 memory controller: cannot limit the baseline's memory")
        group = root / f"tierlm-bench-{os.getpid()}-{time.monotonic_ns()}"
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        try:
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))  # no swap escape
        except OSError:
            pass
    procs = None if group is None else str(group / "cgroup.procs")

    def enter() -> None:
        if procs is not None:
            Path(procs).write_text(str(os.getpid()))

    try:
        p = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                           timeout=timeout, preexec_fn=enter, cwd=REPO_ROOT, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    finally:
        if group is not None:
            for _ in range(50):
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {p.returncode}: " + " | ".join(tail)}


def disk_bandwidth(store_dir: Path, num_tries: int = 3) -> float:
    """GB/s reading the store's middle 512 MiB the way the streamer does, page cache dropped: the best
    of ``num_tries`` reads, since one short read of this (virtual) disk often comes out well below
    what the streamer then sustains for minutes."""
    from tierlm.memory.hardware import disk_read_bandwidth
    from tierlm.memory.store import WeightStore

    store = WeightStore(store_dir)
    try:
        best = 0.0
        for _ in range(num_tries):
            drop_page_cache()
            best = max(best, disk_read_bandwidth(store, nbytes=512 << 20) / 1e9)
        return best
    finally:
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=MODELS_DIR / "llama-1.1b")
    ap.add_argument("--gguf", type=Path, default=None, help="F16 GGUF of the model (made if missing)")
    ap.add_argument("--budgets", default="0,25,50,75,100", help="percent of the model's weight bytes")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--steps", type=int, default=6, help="decode steps timed per point")
    ap.add_argument("--variants", default="full,sync,whole_layer,attn_first,ffn_first,llamacpp,accelerate")
    ap.add_argument("--ablations-batch1-only", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--name", default="offload")
    ap.add_argument("--quant", default=None, help="tierlm format the store holds (q8, q4, ...); default bf16")
    ap.add_argument("--quant-group", type=int, default=64)
    a = ap.parse_args()

    import torch

    from tierlm.loader.model_loader import open_checkpoint
    from tierlm.quant.store import StoreQuant, open_or_build_store

    def build_store(model: Path, quant: StoreQuant | None) -> Path:
        opened = open_checkpoint(model)
        store = open_or_build_store(opened, torch.bfloat16, quant=quant)
        store.close()
        opened.reader.close()
        return store.path

    quant = None if a.quant is None else StoreQuant(a.quant, a.quant_group)
    quant_kw = {} if quant is None else {"quant": a.quant, "quant_group": a.quant_group}
    store_dir = build_store(a.model, quant)
    gguf = a.gguf or REPO_ROOT / ".cache" / "gguf" / f"{a.model.name}-f16.gguf"
    variants = a.variants.split(",")
    gguf_store = build_store(gguf, StoreQuant("gguf")) if "gguf" in variants else None
    if "llamacpp" in variants and not gguf.exists():
        from gguf_export import export
        gguf.parent.mkdir(parents=True, exist_ok=True)
        export(a.model, gguf, "f16")

    mem_bw = measure_memory_bandwidth() * 1e9  # bytes/s
    disk_bw = disk_bandwidth(store_dir) * 1e9
    print(f"memory {mem_bw / 1e9:.1f} GB/s, disk {disk_bw / 1e9:.2f} GB/s (O_DIRECT, 4 threads)", flush=True)
    rows = []
    dropped = True
    for batch in [int(b) for b in a.batches.split(",")]:
        for pct in [int(p) for p in a.budgets.split(",")]:
            base = {"model": str(a.model), "budget": f"{pct}%", "store": str(store_dir), "batch": batch,
                    "steps": a.steps}
            point: dict[str, dict] = {}
            for v in variants:
                if v in TIERLM_VARIANTS:
                    if v != "full" and (pct == 100 or (batch > 1 and a.ablations_batch1_only)):
                        continue
                    dropped &= drop_page_cache()
                    r = run_child(_TIERLM_CHILD, {**base, "kw": {**TIERLM_VARIANTS[v], **quant_kw}})
                elif v == "gguf":  # tierlm streaming the GGUF file's own blocks
                    dropped &= drop_page_cache()
                    r = run_child(_TIERLM_CHILD, {**base, "model": str(gguf), "store": str(gguf_store),
                                                  "kw": {"quant": "gguf"}})
                elif v == "llamacpp":
                    if batch > 1:
                        continue
                    limit = None if pct == 100 else point.get("full", {}).get("peak_rss")
                    dropped &= drop_page_cache()
                    r = run_child(_LLAMACPP_CHILD, {**base, "gguf": str(gguf)}, limit)
                    r["memory_limit"] = limit
                elif v == "accelerate":
                    full = point.get("full", {})
                    limit = None if pct == 100 else full.get("peak_rss")
                    budget_bytes = int(full.get("total_bytes", 0) * pct / 100) or 1
                    offload = REPO_ROOT / ".cache" / "offload"
                    dropped &= drop_page_cache()
                    r = run_child(_ACCELERATE_CHILD, {**base, "budget_bytes": budget_bytes, "offload": str(offload)},
                                  limit)
                    r["memory_limit"] = limit
                else:
                    raise SystemExit(f"unknown variant {v!r}")
                point[v] = r
                row = {"batch": batch, "budget_pct": pct, "engine": v, **r}
                full = point.get("full", {})
                if "resident_bytes" in r:
                    _set_limit(row, mem_bw, disk_bw)
                    row["streamed_gbps"] = r["streamed_bytes"] * r["tok_s"] / batch / 1e9
                if v != "full" and "tok_s" in full and "tok_s" in r:
                    row["full_vs_this"] = full["tok_s"] / r["tok_s"]
                if v in TIERLM_VARIANTS and v not in ("full", "sync") and "placement" in r:
                    row["same_placement_as_full"] = r["placement"] == full.get("placement")
                rows.append(row)
                print(json.dumps(row), flush=True)
    # This disk's speed drifts by tens of percent over minutes (1.35 to 2.0 GB/s on one day): measured
    # again at the end, the limit uses the faster sample, so a share of the limit above 1 is noise.
    disk_samples = [disk_bw, disk_bandwidth(store_dir) * 1e9]
    disk_bw = max(disk_samples)
    for row in rows:
        if "resident_bytes" in row:
            _set_limit(row, mem_bw, disk_bw)
    _set_compute_limit(rows)
    meta = {"model": str(a.model), "dtype": "bfloat16", "quant": a.quant, "gguf": str(gguf),
            "memory_bandwidth_gbps": mem_bw / 1e9, "disk_bandwidth_gbps": disk_bw / 1e9,
            "disk_bandwidth_samples_gbps": [round(b / 1e9, 3) for b in disk_samples], "page_cache_dropped": dropped,
            "steps": a.steps,
            "machine": machine_info(), "baseline_memory_limit": "cgroup v1 child group at tierlm full's peak RSS"}
    cols = ["batch", "budget_pct", "engine", "tok_s", "tpot_ms", "limit_tok_s", "share_of_limit",
            "share_of_compute_limit", "full_vs_this",
            "same_placement_as_full", "streamed_gbps", "peak_rss", "memory_limit", "stalls", "error"]
    write_results(a.name, rows, meta, cols)
    plot(rows, RESULTS_DIR / f"{a.name}.png")


def _set_limit(row: dict, mem_bw: float, disk_bw: float) -> None:
    """limit_tok_s = batch * min(memory bw / resident bytes, disk bw / streamed bytes), and the share of it."""
    t_disk = row["streamed_bytes"] / disk_bw
    limit_tok = row["batch"] * min(mem_bw / max(1, row["resident_bytes"]), 1 / t_disk if t_disk else 1e9)
    row["limit_tok_s"] = limit_tok
    row["share_of_limit"] = row["tok_s"] / limit_tok


def _set_compute_limit(rows: list[dict]) -> None:
    """The bandwidth limit ignores compute, which bounds batch 16 (and the 1.1B at 75%) on 2 cores. The
    fully resident run of the same batch is this machine's compute ceiling for it, measured in the
    same run: compute_limit_tok_s = min(limit_tok_s, that run's tok/s), and the share of it."""
    resident = {r["batch"]: r["tok_s"] for r in rows
                if r.get("engine") == "full" and r.get("budget_pct") == 100 and "tok_s" in r}
    for r in rows:
        if "limit_tok_s" in r and r["batch"] in resident:
            r["compute_limit_tok_s"] = min(r["limit_tok_s"], resident[r["batch"]])
            r["share_of_compute_limit"] = r["tok_s"] / r["compute_limit_tok_s"]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for engine in dict.fromkeys(r["engine"] for r in rows):
            pts = sorted((r["budget_pct"], r["tok_s"]) for r in rows
                         if r["batch"] == batch and r["engine"] == engine and "tok_s" in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=engine)
        lim = sorted((r["budget_pct"], r["limit_tok_s"]) for r in rows
                     if r["batch"] == batch and r["engine"] == "full" and "limit_tok_s" in r and r["budget_pct"] < 100)
        if lim:
            ax.plot(*zip(*lim), "k--", label="limit (disk/streamed)")
        ax.set_xlabel("weight budget, % of model")
        ax.set_ylabel("decode tok/s")
        ax.set_yscale("log")
        ax.set_title(f"batch {batch}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
