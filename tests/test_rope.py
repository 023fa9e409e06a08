"""The compiled in-place RoPE (tierlm/model/kernels/rope.c) against tierlm.model.rope.apply_rope."""

from __future__ import annotations

import pytest
import torch

from tests.kernel_check import built_or_none
from tierlm.model.kernels import cpu_has_avx2, rope_bf16_kernel, rope_kernel
from tierlm.model.rope import RotaryTable, apply_rope


def _kernel(dtype=torch.float32):
    kernel = rope_kernel() if dtype == torch.float32 else rope_bf16_kernel()
    return built_or_none(kernel, cpu_has_avx2(), f"RoPE kernel ({dtype})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize("rot", [64, 32])  # 32: partial rotary, the rest of each head passes through
def test_compiled_rope_equals_torch_bit_for_bit_in_place_on_strided_rows(layout, rot, dtype):
    kernel = _kernel(dtype)
    if kernel is None:
        return
    g = torch.Generator().manual_seed(0)
    n, heads, d = 5, 6, 64
    qkv = (3 * torch.randn(n, (heads + 2) * d, generator=g)).to(dtype)  # q and k heads, then 2 that must stay
    qkv[0, 1] = float("nan")  # a NaN stays NaN
    x = qkv[:, :heads * d].view(n, heads, d)  # rows (heads + 2) * d apart
    cos, sin = RotaryTable(rot, 10000.0, None, 4096).lookup(torch.tensor([0, 3, 17, 400, 4000]), dtype)
    ref = apply_rope(x.clone(), cos, sin, layout)
    assert ref.isnan().any()
    rest = qkv[:, heads * d:].clone()
    kernel(x.data_ptr(), x.stride(0), n, heads, d, rot, cos.contiguous().data_ptr(), sin.contiguous().data_ptr(),
           int(layout == "interleaved"))
    torch.testing.assert_close(x, ref, rtol=0, atol=0, equal_nan=True)  # NaN where torch's (its bits vary)
    assert torch.equal(qkv[:, heads * d:], rest)


def test_the_model_rotates_float32_and_bf16_in_place_and_mixed_dtypes_with_torch(hf_model):
    from tierlm import LLM

    _, folder = hf_model("llama")
    model = LLM(folder, dtype="float32").model
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 16, generator=g)
    cos, sin = RotaryTable(16, 10000.0, None, 8).lookup(torch.tensor([1, 2, 7]), torch.float32)
    ref = apply_rope(x.clone(), cos, sin, model.cfg.rope_layout)
    done = model._rope_(x, cos, sin)
    assert done == (_kernel() is not None)
    if done:
        assert torch.equal(x, ref)
    xb = torch.randn(3, 4, 16, generator=g).to(torch.bfloat16)
    cb, sb = cos.to(torch.bfloat16), sin.to(torch.bfloat16)
    ref = apply_rope(xb.clone(), cb, sb, model.cfg.rope_layout)
    done = model._rope_(xb, cb, sb)
    assert done == (_kernel(torch.bfloat16) is not None)
    if done:
        assert torch.equal(xb, ref)
    assert not model._rope_(xb, cos, sin)  # bf16 rows, float32 tables: apply_rope
    assert not model._rope_(x.transpose(0, 1), cos, sin)  # heads not contiguous
