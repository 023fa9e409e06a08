"""``tierlm serve`` end to end: real servers in subprocesses (loopback only) on the default SmolLM2,
driven by the official ``openai`` client and raw httpx; plus the engine thread's failure isolation
in-process on a fake model runner (no torch).

Two servers start together at module setup (loading overlaps): ``main`` (context 512 tokens) and
``tight`` (``--max-queue 1``). Every wait is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tierlm.engine.block_manager import BlockManager
from tierlm.engine.engine import EngineCore, SampledToken
from tierlm.engine.scheduler import SchedulerConfig
from tierlm.sampling_params import SamplingParams
from tierlm.serve.async_engine import AsyncEngine, EngineStepError, QueueFullError

REPO = Path(__file__).resolve().parents[1]
MAX_MODEL_LEN = 512
# A fixed step budget: these tests are about HTTP, and measuring the budget at start-up (serve's
# default "auto", tested in test_budget.py) takes minutes on a busy 2-core machine.
SERVER_ARGS = ("--port", "0", "--max-model-len", str(MAX_MODEL_LEN), "--max-num-batched-tokens", "256")
STARTUP_TIMEOUT_S = 120
CHAT = [{"role": "user", "content": "Name three colors."}]
READY = re.compile(r"tierlm\.serve: ready in [0-9.]+ s: serving (\S+) on (http://127\.0\.0\.1:[0-9]+)/v1$", re.M)


class Server:
    """``tierlm serve`` on a port the OS picks; ``base`` is the address its readiness line names."""

    def __init__(self, *args: str):
        self.base: str | None = None
        fd, self.log_path = tempfile.mkstemp(prefix="tierlm-serve-", suffix=".log")
        with os.fdopen(fd, "w") as log:  # the child keeps its own descriptor; output() opens the file anew
            self.proc = subprocess.Popen([sys.executable, "-m", "tierlm", "serve", *SERVER_ARGS, *args], cwd=REPO,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self) -> None:
        """Until the readiness line is logged, then /health must answer at the address it names."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while (ready := READY.search(self.output(tail=None))) is None:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no readiness line within {STARTUP_TIMEOUT_S} s:\n{self.output()}")
            time.sleep(0.2)
        self.base = ready.group(2)
        assert httpx.get(f"{self.base}/health", timeout=5).status_code == 200, self.output()

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key="x", max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        """sample name (with labels, e.g. 'x{finish_reason="stop"}') -> value"""
        text = httpx.get(f"{self.base}/metrics", timeout=5).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
        return out

    def output(self, tail: int | None = 4000) -> str:
        text = Path(self.log_path).read_text(errors="replace")
        return text if tail is None else text[-tail:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


@pytest.fixture(scope="module")
def servers():
    started = {"main": Server(), "tight": Server("--max-queue", "1")}
    try:
        for s in started.values():
            s.wait_ready()
        yield started
    finally:
        for s in started.values():
            s.stop()
    for name, s in started.items():
        assert "Traceback" not in s.output(), f"{name} server logged a traceback:\n{s.output()}"
        os.unlink(s.log_path)


@pytest.fixture(scope="module")
def server(servers) -> Server:
    return servers["main"]


def _wait_for(predicate, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


# -- generation -----------------------------------------------------------------------------------

def test_progress_and_readiness_lines(server):
    log = server.output(tail=None)
    ready = READY.search(log)
    assert ready.group(1) == "SmolLM2-135M-Instruct.Q4_1" and len(READY.findall(log)) == 1
    progress = [log.index(line) for line in ("tierlm: loading the default model", "tierlm: runtime: ",
                                             "tierlm: configuration:", "tierlm: loaded ")]
    assert progress == sorted(progress) and progress[-1] < ready.start(), log


def test_models_and_health(server):
    models = server.client().models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct.Q4_1"]
    assert httpx.get(f"{server.base}/health", timeout=5).json() == {"status": "ok"}


def test_tokenize_and_detokenize_speak_llama_server_and_vllm(server):
    """/tokenize takes llama-server's ``content`` or vLLM's ``prompt`` and counts as the completion
    endpoint does; /detokenize inverts it; bad bodies get 400 naming the field."""
    text = "The jury said it did find that"
    tok = httpx.post(f"{server.base}/tokenize", json={"content": text}, timeout=10).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == MAX_MODEL_LEN
    assert httpx.post(f"{server.base}/tokenize", json={"prompt": text}, timeout=10).json() == tok
    usage = server.client().completions.create(model="m", prompt=text, max_tokens=1, temperature=0).usage
    assert usage.prompt_tokens == tok["count"]
    pieces = httpx.post(f"{server.base}/tokenize", json={"content": text, "with_pieces": True}, timeout=10).json()
    assert [p["id"] for p in pieces["tokens"]] == tok["tokens"]
    assert "".join(p["piece"] for p in pieces["tokens"]).endswith(text)
    back = httpx.post(f"{server.base}/detokenize", json={"tokens": tok["tokens"]}, timeout=10).json()
    assert back["content"] == back["prompt"] and back["content"].endswith(text)
    plain = httpx.post(f"{server.base}/tokenize", json={"content": text, "add_special": False}, timeout=10).json()
    assert plain["tokens"] == tok["tokens"][len(tok["tokens"]) - plain["count"]:]  # at most a BOS less
    for path, body, param in (("/tokenize", {"content": "a", "prompt": "b"}, "content"),
                              ("/tokenize", {}, "content"),
                              ("/detokenize", {"tokens": [1, 10**9]}, "tokens"),
                              ("/detokenize", {"tokens": "abc"}, "tokens")):
        r = httpx.post(f"{server.base}{path}", json=body, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, body, r.text)


def test_chat_stream_matches_non_stream(server):
    client = server.client()
    whole = client.chat.completions.create(model="any", messages=CHAT, temperature=0, max_tokens=20)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("stop", "length")
    u = whole.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and 1 <= u.completion_tokens <= 20
    chunks = list(client.chat.completions.create(model="any", messages=CHAT, temperature=0, max_tokens=20,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == u.model_dump()


def test_completion_stream_matches_non_stream(server):
    client = server.client()
    whole = client.completions.create(model="any", prompt="The capital of France is", temperature=0, max_tokens=8)
    assert "Paris" in whole.choices[0].text
    assert whole.usage.completion_tokens == 8 and whole.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="any", prompt="The capital of France is", temperature=0,
                                            max_tokens=8, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_completion_token_id_prompt_and_logprobs(server):
    out = server.client().completions.create(model="any", prompt=[504, 3575, 282, 4649, 314], temperature=0,
                                             max_tokens=4, logprobs=2)
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 4
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(v <= 0 for v in lp.token_logprobs) and all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    chat = server.client().chat.completions.create(model="any", messages=CHAT, temperature=0, max_tokens=5,
                                                   logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)  # greedy picks the top one


def test_stop_strings(server):
    client = server.client()
    base = client.completions.create(model="any", prompt="1, 2, 3, 4,", temperature=0, max_tokens=12)
    text = base.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), text
    cut = client.completions.create(model="any", prompt="1, 2, 3, 4,", temperature=0, max_tokens=12,
                                    stop=[stop, "never appears"])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="any", prompt="1, 2, 3, 4,", temperature=0, max_tokens=12,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_seed_reproducible_and_penalties(server):
    client = server.client()
    kwargs = dict(model="any", messages=CHAT, temperature=1.0, top_p=0.9, max_tokens=16, seed=1234,
                  presence_penalty=0.5, frequency_penalty=0.5)
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    assert first and client.chat.completions.create(**kwargs).choices[0].message.content == first


def test_concurrent_clients_share_the_engine(server):
    """Four clients at once are batched by one engine loop; each gets its own greedy answer.

    Not always token for token the answer it gets alone: the default model runs its GGUF blocks as
    stored, and a product of up to 8 rows rounds the activations to int8 (as llama.cpp's kernels do)
    while a larger one does not, so a prompt's numerics depend on what shares its step and greedy
    answers can part at a near-tie ("Paris.\n\nThe United States" alone, "Paris.\n\nThe answer" in a
    batch). Requests that mixed would differ from the first token: each concurrent answer starts as
    its alone answer does, and the four differ."""
    prompts = ["The capital of France is", "1, 2, 3,", "My favourite food is", "def add(a, b):"]

    def ask(prompt: str) -> str:
        return server.client().completions.create(model="any", prompt=prompt, temperature=0,
                                                  max_tokens=12).choices[0].text

    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts, timeout=60))
    assert all(len(a) >= 8 and t[:8] == a[:8] for t, a in zip(together, alone)), (together, alone)
    assert len(set(alone)) == len(set(together)) == len(prompts)


# -- errors ---------------------------------------------------------------------------------------

def test_bad_requests_get_400_naming_the_field(server):
    client = server.client()
    cases = [(dict(messages=CHAT, temperature=-1), "temperature"), (dict(messages=CHAT, n=2), "n"),
             (dict(messages=CHAT, max_tokens=0), "max_tokens"), (dict(messages=[]), "messages")]
    for kwargs, field in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="any", **kwargs)
        assert info.value.status_code == 400 and info.value.param == field, (kwargs, info.value.body)
    for body, field in [({"model": "any"}, "messages"), ({"messages": "hi"}, "messages"),
                        ({"messages": CHAT, "temperature": "hot"}, "temperature")]:
        r = httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{server.base}/v1/completions", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text


def test_prompt_longer_than_context_gets_400(server):
    with pytest.raises(openai.BadRequestError) as info:
        server.client().completions.create(model="any", prompt="hello " * (MAX_MODEL_LEN + 10), max_tokens=4)
    assert info.value.param == "prompt" and "context" in info.value.message


# -- robustness -----------------------------------------------------------------------------------

@contextlib.contextmanager
def _long_stream(base: str, num_events: int):
    """A long streaming completion, open after ``num_events`` data events; leaving closes it mid-stream."""
    body = {"model": "any", "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{base}/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = (line for line in response.iter_lines() if line.startswith("data: {"))
        for _ in range(num_events):
            json.loads(next(events)[len("data: "):])
        yield response


def test_disconnect_mid_stream_frees_blocks(server):
    with _long_stream(server.base, 3):
        during = server.metrics()
    assert during["tierlm_kv_blocks_used"] > 0 and during["tierlm_num_requests_running"] == 1
    assert _wait_for(lambda: server.metrics()["tierlm_kv_blocks_used"] == 0), server.metrics()
    after = server.metrics()
    assert after["tierlm_num_requests_running"] == 0 and after["tierlm_num_requests_waiting"] == 0
    assert after['tierlm_requests_finished_total{finish_reason="abort"}'] >= 1


def test_metrics_count_tokens_and_latencies(server):
    before = server.metrics()
    server.client().completions.create(model="any", prompt="Hello", temperature=0, max_tokens=5,
                                      extra_body={"ignore_eos": True})
    after = server.metrics()
    assert after["tierlm_generation_tokens_total"] - before["tierlm_generation_tokens_total"] == 5
    assert after["tierlm_prompt_tokens_total"] > before["tierlm_prompt_tokens_total"]
    assert after["tierlm_time_to_first_token_seconds_count"] == before["tierlm_time_to_first_token_seconds_count"] + 1
    assert after["tierlm_inter_token_latency_seconds_count"] == before["tierlm_inter_token_latency_seconds_count"] + 4
    # the prompt in one step that samples the first token, then one decode step per token
    assert after["tierlm_engine_step_seconds_count"] == before["tierlm_engine_step_seconds_count"] + 5
    assert after["tierlm_engine_step_seconds_sum"] > before["tierlm_engine_step_seconds_sum"]
    assert after['tierlm_requests_finished_total{finish_reason="length"}'] >= 1
    assert after["tierlm_kv_blocks_free"] > 0


def test_full_queue_gets_429(servers):
    tight = servers["tight"]
    with _long_stream(tight.base, 1), pytest.raises(openai.RateLimitError) as info:
        tight.client().completions.create(model="any", prompt="Hi", max_tokens=2)
    assert info.value.status_code == 429 and info.value.code == "rate_limit_exceeded"

    def accepted() -> bool:
        try:
            return bool(tight.client().completions.create(model="any", prompt="Hi", max_tokens=2).choices)
        except openai.RateLimitError:
            return False

    assert _wait_for(accepted, timeout_s=5)


# -- engine thread, in-process --------------------------------------------------------------------

class _PoisonRunner:
    """Samples token 7 for everyone; raises when a scheduled request's prompt starts with 666."""

    def execute(self, out):
        if any(c.request.prompt_token_ids[0] == 666 for c in out.chunks):
            raise RuntimeError("poisoned batch")
        return {c.request.request_id: SampledToken(7) for c in out.chunks if c.samples}

    def release(self, request_id: str) -> None:
        pass


def test_failing_step_fails_only_its_requests():
    core = EngineCore(SchedulerConfig(max_num_seqs=1), BlockManager(16, 4), _PoisonRunner(), max_model_len=32)
    engine = AsyncEngine(core, max_queue=2)
    engine.start()

    async def run(prompt: list[int]) -> list[int]:
        stream = await engine.add_request(prompt, SamplingParams(max_tokens=3))
        outs = [out async for out in stream]
        return outs[-1].token_ids

    async def main():
        # max_num_seqs=1: the poisoned request runs alone, so only its step fails.
        results = await asyncio.wait_for(asyncio.gather(run([666, 1]), run([1, 2]), return_exceptions=True), 10)
        await asyncio.sleep(0.1)  # the engine thread publishes its gauges before it goes idle
        used = engine.metrics.registry.get_sample_value("tierlm_kv_blocks_used")
        held = [await engine.add_request([3], SamplingParams(max_tokens=30)) for _ in range(2)]
        with pytest.raises(QueueFullError):
            await engine.add_request([3], SamplingParams(max_tokens=30))
        for stream in held:
            stream.close()
        return results, used

    try:
        (poisoned, healthy), used = asyncio.run(main())
    finally:
        engine.shutdown()
    assert isinstance(poisoned, EngineStepError) and healthy == [7, 7, 7]
    assert used == 0 and not engine.is_alive
    assert engine.metrics.registry.get_sample_value("tierlm_requests_finished_total", {"finish_reason": "error"}) == 1
