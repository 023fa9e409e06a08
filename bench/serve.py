"""Serving benchmark in DeepSpeed-FastGen's method: closed-loop clients against a real `tierlm serve`.

For each scheduling policy a real server process is started (``python -m tierlm serve ...`` on
127.0.0.1), then for each client count C, C closed-loop clients stream /v1/completions for a fixed
duration (a warm-up window excluded). Every level replays the same seeded request sequence: prompt
lengths from a mixture of Normal(mean, 0.3*mean) components (clipped to >= 8), output lengths
Normal(out_mean, 0.3*out_mean) (clipped to >= 4), random token ids, greedy, EOS ignored.

SLA (FastGen: TTFT of an L-token prompt <= L/512 s, and generation at >= 2 tok/s): scaled to this CPU by
measuring, on every policy's server, a lone request's prefill rate (TTFT of one long prompt) and decode
rate, and setting R = the fastest prefill rate / --sla-scale and g = the fastest decode rate / --sla-scale. A
request passes if TTFT <= L/R and its i-th generated token (first = 0) arrives within i/g s of the first token. The pass
fraction with FastGen's literal g = 2 tok/s is reported too. Effective throughput = queries/s x pass
fraction.

    python bench/serve.py                      # SmolLM2, both policies, clients 1..32
    python bench/serve.py --model .cache/models/llama-1.1b --mix 0.5:256,0.5:64 --clients 1,2,4,8
    python bench/serve.py --policies splitfuse,prefill_first,splitfuse_shortest   # and shortest-prompt-first
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, RESULTS_DIR, write_results

SLO_POLICY = "splitfuse_slo"
SHORTEST = "_shortest"  # a policy name ending in it: the server runs `--prompt-order shortest`
AGED = SHORTEST + "_aged"  # ... and `--prompt-aging` (--aging-fraction x the SLA's R)
POLICIES = ("splitfuse", "prefill_first", SLO_POLICY, "splitfuse" + SHORTEST, SLO_POLICY + SHORTEST,
            "splitfuse" + AGED, SLO_POLICY + AGED)


@dataclass
class Req:
    prompt: list[int]
    max_tokens: int


@dataclass
class Result:
    idx: int
    prompt_len: int
    max_tokens: int
    send: float
    token_times: list[float] = field(default_factory=list)
    done: float | None = None
    error: str | None = None


def make_requests(n: int, mix: list[tuple[float, float]], out_mean: float, max_model_len: int, vocab: int,
                  seed: int) -> list[Req]:
    rng = np.random.default_rng(seed)
    weights = np.array([w for w, _ in mix]) / sum(w for w, _ in mix)
    reqs = []
    for _ in range(n):
        mean = mix[rng.choice(len(mix), p=weights)][1]
        out = int(max(4, round(rng.normal(out_mean, 0.3 * out_mean))))
        plen = int(max(8, round(rng.normal(mean, 0.3 * mean))))
        plen = min(plen, max_model_len - out)
        reqs.append(Req(rng.integers(100, vocab, plen).tolist(), out))
    return reqs


# -- one request ----------------------------------------------------------------------------------

async def run_request(client: httpx.AsyncClient, url: str, idx: int, req: Req, sink: list[Result]) -> Result:
    res = Result(idx, len(req.prompt), req.max_tokens, time.perf_counter())
    sink.append(res)  # recorded before it finishes: unfinished requests still count at the end
    body = {"model": "m", "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "logprobs": 0}  # logprobs: one entry per token, even when its text is empty
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            res.done = time.perf_counter()
            return res
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            now = time.perf_counter()
            chunk = json.loads(data)
            if "error" in chunk:
                res.error = str(chunk["error"])
                break
            for choice in chunk.get("choices", ()):
                lp = choice.get("logprobs") or {}
                res.token_times.extend([now] * len(lp.get("tokens", ())))
    res.done = time.perf_counter()
    return res


# -- one load level -------------------------------------------------------------------------------

def mem_available_bytes() -> int:
    """MemAvailable from /proc/meminfo: what the kernel could still hand out without swapping."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


# Below this much free memory the servers' pages (weights, KV) start being evicted and re-read:
# a level's figures then measure the disk, not the scheduler (four 1.1B float32 servers did that).
MIN_MEM_AVAILABLE_BYTES = 1 << 30


async def run_level(url: str, reqs: list[Req], clients: int, warmup: float, duration: float
                    ) -> tuple[list[Result], float, float, int]:
    """The level's results, warm-up end and end (perf_counter s), and the least MemAvailable seen (bytes)."""
    results: list[Result] = []
    mem_min = mem_available_bytes()
    counter = iter(range(10**9))
    t0 = time.perf_counter()
    t_end = t0 + warmup + duration

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < t_end:
            i = next(counter)
            await run_request(client, url, i, reqs[i % len(reqs)], results)

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        tasks = [asyncio.create_task(client_loop(client)) for _ in range(clients)]
        while (left := t_end - time.perf_counter()) > 0:
            await asyncio.sleep(min(1.0, left))
            mem_min = min(mem_min, mem_available_bytes())
        for t in tasks:
            t.cancel()  # in-flight requests are abandoned; the server aborts them on disconnect
        await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(1.0)  # let the server finish aborting before the next level
    return results, t0 + warmup, t_end, mem_min


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def verdict(r: Result, R: float, g: float, t_end: float) -> bool | None:
    """True: passed; False: missed a deadline (known by t_end); None: unfinished, no deadline missed yet."""
    ttft_deadline = r.send + r.prompt_len / R
    if not r.token_times:
        return False if (r.done is not None or t_end > ttft_deadline) else None
    first = r.token_times[0]
    if first > ttft_deadline:
        return False
    for i, t in enumerate(r.token_times):
        if t - first > i / g + 1e-9:
            return False
    finished = r.done is not None and r.error is None and len(r.token_times) >= r.max_tokens
    if finished:
        return True
    if r.done is not None:
        return False  # error
    # unfinished: has its next token's deadline already passed?
    return False if t_end > first + len(r.token_times) / g else None


def summarize(results: list[Result], t_warm: float, t_end: float, R: float, g: float, g_literal: float) -> dict:
    duration = t_end - t_warm
    completed = [r for r in results if r.done is not None and r.error is None and t_warm <= r.done <= t_end]
    window = [r for r in results if r.send >= t_warm]  # sent after warm-up
    errors = sum(1 for r in window if r.error is not None)
    ttfts = [r.token_times[0] - r.send for r in window if r.token_times]
    # starvation: the longest wait for a first token, a request still without one counting its wait so far
    ttft_max = max([(r.token_times[0] if r.token_times else t_end) - r.send for r in window], default=None)
    gaps = [b - a for r in window for a, b in zip(r.token_times, r.token_times[1:])]
    row = {"queries_per_s": len(completed) / duration, "completed": len(completed), "sent": len(window),
           "errors": errors,
           "ttft_p50_s": pct(ttfts, 50), "ttft_p95_s": pct(ttfts, 95), "ttft_max_s": ttft_max,
           "tok_lat_p50_ms": None, "tok_lat_p90_ms": None, "tok_lat_p95_ms": None, "tok_lat_p99_ms": None,
           "gen_tok_per_s": sum(len([t for t in r.token_times if t_warm <= t <= t_end]) for r in results) / duration}
    for q in (50, 90, 95, 99):
        v = pct(gaps, q)
        row[f"tok_lat_p{q}_ms"] = None if v is None else 1000 * v
    for key, gg in (("", g), ("_g2", g_literal)):
        vs = [verdict(r, R, gg, t_end) for r in window]
        decided = [v for v in vs if v is not None]
        frac = sum(decided) / len(decided) if decided else None
        row[f"pass_frac{key}"] = frac
        row[f"eff_qps{key}"] = None if frac is None else row["queries_per_s"] * frac
        row[f"undecided{key}"] = len(vs) - len(decided)
    return row


# -- server ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], log_path: Path, base: str, timeout: float = 180) -> subprocess.Popen:
    log = open(log_path, "w")  # noqa: SIM115 (held by the server process for its lifetime)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"server not healthy after {timeout} s; see {log_path}")


def chosen_budgets(log_path: Path) -> tuple[int, int]:
    """The step budgets a `tierlm serve -v --max-num-batched-tokens auto` logged at start-up."""
    m = re.search(r"step budget: (\d+) tokens.*; (\d+) in steps without decodes", log_path.read_text())
    if m is None:
        raise RuntimeError(f"no measured step budget in {log_path}")
    return int(m.group(1)), int(m.group(2))


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def lone_rates(url: str, long_len: int, vocab: int, reps: int = 3) -> dict:
    """Prefill rate (tok/s) = long_len / median TTFT of a lone long prompt (1 output token); decode rate =
    1 / median gap between tokens of a lone 128-token-prompt, 64-token request. One warm-up each, excluded."""
    rng = np.random.default_rng(12345)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None)) as client:
        ttfts, gaps = [], []
        for k in range(reps + 1):
            sink: list[Result] = []
            r = await run_request(client, url, k, Req(rng.integers(100, vocab, long_len).tolist(), 1), sink)
            if k and r.token_times:
                ttfts.append(r.token_times[0] - r.send)
        for k in range(2):
            sink = []
            r = await run_request(client, url, k, Req(rng.integers(100, vocab, 128).tolist(), 64), sink)
            if k:
                gaps = [b - a for a, b in zip(r.token_times, r.token_times[1:])]
    ttft = statistics.median(ttfts)
    gap = statistics.median(gaps)
    return {"lone_prompt_len": long_len, "lone_ttft_s": ttft, "prefill_tok_per_s": long_len / ttft,
            "lone_decode_gap_ms": 1000 * gap, "decode_tok_per_s": 1 / gap}


# -- main -----------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--policies", default="splitfuse,prefill_first",
                    help=f"comma-separated, of {', '.join(POLICIES)}: {SLO_POLICY} is splitfuse promised the SLA's "
                    f"g (`tierlm serve --slo-tokens-per-s g`), {SHORTEST} adds `--prompt-order shortest`, {AGED} "
                    f"also `--prompt-aging` (see --aging-fraction)")
    ap.add_argument("--aging-fraction", type=float, default=0.125,
                    help=f"{AGED}: the aging rate as a fraction of the SLA's R (tokens/s), so that a prompt waits at "
                    "most about its TTFT deadline over this fraction while shorter ones keep coming (default 1/8; "
                    "bench/serve_sim.py --agings compares rates)")
    ap.add_argument("--clients", default="1,2,4,8,16,32")
    ap.add_argument("--duration", type=float, default=75, help="measured seconds per level")
    ap.add_argument("--warmup", type=float, default=15, help="excluded seconds at the start of each level, at least")
    ap.add_argument("--warmup-per-client", type=float, default=1.0,
                    help="warm-up is max(--warmup, this x clients): large loads need longer to reach steady state")
    ap.add_argument("--mix", default="0.5:1000,0.5:128", help="prompt-length mixture weight:mean,...")
    ap.add_argument("--out-mean", type=float, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--budget", default="auto",
                    help="--max-num-batched-tokens for splitfuse: a number, or auto (default: the server measures "
                    "it at start-up, and the budget of steps without decodes too; both are read from its log)")
    ap.add_argument("--prefill-budget", type=int, default=None,
                    help="--max-num-prefill-tokens for splitfuse: the budget of steps with no decode in them "
                    "(default: the server's own choice; 0: with a numeric --budget, every step takes it)")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000, help="token ids drawn from [100, vocab)")
    ap.add_argument("--sla-scale", type=float, default=4.0, help="R = lone prefill rate / this; g likewise")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="serve")
    ap.add_argument("--plot", default="serve_latency.png")
    args = ap.parse_args()

    t_start = time.time()
    mix = [(float(w), float(m)) for w, m in (p.split(":") for p in args.mix.split(","))]
    clients = [int(c) for c in args.clients.split(",")]
    policies = args.policies.split(",")
    if unknown := [p for p in policies if p not in POLICIES]:
        ap.error(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
    reqs = make_requests(4000, mix, args.out_mean, args.max_model_len, args.vocab, args.seed)
    long_len = int(max(m for _, m in mix))
    rows, servers, procs = [], {}, {}
    try:
        # Every policy's server is up for the whole run (an idle one only waits on its queue), and each
        # client count runs the policies back to back: this machine's speed drifts by tens of percent
        # over minutes, and interleaving puts both policies in the same stretch of it.
        def start(policy: str, slo: float | None = None, aging: float | None = None) -> None:
            # prefill_first never splits a prompt, and the engine rejects prompts longer than the step budget,
            # so its budget must hold the longest prompt: max_model_len.
            splitfuse = policy != "prefill_first"
            budget = args.budget if splitfuse else args.max_model_len
            prefill_budget = args.prefill_budget if splitfuse and args.prefill_budget else None
            extra = [] if prefill_budget is None else ["--max-num-prefill-tokens", str(prefill_budget)]
            if slo is not None:
                extra += ["--slo-tokens-per-s", f"{slo:.4g}"]
            if policy.endswith(SHORTEST) or policy.endswith(AGED):
                extra += ["--prompt-order", "shortest"]
            if aging is not None:
                extra += ["--prompt-aging", f"{aging:.4g}"]
            if budget == "auto":
                extra.append("-v")  # the server logs the budgets it measured
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, "-m", "tierlm", "serve", *([args.model] if args.model else []), "--port", str(port),
                   "--dtype", args.dtype, "--max-model-len", str(args.max_model_len), "--max-num-seqs",
                   str(args.max_num_seqs), "--max-num-batched-tokens", str(budget), "--max-queue", "256",
                   "--scheduling-policy", "splitfuse" if splitfuse else "prefill_first", *extra]
            print(f"[{time.strftime('%H:%M:%S')}] starting: {' '.join(cmd[1:])}", flush=True)
            log_path = Path(f"/tmp/tierlm-bench-{args.name}-{policy}.log")
            procs[policy] = (start_server(cmd, log_path, base), base)
            if budget == "auto":
                budget, prefill_budget = chosen_budgets(log_path)
                print(f"  measured budgets: {budget} tokens a step, {prefill_budget} in steps without decodes",
                      flush=True)
            rates = asyncio.run(lone_rates(base + "/v1/completions", long_len, args.vocab))
            print(f"  lone rates ({policy}): {rates}", flush=True)
            servers[policy] = {"command": cmd[1:], "max_num_batched_tokens": int(budget),
                               "max_num_prefill_tokens": prefill_budget, "lone_rates": rates}

        for policy in policies:
            if not policy.startswith(SLO_POLICY) and not policy.endswith(AGED):
                start(policy)
        # One SLA for every policy, from the fastest lone rates any server showed: a policy that prefills
        # a lone prompt more slowly (in chunks) must not get a looser TTFT deadline for it.
        prefill = max(s["lone_rates"]["prefill_tok_per_s"] for s in servers.values())
        decode = max(s["lone_rates"]["decode_tok_per_s"] for s in servers.values())
        sla = {"from": "the fastest lone prefill and decode rates over the policies' servers (not the SLO servers')",
               "prefill_tok_per_s": prefill, "decode_tok_per_s": decode,
               "R_tok_per_s": prefill / args.sla_scale, "g_tok_per_s": decode / args.sla_scale,
               "g_literal_tok_per_s": 2.0}
        print(f"  SLA: R = {sla['R_tok_per_s']:.0f} tok/s, g = {sla['g_tok_per_s']:.1f} tok/s "
              f"(fastest lone rates / {args.sla_scale}); also g = 2 tok/s", flush=True)
        # An SLO server is promised the SLA's g, an aged one ages at a fraction of its R: both start once known.
        sla["aging_tok_per_s"] = args.aging_fraction * sla["R_tok_per_s"]
        for policy in policies:
            if policy.startswith(SLO_POLICY) or policy.endswith(AGED):
                start(policy, sla["g_tok_per_s"] if policy.startswith(SLO_POLICY) else None,
                      sla["aging_tok_per_s"] if policy.endswith(AGED) else None)
        for c in clients:
            for policy in policies:
                res, t_warm, t_end, mem_min = asyncio.run(run_level(procs[policy][1] + "/v1/completions", reqs, c,
                                                           max(args.warmup, args.warmup_per_client * c),
                                                           args.duration))
                row = {"policy": policy, "clients": c,
                       **summarize(res, t_warm, t_end, sla["R_tok_per_s"], sla["g_tok_per_s"], 2.0),
                       "mem_avail_min_gib": round(mem_min / 2**30, 2)}
                rows.append(row)
                if mem_min < MIN_MEM_AVAILABLE_BYTES:
                    print(f"  WARNING: MemAvailable fell to {mem_min / 2**30:.2f} GiB in this level: the servers "
                          f"were paging, its figures are not the scheduler's (run fewer policies at once)", flush=True)
                print(f"[{time.strftime('%H:%M:%S')}] {policy:>13} C={c:<3} qps {row['queries_per_s']:.2f} "
                      f"TTFT p50/p95 {row['ttft_p50_s']} / {row['ttft_p95_s']} s, tok p50/p95 "
                      f"{row['tok_lat_p50_ms']} / {row['tok_lat_p95_ms']} ms, pass {row['pass_frac']} "
                      f"(g=2: {row['pass_frac_g2']}), eff {row['eff_qps']}", flush=True)
    finally:
        for proc, _ in procs.values():
            stop_server(proc)
    rows.sort(key=lambda r: (policies.index(r["policy"]), r["clients"]))

    best = {}
    for policy in policies:
        prow = [r for r in rows if r["policy"] == policy]
        for key in ("eff_qps", "eff_qps_g2"):
            top = max(prow, key=lambda r: r[key] or 0)
            best.setdefault(policy, {})[key] = {"value": top[key], "clients": top["clients"]}
    meta = {"model": args.model or "embedded SmolLM2-135M-Instruct", "dtype": args.dtype,
            "workload": {"prompt_mix (weight:mean), sd = 0.3*mean, clipped >= 8": args.mix,
                         "out_mean (sd 0.3*mean, clipped >= 4)": args.out_mean, "token_ids": f"[100, {args.vocab})",
                         "seed": args.seed, "temperature": 0, "ignore_eos": True, "stream": True,
                         "requests_pool": len(reqs), "same_sequence_every_level_and_policy": True},
            "order": "all servers up at once; each client count runs every policy back to back",
            "clients": clients, "duration_s": args.duration,
            "warmup_s": f"max({args.warmup}, {args.warmup_per_client} x clients)",
            "sla": {**sla, "how": f"R = lone prefill rate / {args.sla_scale} (FastGen: 512 tok/s); g = lone "
                                  f"decode rate / {args.sla_scale} (FastGen: 2 tok/s, reported as *_g2)"},
            "servers": servers, "best_effective_qps": best,
            "total_runtime_s": round(time.time() - t_start, 1)}
    cols = ["policy", "clients", "queries_per_s", "ttft_p50_s", "ttft_p95_s", "ttft_max_s", "tok_lat_p50_ms",
            "tok_lat_p90_ms", "tok_lat_p95_ms", "tok_lat_p99_ms", "pass_frac", "eff_qps", "pass_frac_g2", "eff_qps_g2",
            "completed",
            "errors", "mem_avail_min_gib"]
    write_results(args.name, rows, meta, columns=cols)
    plot(rows, policies, RESULTS_DIR / args.plot, meta)
    print(json.dumps(best, indent=1))
    print(f"total runtime {time.time() - t_start:.0f} s")
    return 0


def plot(rows: list[dict], policies: list[str], path: Path, meta: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for policy in policies:
        pr = [r for r in rows if r["policy"] == policy]
        xs = [r["clients"] for r in pr]
        a1.plot(xs, [r["tok_lat_p95_ms"] for r in pr], "o-", label=policy)
        a2.plot(xs, [r["ttft_p95_s"] for r in pr], "o-", label=policy)
    for ax, title, unit in ((a1, "per-token latency P95", "ms"), (a2, "TTFT P95", "s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("closed-loop clients")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    mix = meta["workload"]["prompt_mix (weight:mean), sd = 0.3*mean, clipped >= 8"]
    fig.suptitle(f"tierlm serve, {meta['model']}, prompts {mix}"
                 f", out {meta['workload']['out_mean (sd 0.3*mean, clipped >= 4)']:.0f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
