"""The compiled RMSNorm (tierlm/model/kernels/rms_norm.c) against torch's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.kernel_check import built_or_none
from tierlm.model.kernels import cpu_has_avx2, rms_norm_kernel


def test_compiled_rms_norm_equals_torch_within_float_rounding():
    kernel = built_or_none(rms_norm_kernel(), cpu_has_avx2(), "RMSNorm kernel")
    if kernel is None:
        return
    g = torch.Generator().manual_seed(0)
    # one decode row, a prompt chunk (threads split its rows), and a width that is no multiple of the vector
    for n, d in ((1, 2048), (37, 576), (20, 100)):
        x = 3 * torch.randn(n, d, generator=g)
        w = torch.randn(d, generator=g)
        y = torch.empty(n, d)
        kernel(x.data_ptr(), w.data_ptr(), y.data_ptr(), n, d, 1e-5, torch.get_num_threads())
        ref = F.rms_norm(x.double(), (d,), w.double(), 1e-5)
        assert (y.double() - ref).abs().max() < 1e-5 * ref.abs().max(), (n, d)


def test_the_model_norm_takes_strided_inputs_and_bf16_weights(hf_model):
    """Transformer._norm hands the kernel contiguous float32 rows whatever it is given (q/k norms
    get views into the fused qkv output) and returns the input's dtype."""
    from tierlm import LLM

    _, folder = hf_model("llama")
    model = LLM(folder, dtype="float32").model
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(6, 2, 64, generator=g)
    x = wide[:, 1]  # (6, 64), rows 128 values apart
    w = torch.randn(64, generator=g).to(torch.bfloat16)
    y = model._norm(x, w, None)
    ref = F.rms_norm(x.double(), (64,), w.double(), model.cfg.norm_eps)
    assert y.dtype == torch.float32 and y.shape == (6, 64)
    assert (y.double() - ref).abs().max() < 1e-5 * ref.abs().max()
    yb = model._norm(x.to(torch.bfloat16), w, None)
    assert yb.dtype == torch.bfloat16
