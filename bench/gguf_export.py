"""Write a random-weight HF Llama folder (no tokenizer) as an F16/BF16 GGUF that llama.cpp loads.

llama.cpp's converter wants a tokenizer in the folder; the benchmark models have none, so this
writes the tensors itself with the ``gguf`` package, plus a placeholder SentencePiece vocabulary
(<unk>, <s>, </s>, the 256 byte pieces, then filler pieces) of the model's vocab size. Benchmarks
feed token ids, so the vocabulary is never used to tokenize text.

llama.cpp applies RoPE to q/k rows in interleaved order; HF checkpoints store them in half-split
order, so q and k rows are permuted the way llama.cpp's own converter does.

    python bench/gguf_export.py .cache/models/llama-1.1b out.gguf [--type bf16|f16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def _permute(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """HF half-split rotary rows -> llama.cpp interleaved rows (per head)."""
    rows, cols = w.shape
    return w.reshape(num_heads, 2, rows // num_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def export(folder: Path, out: Path, kind: str = "f16", encode=None) -> Path:
    """Write ``folder``'s model to ``out``: matrices as ``kind`` (f16, bf16; q8_0, q4_0 quantized by the
    gguf package), unless ``encode(gguf_name, float32 array)`` returns ``(raw uint8 blocks, GGML type
    name)`` for a matrix (tests use it to place other block types)."""
    import gguf
    from safetensors import safe_open

    cfg = json.loads((folder / "config.json").read_text())
    d, n_layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(d)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(d // heads)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}.get(kind, gguf.LlamaFileType.MOSTLY_BF16))
    vocab = cfg["vocab_size"]
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    pieces += [f"▁t{i}" for i in range(vocab - len(pieces))]
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(vocab - 259)])
    w.add_token_types([2, 3, 3, *[6] * 256, *[1] * (vocab - 259)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    files = sorted(folder.glob("*.safetensors"))
    handles = [safe_open(str(f), "pt") for f in files]
    where = {name: h for h in handles for name in h.keys()}  # noqa: SIM118 (safe_open is not a dict)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(n_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, gg in names.items():
        if hf not in where:
            continue
        t = where[hf].get_tensor(hf)
        if gg.endswith("attn_q.weight"):
            t = _permute(t, heads)
        elif gg.endswith("attn_k.weight"):
            t = _permute(t, kv_heads)
        encoded = encode(gg, t.float().numpy()) if encode is not None and t.dim() == 2 else None
        if encoded is not None:
            raw, type_name = encoded
            w.add_tensor(gg, raw, raw_dtype=gguf.GGMLQuantizationType[type_name])
        elif t.dim() == 1:
            arr = t.float().numpy()
            w.add_tensor(gg, arr)
        elif kind == "f16":
            w.add_tensor(gg, t.to(torch.float16).numpy())
        elif kind in ("q8_0", "q4_0"):  # (tests) every matrix in these blocks, quantized by the gguf package
            qtype = gguf.GGMLQuantizationType[kind.upper()]
            raw = gguf.quants.quantize(t.float().numpy(), qtype)
            w.add_tensor(gg, raw, raw_dtype=qtype)
        else:
            raw = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
            w.add_tensor(gg, raw, raw_shape=tuple(t.shape), raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--type", choices=("f16", "bf16"), default="f16")
    a = ap.parse_args()
    export(a.folder, a.out, a.type)


if __name__ == "__main__":
    main()
