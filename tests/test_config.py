"""The config tree (tierlm.config), its flat view (tierlm.engine_args) and the CLI flags generated from it:
one field per flag and back, and every invalid setting rejected before a weight is read, naming it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from tierlm import cli
from tierlm.config import GROUPS, ConfigError, TierlmConfig
from tierlm.engine_args import EngineArgs, flag_of, from_cli_args

REPO = Path(__file__).resolve().parents[1]
ENGINE_COMMANDS = ("generate", "chat", "serve", "info", "perplexity", "imatrix")
NOT_SETTABLE = {("scheduler", "step_cost")}  # measured at start-up, never typed by a user


def _subparser(name: str):
    return cli.build_parser()._subparsers._group_actions[0].choices[name]


def _engine_actions(name: str) -> dict[str, object]:
    """dest -> action of the engine flags of command ``name``."""
    names = {f.name for f in fields(EngineArgs)}
    return {a.dest: a for a in _subparser(name)._actions if a.dest in names}


def test_every_engine_arg_is_one_config_field_and_every_field_one_arg():
    targets = {}
    for f in fields(EngineArgs):
        group, attr = f.metadata["group"], f.metadata["attr"] or f.name
        assert attr in {g.name for g in fields(GROUPS[group])}, (f.name, group, attr)
        assert (group, attr) not in targets, f"{f.name} and {targets[(group, attr)]} set the same field"
        targets[(group, attr)] = f.name
    every = {(g, f.name) for g, cls in GROUPS.items() for f in fields(cls)}
    assert every - set(targets) == NOT_SETTABLE


@pytest.mark.parametrize("command", ENGINE_COMMANDS)
def test_every_engine_arg_is_one_flag_of_every_command(command):
    actions = _engine_actions(command)
    assert set(actions) == {f.name for f in fields(EngineArgs)}
    for name, action in actions.items():
        expected = [] if name == "model" else [flag_of(name)]
        assert [o for o in action.option_strings if not o.startswith("--no-")] == expected, name


def test_flags_round_trip_through_the_config_tree():
    argv = ["generate", "m.gguf", "--dtype", "bfloat16", "--max-model-len", "512", "--spec-dir", "a", "--spec-dir",
            "b", "--block-size", "32", "--kv-cache-tokens", "4096", "--kv-quant", "q8", "--max-num-seqs", "4",
            "--max-num-batched-tokens", "auto", "--max-num-prefill-tokens", "1024", "--no-enable-chunked-prefill",
            "--prompt-order", "shortest", "--prompt-aging", "8", "--slo-tokens-per-s", "4",
            "--weight-memory", "25%", "--device-memory", "1GiB", "--prefetch-window", "2", "--tier-locking",
            "whole_layer", "--tier-order", "ffn_first", "--num-io-threads", "2", "--store-dir", "/tmp/s",
            "--quant", "q4", "--quant-group", "32", "--quant-method", "rtn", "--quant-int8-prompts",
            "--no-fused-decode", "--num-threads", "1", "--chat-template", "chatml"]
    args = cli.build_parser().parse_args(argv)
    engine_args = from_cli_args(args)
    config = engine_args.create_config()
    back = {}
    for f in fields(EngineArgs):
        back[f.name] = getattr(getattr(config, f.metadata["group"]), f.metadata["attr"] or f.name)
    assert EngineArgs(**back) == engine_args
    assert config.model.spec_dirs == ("a", "b") and config.scheduler.policy == "splitfuse"
    assert config.tiers.weight_memory == "25%" and config.quant.quant_int8_prompts
    assert not config.runtime.fused_decode and not config.scheduler.enable_chunked_prefill


def test_commands_set_their_own_defaults_without_touching_the_others():
    parser = cli.build_parser()
    assert parser.parse_args(["serve"]).max_num_batched_tokens == "auto"
    assert parser.parse_args(["chat"]).max_num_seqs == 1
    assert parser.parse_args(["generate"]).max_num_batched_tokens == 2048
    assert parser.parse_args(["info"]).max_num_seqs == 16


# Every setting the old LLM / EngineConfig / CLI rejected, and the new ones, as (settings, field, fragment).
INVALID = [
    (dict(dtype="float16"), "dtype", "dtype must be one of"),
    (dict(device="tpu"), "device", "cpu, cuda or cuda:N"),
    (dict(max_model_len=0), "max_model_len", "max_model_len must be >= 1"),
    (dict(block_size=0), "block_size", "block_size must be >= 1"),
    (dict(kv_cache_tokens=-5), "kv_cache_tokens", "kv_cache_tokens must be >= 1"),
    (dict(kv_quant="q2"), "kv_quant", "kv_quant must be one of"),
    (dict(max_num_seqs=0), "max_num_seqs", "max_num_seqs must be >= 1"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens", "must be >= 1"),
    (dict(max_num_batched_tokens="lots"), "max_num_batched_tokens", "must be an integer"),
    (dict(max_num_prefill_tokens=0), "max_num_prefill_tokens", "must be >= 1"),
    (dict(scheduling_policy="lifo"), "scheduling_policy", "must be one of"),
    (dict(prompt_order="longest"), "prompt_order", "prompt_order must be one of"),
    (dict(prompt_order="shortest", scheduling_policy="prefill_first"), "prompt_order", "splitfuse policy only"),
    (dict(prompt_aging_tokens_per_s=4.0), "prompt_aging_tokens_per_s", "prompt_order='shortest' only"),
    (dict(prompt_order="shortest", prompt_aging_tokens_per_s=float("inf")), "prompt_aging_tokens_per_s",
     "finite number > 0"),
    (dict(slo_tokens_per_s=5.0), "slo_tokens_per_s", "measured step_cost"),
    (dict(slo_tokens_per_s=0.0, max_num_batched_tokens="auto"), "slo_tokens_per_s", "finite number > 0"),
    (dict(slo_tokens_per_s=5.0, max_num_batched_tokens="auto", scheduling_policy="prefill_first"),
     "slo_tokens_per_s", "splitfuse policy only"),
    (dict(weight_memory="lots"), "weight_memory", "is not a size"),
    (dict(weight_memory=-1), "weight_memory", ">= 0 bytes"),
    (dict(device_memory="1 GB of it"), "device_memory", "is not a size"),
    (dict(prefetch_window=-1), "prefetch_window", "integer >= 0"),
    (dict(tier_locking="some"), "tier_locking", "must be one of"),
    (dict(tier_order="random"), "tier_order", "must be one of"),
    (dict(num_io_threads=0), "num_io_threads", "must be >= 1"),
    (dict(quant="q9"), "quant", "quant must be one of"),
    (dict(quant="gguf", model="folder"), "quant", "not a .gguf file"),
    (dict(quant="q4", quant_group=48), "quant_group", "multiple of 32"),
    (dict(quant="gguf", quant_method="gptq"), "quant_method", "produces a tierlm format"),
    (dict(quant_method="awq"), "quant_method", "must be one of"),
    (dict(quant_importance="im.safetensors"), "quant_importance", "tierlm format"),
    (dict(quant="q4", quant_method="gptq", quant_importance="im.safetensors"), "quant_importance",
     "computes its own importance"),
    (dict(num_threads=0), "num_threads", "must be >= 1"),
    (dict(max_model_len=1024, kv_cache_tokens=512), "kv_cache_tokens", "cannot hold one sequence"),
]


@pytest.mark.parametrize("settings,field,fragment", INVALID, ids=[c[1] + "-" + str(i) for i, c in enumerate(INVALID)])
def test_invalid_settings_are_rejected_naming_the_field(settings, field, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        EngineArgs.from_kwargs(**settings).create_config()
    assert info.value.field == field and field in str(info.value)


def test_unknown_keyword_names_the_nearest_setting():
    with pytest.raises(ConfigError, match="did you mean 'max_model_len'") as info:
        EngineArgs.from_kwargs(max_model_length=5)
    assert info.value.field == "max_model_length"


@pytest.fixture
def no_weights_read(monkeypatch):
    """Fail the test if any weight is read: the checks under test must all come before that."""
    from tierlm import builder

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the settings were checked")

    monkeypatch.setattr(builder, "load_weights_stage", refuse)


def test_checks_that_need_the_checkpoint_come_before_its_weights(no_weights_read):
    from tierlm import LLM

    with pytest.raises(ConfigError, match="exceeds the model's context of 8192 positions") as info:
        LLM(max_model_len=10_000)
    assert info.value.field == "max_model_len"
    with pytest.raises(ConfigError, match="cannot hold one sequence") as info:
        LLM(kv_cache_tokens=100)  # the model's whole context by default
    assert info.value.field == "kv_cache_tokens"


def test_cuda_without_a_device_is_named(no_weights_read):
    from tierlm import LLM

    if sys.modules["torch"].cuda.is_available():
        pytest.skip("this machine has CUDA")  # the check is for machines without it
    with pytest.raises(ConfigError, match="torch sees no CUDA device") as info:
        LLM(device="cuda")
    assert info.value.field == "device"


def test_describe_lists_every_group_and_field():
    text = TierlmConfig().describe()
    for name, cls in GROUPS.items():
        line = next(line for line in text.splitlines() if line.startswith(name + ":"))
        assert all(f"{f.name}=" in line for f in fields(cls))


# -- first contact: the command line ----------------------------------------------------------------

def _tierlm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m tierlm ARGS`` with a probe that reports whether torch was imported."""
    code = ("import sys, json, runpy; sys.argv = ['tierlm', *json.loads(sys.argv[1])]\n"
            "try:\n    runpy.run_module('tierlm', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr); raise\n")
    return subprocess.run([sys.executable, "-c", code, json.dumps(list(args))], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


def _one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    *lines, probe = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) == 1 and lines[0].startswith("tierlm: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return probe


def test_help_does_not_import_torch():
    proc = _tierlm("--help")
    assert proc.returncode == 0 and "generate" in proc.stdout
    assert proc.stderr.strip() == "NO-TORCH"
    proc = _tierlm("serve", "--help")
    assert proc.returncode == 0 and "--weight-memory" in proc.stdout and proc.stderr.strip() == "NO-TORCH"


@pytest.mark.parametrize("argv,fragments", [
    (["generate", "--weight-memory", "lots"], ["argument --weight-memory", "'lots' is not a size"]),
    (["serve", "--device", "tpu"], ["argument --device", "cpu, cuda or cuda:N"]),
    (["generate", "--temperature", "inf", "--prompt", "x"], ["argument --temperature", "finite"]),
    (["chat", "--top-p", "nan"], ["argument --top-p"]),
    (["serve", "--prompt-aging", "3"], ["argument --prompt-aging", "prompt_order='shortest'"]),
    (["generate", "--quant", "gguf", "--quant-method", "gptq", "--prompt", "x"], ["argument --quant-method"]),
    (["generate", "--quant-group", "40", "--quant", "q4", "--prompt", "x"], ["argument --quant-group"]),
])
def test_bad_arguments_fail_before_torch_with_the_flag_named(argv, fragments):
    assert _one_line_error(_tierlm(*argv), *fragments) == "NO-TORCH"


def test_argparse_rejects_malformed_numbers_naming_the_flag():
    for argv, flag in ((["generate", "--max-model-len", "many"], "--max-model-len"),
                       (["serve", "--port", "70000"], "--port"),
                       (["serve", "--max-num-batched-tokens", "0"], "--max-num-batched-tokens")):
        proc = _tierlm(*argv)
        assert proc.returncode == 2 and flag in proc.stderr and "Traceback" not in proc.stderr


def test_context_beyond_the_model_is_refused_before_loading():
    # the checkpoint's header is read (that is where the context is), its weights are not: no torch
    # module is needed for that either, but the check runs in the builder, after torch is imported
    proc = _tierlm("generate", "--max-model-len", "100000", "--prompt", "x")
    _one_line_error(proc, "argument --max-model-len", "exceeds the model's context of 8192 positions")


def test_a_port_in_use_is_refused_before_loading():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        proc = _tierlm("serve", "--port", str(port))
    assert _one_line_error(proc, "argument --port", f"127.0.0.1:{port}", "in use") == "NO-TORCH"
