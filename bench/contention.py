"""Batch-1 decode beside other work: tok/s alone and beside busy processes, per OpenMP setting.

One long-lived child per (model, variant), loaded once with that variant's environment (libgomp
reads it when torch loads it) and thread count; the parent then asks each child for one measurement
at a time, in interleaved rounds, alone or with ``--num-busy`` busy processes running
(``python -c "while True: pass"``, started once, stopped with SIGSTOP between their turns). One
measurement: a 32-token prompt, then ``--new-tokens`` greedy tokens (EOS ignored); decode tok/s =
(tokens - 1) / (last token time - first token time). Results: medians over ``--rounds`` rounds, and
each variant's busy/alone ratio of medians (the fair share beside two busy processes on two cores is
0.5: three runnable things... two of them ours, sharing the cores with two others).

    python bench/contention.py                                  # before (libgomp defaults) vs after (tierlm's)
    python bench/contention.py --variant passive:OMP_WAIT_POLICY=passive --variant one-thread::1 --name x
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

# the default model: its GGUF blocks, a float32 load, and its GGUF blocks behind `tierlm serve` (a streaming client)
MODELS = {"smollm2-gguf": {}, "smollm2-f32": {"dtype": "float32"}, "smollm2-gguf-serve": {}}
SERVE_ARGS = ["serve", "--port", "0", "--max-model-len", "256", "--max-num-batched-tokens", "256"]
# The server as the tierlm command started it before tierlm.runtime: torch (libgomp) loaded before the
# command runs, so prepare_openmp adds nothing and the variant's environment alone decides.
SERVE_CODE = "import sys, torch; from tierlm.cli import main; sys.exit(main(sys.argv[1:]))"
BUSY_CODE = "while True: pass"
PROMPT = list(range(1000, 1032))


@dataclass(frozen=True)
class Variant:
    """A way to start the engine: environment wait variables (``env``; the others are removed) and
    ``num_threads`` (None: tierlm's default)."""

    name: str
    env: dict[str, str]
    num_threads: int | None

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``NAME:VAR=VALUE,VAR=VALUE:THREADS`` (the last two parts optional)."""
        name, _, rest = text.partition(":")
        env_text, _, threads = rest.partition(":")
        env = dict(item.split("=", 1) for item in env_text.split(",") if item)
        return cls(name, env, int(threads) if threads else None)


def default_variants() -> list[Variant]:
    from tierlm.runtime import OPENMP_SETTINGS

    return [Variant("before", {}, None), Variant("after", dict(OPENMP_SETTINGS), None)]


# -- child: one engine, measuring on request ----------------------------------------------------------

def child_serve(num_threads: int | None, new_tokens: int) -> None:
    """A server in a grandchild process; each measurement streams one completion from it and times
    the tokens' arrival at the client (the event loop and HTTP included)."""
    import re

    import httpx

    args = SERVE_ARGS + ([] if num_threads is None else ["--num-threads", str(num_threads)])
    log = tempfile.NamedTemporaryFile("w+", suffix=".log")
    server = subprocess.Popen([sys.executable, "-c", SERVE_CODE, *args], stdout=log, stderr=subprocess.STDOUT)
    try:
        while (ready := re.search(r"serving \S+ on (http://\S+)", Path(log.name).read_text())) is None:
            if server.poll() is not None:
                raise RuntimeError(Path(log.name).read_text()[-3000:])
            time.sleep(0.2)
        url = ready.group(1) + "/completions"
        body = {"model": "x", "prompt": PROMPT, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "logprobs": 0}  # logprobs: an event for every token, also one with no text

        def stream_times(max_tokens: int) -> list[float]:
            times = []
            with httpx.stream("POST", url, json={**body, "max_tokens": max_tokens}, timeout=300) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        times.append(time.perf_counter())
            return times

        stream_times(8)  # warm-up
        print(json.dumps({"ready": True, "threads": num_threads or len(os.sched_getaffinity(0)),
                          "env": {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ}}),
              flush=True)
        for line in sys.stdin:
            if line.strip() != "go":
                break
            times = stream_times(new_tokens)
            print(json.dumps({"tok_s": (len(times) - 1) / (times[-1] - times[0])}), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)


def child(model: str, num_threads: int | None, new_tokens: int) -> None:
    if model.endswith("-serve"):
        child_serve(num_threads, new_tokens)
        return
    from tierlm import LLM, SamplingParams
    from tierlm.runtime import WAIT_VARIABLES

    kwargs = dict(MODELS[model], max_num_seqs=1, max_model_len=256, num_threads=num_threads)
    llm = LLM(**kwargs)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # warm-up
    import torch

    print(json.dumps({"ready": True, "threads": torch.get_num_threads(),
                      "env": {k: os.environ[k] for k in WAIT_VARIABLES if k in os.environ}}), flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        times = llm.generate(PROMPT, params)[0].metrics.token_times
        print(json.dumps({"tok_s": (len(times) - 1) / (times[-1] - times[0])}), flush=True)


# -- parent ---------------------------------------------------------------------------------------------

class Engine:
    """A child process serving measurements over its stdin/stdout."""

    def __init__(self, model: str, variant: Variant, new_tokens: int, log: Path):
        from tierlm.runtime import WAIT_VARIABLES

        env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
        env.update(variant.env)
        args = [sys.executable, __file__, "--child", model, "--new-tokens", str(new_tokens)]
        if variant.num_threads is not None:
            args += ["--threads", str(variant.num_threads)]
        self.log = log.open("w")
        self.proc = subprocess.Popen(args, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True)
        self.model, self.variant, self.log_path = model, variant, log

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.model}/{self.variant.name} exited:\n{self.log_path.read_text()[-3000:]}")
        return json.loads(line)

    def measure(self) -> float:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self.read()["tok_s"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        self.log.close()


class Busy:
    """``num`` busy processes, stopped (SIGSTOP) except while ``running()``."""

    def __init__(self, num: int):
        self.procs = [subprocess.Popen([sys.executable, "-c", BUSY_CODE]) for _ in range(num)]
        self._signal(signal.SIGSTOP)

    def _signal(self, sig: int) -> None:
        for p in self.procs:
            os.kill(p.pid, sig)

    def start(self) -> None:
        self._signal(signal.SIGCONT)
        time.sleep(0.3)  # let the scheduler spread them

    def stop(self) -> None:
        self._signal(signal.SIGSTOP)

    def close(self) -> None:
        self._signal(signal.SIGKILL)
        for p in self.procs:
            p.wait()


def measure_all(engines: list[Engine], busy: Busy, rounds: int) -> dict[tuple[str, str, str], list[float]]:
    """(model, variant, "alone"/"busy") -> tok/s of each round. Each round visits the engines in a
    rotated order and alternates which condition comes first, so drift hits every cell alike."""
    samples: dict[tuple[str, str, str], list[float]] = {}
    for r in range(rounds):
        order = engines[r % len(engines):] + engines[:r % len(engines)]
        for e in order:
            for condition in (("alone", "busy") if r % 2 == 0 else ("busy", "alone")):
                if condition == "busy":
                    busy.start()
                try:
                    tok_s = e.measure()
                finally:
                    busy.stop()
                samples.setdefault((e.model, e.variant.name, condition), []).append(tok_s)
                print(f"round {r + 1}/{rounds} {e.model:<13} {e.variant.name:<10} {condition:<5} {tok_s:6.1f} tok/s "
                      f"(load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    return samples


def rows_of(samples: dict, engines: list[Engine], ready: dict) -> list[dict]:
    rows = []
    for e in engines:
        alone, busy = (samples[(e.model, e.variant.name, c)] for c in ("alone", "busy"))
        info = ready[(e.model, e.variant.name)]
        rows.append({"model": e.model, "variant": e.variant.name,
                     "env": ",".join(f"{k}={v}" for k, v in info["env"].items()) or "(libgomp defaults)",
                     "threads": info["threads"], "alone_tok_s": statistics.median(alone),
                     "busy_tok_s": statistics.median(busy),
                     "busy_over_alone": statistics.median(busy) / statistics.median(alone),
                     "alone_all": [round(x, 2) for x in alone], "busy_all": [round(x, 2) for x in busy]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=MODELS, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, of: " + ", ".join(MODELS))
    p.add_argument("--variant", action="append", type=Variant.parse, default=[],
                   help="NAME:VAR=VALUE,...:THREADS (repeatable); default: before (libgomp defaults) and after "
                   "(tierlm.runtime.OPENMP_SETTINGS)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--num-busy", type=int, default=2)
    p.add_argument("--name", default="contention", help="results file name under bench/results/")
    a = p.parse_args()
    if a.child:
        child(a.child, a.threads, a.new_tokens)
        return
    from bench.common import write_results

    variants = a.variant or default_variants()
    logs = Path(tempfile.mkdtemp(prefix="tierlm-contention-"))
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    engines = [Engine(m, v, a.new_tokens, logs / f"{m}-{v.name}.log") for m in a.models.split(",") for v in variants]
    busy = None
    try:
        ready = {(e.model, e.variant.name): e.read() for e in engines}
        busy = Busy(a.num_busy)
        samples = measure_all(engines, busy, a.rounds)
    finally:
        if busy is not None:
            busy.close()
        for e in engines:
            e.close()
    rows = rows_of(samples, engines, ready)
    meta = {"rounds": a.rounds, "new_tokens": a.new_tokens, "num_busy": a.num_busy, "busy_code": BUSY_CODE,
            "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
            "elapsed_s": round(time.perf_counter() - t0, 1)}
    write_results(a.name, rows, meta, columns=["model", "variant", "env", "threads", "alone_tok_s", "busy_tok_s",
                                                "busy_over_alone", "alone_all", "busy_all"])
    for r in rows:
        print(f"{r['model']:<13} {r['variant']:<10} alone {r['alone_tok_s']:6.1f}  busy {r['busy_tok_s']:6.1f}  "
              f"ratio {r['busy_over_alone']:.2f}")


if __name__ == "__main__":
    main()
