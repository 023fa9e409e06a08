"""Quantization formats: exact packing, bounded dequantization error, products, kernels."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import tierlm.quant.base as qbase
import tierlm.quant.tiles as qtiles
from tests.kernel_check import built_or_none
from tierlm.model.kernels import QUANT_BUILDS, cpu_has_avx512_vnni, cpu_runs_quant_build, quant_gemv
from tierlm.model.linear import DenseLinear
from tierlm.quant import (
    FORMATS,
    FusedWeight,
    QuantError,
    QuantizedWeight,
    get_quantizer,
    method_for,
)
from tierlm.quant.gguf import SUPPORTED, GGUFFormat
from tierlm.quant.linear import KERNEL_FORMATS, TILE_KERNEL_FORMATS, QuantLinear, kernel_matmul
from tierlm.quant.tiles import TILE_FORMATS, TILE_ROWS, RowTiles, dequantize_tiles, tile_rows, tiled_tiles_matmul

LEVELS = {"q8": 256, "q6": 64, "q5": 32, "q4": 16, "q3h": 11, "q3": 8, "q2": 4}
BITS_PER_WEIGHT = {"q8": 8, "q6": 6, "q5": 5, "q4": 4, "q3h": 3.5, "q3": 3, "q2": 2}


def _weights(rows: int = 37, cols: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[3] *= 1e-3  # a row of tiny weights: steps near float16's subnormals
    w[5, :128] = 0.25  # a constant group (any group size up to 128): step 0
    return w


@pytest.mark.parametrize("fmt", FORMATS)
def test_pack_unpack_is_exact_for_every_code(fmt):
    q = get_quantizer(fmt)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, LEVELS[fmt], (5, 192), generator=g, dtype=torch.int64).to(torch.uint8)
    codes[0] = LEVELS[fmt] - 1  # the largest code everywhere
    packed = q.pack(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, int(192 * BITS_PER_WEIGHT[fmt] / 8))
    assert torch.equal(q.unpack(packed, 192), codes)
    assert q.levels == LEVELS[fmt]


def test_packed_bytes_are_the_documented_layouts():
    # q4: byte j = code j | code j+16 << 4 within each 32-weight run
    codes = torch.arange(32, dtype=torch.uint8).remainder(16).view(1, 32)
    assert get_quantizer("q4").pack(codes).tolist() == [[j | (j << 4) for j in range(16)]]
    # q3: little-endian bit stream, 8 codes in 3 bytes
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0] * 4], dtype=torch.uint8)
    word = sum(c << (3 * i) for i, c in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))
    assert get_quantizer("q3").pack(codes)[0, :3].tolist() == [word & 255, (word >> 8) & 255, word >> 16]
    # q3h: pairs a*11 + b in 7 bits; 16 codes in 7 bytes
    codes = torch.tensor([[10, 10, 0, 1] + [0] * 28], dtype=torch.uint8)
    packed = get_quantizer("q3h").pack(codes)
    assert packed.shape == (1, 14)
    value = 120 | (1 << 7)  # pair 0 = 10*11 + 10 = 120, pair 1 = 0*11 + 1 = 1
    assert packed[0, :2].tolist() == [value & 255, value >> 8]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_dequantization_error_is_at_most_half_a_step_of_each_group(fmt, group):
    w = _weights()
    q = get_quantizer(fmt, group)
    qw = q.quantize(w)
    assert qw.format == fmt and qw.group == group and qw.shape == (37, 256)
    assert qw.scales.dtype == torch.float16 and qw.scales.shape == (37, 256 // group)
    deq = q.dequantize(qw).view(37, -1, group)
    wg = w.view(37, -1, group)
    codes = q.unpack(qw.codes, 256).view(37, -1, group)
    step, lo = qw.scales.float()[..., None], qw.mins.float()[..., None]
    hi = lo + step * (LEVELS[fmt] - 1)  # the group's (chosen) range [lo, hi]
    inside = (wg >= lo) & (wg <= hi)
    # inside the range: within half a step of the group
    assert ((deq - wg).abs() <= step / 2 * (1 + 1e-3) + 1e-7)[inside].all()
    # outside it (only where the range search clipped): clamped to the range's ends, exactly
    below, above = wg < lo, wg > hi
    assert (codes[below] == 0).all() and torch.equal(deq[below], lo.expand_as(wg)[below])
    assert (codes[above] == LEVELS[fmt] - 1).all()
    assert torch.allclose(deq[above], hi.expand_as(wg)[above], rtol=1e-6, atol=0)
    # clipping trims tails only: most of each group lies inside its range
    assert (inside.float().mean(-1) >= 0.6).all()
    if fmt == "q8" or not q.search:  # plain min-max: nothing is clipped
        assert not (below | above).any()
    assert deq.view(37, 256)[5, :128].eq(0.25).all() and qw.scales[5, 0] == 0  # a constant group is exact
    # each group's largest code is used (its maximum is representable or clamped to the top level)
    assert (codes.amax(dim=-1)[qw.scales > 0] >= LEVELS[fmt] - 2).all()
    # the range search never does worse than plain min-max, group by group
    plain = get_quantizer(fmt, group, search=False)
    plain_err = (plain.dequantize(plain.quantize(w)).view(37, -1, group) - wg).square().sum(-1)
    assert ((deq - wg).square().sum(-1) <= plain_err * (1 + 1e-5) + 1e-12).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_product_with_quantized_weight_equals_product_with_dequantized(fmt, monkeypatch):
    monkeypatch.setattr(qbase, "TILE_BYTES", 10 * 256 * 4)  # several tiles, the last one partial
    w = _weights()
    q = get_quantizer(fmt)
    qw = q.quantize(w)
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(2))
    ref = x.double() @ q.dequantize(qw).double().T
    y = q.matmul(x, qw)
    assert y.shape == (6, 37) and y.dtype == torch.float32
    assert torch.allclose(y.double(), ref, atol=1e-4, rtol=1e-5)


def test_more_bits_give_smaller_errors_and_q3h_sits_between_q3_and_q4():
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(3))
    rms = {f: (get_quantizer(f).dequantize(get_quantizer(f).quantize(w)) - w).pow(2).mean().sqrt().item()
           for f in FORMATS}
    order = ["q8", "q6", "q5", "q4", "q3h", "q3", "q2"]
    assert all(rms[a] < rms[b] for a, b in itertools.pairwise(order)), rms


def test_unknown_formats_and_bad_groups_are_clear_errors():
    with pytest.raises(QuantError, match="unknown quantization format 'q7'"):
        get_quantizer("q7")
    for group in (0, 16, 48, -64):
        with pytest.raises(QuantError, match="multiple of 32"):
            get_quantizer("q4", group)
    with pytest.raises(QuantError, match="not a whole number of groups of 128"):
        get_quantizer("q4", 128).quantize(torch.zeros(4, 576))
    with pytest.raises(QuantError, match="not executed natively"):
        GGUFFormat("IQ2_XS")


# -- importance-weighted quantization ---------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_uniform_importance_quantizes_like_no_importance(fmt):
    w = _weights()
    q = get_quantizer(fmt)
    plain = q.quantize(w)
    # Only relative importance within a group matters; an all-zero row of importance means "no
    # information" and falls back to uniform weights.
    for imp in (torch.ones(256), torch.full((256,), 3.0), torch.ones(37, 256), torch.zeros(256)):
        weighted = q.quantize(w, importance=imp)
        assert torch.allclose(q.dequantize(weighted), q.dequantize(plain), rtol=0, atol=1e-6), imp.shape
        assert (q.unpack(weighted.codes, 256) == q.unpack(plain.codes, 256)).float().mean() > 0.999


def test_quantizing_in_bands_of_rows_gives_exactly_the_whole_matrix_result(monkeypatch):
    w = torch.randn(37, 256, generator=torch.Generator().manual_seed(3))
    imps = (None, torch.rand(256, generator=torch.Generator().manual_seed(4)),
            torch.rand(37, 256, generator=torch.Generator().manual_seed(5)))
    whole = [qbase.minmax_quantize(w, 16, 64, True, imp) for imp in imps]
    monkeypatch.setattr(qbase, "QUANT_BAND_WEIGHTS", 5 * 256)  # bands of 5 rows, the last one of 2
    for imp, expected in zip(imps, whole, strict=True):
        banded = qbase.minmax_quantize(w, 16, 64, True, imp)
        assert [t.shape for t in banded] == [(37, 256), (37, 4), (37, 4)]
        for got, want in zip(banded, expected, strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize("fmt", ["q6", "q5", "q4", "q3h", "q3", "q2"])
def test_a_heavily_weighted_column_gets_a_smaller_error(fmt):
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(5))
    q = get_quantizer(fmt)
    loud = torch.arange(256) % 64 == 7  # one column per group of 64
    imp = torch.where(loud, 100.0, 1.0)  # (in,)
    err_plain = (q.dequantize(q.quantize(w)) - w).square()  # (out, in)
    err_weighted = (q.dequantize(q.quantize(w, importance=imp)) - w).square()
    assert err_weighted[:, loud].mean() < 0.5 * err_plain[:, loud].mean()
    # ... and the weighted error, the objective, is lower overall, bought with the other columns
    assert (err_weighted * imp).sum() < (err_plain * imp).sum()
    assert err_weighted[:, ~loud].mean() >= err_plain[:, ~loud].mean()
    # a weighted column still cannot leave its group's range, so the half-step bound is kept there
    qw = q.quantize(w, importance=imp)
    deq = q.dequantize(qw).view(256, 4, 64)
    lo = qw.mins.float()[..., None]
    hi = lo + qw.scales.float()[..., None] * (q.levels - 1)
    inside = (w.view(256, 4, 64) >= lo) & (w.view(256, 4, 64) <= hi)
    assert ((deq - w.view(256, 4, 64)).abs() <= qw.scales.float()[..., None] / 2 * (1 + 1e-3) + 1e-7)[inside].all()


def test_importance_is_checked():
    q = get_quantizer("q4")
    with pytest.raises(QuantError, match="does not fit"):
        q.quantize(torch.zeros(4, 128), importance=torch.ones(64))
    with pytest.raises(QuantError, match="non-negative"):
        q.quantize(torch.zeros(4, 128), importance=-torch.ones(128))
    # plain min-max (q8: no search) has nothing to steer: importance leaves it unchanged
    w = _weights()
    q8 = get_quantizer("q8")
    assert torch.equal(q8.quantize(w, importance=torch.rand(256)).codes, q8.quantize(w).codes)


# -- GGUF block types -------------------------------------------------------------------------------

def _gguf_weight(type_name: str, rows: int = 24, cols: int = 512, seed: int = 4) -> QuantizedWeight:
    """Blocks made by the gguf package's quantizer, or (K-quants, which it cannot make) random blocks
    with sane float16 scales."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    fmt = GGUFFormat(type_name)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).numpy()
    try:
        raw = quantize(w, GGMLQuantizationType[type_name])
    except NotImplementedError:
        rng = np.random.default_rng(seed)
        raw = rng.integers(0, 256, (rows, cols // fmt.block * fmt.type_size), dtype=np.uint8)
        blocks = raw.reshape(rows, -1, fmt.type_size)
        # the float16 scales: d (and dmin) first, or last (Q6_K, Q3_K: d; Q2_K: d, dmin)
        at = {"Q6_K": slice(-2, None), "Q3_K": slice(-2, None), "Q2_K": slice(-4, None)}.get(type_name, slice(0, 4))
        halves = blocks[..., at].view(np.float16)
        halves[...] = rng.uniform(1e-3, 1e-2, halves.shape).astype(np.float16)
    return fmt.weight(torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8)), (rows, cols))


@pytest.mark.parametrize("type_name", SUPPORTED)
def test_gguf_blocks_decode_like_the_gguf_package_and_multiply_tile_by_tile(type_name, monkeypatch):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qw = _gguf_weight(type_name)
    fmt = method_for(qw.format, qw.group)
    ref_w = dequantize(qw.codes.numpy(), GGMLQuantizationType[type_name])
    assert np.array_equal(fmt.dequantize(qw).numpy(), ref_w)
    assert np.array_equal(fmt.dequantize(qw.rows(5, 9)).numpy(), ref_w[5:9])
    monkeypatch.setattr(qbase, "TILE_BYTES", 7 * 512 * 4)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(fmt.matmul(x, qw).double(), x.double() @ torch.from_numpy(ref_w).double().T,
                          atol=1e-4, rtol=1e-5)


# -- the compiled kernel ----------------------------------------------------------------------------

def _int8_blocks(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """x rounded as the kernel rounds it: int8 in blocks of ``block``, scale max|x| / 127, float64."""
    xb = x.double().view(x.shape[0], -1, block)
    d = xb.abs().amax(dim=-1, keepdim=True) / 127
    return (torch.round(xb / torch.where(d > 0, d, torch.ones_like(d))) * d).view_as(x)


def _kernel_input(fmt: str, x: torch.Tensor, kernel) -> torch.Tensor:
    """x as ``kernel`` multiplies it against ``fmt``, float64: as it is for float16 and bfloat16 rows,
    rounded to int8 per 256 values for K-quants in the AVX2 build, else per 32."""
    from tierlm.quant.linear import FLOAT_X_FORMATS, SUPER_BLOCK_X_FORMATS

    if fmt in FLOAT_X_FORMATS:
        return x.double()
    if kernel.isa == "avx2" and fmt in SUPER_BLOCK_X_FORMATS:
        return _int8_blocks(x, 256)
    return _int8_blocks(x)


def _kernel(isa: str | None = None):
    """Build ``isa`` of the quantized kernel (None: the one this CPU runs best), or None where the CPU cannot run it."""
    return built_or_none(quant_gemv(isa), cpu_runs_quant_build(isa), f"quantized kernel ({isa or 'best build'})")


@pytest.fixture(params=[b.isa for b in QUANT_BUILDS])
def kernel(request):
    """Each build of the quantized kernel in turn (AVX-512 CPUs run both), None where the CPU cannot run it."""
    return _kernel(request.param)


def test_quant_gemv_loads_the_best_build_this_cpu_runs():
    kernel = _kernel()
    if kernel is None:
        return
    assert (kernel.isa, kernel.row_tiles) == (("avx512-vnni", True) if cpu_has_avx512_vnni() else ("avx2", False))
    assert QuantLinear(None, DenseLinear(), kernel).name == f"quant-native+dense+{kernel.isa}"


@pytest.mark.parametrize("fmt", sorted(KERNEL_FORMATS))
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("rows", [41, 3])  # 41: the last 4-row tile overlaps; 3: fewer rows than a tile
def test_kernel_equals_dequantized_weight_times_int8_rounded_input(kernel, fmt, m, rows):
    if kernel is None:
        return
    if fmt.startswith("gguf:"):
        qw = _gguf_weight(fmt[5:], rows=rows)
    else:
        # groups of 64, 128 and 32 (one block: a new step and min every block)
        qw = get_quantizer(fmt, {1: 64, 3: 128, 8: 32}[m]).quantize(_weights(41, 512)[:rows])
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m))
    x[0, :32] = 0  # an all-zero block of x: scale 0
    deq = method_for(qw.format, qw.group).dequantize(qw).double()
    y = kernel_matmul(kernel, x, qw, num_threads=2)
    ref = _kernel_input(qw.format, x, kernel) @ deq.T
    assert y.shape == (m, rows)
    assert torch.allclose(y.double(), ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-5)
    # and int8 rounding of x costs little against the float product
    exact = x.double() @ deq.T
    assert ((y.double() - exact).norm() / exact.norm()).item() < 0.02


@pytest.mark.parametrize("fmt", ["gguf:Q2_K", "gguf:Q3_K", "gguf:Q4_K", "gguf:Q5_K", "gguf:Q6_K", "gguf:IQ4_XS"])
def test_avx2_k_quants_per_super_block_and_per_block_are_each_exact_for_their_rounding_of_x(fmt):
    """The AVX2 build's two K-quant paths: per 256-weight super-block (the default) against x rounded per
    256, and block by block against x rounded per 32 (tierlm_quant_kquant_blocks32)."""
    from tierlm.model.kernels import quant_kquant_blocks32

    kernel, switch = _kernel("avx2"), quant_kquant_blocks32()
    if kernel is None or switch is None:
        return
    qw = _gguf_weight(fmt[5:], rows=41, cols=768)
    deq = method_for(qw.format, qw.group).dequantize(qw).double()
    x = torch.randn(3, 768, generator=torch.Generator().manual_seed(9))
    x[1, 256:512] = 0  # a super-block of x all zero: scale 0
    try:
        for blocks32, block in ((0, 256), (1, 32)):
            switch(blocks32)
            ref = _int8_blocks(x, block) @ deq.T
            y = kernel_matmul(kernel, x, qw, num_threads=2).double()
            assert torch.allclose(y, ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-5), block
    finally:
        switch(0)


def _extreme_weight(fmt: str, rows: int, cols: int) -> QuantizedWeight:
    """Every code at its largest (even rows) or smallest (odd rows), scales 1: the int16 pair sums of the
    AVX2 build's vpmaddubsw are at their largest against x at +-127."""
    if not fmt.startswith("gguf:"):
        q = get_quantizer(fmt, 32)
        codes = torch.zeros(rows, cols, dtype=torch.uint8)
        codes[0::2] = q.levels - 1
        ones = torch.ones(rows, cols // 32, dtype=torch.float16)
        return QuantizedWeight(fmt, (rows, cols), q.pack(codes), 32, ones, torch.zeros_like(ones))
    fmt_ = GGUFFormat(fmt[5:])
    blocks = torch.zeros(rows, cols // fmt_.block, fmt_.type_size, dtype=torch.uint8)
    one = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8)
    if fmt == "gguf:Q6_K":  # 6-bit codes 63 / 0, int8 scales 127, d 1
        blocks[0::2, :, :192] = 255
        blocks[:, :, 192:208] = 127
        blocks[:, :, 208:] = one
    elif fmt == "gguf:Q2_K":  # 2-bit codes 3 / 0, 4-bit scales and mins 15, d and dmin 1
        blocks[:, :, :16] = 255
        blocks[0::2, :, 16:80] = 255
        blocks[:, :, 80:82] = one
        blocks[:, :, 82:84] = one
    elif fmt == "gguf:Q3_K":  # codes 7 (high bit and both low bits set) / 0 (weight -4 * scale), scales 63 - 32, d 1
        blocks[0::2, :, :96] = 255
        blocks[:, :, 96:108] = 255
        blocks[:, :, 108:] = one
    elif fmt == "gguf:IQ4_XS":  # block scales 63 - 32, nibbles 0 (value -127) / 15 (113), d 1
        blocks[:, :, :2] = one
        blocks[:, :, 2:8] = 255
        blocks[1::2, :, 8:] = 255
    elif fmt == "gguf:IQ4_NL":  # nibbles 0 (value -127) / 15 (113), d 1
        blocks[:, :, :2] = one
        blocks[1::2, :, 2:] = 255
    elif fmt in ("gguf:F16", "gguf:BF16"):  # +-the largest finite values that keep sums finite
        half = torch.float16 if fmt == "gguf:F16" else torch.bfloat16
        big = torch.tensor([6e4 if fmt == "gguf:F16" else 1e30], dtype=half)
        pair = torch.cat([big, -big]).view(torch.uint8).reshape(1, 1, 4)
        blocks[...] = pair.repeat(rows, cols // 2, 1).view(rows, cols, 2)
    elif fmt in ("gguf:Q4_K", "gguf:Q5_K"):  # sub-block scales and mins 63: all 12 bytes set; codes 15 / 31 / 0
        blocks[:, :, :2] = one
        blocks[:, :, 4:16] = 255
        blocks[0::2, :, 16:] = 255
    else:  # d 1 (and m 0); Q8_0: bytes 127 and -128; 4/5-bit codes all ones
        blocks[:, :, :2] = one
        payload = 2 if fmt == "gguf:Q8_0" else (4 if fmt in ("gguf:Q4_1", "gguf:Q5_1") else 2)
        blocks[0::2, :, payload:] = 127 if fmt == "gguf:Q8_0" else 255
        if fmt == "gguf:Q8_0":
            blocks[1::2, :, payload:] = 128
    return fmt_.weight(blocks.reshape(rows, -1), (rows, cols))


@pytest.mark.parametrize("fmt", sorted(KERNEL_FORMATS))
def test_kernel_sums_extreme_codes_against_extreme_inputs_exactly(kernel, fmt):
    """Largest codes times x's bytes all +127 (or -127): where a build's integer sums overflowed or
    saturated (the AVX2 one's vpmaddubsw with 8-bit codes), these products would be far off."""
    if kernel is None:
        return
    cols = 512
    qw = _extreme_weight(fmt, 6, cols)
    deq = method_for(qw.format, qw.group).dequantize(qw).double()
    assert deq.abs().max() > 0 and deq[0].abs().min() > 0  # every weight of row 0 at an extreme
    x = torch.ones(4, cols)
    x[1] = -1
    x[2, 0::2] = -1  # alternating signs: maddubs pairs of opposite signs
    x[3, :256] = -1
    y = kernel_matmul(kernel, x, qw, num_threads=2)
    ref = _kernel_input(qw.format, x, kernel) @ deq.T
    assert torch.allclose(y.double(), ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-5)


def test_quant_linear_quantizes_on_prepare_and_sends_prompts_to_the_kernel_only_when_asked(kernel):
    lin = QuantLinear(get_quantizer("q4"), DenseLinear(), kernel)
    w = _weights(40, 256)
    bias = torch.randn(40)
    qw = lin.prepare(w)
    # with a kernel that has them, repacked into row tiles (40 rows padded to 48) of the same codes,
    # steps and mins; the AVX2 build runs the rows
    tiles = kernel is not None and kernel.row_tiles
    assert isinstance(qw, RowTiles if tiles else QuantizedWeight) and qw.format == "q4"
    stored = get_quantizer("q4").quantize(w)
    num_rows = 48 if tiles else 40
    assert qw.nbytes == num_rows * (128 + 4 * 2 * 2)  # codes + float16 steps and mins
    deq = get_quantizer("q4").dequantize(stored)
    x16 = torch.randn(16, 256, generator=torch.Generator().manual_seed(6))  # > max_kernel_rows: float path
    assert torch.allclose(lin.apply(x16, qw, bias), x16 @ deq.T + bias, atol=1e-4)
    assert torch.allclose(lin.apply(x16, stored, bias), x16 @ deq.T + bias, atol=1e-4)  # file-layout rows too
    x1 = x16[:1]
    expected = (_int8_blocks(x1) @ deq.double().T).float() if kernel is not None else x1 @ deq.T
    assert torch.allclose(lin.apply(x1, qw, bias), expected + bias, atol=1e-4)
    # int8_prompts: the kernel at every batch size (activations rounded to int8 per 32 values)
    fast = QuantLinear(get_quantizer("q4"), DenseLinear(), kernel, int8_prompts=True)
    for x in (x16, torch.randn(70, 256, generator=torch.Generator().manual_seed(7))):
        expected = (_int8_blocks(x) @ deq.double().T).float() if kernel is not None else x @ deq.T
        assert torch.allclose(fast.apply(x, qw, bias), expected + bias, atol=1e-4)
        assert torch.allclose(fast.apply(x, stored, bias), expected + bias, atol=1e-4)
    # quantized weights pass through prepare; float ones stay float without a quantizer
    assert lin.prepare(qw) is qw
    native = QuantLinear(None, DenseLinear(), kernel)
    assert native.prepare(w) is w and torch.equal(native.apply(x16, w, None), x16 @ w.T)
    if kernel is not None:
        assert kernel_matmul(kernel, x16[:0], qw).shape == (0, 40)  # an empty batch


def test_fused_weight_concatenates_its_parts_outputs():
    a = _gguf_weight("Q5_0", rows=8, cols=256)
    b = _gguf_weight("Q8_0", rows=4, cols=256)
    fused = FusedWeight((a, b))
    assert fused.shape == (12, 256) and fused.nbytes == a.nbytes + b.nbytes
    lin = QuantLinear(None, DenseLinear(), None)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(7))
    deq = torch.cat([method_for(p.format, p.group).dequantize(p) for p in (a, b)])
    assert torch.allclose(lin.apply(x, fused, None), x @ deq.T, atol=1e-4)


# -- row tiles (tierlm.quant.tiles) -------------------------------------------------------------------

TILED = ["Q4_0", "Q6_K", "q8", "q6", "q5", "q4", "q3h", "q3", "q2"]


def _tile_source(name: str, rows: int, group: int = 64) -> QuantizedWeight:
    """A GGUF type's blocks (upper case) or a tierlm format's matrix (rows x 512)."""
    if name.isupper():
        return _gguf_weight(name, rows=rows)
    return get_quantizer(name, group).quantize(_weights(41, 512)[:rows])


@pytest.mark.parametrize("name", TILED)
@pytest.mark.parametrize("rows", [41, 16, 3])  # 41: a padded last tile; 3: fewer rows than one tile
def test_row_tiles_hold_exactly_the_weight_and_pad_with_zero_rows(name, rows):
    qw = _tile_source(name, rows, group={41: 64, 16: 128, 3: 32}[rows])
    tw = tile_rows(qw)
    num_tiles = -(-rows // TILE_ROWS)
    assert tw.shape == qw.shape and tw.format == qw.format and tw.group == qw.group
    assert tw.nbytes == num_tiles * TILE_ROWS * qw.nbytes // rows  # the rows' bytes, padding rows included
    deq = dequantize_tiles(tw, 0, num_tiles)
    assert torch.equal(deq[:rows], method_for(qw.format, qw.group).dequantize(qw))
    assert torch.equal(deq[rows:], torch.zeros(num_tiles * TILE_ROWS - rows, 512))
    if rows > 2 and name == "Q4_0":
        # tile 0, block 1 starts with row 2's d at bytes 4..5; its chunk 3 holds row 2's nibble bytes
        # 12..15 at 32 + 64 * 3 + 4 * 2
        b = 288
        assert torch.equal(tw.tiles[0, b + 4:b + 6], qw.codes[2, 18:20])
        assert torch.equal(tw.tiles[0, b + 32 + 192 + 8:b + 32 + 192 + 12], qw.codes[2, 18 + 2 + 12:18 + 2 + 16])
    if rows > 2 and name == "Q6_K":
        # super-block 1 of tile 0: row 2's d (the block's last 2 bytes) at 4..5, its sub-block 5
        # scale at 32 + 16 * 5 + 2, and weight 32 * 3 + 16 + 4 * 2 + 1 = 121's code split between
        # block 3's chunk 2 (high nibble of row 2's byte 1) and its second top-bits chunk (bits 4..5)
        sb, row = 3360, qw.codes[2, 210:420]
        assert torch.equal(tw.tiles[0, sb + 4:sb + 6], row[208:210])
        assert tw.tiles[0, sb + 32 + 80 + 2] == row[192 + 5]
        code = qtiles.q6_k_codes(row.reshape(1, 1, 210))[0, 0, 121].item()
        blk = sb + 288 + 384 * 3
        assert tw.tiles[0, blk + 64 * 2 + 4 * 2 + 1].item() >> 4 == code & 15
        assert (tw.tiles[0, blk + 320 + 4 * 2 + 1].item() >> 4) & 3 == code >> 4
    if rows == 41 and name == "q3":
        # group 1 of tile 0 (records of 64 + 2 blocks x 192 bytes): row 2's step at 2 * 2, then block
        # 0's 2-bit plane (chunk h = 1) and 1-bit plane hold weight 64 + 16 + 4 * 2 + 1 = 89
        g1, code = 448, get_quantizer("q3", 64).unpack(qw.codes, 512)[2, 89].item()
        assert torch.equal(tw.tiles[0, g1 + 4:g1 + 6].view(torch.float16), qw.scales[2, 1:2])
        assert (tw.tiles[0, g1 + 64 + 64 + 9].item() >> 4) & 3 == code & 3  # bits 2l, l = 2
        assert (tw.tiles[0, g1 + 64 + 128 + 9].item() >> 6) & 1 == code >> 2  # bit 4h + l = 6


@pytest.mark.parametrize("name", ["Q4_0", "Q6_K", "q4", "q3h"])
def test_row_tiles_are_built_band_by_band_with_the_same_bytes(name, monkeypatch):
    qw = _tile_source(name, 41)
    whole = tile_rows(qw).tiles
    monkeypatch.setattr(qtiles, "TILE_BYTES", 1)  # one tile per band; the last band pads 9 rows
    assert torch.equal(tile_rows(qw).tiles, whole)


def test_q6_k_codes_follow_ggml_layout():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qw = _gguf_weight("Q6_K", rows=5)
    blocks = qw.codes.reshape(5, 2, 210)
    codes = qtiles.q6_k_codes(blocks).float()  # (5, 2, 256)
    d = blocks[..., 208:].contiguous().view(torch.float16).float()  # (5, 2, 1)
    sc = blocks[..., 192:208].contiguous().view(torch.int8).float()  # (5, 2, 16)
    w = ((d * sc)[..., None] * (codes.reshape(5, 2, 16, 16) - 32)).reshape(5, 512)
    assert torch.equal(w, torch.from_numpy(dequantize(qw.codes.numpy(), GGMLQuantizationType.Q6_K)))


def test_row_tiles_take_only_their_formats():
    with pytest.raises(QuantError, match="no row-tile layout for gguf:Q8_0"):
        tile_rows(_gguf_weight("Q8_0"))
    assert set(TILE_FORMATS) == set(TILE_KERNEL_FORMATS) == {f"gguf:{n}" if n.isupper() else n for n in TILED}


@pytest.mark.parametrize("name", TILED)
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("rows", [41, 3])
def test_row_tile_kernel_equals_dequantized_weight_times_int8_rounded_input(kernel, name, m, rows):
    if kernel is None:
        return
    qw = _tile_source(name, rows, group={1: 64, 3: 128, 8: 32}[m])
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m))
    x[0, :32] = 0  # an all-zero block of x: scale 0
    if not kernel.row_tiles:  # the AVX2 build refuses row tiles (QuantLinear never makes them for it)
        with pytest.raises(ValueError, match="does not take"):
            kernel_matmul(kernel, x, tile_rows(qw), num_threads=2)
        return
    deq = method_for(qw.format, qw.group).dequantize(qw).double()
    y = kernel_matmul(kernel, x, tile_rows(qw), num_threads=2)
    ref = _int8_blocks(x) @ deq.T
    assert y.shape == (m, rows)
    assert torch.allclose(y.double(), ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-5)
    # the row kernel on the file's layout computes the same products (summed in another order)
    assert torch.allclose(y, kernel_matmul(kernel, x, qw, num_threads=2), atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("name", TILED)
def test_row_tiles_multiply_prompt_chunks_band_by_band(name, monkeypatch):
    qw = _tile_source(name, 41)
    monkeypatch.setattr("tierlm.quant.tiles.TILE_BYTES", 2 * 512 * 4 * TILE_ROWS)  # bands of 2 tiles
    x = torch.randn(20, 512, generator=torch.Generator().manual_seed(3))
    deq = method_for(qw.format, qw.group).dequantize(qw)
    assert torch.allclose(tiled_tiles_matmul(x, tile_rows(qw)), x @ deq.T, atol=1e-4)
    with pytest.raises(QuantError, match="input has 256 features"):
        tiled_tiles_matmul(x[:, :256], tile_rows(qw))


def test_quant_linear_tiles_resident_matrices_of_tiled_formats(kernel):
    a, b = _gguf_weight("Q4_0", rows=40, cols=256), _gguf_weight("Q8_0", rows=8, cols=256)
    x1 = torch.randn(1, 256, generator=torch.Generator().manual_seed(8))
    x16 = torch.randn(16, 256, generator=torch.Generator().manual_seed(9))
    deq = torch.cat([method_for(p.format, p.group).dequantize(p) for p in (a, b)])
    lin = QuantLinear(None, DenseLinear(), kernel)
    fused = lin.prepare(FusedWeight((a, b)))
    assert isinstance(fused, FusedWeight) and fused.shape == (48, 256)
    if kernel is None:
        assert fused.parts == (a, b)
        return
    if not kernel.row_tiles:  # the AVX2 build: Q4_0 in its own tiles of 8 rows, not the 16-row ones
        assert not lin.kernel_takes(tile_rows(a))
        assert torch.allclose(lin.apply(x1, tile_rows(a), None), x1 @ deq[:40].T, atol=1e-4)  # float path
    tiled, kept = fused.parts
    if kernel.row_tiles:
        assert isinstance(tiled, RowTiles) and kept is b  # Q8_0 has no 16-row tile layout
    else:  # the AVX2 build has 8-row tiles for both
        assert isinstance(tiled, RowTiles) and isinstance(kept, RowTiles) and kept.rows_per_tile == 8
    assert lin.prepare(tiled) is tiled and lin.prepare(fused.parts[0]) is tiled
    assert torch.allclose(lin.apply(x16, fused, None), x16 @ deq.T, atol=1e-4)  # above max_kernel_rows: float
    expected = (_int8_blocks(x1) @ deq.double().T).float()
    assert torch.allclose(lin.apply(x1, fused, None), expected, atol=1e-4)
    assert QuantLinear(None, DenseLinear(), None).prepare(a) is a  # no kernel: the file's layout


@pytest.mark.parametrize("m", [1, 3])
def test_q3h_tiles_split_pairs_the_same_without_avx512_vbmi(m):
    """The q3h tile kernel CPUs without VBMI run (a = p / 11 by multiplies) gives the same sums as the
    vpermi2b one, and both equal the dequantized weight times the int8-rounded input."""
    kernel = _kernel("avx512-vnni")
    if kernel is None:
        return
    from tierlm.model.kernels import quant_q3h_split

    split = quant_q3h_split()
    qw = _tile_source("q3h", 41, group=64)
    tw = tile_rows(qw)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(5))
    ref = _int8_blocks(x) @ method_for("q3h", 64).dequantize(qw).double().T
    default = kernel_matmul(kernel, x, tw, num_threads=2)
    try:
        split(0)
        without = kernel_matmul(kernel, x, tw, num_threads=2)
    finally:
        split(-1)
    assert torch.equal(without, default)  # the same integer sums, scaled alike
    assert torch.allclose(without.double(), ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("fmt", ["q8", "q4", "q3h", "gguf:Q4_0"])
def test_packed_rows_round_trip_as_views_and_multiply_exactly_like_the_original(kernel, fmt):
    """A store keeps a quantized matrix as one record per row (codes, steps, mins); the views read
    back are the same weight, and the kernel takes their row strides without copying."""
    if fmt.startswith("gguf:"):
        qw = _gguf_weight("Q4_0", rows=41)
    else:
        qw = get_quantizer(fmt, 64).quantize(_weights(41, 512))
    rows = qw.packed_rows()
    assert rows.dtype == torch.uint8 and rows.shape[0] == 41
    back = QuantizedWeight.from_packed_rows(rows, qw.format, qw.group, qw.shape[1])
    assert back.shape == qw.shape and back.nbytes == qw.nbytes == rows.numel()
    assert back.codes.data_ptr() == rows.data_ptr()  # a view, not a copy
    assert torch.equal(back.codes, qw.codes)
    if qw.scales is not None:
        assert torch.equal(back.scales, qw.scales) and torch.equal(back.mins, qw.mins)
    method = method_for(qw.format, qw.group)
    band = QuantizedWeight.from_packed_rows(rows[7:30], qw.format, qw.group, qw.shape[1])
    assert torch.equal(method.dequantize(band), method.dequantize(qw)[7:30])
    if kernel is not None and fmt in KERNEL_FORMATS:
        x = torch.randn(2, 512, generator=torch.Generator().manual_seed(9))
        assert torch.equal(kernel_matmul(kernel, x, band), kernel_matmul(kernel, x, qw.rows(7, 30)))


@pytest.mark.parametrize("fmt", ["gguf:Q2_K", "gguf:Q3_K", "gguf:Q4_K", "gguf:Q5_K", "gguf:Q6_K"])
@pytest.mark.parametrize("rows", [41, 3])
def test_prompt_gemm_equals_dequantized_weight_times_x_rounded_per_256(fmt, rows):
    """quant_gemv.c's prompt GEMM (tiles of W decoded once for many rows of x), which ``int8_prompts``
    sends prompt chunks in these formats to."""
    from tierlm.quant.linear import prompt_matmul

    kernel = _kernel()
    if kernel is None:
        return
    qw = _gguf_weight(fmt[5:], rows=rows, cols=768)
    deq = method_for(qw.format, qw.group).dequantize(qw).double()
    x = torch.randn(37, 768, generator=torch.Generator().manual_seed(3))
    x[5, 256:512] = 0  # a super-block of x all zero
    ref = _int8_blocks(x, 256) @ deq.T
    y = prompt_matmul(kernel, x, qw, num_threads=2).double()
    assert y.shape == (37, rows)
    assert torch.allclose(y, ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-5)
    q = QuantLinear(None, DenseLinear(), kernel, int8_prompts=True)
    assert torch.equal(q.apply(x, qw, None), prompt_matmul(kernel, x, qw))


@pytest.mark.parametrize("rows", [41, 3, 16])
@pytest.mark.parametrize("type_name", ["Q4_K", "Q4_0", "Q6_K", "Q5_K", "Q3_K", "Q2_K", "IQ4_XS", "Q8_0"])
def test_avx2_tiles_of_8_rows_dequantize_bit_for_bit_and_multiply_exactly(type_name, rows):
    """The AVX2 build's K-quant, IQ4_XS, Q4_0 and Q8_0 tiles (tierlm.quant.tiles.tile_rows_kx8): untiled equal
    to the gguf package's dequantization, products equal to the dequantized weight times x rounded as for
    the rows (per 256 / per 32), the K-quants' bit for bit equal to their rows'; the linear method makes
    them for resident matrices, runs them in the kernel, and untiles bands for prompt chunks."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from tierlm.quant.tiles import KX8_FORMATS, KX8_ROWS, dequantize_tiles, tile_rows_kx8

    kernel = _kernel("avx2")
    if kernel is None:
        return
    qw = _gguf_weight(type_name, rows=rows, cols=768)
    ref_w = torch.from_numpy(dequantize(qw.codes.numpy(), GGMLQuantizationType[type_name]))
    tw = tile_rows_kx8(qw)
    assert tw.rows_per_tile == KX8_ROWS and tw.num_tiles == -(-rows // 8)
    # Q4_0, Q8_0, Q6_K, Q2_K: the file's bytes per row; Q4_K: its 6-bit scales and mins as bytes, 1184 bytes a
    # super-block; Q5_K: those and its codes in 6 bits, 1696; Q3_K: its codes in nibbles, 1168; IQ4_XS:
    # its scales as bytes, 1104
    block, _, tile_block, _ = KX8_FORMATS[f"gguf:{type_name}"]
    assert tw.nbytes == tw.num_tiles * tile_block * 768 // block
    sizes = {"Q4_K": 1184, "Q4_0": 144, "Q6_K": 8 * 210, "Q5_K": 1696, "Q3_K": 1168, "Q2_K": 8 * 84, "IQ4_XS": 1104,
             "Q8_0": 8 * 34}
    assert tile_block == sizes[type_name]
    assert torch.equal(dequantize_tiles(tw, 0, tw.num_tiles)[:rows], ref_w)
    x = torch.randn(3, 768, generator=torch.Generator().manual_seed(11))
    x[1, 256:512] = 0
    per32 = type_name in ("Q4_0", "Q8_0")  # x rounded per 32
    ref = _int8_blocks(x, 32 if per32 else 256) @ ref_w.double().T
    y = kernel_matmul(kernel, x, tw, num_threads=2).double()
    assert torch.allclose(y, ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-5)
    # rows of x four at a time against a tile (9 rows: two blocks of 4, then one), as one at a time
    x9 = torch.randn(9, 768, generator=torch.Generator().manual_seed(13))
    one_by_one = torch.cat([kernel_matmul(kernel, x9[i:i + 1], tw) for i in range(9)])
    assert torch.equal(kernel_matmul(kernel, x9, tw, num_threads=2), one_by_one)
    q = QuantLinear(None, DenseLinear(), kernel)
    prepared = q.prepare(qw)
    assert isinstance(prepared, RowTiles) and prepared.rows_per_tile == KX8_ROWS
    rows_y = kernel_matmul(kernel, x, qw).to(x.dtype)
    if type_name != "Q4_0":  # the same arithmetic: streamed rows and resident tiles agree exactly
        assert torch.equal(q.apply(x, prepared, None), rows_y)
    else:
        assert torch.allclose(q.apply(x, prepared, None), rows_y, atol=1e-4 * rows_y.abs().max().item())
    # a prompt chunk: by default through the int8 kernel (not Q4_0's and Q8_0's); with int8_prompts=False in
    # float from untiled bands
    xs = torch.randn(20, 768, generator=torch.Generator().manual_seed(12))
    assert q.int8_prompts_for(prepared) == (not per32)
    if not per32:
        assert torch.equal(q.apply(xs, prepared, None), kernel_matmul(kernel, xs, tw))
    float_q = QuantLinear(None, DenseLinear(), kernel, int8_prompts=False)
    assert not float_q.int8_prompts_for(prepared)
    y_float = float_q.apply(xs, prepared, None).double()
    assert torch.allclose(y_float, xs.double() @ ref_w.double().T, atol=1e-3, rtol=1e-4)
