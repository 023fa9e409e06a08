"""Linear methods (how weight matrices are multiplied) against a float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.kernel_check import built_or_none
from tierlm.model.kernels import bf16_gemm, cpu_has_avx512_bf16, cpu_has_avx512f, f32_gemm
from tierlm.model.linear import CPULinear, DenseLinear, StreamingLinear, default_linear_method


def _methods():
    methods = [DenseLinear(), CPULinear(), CPULinear(min_fp32_packed_elements=0)]
    if bf16_gemm() is not None:
        methods.append(StreamingLinear(bf16_gemm(), torch.bfloat16, max_rows=16, k_multiple=32))
    if f32_gemm() is not None:
        methods.append(StreamingLinear(f32_gemm(), torch.float32, max_rows=64, k_multiple=16))
        # Above max_rows the product goes to oneDNN on the plain weight (m = 5, 16, 17 here).
        methods.append(StreamingLinear(f32_gemm(), torch.float32, max_rows=4, k_multiple=16, onednn_above=True))
    return methods


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 16, 17])
def test_every_method_computes_the_same_product(dtype, m):
    g = torch.Generator().manual_seed(m)
    n, k = 37, 96  # n not a multiple of the kernel's 8-row slabs; k a multiple of 32
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    ref = F.linear(x.double(), w.double(), bias.double())
    # bf16 outputs are rounded to 8 bits of mantissa: allow a few bf16 steps at |ref| ~ 10.
    tol = 1e-4 if dtype == torch.float32 else 0.08
    for method in _methods():
        out = method.apply(x, method.prepare(w), bias)
        assert out.dtype == dtype and out.shape == (m, n), method.name
        assert torch.allclose(out.double(), ref, atol=tol, rtol=0.01 if dtype == torch.bfloat16 else 0), method.name


def test_bf16_kernel_accumulates_in_float32_exactly_like_a_float_product():
    """Before its final rounding to bf16 the kernel's sum equals the fp32 product of bf16 inputs."""
    kernel = built_or_none(bf16_gemm(), cpu_has_avx512_bf16(), "bf16 kernel")
    if kernel is None:
        return
    g = torch.Generator().manual_seed(0)
    w = torch.randn(19, 2048, generator=g).to(torch.bfloat16)
    x = torch.randn(5, 2048, generator=g).to(torch.bfloat16)
    y = torch.empty(5, 19)
    kernel(x.data_ptr(), w.data_ptr(), y.data_ptr(), 5, 19, 2048, torch.get_num_threads())
    ref = x.double() @ w.double().T
    assert (y.double() - ref).abs().max() < 1e-3


def test_f32_kernel_equals_a_float_product_at_every_decode_batch():
    kernel = built_or_none(f32_gemm(), cpu_has_avx512f(), "float32 kernel")
    if kernel is None:
        return
    g = torch.Generator().manual_seed(0)
    w = torch.randn(21, 2048, generator=g)  # 21 rows: two whole slabs of 8 and a short one
    for m in (1, 3, 4, 9, 64):  # x rows in blocks of 4, the last one short
        x = torch.randn(m, 2048, generator=g)
        y = torch.empty(m, 21)
        kernel(x.data_ptr(), w.data_ptr(), y.data_ptr(), m, 21, 2048, torch.get_num_threads())
        assert (y.double() - x.double() @ w.double().T).abs().max() < 1e-3, m


def test_default_method_follows_the_machine():
    f32 = default_linear_method("cpu", torch.float32)
    assert isinstance(f32, StreamingLinear if cpu_has_avx512f() else CPULinear)
    bf16 = default_linear_method("cpu", torch.bfloat16)
    assert isinstance(bf16, StreamingLinear if cpu_has_avx512_bf16() else CPULinear)
    if cpu_has_avx512f():
        assert (f32.dtype, f32.max_rows, f32.onednn_above) == (torch.float32, 16, True)


def test_bf16_model_stays_close_to_float32(hf_model):
    from tierlm import LLM

    _, folder = hf_model("llama")
    ids = list(range(3, 40))
    f32 = LLM(folder, dtype="float32").score(ids)
    b16 = LLM(folder, dtype="bfloat16").score(ids)
    rel = (b16 - f32).norm() / f32.norm()
    assert rel < 0.03, rel


def test_cpu_linear_packs_bf16_only_where_onednn_runs_it():
    """oneDNN's bf16 reorder raises on CPUs without its bf16 kernels (AVX2 only): the weight stays plain
    there and the product is still right."""
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    method = CPULinear()
    prepared = method.prepare(w)
    assert prepared.is_mkldnn == torch.ops.mkldnn._is_mkldnn_bf16_supported() == method.packs_bf16
    assert torch.allclose(method.apply(x, prepared, None).double(), F.linear(x.double(), w.double()),
                          atol=0.08, rtol=0.01)
