"""A GGUF file run as stored: the embedding table and a tied head stay as the file's blocks (lookups
dequantize only the rows asked for), resident or tiered; matrices stacked from parts of different
block types stream part by part."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_gguf_models import _gemma_path
from tests.test_quant import _gguf_weight, _int8_blocks
from tierlm import LLM, SamplingParams
from tierlm.loader.checkpoint import GGUFFile
from tierlm.loader.model_loader import default_model_path
from tierlm.model.transformer import embedding_rows
from tierlm.quant import FusedWeight, QuantizedWeight
from tierlm.quant.gguf import SUPPORTED

GREEDY8 = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _gguf_rows(path, name: str, ids: list[int]) -> np.ndarray:
    """Rows ``ids`` of tensor ``name`` of a GGUF file, dequantized by the gguf package (float32)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    reader = GGUFFile(path)
    try:
        raw = reader.read_raw(name).numpy()[ids]
        return dequantize(raw, GGMLQuantizationType[reader.quant_type(name)])
    finally:
        reader.close()


@pytest.mark.parametrize("type_name", SUPPORTED)
def test_quantized_embedding_rows_are_the_gguf_package_dequantization_bit_for_bit(type_name):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    table = _gguf_weight(type_name, rows=40, cols=512)
    ids = torch.tensor([7, 3, 7, 0, 39, 3])  # repeats and any order
    got = embedding_rows(table, ids)
    want = dequantize(table.codes.numpy()[ids.numpy()], GGMLQuantizationType[type_name])
    assert got.dtype == torch.float32 and got.shape == (6, 512)
    assert np.array_equal(got.numpy(), want)
    # a float table is indexed as it is
    dense = torch.from_numpy(dequantize(table.codes.numpy(), GGMLQuantizationType[type_name]))
    assert torch.equal(embedding_rows(dense, ids), dense[ids])


def test_tied_quantized_head_multiplies_the_embedding_blocks_like_the_float_head():
    """SmolLM2's tied Q8_0 table: one object is both the embedding and the head (no float copy);
    prompt-sized logits equal the float head of the dequantized table within float rounding, and
    decode-sized ones are the kernel's product (activations rounded to int8 per 32 values)."""
    llm = LLM(max_model_len=64)
    w = llm.model.w
    assert isinstance(w.embed, QuantizedWeight) and w.embed.format == "gguf:Q8_0" and w.lm_head is w.embed
    assert w.embed.shape == (49152, 576) and w.embed.nbytes == 49152 * 576 // 32 * 34  # the file's blocks
    assert w.nbytes_by_group()["embedding"] == w.embed.nbytes
    float_llm = LLM(max_model_len=64, dtype="float32")  # expands the table to float32
    table = float_llm.model.w.embed
    assert table.dtype == torch.float32 and float_llm.model.w.lm_head is table
    ids = torch.tensor([1, 504, 3575, 282, 49151, 0, 504])
    assert torch.equal(llm.model.embed(ids, torch.arange(7)), float_llm.model.embed(ids, torch.arange(7)))
    file_rows = _gguf_rows(default_model_path(), "token_embd.weight", ids.tolist())
    assert torch.equal(table[ids], torch.from_numpy(file_rows))
    h = torch.randn(12, 576, generator=torch.Generator().manual_seed(0))
    got, want = llm.model.logits(h), float_llm.model.logits(h)  # 12 rows: the float path, a band at a time
    assert torch.allclose(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    few = h[:2]  # decode-sized: the quantized kernel where this CPU has one
    got = llm.model.logits(few).double()
    normed = float_llm.model._norm(few, float_llm.model.w.final_norm, None)
    x = _int8_blocks(normed) if llm.model.linear.kernel is not None else normed.double()
    want = x @ table.double().T
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max().item(), rtol=1e-5)


@pytest.fixture(scope="module")
def gemma():
    """Gemma-3-270m's GGUF loaded as by default (its blocks kept), shared: a load builds a 262k-entry
    tokenizer, which costs seconds."""
    return LLM(_gemma_path(), max_model_len=64, kv_cache_tokens=256)


def test_gemma3_gguf_loads_natively_with_its_embedding_quantized(gemma):
    """The default load of Gemma-3-270m's Q4_K_M file: every matrix and the 262144 x 640 table stay
    the file's blocks (170 MiB instead of 671 MiB of float32); its greedy text is llama.cpp's."""
    path = _gemma_path()
    assert gemma.config.quant.quant == "gguf"
    w = gemma.model.w
    assert isinstance(w.embed, QuantizedWeight) and w.lm_head is w.embed
    assert w.embed.format == "gguf:Q8_0" and w.embed.shape == (262144, 640) and w.embed.nbytes == 178257920
    # every weight together is no larger than the file, and the RoPE tables are made for short sequences
    assert sum(w.nbytes_by_group().values()) <= path.stat().st_size
    from tierlm.model.transformer import ROPE_INITIAL_POSITIONS

    assert {t.cos.shape for t in gemma.model.rope.values()} == {(ROPE_INITIAL_POSITIONS, 128)}
    ids = [2, 818, 262143, 5279, 2]
    rows = embedding_rows(w.embed, torch.tensor(ids))
    assert np.array_equal(rows.numpy(), _gguf_rows(path, "token_embd.weight", ids))
    from tests.test_gguf_models import REFERENCE

    ref = REFERENCE["gemma-3-270m-q4_k_m"]["greedy"]
    agree = 8 if gemma.model.linear.kernel is not None else 5  # int8 activations, as llama.cpp's kernels
    assert gemma.generate([ref["prompt_ids"]], GREEDY8)[0].token_ids[:agree] == ref["ids"][:agree]


def test_gemma3_gguf_streams_its_blocks_with_the_resident_outputs(gemma, tmp_path):
    """weight_memory="25%" on Gemma-3's GGUF: the store holds the file's blocks, the table included and
    each mixed-type qkv (Q5_0 q and k, Q8_0 v) as three parts; streamed rows give the resident native
    model's logits and greedy text, and a qkv streamed part by part gives the resident product."""
    from tierlm.memory.store import WeightStore
    from tierlm.memory.tiered import SplitMatrix, TierSettings, load_tiered
    from tierlm.quant.store import resident_weights

    path = _gemma_path()
    llm = LLM(path, max_model_len=64, kv_cache_tokens=256, weight_memory="25%", store_dir=tmp_path / "store")
    tiers = llm.tiers
    matrices = tiers.store.meta["matrices"]
    assert matrices["embed"] == ["gguf:Q8_0", 32, 640] and "lm_head" not in tiers.store.tensors
    assert [matrices[f"layers.0.qkv.{k}"][0] for k in range(3)] == ["gguf:Q5_0", "gguf:Q5_0", "gguf:Q8_0"]
    assert matrices["layers.2.qkv"][0] == "gguf:Q5_0" and "layers.0.qkv" not in matrices  # one type: one tensor
    assert matrices["layers.0.o"][0] == "gguf:Q4_K" and matrices["layers.0.down"][0] == "gguf:Q6_K"
    assert tiers.plan.streams and tiers.embed is None  # the tied head streams; lookups read the store
    # 25% of a layer holds q, k and v whole (attention first): the parts' FusedWeight; o, up, down stream
    lw = tiers.weights.layers[0]
    assert isinstance(lw.qkv, FusedWeight) and all(isinstance(getattr(lw, m), SplitMatrix) for m in ("o", "up", "down"))
    ids = gemma.tokenizer.encode("The capital of France is")
    # tiered weights decode layer by layer: the resident model's tokens on that path (the fused step's
    # GELU, C's tanhf against torch's, can move a near tie once x is rounded to int8 per 256 values)
    resident = LLM(path, max_model_len=64, kv_cache_tokens=256, fused_decode=False)
    assert llm.generate([ids], GREEDY8)[0].token_ids == resident.generate([ids], GREEDY8)[0].token_ids
    assert torch.equal(llm.score(ids[:5]), gemma.score(ids[:5]))  # decode-sized: the kernel, row by row
    table = torch.tensor([2, 262143, 818, 2])
    assert torch.equal(tiers.embedding(table), embedding_rows(gemma.model.w.embed, table))
    llm.close()
    # At 10% every matrix streams some rows, the mixed-type qkv part by part: each part's resident rows,
    # then its streamed rows, at the part's offset (q [0, 1024), k [1024, 1280), v [1280, 1536)).
    low = load_tiered(WeightStore(tmp_path / "store"), 18, TierSettings("10%"))
    layer_linear, _ = low.bind(gemma.model.linear, "cpu")
    qkv = low.weights.layers[0].qkv
    assert isinstance(qkv, SplitMatrix) and qkv.shape == (1536, 640)
    assert [(p.row_start, p.resident is None) for p in qkv.parts][::2] == [(0, False), (1024, False), (1280, False)]
    assert [p.row_end for p in qkv.parts][1::2] == [1024, 1280, 1536] and all(
        p.row_end == q.row_start for p, q in zip(qkv.parts, qkv.parts[1:]))
    x = torch.randn(12, 640, generator=torch.Generator().manual_seed(0))
    low.acquire_layer(0)
    try:
        decode, prompt = layer_linear.apply(x[:3], qkv, None), layer_linear.apply(x, qkv, None)
    finally:
        low.release_layer(0)
    resident = gemma.model.w.layers[0].qkv
    assert torch.equal(decode, gemma.model.linear.apply(x[:3], resident, None))  # the kernel, row by row
    want = gemma.model.linear.apply(x, resident, None)  # dequantized bands of rows
    assert torch.allclose(prompt, want, atol=1e-5 * want.abs().max().item(), rtol=0)
    low.close()
    # and read back whole (resident_weights), the parts are the file's blocks, the table one object
    weights = resident_weights(WeightStore(tmp_path / "store"))
    reader = GGUFFile(path)
    for part, name in zip(weights.layers[0].qkv.parts, ("attn_q", "attn_k", "attn_v")):
        assert torch.equal(part.codes, reader.read_raw(f"blk.0.{name}.weight"))
    reader.close()
    assert weights.lm_head is weights.embed and weights.embed.format == "gguf:Q8_0"


@pytest.mark.parametrize("budget", ["30%", "100%"])
def test_an_untied_quantized_table_is_looked_up_in_the_store_or_in_memory(hf_model, tmp_path, budget):
    """An untied Q8_0 table (a Llama exported by the gguf package) next to a Q8_0 head: below the whole
    model's size its rows are read from the store per step, at 100% it is resident as blocks; either
    way the tiered model's logits are the resident native model's."""
    from bench.gguf_export import export

    _, folder = hf_model("llama")
    path = export(folder, tmp_path / "llama-q8_0.gguf", "q8_0")
    ref = LLM(path, max_model_len=64)
    assert isinstance(ref.model.w.embed, QuantizedWeight) and not ref.model.w.tied
    llm = LLM(path, max_model_len=64, weight_memory=budget, store_dir=tmp_path / "store")
    matrices = llm.tiers.store.meta["matrices"]
    assert matrices["embed"][0] == matrices["lm_head"][0] == "gguf:Q8_0"
    assert (llm.tiers.embed is None) == (budget == "30%") and llm.tiers.plan.streams == (budget == "30%")
    if budget == "100%":
        assert isinstance(llm.tiers.embed, QuantizedWeight) and llm.tiers.embed.nbytes == 384 * 64 // 32 * 34
    ids = [1, 5, 77, 300, 12, 9, 250, 101, 42, 7, 3, 200, 150, 383]
    assert torch.equal(llm.score(ids[:4]), ref.score(ids[:4]))  # decode-sized: the kernel, row by row
    want = ref.score(ids)  # prompt-sized: dequantized bands of rows
    assert torch.allclose(llm.score(ids), want, atol=1e-5 * want.abs().max().item(), rtol=0)


def test_rotary_tables_start_small_and_grow_to_the_values_of_a_whole_table():
    """Gemma-3's two RoPE tables for its 32,768 positions would hold 64 MiB, a quarter of its GGUF file:
    the model makes ROPE_INITIAL_POSITIONS rows and a longer sequence grows them, to the same values."""
    from tierlm.model.rope import RotaryTable
    from tierlm.model.transformer import ROPE_INITIAL_POSITIONS

    table = RotaryTable(256, 1e6, None, ROPE_INITIAL_POSITIONS)
    whole = RotaryTable(256, 1e6, None, 32768)
    positions = torch.tensor([0, 17, ROPE_INITIAL_POSITIONS - 1, ROPE_INITIAL_POSITIONS, 20000, 32767])
    for got, want in zip(table.lookup(positions, torch.float32), whole.lookup(positions, torch.float32)):
        assert torch.equal(got, want)
    assert table.cos.shape[0] == 32768  # grown on demand: to max(positions needed, twice its rows)
