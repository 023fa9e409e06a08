"""Random-weight transformers models, one per family, saved as safetensors (test-only helper)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

VOCAB = 384


def _configs():
    import transformers as tf

    common = dict(vocab_size=VOCAB, max_position_embeddings=512)
    return {
        "llama": (tf.LlamaForCausalLM, tf.LlamaConfig(
            hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False,
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, **common)),
        # wide enough for GGUF's 256-weight K-quant super-blocks (not one of FAMILIES)
        "llama-256": (tf.LlamaForCausalLM, tf.LlamaConfig(
            hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False, **common)),
        "mistral": (tf.MistralForCausalLM, tf.MistralConfig(
            hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=1, head_dim=16, sliding_window=7, **common)),
        "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config(
            hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, **common)),
        "gemma3": (tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(
            hidden_size=64, intermediate_size=160, num_hidden_layers=7, num_attention_heads=4,
            num_key_value_heads=1, head_dim=32, sliding_window=6, query_pre_attn_scalar=24, **common)),
        "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config(
            n_embd=64, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=512, bos_token_id=0, eos_token_id=0)),
        "opt": (tf.OPTForCausalLM, tf.OPTConfig(
            hidden_size=64, ffn_dim=160, num_hidden_layers=3, num_attention_heads=4, word_embed_proj_dim=64,
            pad_token_id=1, bos_token_id=0, eos_token_id=0, **common)),
    }


FAMILIES = ("llama", "mistral", "qwen2", "gemma3", "gpt2", "opt")


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights with unit-scale activations, so greedy outputs vary (the default 0.02 init makes
    every family repeat one token, which would make the greedy comparisons weak)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                base = 0.0 if ("norm" in name and "gemma" in type(model).__name__.lower()) else (
                    1.0 if ("norm" in name or "ln_" in name or "layer_norm" in name) and name.endswith("weight")
                    else 0.0)
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                gpt2_conv = "GPT2" in type(model).__name__ and "wte" not in name and "wpe" not in name
                fan_in = p.shape[0] if gpt2_conv else p.shape[-1]
                if "embed" in name or "wte" in name or "wpe" in name:
                    # Small embeddings keep a tied lm_head from just predicting the input token;
                    # Gemma multiplies them by sqrt(hidden) = 8 on top.
                    std = 0.02 if "Gemma" in type(model).__name__ else 0.1
                else:
                    std = 1.2 / math.sqrt(fan_in)
                p.copy_(std * torch.randn(p.shape, generator=g))


def build(family: str, folder: Path, seed: int = 0) -> torch.nn.Module:
    cls, cfg = _configs()[family]
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    randomize_(model, seed)
    model.save_pretrained(folder)
    return model
