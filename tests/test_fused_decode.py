"""The fused decode step (tierlm.model.fused_decode, kernels/decode_layers.c) against the layer-by-layer path."""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import functools
import math

import pytest
import torch

from tests.kernel_check import built_or_none
from tierlm import LLM
from tierlm.model.attention import KVCache, SeqSlice, build_attention_batch
from tierlm.model.kernels import (
    cpu_has_avx2,
    cpu_has_avx512f,
    cpu_runs_quant_build,
    decode_layers_kernel,
    f32_gemm,
    quant_gemv,
)
from tierlm.quant import FusedWeight, get_quantizer
from tierlm.sampling_params import SamplingParams

# Where the CPU runs the kernels they must have been built (a missing build step fails loudly). The
# quantized kernel has an AVX512-VNNI build and an AVX2 one; a CPU with neither (not x86-64-v3) has no
# fused step for quantized weights, and these tests do not apply there. Float32 matrices need the
# float32 GEMM (AVX-512F): without it a float32 model's plan says why it is not fused (NO_F32_GEMM).
needs_kernels = pytest.mark.skipif(not cpu_runs_quant_build() or not cpu_has_avx2(),
                                   reason="the quantized kernel needs AVX512-VNNI or AVX2 (x86-64-v3)")
NO_F32_GEMM = "a qkv matrix neither the quantized kernel nor the float32 GEMM takes"


@pytest.fixture(autouse=True)
def _kernels_built():
    built_or_none(decode_layers_kernel(), cpu_has_avx2(), "fused decode step")
    built_or_none(quant_gemv(), cpu_runs_quant_build(), "quantized kernel")
    built_or_none(f32_gemm(), cpu_has_avx512f(), "float32 kernel")

BLOCK = 16
LENGTHS = (5, 17, 9)  # cached tokens per sequence before the decode step (17 > mistral's window of 7)
TABLES = ([1, 2], [3, 4], [5, 6])


@functools.cache
def _libm(name: str):
    f = getattr(ctypes.CDLL(ctypes.util.find_library("m")), name)
    f.argtypes, f.restype = [ctypes.c_float], ctypes.c_float
    return f


def _elementwise(name: str, x: torch.Tensor) -> torch.Tensor:
    f = _libm(name)
    return torch.tensor([f(v) for v in x.flatten().tolist()], dtype=torch.float32).view(x.shape)


def _silu_as_c(g: torch.Tensor) -> torch.Tensor:
    """SiLU as decode_layers.c computes it, g / (1 + expf(-g)) with the C library's expf (not correctly
    rounded for about 1 value in 1500, so torch's exp will not do), so that the layer path's values can
    be compared with the fused step bit for bit."""
    return g / (1 + _elementwise("expf", -g))


def _gelu_tanh_as_c(g: torch.Tensor) -> torch.Tensor:
    """GELU (tanh approximation) as decode_layers.c and torch compute it, with the C library's tanhf."""
    beta = torch.tensor(math.sqrt(2) * (2 / math.sqrt(math.pi)) * 0.5, dtype=torch.float32)
    inner = beta * (g + torch.tensor(0.044715, dtype=torch.float32) * (g * g * g))
    return 0.5 * g * (1 + _elementwise("tanhf", inner))


ACTIVATIONS_AS_C = {"silu": _silu_as_c, "gelu_tanh": _gelu_tanh_as_c}


def _prefilled(model, num_seqs: int):
    """A KV cache holding LENGTHS[:num_seqs] random tokens (through the layer path), and the decode
    step that follows: (cache, batch, next token ids)."""
    cache = model.new_kv_cache(32, BLOCK)
    gen = torch.Generator().manual_seed(0)
    seqs, ids, start = [], [], 0
    for n, table in zip(LENGTHS[:num_seqs], TABLES):
        seqs.append(SeqSlice(start, n, n, table))
        ids += torch.randint(0, 300, (n,), generator=gen).tolist()
        start += n
    model.forward(torch.tensor(ids), build_attention_batch(seqs, BLOCK, model.layer_windows), cache)
    step = [SeqSlice(i, 1, n + 1, t) for i, (n, t) in enumerate(zip(LENGTHS[:num_seqs], TABLES))]
    return cache, build_attention_batch(step, BLOCK, model.layer_windows), torch.randint(0, 300, (num_seqs,),
                                                                                         generator=gen)


def _both_paths(model, num_seqs: int):
    """(hidden, cache) from one decode step fused, and the same from the layer path."""
    cache, batch, ids = _prefilled(model, num_seqs)
    fused_cache, layer_cache = copy.deepcopy(cache), copy.deepcopy(cache)
    assert model.decode_plan().fused is not None and model.decode_plan().fused.takes(batch, fused_cache)
    fused = model.forward(ids, batch, fused_cache)
    model.fused_decode, act = False, model.act
    model.act = ACTIVATIONS_AS_C[model.cfg.activation]
    try:
        layer = model.forward(ids, batch, layer_cache)
    finally:
        model.fused_decode, model.act = True, act
    return (fused, fused_cache), (layer, layer_cache)


def _assert_same(a, b):
    (ha, ca), (hb, cb) = a, b
    assert torch.equal(ha, hb)
    for x, y in zip(ca.k + ca.v, cb.k + cb.v):  # every slot, written or not (unwritten ones: the same garbage)
        assert torch.equal(x.nan_to_num(), y.nan_to_num())


@needs_kernels
# llama3 RoPE; a sliding window; q/k/v biases; Gemma 3's q/k norms, post-norms, GELU, two RoPE tables
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma3"])
@pytest.mark.parametrize("quant", [None, "q4", "q3h", "q2"])
@pytest.mark.parametrize("num_seqs", [1, 3])
def test_fused_decode_step_equals_the_layer_path_bit_for_bit(hf_model, family, quant, num_seqs):
    _, folder = hf_model(family)
    llm = LLM(folder, quant=quant, quant_group=32)
    if quant is None and f32_gemm() is None:
        assert llm.model.decode_plan().reason == NO_F32_GEMM and llm.model.decode_plan().fused is None
        return
    assert llm.model.decode_plan().reason == "fused"
    fused, layer = _both_paths(llm.model, num_seqs)
    _assert_same(fused, layer)
    # the step wrote each row's K/V to its slot (position n of table t: slot t[n // 16] * 16 + n % 16)
    _, cache = fused
    for n, table in zip(LENGTHS[:num_seqs], TABLES):
        slot = table[n // BLOCK] * BLOCK + n % BLOCK
        assert cache.k[0][slot].abs().sum() > 0 and torch.isfinite(cache.v[-1][slot]).all()


@needs_kernels
def test_fused_decode_takes_stacked_parts_of_different_formats(hf_model):
    """A GGUF file's q, k, v may be stored in different types (tierlm.quant.FusedWeight): part by part."""
    _, folder = hf_model("llama")
    llm = LLM(folder, quant="q4", quant_group=32)
    floats = LLM(folder).model.w.layers
    method = llm.model.linear
    q_rows = llm.model.q_size
    for lw, fw in zip(llm.model.w.layers, floats):
        q8 = get_quantizer("q8", 32).quantize(fw.qkv[q_rows:])
        lw.qkv = FusedWeight((method.prepare(fw.qkv[:q_rows].contiguous()), method.prepare(q8)))
    plan = llm.model.decode_plan()  # made again: the weights changed
    assert plan.reason == "fused" and plan.current(llm.model.w.layers, llm.model.linear)
    _assert_same(*_both_paths(llm.model, 3))


@needs_kernels
def test_fused_decode_is_planned_again_when_weights_change(hf_model):
    _, folder = hf_model("llama")
    llm = LLM(folder, quant="q4", quant_group=32)
    model = llm.model
    first = model.decode_plan()
    assert model.decode_plan() is first  # nothing changed: the same plan
    lw = model.w.layers[1]
    lw.o = model.linear.prepare(torch.randn(lw.o.shape, generator=torch.Generator().manual_seed(3)))
    second = model.decode_plan()
    assert second is not first and not first.current(model.w.layers, model.linear)
    _assert_same(*_both_paths(model, 3))  # and it reads the new matrix


@needs_kernels
def test_fused_decode_declines_what_it_does_not_implement(hf_model):
    for family in ("gpt2", "opt"):  # LayerNorm, learned positions
        _, folder = hf_model(family)
        assert LLM(folder).model.decode_plan().reason.startswith("not a Llama- or Gemma-shaped block")
    _, folder = hf_model("llama")
    assert LLM(folder, dtype="bfloat16").model.decode_plan().reason == "float32 on CPU only"
    assert LLM(folder, weight_memory="50%").model.decode_plan().reason == "weights are tiered (streamed per layer)"
    off = LLM(folder, fused_decode=False)
    assert off.model.decode_plan().fused is None and "fused_decode=False" in off.config.describe()
    llm = LLM(folder, quant="q4", quant_group=32)
    fused = llm.model.decode_plan().fused
    cache, batch, _ = _prefilled(llm.model, 3)
    assert fused.takes(batch, cache)
    # a prompt chunk next to the decodes, or more decode rows than the quantized kernel's batch
    mixed = build_attention_batch([SeqSlice(0, 1, 6, [1]), SeqSlice(1, 4, 4, [2])], BLOCK, llm.model.layer_windows)
    assert not fused.takes(mixed, cache)
    nine = build_attention_batch([SeqSlice(i, 1, 3, [i + 1]) for i in range(9)], BLOCK, llm.model.layer_windows)
    assert fused.max_rows == 8 and not fused.takes(nine, cache)
    # float32 weights: the float32 GEMM's 16 rows (StreamingLinear.max_rows), where it runs
    dense = LLM(folder).model.decode_plan()
    if f32_gemm() is None:
        assert dense.fused is None and dense.reason == NO_F32_GEMM
    else:
        assert dense.fused.max_rows == 16 and dense.fused.takes(nine, cache)
    # a quantized KV cache (not a plain tensor; head_dim 32 for its groups), or one in another dtype
    assert not fused.takes(batch, KVCache(3, 32, BLOCK, 2, 32, torch.float32, quant="q8"))
    assert not fused.takes(batch, KVCache(3, 32, BLOCK, 2, 16, torch.bfloat16))


@needs_kernels
@pytest.mark.parametrize("quant", [None, "q4"])
def test_generation_gives_the_same_tokens_with_fused_decode_on_and_off(hf_model, quant):
    _, folder = hf_model("mistral")
    prompts = [[5, 6, 7, 8], list(range(20, 41)), [100, 3]]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    on = LLM(folder, quant=quant, quant_group=32, max_num_seqs=4)
    off = LLM(folder, quant=quant, quant_group=32, max_num_seqs=4, fused_decode=False)
    assert on.model.decode_plan().reason == ("fused" if quant is not None or f32_gemm() is not None else NO_F32_GEMM)
    on.model.act = off.model.act = _silu_as_c  # prompts run the layer path in both
    assert [o.token_ids for o in on.generate(prompts, greedy)] == [o.token_ids for o in off.generate(prompts, greedy)]


@needs_kernels
def test_smollm2_decodes_the_same_tokens_fused_and_layer_by_layer():
    """The real model from its GGUF blocks (Q4_1 rows, the file-layout kernel; Q8_0 embeddings). With
    each path's own SiLU the greedy tokens part after a few (an ulp in one activation flips an int8
    rounding of the next matrix's input, as an ulp of noise in the layer path's SiLU does); with the
    same SiLU they are the same tokens."""
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    tokens = []
    for fused in (True, False):
        llm = LLM(quant="gguf", max_model_len=128, fused_decode=fused)
        assert llm.model.decode_plan().reason == ("fused" if fused else "layer by layer (fused_decode=False)")
        llm.model.act = _silu_as_c
        ids = llm.tokenizer.encode("The capital of France is")
        tokens.append(llm.generate([ids], greedy)[0].token_ids)
    assert tokens[0] == tokens[1]
    assert llm.tokenizer.decode(tokens[0]).startswith(" Paris.")
