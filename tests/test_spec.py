"""Architectures as data: a new family from a file, with no code change; spec validation."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from tierlm import LLM, SamplingParams
from tierlm.model.spec import SpecError, UnknownArchitectureError, builtin_families, load_family

# GPT-J exercises what no built-in family uses: a parallel residual with one shared norm,
# interleaved ("rotate every two") RoPE on only part of each head, and a biased lm_head.
GPTJ_SPEC = textwrap.dedent('''
    name = "gptj"
    hf_architectures = ["GPTJForCausalLM"]
    hf_ignore = ['\\.attn\\.bias$', '\\.attn\\.masked_bias$', 'embed_positions']

    [defaults]
    norm = "layernorm"
    norm_eps = 1e-5
    activation = "gelu_tanh"
    gated_mlp = false
    position = "rope"
    rope_layout = "interleaved"
    residual = "parallel"

    [hf_config]
    vocab_size = "vocab_size"
    hidden_size = "n_embd"
    num_layers = "n_layer"
    num_heads = "n_head"
    intermediate_size = "n_inner"
    max_position = "n_positions"
    rotary_dim = "rotary_dim"
    norm_eps = "layer_norm_epsilon"
    activation = "activation_function"
    tie_embeddings = "tie_word_embeddings"

    [hf_tensors]
    embed = "transformer.wte.weight"
    final_norm = "transformer.ln_f.weight"
    "final_norm.bias" = "transformer.ln_f.bias"
    lm_head = "lm_head.weight"
    "lm_head.bias" = "lm_head.bias"
    "layer.attn_norm" = "transformer.h.{i}.ln_1.weight"
    "layer.attn_norm.bias" = "transformer.h.{i}.ln_1.bias"
    "layer.q" = "transformer.h.{i}.attn.q_proj.weight"
    "layer.k" = "transformer.h.{i}.attn.k_proj.weight"
    "layer.v" = "transformer.h.{i}.attn.v_proj.weight"
    "layer.o" = "transformer.h.{i}.attn.out_proj.weight"
    "layer.up" = "transformer.h.{i}.mlp.fc_in.weight"
    "layer.up.bias" = "transformer.h.{i}.mlp.fc_in.bias"
    "layer.down" = "transformer.h.{i}.mlp.fc_out.weight"
    "layer.down.bias" = "transformer.h.{i}.mlp.fc_out.bias"
''')


def test_new_family_from_a_spec_file_runs_and_matches_transformers(tmp_path):
    import transformers

    from tests.hf_models import randomize_

    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    (spec_dir / "gptj.toml").write_text(GPTJ_SPEC)
    cfg = transformers.GPTJConfig(vocab_size=300, n_positions=256, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)
    torch.manual_seed(0)
    model = transformers.GPTJForCausalLM(cfg).eval()
    randomize_(model, seed=3)
    folder = tmp_path / "gptj"
    model.save_pretrained(folder)

    with pytest.raises(UnknownArchitectureError, match="GPTJForCausalLM"):
        LLM(folder)  # not a built-in family
    llm = LLM(folder, dtype="float32", spec_dirs=[spec_dir])
    assert llm.arch.family == "gptj" and llm.arch.residual == "parallel"
    ids = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    assert torch.allclose(llm.score(ids), ref, atol=1e-4, rtol=0)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 24:]
    out = llm.generate([ids], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == expected.tolist()


def test_builtin_families_cover_the_six():
    assert {f.name for f in builtin_families()} == {"llama", "mistral", "qwen2", "gemma3", "gpt2", "opt"}


def test_malformed_family_files_name_the_problem(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nunknown_key = 1\n')
    with pytest.raises(SpecError, match="unknown keys"):
        load_family(bad)
    bad.write_text("name = [")
    with pytest.raises(SpecError, match="cannot read family file"):
        load_family(bad)
    llama = next(f for f in builtin_families() if f.name == "llama")
    base = {"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 3,
            "num_key_value_heads": 2}
    with pytest.raises(SpecError, match="multiple of num_kv_heads"):
        llama.resolve_hf(base)
    with pytest.raises(SpecError, match="rope scaling type 'yarn'"):
        llama.resolve_hf({**base, "num_attention_heads": 2, "rope_scaling": {"rope_type": "yarn", "factor": 2}})


def test_unsupported_config_values_are_refused(tmp_path):
    opt = next(f for f in builtin_families() if f.name == "opt")
    with pytest.raises(SpecError, match="do_layer_norm_before=False"):
        opt.resolve_hf({"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                        "do_layer_norm_before": False})


def test_gemma3_layer_pattern_and_gguf_overrides():
    gemma = next(f for f in builtin_families() if f.name == "gemma3")
    cfg = gemma.resolve_gguf({"gemma3.embedding_length": 640, "gemma3.block_count": 12,
                              "gemma3.attention.head_count": 4, "gemma3.attention.head_count_kv": 1,
                              "gemma3.attention.key_length": 256, "gemma3.feed_forward_length": 2048,
                              "gemma3.attention.sliding_window": 512, "tierlm.embedding_rows": 1000,
                              "gemma3.rope.freq_base": 1e6}, "gemma3")
    assert cfg.layer_types == ("sliding",) * 5 + ("full",) + ("sliding",) * 5 + ("full",)
    assert cfg.norm_weight_offset == 0.0 and cfg.rope_local_theta == 10000.0 and cfg.sliding_window == 512
    assert cfg.effective_embed_scale == pytest.approx(640 ** 0.5)
    hf = gemma.resolve_hf(json.loads(json.dumps({
        "vocab_size": 1000, "hidden_size": 640, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 512,
        "layer_types": ["sliding_attention", "full_attention"]})))
    assert hf.norm_weight_offset == 1.0 and hf.layer_types == ("sliding", "full")
    assert hf.effective_attn_scale == pytest.approx(1 / 16)
