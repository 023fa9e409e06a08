"""First contact: ``tierlm info`` reads metadata only (no torch, no tokenizer built), and the facts it
reads equal those of the tokenizer the engine builds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from safetensors.numpy import save_file
from tokenizers.models import BPE

from tierlm.commands.info import read_header
from tierlm.loader.model_loader import default_model_path
from tierlm.loader.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
LLAMA_CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=6, hidden_size=16,
                    intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                    max_position_embeddings=64, rms_norm_eps=1e-6)

# `tierlm info ARGS` in a process where building a tokenizer raises; prints which heavy modules came in.
PROBE = """
import json, sys
from tierlm.loader.tokenizer import Tokenizer
def refuse(*args, **kwargs):
    raise AssertionError("info built a tokenizer")
Tokenizer.from_gguf = Tokenizer.from_hf_dir = classmethod(refuse)
from tierlm.cli import main
rc = main(json.loads(sys.argv[1]))
print("MODULES", rc, " ".join(m for m in ("torch", "gguf") if m in sys.modules))
"""


def _info(*args: str) -> tuple[dict[str, str], str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(["info", *args])], capture_output=True, text=True,
                          cwd=REPO, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    *rows, probe = proc.stdout.strip().splitlines()
    return dict(line.split(None, 1) for line in rows if not line.startswith("bytes")), probe


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A one-layer Llama folder whose tokenizer has 4 pieces and 2 special tokens, none of them built here."""
    folder = tmp_path_factory.mktemp("hf")
    (folder / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    tensors = {"model.embed_tokens.weight": np.zeros((6, 16), np.float32),
               "model.layers.0.mlp.down_proj.weight": np.zeros((16, 32), np.float16)}
    save_file(tensors, str(folder / "model.safetensors"))
    tok = tokenizers.Tokenizer(BPE({"a": 0, "b": 1, "c": 2, "d": 3}, []))
    tok.add_special_tokens(["<s>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "d"}}))
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    return folder


def test_info_reads_metadata_only_gguf():
    fields, probe = _info()
    assert probe == "MODULES 0 gguf"  # no torch; gguf: tierlm.loader.gguf's tensor sizes
    assert fields["architecture"].startswith("llama: 30 layers")
    assert fields["tokenizer"] == "vocab 49152, bos 1 '<|im_start|>', eos 2 '<|im_end|>', 0 '<|endoftext|>', " \
                                  "chat template yes"
    assert fields["source"] == "gguf; tensor types: Q4_1 x210, F32 x61, Q8_0 x1"


def test_info_reads_metadata_only_hf(hf_folder):
    fields, probe = _info(str(hf_folder))
    assert probe == "MODULES 0"
    assert fields["source"] == "hf; tensor types: float32 x1, float16 x1"
    assert fields["parameters"] == "608 (0.0 M)"
    # eos: tokenizer_config's, then the added end-of-turn token
    assert fields["tokenizer"] == "vocab 6, bos 4 '<s>', eos 3 'd', 5 '<|im_end|>', chat template yes"


def test_info_facts_equal_the_built_tokenizers(hf_folder):
    for path, built in ((hf_folder, Tokenizer.from_hf_dir(hf_folder)),
                        (default_model_path(), Tokenizer.from_gguf(default_model_path()))):
        facts = read_header(str(path)).tokenizer
        assert facts.vocab_size == built.vocab_size
        assert facts.bos == (built.bos_token_id, built.id_to_token(built.bos_token_id))
        assert facts.eos == tuple((i, built.id_to_token(i)) for i in built.eos_token_ids)
        assert facts.chat_template == (built.chat_template is not None)
