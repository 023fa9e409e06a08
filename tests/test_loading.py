"""Checkpoint loading: memory use while loading, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tierlm import LLM
from tierlm.loader.checkpoint import CheckpointError
from tierlm.model.spec import UnknownArchitectureError


@pytest.fixture(scope="module")
def mid_llama(tmp_path_factory):
    """A ~200 MB float32 Llama (53M parameters): big enough that fixed overheads do not hide a copy."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=8000, hidden_size=768, intermediate_size=2560, num_hidden_layers=8,
                                   num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("mid-llama")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(folder, max_shard_size="60MB")  # several shards, like real checkpoints
    num_params = sum(p.numel() for p in model.parameters())
    del model
    return folder, num_params


_MEASURE = textwrap.dedent("""
    import json, sys
    import torch
    from tierlm import LLM

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    before = status("VmRSS:")
    llm = LLM(sys.argv[1], dtype=sys.argv[2], kv_cache_tokens=2048, max_model_len=2048)
    print(json.dumps({"before": before, "peak": status("VmHWM:")}))
""")


@pytest.mark.parametrize("dtype,elem", [("float32", 4), ("bfloat16", 2)])
def test_peak_rss_while_loading_stays_under_1_3x_model_bytes(mid_llama, dtype, elem):
    folder, num_params = mid_llama
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(folder), dtype], capture_output=True, text=True,
                         check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    model_bytes = num_params * elem
    grew = m["peak"] - m["before"]
    assert grew <= 1.3 * model_bytes, f"peak grew {grew / 2**20:.0f} MiB for a {model_bytes / 2**20:.0f} MiB model"


def test_missing_path_and_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        LLM(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        LLM(tmp_path)


def test_truncated_and_corrupt_safetensors(hf_model, tmp_path):
    _, folder = hf_model("llama")
    for name in ("config.json",):
        (tmp_path / name).write_text((folder / name).read_text())
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        LLM(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        LLM(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        LLM(tmp_path)


def test_missing_and_unexplained_tensors(hf_model, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = hf_model("llama")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_file(missing, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="lacks tensor 'layer.up' of layer 1"):
        LLM(tmp_path)
    extra = dict(tensors)
    extra["model.layers.0.mystery.weight"] = torch.zeros(3)
    save_file(extra, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="does not describe checkpoint tensors: model.layers.0.mystery"):
        LLM(tmp_path)


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"], "model_type": "foo"}))
    with pytest.raises(UnknownArchitectureError, match="FooForCausalLM.*known families: gemma3, gpt2, llama"):
        LLM(tmp_path)


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGML" + b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        LLM(bad)
    bad.write_bytes((0x46554747).to_bytes(4, "little") + (3).to_bytes(4, "little") + (1).to_bytes(8, "little")
                    + (5).to_bytes(8, "little"))
    with pytest.raises(CheckpointError, match="truncated GGUF|corrupt or truncated"):
        LLM(bad)
