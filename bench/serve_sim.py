"""bench/serve.py's closed loop, simulated: the real scheduler (tierlm.engine, no torch) against a
step-cost model instead of a model, so that scheduling choices can be compared in seconds.

Each step costs fixed + per_token * tokens + per_pair * query-key pairs (tierlm.engine.budget.StepCost),
times log-normal noise of --noise (this machine's steps vary by 10-30%). The workload, the SLA and the
pass rule are bench/serve.py's: prompt lengths from a mixture of Normal(mean, 0.3 mean), outputs
Normal(out, 0.3 out), C clients each sending its next request when the last one finishes; a request
passes if its TTFT <= L / R and its token i (first = 0) comes within i / g s of its first, and one
still in flight at the end fails if a deadline has already passed (as bench/serve.py scores it: before
aging was added, the simulation scored only finished requests, so a starved prompt never counted).

The step costs and the SLA default to what bench/serve.py and bench/step_cost.py measured here
(serve_*_final.md, step_cost*.md); the simulation says which policy should win, not by how much a
real run will: it leaves out the server's own overhead (tokenizing, streaming, the event loop).

Each splitfuse policy runs with prompts in arrival order and, as ``*_shortest``, fewest prompt tokens
left first (``SchedulerConfig.prompt_order``).

    python bench/serve_sim.py --model llama11b --noise 0.15 --margins 1.2,1.5,2
    python bench/serve_sim.py --model llama11b --clients 4,8,16,32 --margins 1.5 --agings R,8   # aging
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import write_results

import tierlm.engine.scheduler as scheduler_module
from tierlm.engine.block_manager import BlockManager
from tierlm.engine.budget import StepCost
from tierlm.engine.request import FinishReason, Request, RequestMetrics
from tierlm.engine.scheduler import Scheduler, SchedulerConfig
from tierlm.sampling_params import SamplingParams

# Measured here. cost: StepCost coefficients (ms) fitted to bench/results/step_cost*.md, pair term from
# `tierlm serve --slo-tokens-per-s` start-up logs; budget: the auto budget serve measured; R, g: the SLA
# of serve_*_final.md.
MODELS = {
    "llama11b": {"cost": StepCost(220.0, 7.8, 1.3e-3), "budget": 40, "mix": [(0.5, 512), (0.5, 64)], "out": 32,
                 "R": 32.0, "g": 1.41},
    "smollm2": {"cost": StepCost(40.0, 1.0, 5.5e-4), "budget": 63, "mix": [(0.5, 1000), (0.5, 128)], "out": 64,
                "R": 205.0, "g": 5.27},
}


def make_requests(model: dict, n: int, seed: int) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) for n requests."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        u, acc, mean = rng.random(), 0.0, model["mix"][-1][1]
        for w, m in model["mix"]:
            acc += w
            if u <= acc:
                mean = m
                break
        out.append((max(8, int(rng.gauss(mean, 0.3 * mean))), max(4, int(rng.gauss(model["out"], 0.3 * model["out"])))))
    return out


def simulate(model: dict, policy: str, clients: int, duration: float, warmup: float, noise: float,
             slo: bool = False, margin: float = scheduler_module.SLO_COST_MARGIN, seed: int = 0,
             prompt_order: str = "fcfs", aging: float | None = None) -> dict:
    """One level: C closed-loop clients for ``duration`` simulated seconds; requests that arrive after
    ``warmup`` are scored. Returns queries/s, pass fraction, effective queries/s and P95 token gap."""
    cost: StepCost = model["cost"]
    splitfuse = policy != "prefill_first"
    cfg = SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=model["budget"] if splitfuse else 4096,
                          policy="splitfuse" if splitfuse else "prefill_first",
                          max_num_prefill_tokens=2048 if splitfuse else None,
                          slo_tokens_per_s=model["g"] if slo else None, step_cost=cost if slo else None,
                          prompt_order=prompt_order if splitfuse else "fcfs", prompt_aging_tokens_per_s=aging)
    now = 0.0
    sched = Scheduler(cfg, BlockManager(4096, 16), clock=lambda: now)
    pool, noise_rng, done, num_sent = make_requests(model, 4000, seed), random.Random(seed + 1), [], 0

    def send(t: float) -> None:
        nonlocal num_sent
        num_prompt, num_out = pool[num_sent % len(pool)]
        num_sent += 1
        sched.add(Request(f"r{num_sent}", list(range(num_prompt)), SamplingParams(max_tokens=num_out),
                          metrics=RequestMetrics(arrival_time=t)))

    saved = scheduler_module.SLO_COST_MARGIN
    scheduler_module.SLO_COST_MARGIN = margin  # read by Scheduler._step_budget at each step
    try:
        for _ in range(clients):
            send(0.0)
        while now < duration:
            out = sched.schedule()
            ms = cost.fixed_ms + sum(cost.chunk_ms(c.start, c.num_new_tokens) for c in out.chunks)
            now += ms / 1000 * (noise_rng.lognormvariate(0.0, noise) if noise else 1.0)
            sched.commit(out)
            for c in out.chunks:
                r = c.request
                if not c.samples:
                    continue
                r.output_token_ids.append(1)
                if r.metrics.first_token_time is None:
                    r.metrics.first_token_time = now
                r.metrics.token_times.append(now)
                if r.num_output_tokens >= r.params.max_tokens:
                    sched.finish(r, FinishReason.LENGTH)
                    done.append(r)
                    send(now)
    finally:
        scheduler_module.SLO_COST_MARGIN = saved
    scored = [r for r in done if r.metrics.arrival_time >= warmup]
    gaps = sorted(b - a for r in scored for a, b in zip(r.metrics.token_times, r.metrics.token_times[1:]))

    def verdict(r: Request) -> bool | None:
        """bench/serve.py's rule: True passed, False missed a deadline (by the end), None undecided: a
        request still in flight counts once a deadline has passed, so a starved prompt is a failure."""
        due = r.metrics.arrival_time + len(r.prompt_token_ids) / model["R"]
        t0 = r.metrics.first_token_time
        if t0 is None:
            return False if now > due else None
        if t0 > due or any(t - t0 > i / model["g"] + 1e-9 for i, t in enumerate(r.metrics.token_times)):
            return False
        if r.num_output_tokens >= r.params.max_tokens:
            return True
        return False if now > t0 + len(r.metrics.token_times) / model["g"] else None

    window = [r for r in [*done, *sched.running, *sched.waiting] if r.metrics.arrival_time >= warmup]
    decided = [v for v in map(verdict, window) if v is not None]
    num_passed, num_decided = sum(decided), len(decided)
    qps = len(scored) / (duration - warmup)
    frac = num_passed / num_decided if num_decided else 0.0
    # Starvation shows in the long prompts' waits: the longest TTFT of any request, scored or not (one
    # still waiting when the run ends counts its wait so far), over the deadline of its prompt.
    waits = [((r.metrics.first_token_time or now) - r.metrics.arrival_time, len(r.prompt_token_ids))
             for r in window]
    worst = max(waits, default=(0.0, 1))
    return {"queries_per_s": round(qps, 4), "pass_frac": round(frac, 3), "eff_qps": round(qps * frac, 4),
            "tok_lat_p95_ms": round(1000 * gaps[int(0.95 * (len(gaps) - 1))], 1) if gaps else None,
            "ttft_max_s": round(worst[0], 1), "ttft_max_over_deadline": round(worst[0] * model["R"] / worst[1], 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="llama11b")
    ap.add_argument("--clients", default="2,4,8")
    ap.add_argument("--noise", type=float, default=0.15, help="sd of the log-normal factor on each step's cost")
    ap.add_argument("--margins", default="1.2,1.5,2", help="SLO_COST_MARGIN values for splitfuse_slo")
    ap.add_argument("--agings", default="", help="comma-separated prompt_aging_tokens_per_s values (R: the SLA's "
                    "prefill rate) for the *_shortest policies, each also run as *_shortest_aged")
    ap.add_argument("--duration", type=float, default=600.0, help="simulated seconds per level")
    ap.add_argument("--warmup", type=float, default=60.0)
    ap.add_argument("--name", default=None, help="results name (default: serve_sim_<model>)")
    args = ap.parse_args()
    model = MODELS[args.model]
    agings = [model["R"] if a == "R" else float(a) for a in args.agings.split(",") if a]
    rows = []
    for c in (int(x) for x in args.clients.split(",")):
        base = simulate(model, "prefill_first", c, args.duration, args.warmup, args.noise)
        runs = [("prefill_first", None, base)]
        for order, suffix in (("fcfs", ""), ("shortest", "_shortest")):
            runs.append(("splitfuse" + suffix, None, simulate(model, "splitfuse", c, args.duration, args.warmup,
                                                              args.noise, prompt_order=order)))
            runs += [("splitfuse_slo" + suffix, m, simulate(model, "splitfuse", c, args.duration, args.warmup,
                                                            args.noise, True, m, prompt_order=order))
                     for m in (float(x) for x in args.margins.split(","))]
        for a in agings:
            runs.append(("splitfuse_shortest_aged", None, simulate(model, "splitfuse", c, args.duration, args.warmup,
                                                                   args.noise, prompt_order="shortest", aging=a), a))
            runs += [("splitfuse_slo_shortest_aged", m,
                      simulate(model, "splitfuse", c, args.duration, args.warmup, args.noise, True, m,
                               prompt_order="shortest", aging=a), a)
                     for m in (float(x) for x in args.margins.split(","))]
        for policy, margin, res, *aged in runs:
            ratio = res["eff_qps"] / base["eff_qps"] if base["eff_qps"] else None
            rows.append({"policy": policy, "margin": margin if margin is not None else "-",
                         "aging": aged[0] if aged else "-", "clients": c, **res,
                         "eff_vs_prefill_first": round(ratio, 2) if ratio is not None else None})
            print(f"C={c} {policy:>14} margin {rows[-1]['margin']!s:>4} aging {rows[-1]['aging']!s:>5}: eff "
                  f"{res['eff_qps']:.3f} ({rows[-1]['eff_vs_prefill_first']}x), pass {res['pass_frac']}, P95 "
                  f"{res['tok_lat_p95_ms']} ms, max TTFT {res['ttft_max_s']} s "
                  f"({res['ttft_max_over_deadline']}x its deadline)")
    meta = {"model": f"{args.model} (simulated: step cost {model['cost']})", "noise_sd": args.noise,
            "sla": {"R_tok_per_s": model["R"], "g_tok_per_s": model["g"]}, "budget": model["budget"],
            "duration_s": args.duration, "warmup_s": args.warmup}
    write_results(args.name or f"serve_sim_{args.model}", rows, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
