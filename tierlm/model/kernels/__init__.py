"""Compiled CPU kernels, loaded with ctypes (no torch headers, so they build in about a second).

``make`` builds them (``python -m tierlm.model.kernels``); a machine whose CPU or compiler cannot
build them runs the portable torch paths instead (see tierlm.model.linear.default_linear_method).
Nothing is compiled or loaded at import.
"""

from __future__ import annotations

import ctypes
import functools
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("bf16_gemm.c")
LIBRARY = Path(__file__).with_name("libtierlm_bf16.so")
QUANT_SOURCE = Path(__file__).with_name("quant_gemv.c")
QUANT_LIBRARY = Path(__file__).with_name("libtierlm_quant.so")
QUANT_AVX2_LIBRARY = Path(__file__).with_name("libtierlm_quant_avx2.so")
NORM_SOURCE = Path(__file__).with_name("rms_norm.c")
NORM_LIBRARY = Path(__file__).with_name("libtierlm_norm.so")
F32_SOURCE = Path(__file__).with_name("f32_gemm.c")
F32_LIBRARY = Path(__file__).with_name("libtierlm_f32.so")
ATTENTION_SOURCE = Path(__file__).with_name("decode_attention.c")
ATTENTION_LIBRARY = Path(__file__).with_name("libtierlm_attention.so")
ROPE_SOURCE = Path(__file__).with_name("rope.c")
ROPE_LIBRARY = Path(__file__).with_name("libtierlm_rope.so")
PREFILL_ATTENTION_SOURCE = Path(__file__).with_name("prefill_attention.c")
PREFILL_ATTENTION_LIBRARY = Path(__file__).with_name("libtierlm_prefill_attention.so")
DECODE_SOURCE = Path(__file__).with_name("decode_layers.c")
DECODE_LIBRARY = Path(__file__).with_name("libtierlm_decode.so")
_FLAGS = ["-O3", "-march=x86-64-v4", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC"]
_F32_FLAGS = ["-O3", "-march=x86-64-v4", "-fopenmp", "-shared", "-fPIC"]
_QUANT_FLAGS = ["-O3", "-march=x86-64-v4", "-mavx512vnni", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
_QUANT_AVX2_FLAGS = ["-O3", "-march=x86-64-v3", "-fopenmp", "-shared", "-fPIC"]  # quant_gemv.c without AVX-512
_NORM_FLAGS = ["-O3", "-march=x86-64-v3", "-fopenmp", "-shared", "-fPIC"]  # AVX2: every x86-64 CPU of the decade
# (the decode attention and RoPE too)


def cpu_has_avx512_bf16() -> bool:
    return _cpu_has("avx512_bf16")


def cpu_has_avx512_vnni() -> bool:
    return _cpu_has("avx512_vnni") and _cpu_has("avx512bw") and _cpu_has("avx512vl") and _cpu_has("f16c")


def cpu_has_avx512f() -> bool:
    return _cpu_has("avx512f")


def cpu_has_avx2() -> bool:
    return _cpu_has("avx2") and _cpu_has("fma")


def cpu_is_x86_64_v3() -> bool:
    """Whether this CPU runs code built with -march=x86-64-v3 (which may use any of these anywhere)."""
    return all(_cpu_has(f) for f in ("avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm"))


def _cpu_has(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def _fresh(library: Path, source: Path) -> bool:
    return library.exists() and library.stat().st_mtime >= source.stat().st_mtime


def _compile(supported: bool, source: Path, library: Path, flags: list[str], force: bool) -> Path | None:
    if not supported:
        return None
    if _fresh(library, source) and not force:
        return library
    subprocess.run(["gcc", *flags, str(source), "-o", str(library)], check=True)
    return library


def _load(supported: bool, library: Path, source: Path, symbol: str, argtypes: list, restype):
    """``symbol`` from ``library`` with its ctypes signature, or None when the CPU cannot run it or
    the library is missing or older than its source.

    The libraries link libgomp.so.1 by soname; torch is imported first so that its copy is the one
    loaded under that soname, and both share one OpenMP thread pool instead of fighting over the cores.
    """
    if not supported or not _fresh(library, source):
        return None
    import torch  # noqa: F401  (load torch's libgomp first; see above)

    fn = getattr(ctypes.CDLL(str(library)), symbol)
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def build(force: bool = False) -> Path | None:
    """Compile the bf16 GEMM if this CPU runs it; returns the library path, or None."""
    return _compile(cpu_has_avx512_bf16(), SOURCE, LIBRARY, _FLAGS, force)


@dataclass(frozen=True)
class _QuantBuild:
    """One build of quant_gemv.c (its header says what each holds)."""

    isa: str
    library: Path
    flags: list[str]
    supported: Callable[[], bool]  # whether this CPU runs it
    row_tiles: bool  # has the row-tile kernels (tierlm.quant.tiles)


# preferred first: quant_gemv() loads the first one this CPU runs
QUANT_BUILDS = (_QuantBuild("avx512-vnni", QUANT_LIBRARY, _QUANT_FLAGS, cpu_has_avx512_vnni, True),
                _QuantBuild("avx2", QUANT_AVX2_LIBRARY, _QUANT_AVX2_FLAGS, cpu_is_x86_64_v3, False))


def cpu_runs_quant_build(isa: str | None = None) -> bool:
    """Whether this CPU runs build ``isa`` of the quantized GEMV ("avx512-vnni", "avx2"), or (None) any."""
    return any(b.supported() for b in QUANT_BUILDS if isa in (None, b.isa))


def build_quant(force: bool = False) -> Path | None:
    """Compile every build of the quantized GEMV this CPU runs: AVX512-VNNI and AVX2, both where it has
    both (the tests check each); returns the library ``quant_gemv()`` loads, or None."""
    built = [_compile(b.supported(), QUANT_SOURCE, b.library, b.flags, force) for b in QUANT_BUILDS]
    return next((path for path in built if path is not None), None)


def build_f32(force: bool = False) -> Path | None:
    """Compile the float32 GEMM if this CPU runs it (AVX-512F); returns the library path, or None."""
    return _compile(cpu_has_avx512f(), F32_SOURCE, F32_LIBRARY, _F32_FLAGS, force)


@functools.cache
def f32_gemm():
    """``f(x_ptr, w_ptr, y_ptr, M, N, K, num_threads)`` from f32_gemm.c, or None when unavailable."""
    return _load(cpu_has_avx512f(), F32_LIBRARY, F32_SOURCE, "tierlm_f32_gemm",
                 [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int] * 4, None)


def build_norm(force: bool = False) -> Path | None:
    """Compile the float32 RMSNorm if this CPU runs it (AVX2); returns the library path, or None."""
    return _compile(cpu_has_avx2(), NORM_SOURCE, NORM_LIBRARY, _NORM_FLAGS, force)


def build_attention(force: bool = False) -> Path | None:
    """Compile the paged decode attention if this CPU runs it (AVX2); returns the library path, or None."""
    return _compile(cpu_has_avx2(), ATTENTION_SOURCE, ATTENTION_LIBRARY, _NORM_FLAGS, force)


def build_prefill_attention(force: bool = False) -> Path | None:
    """Compile the paged prompt attention if this CPU runs it (AVX-512F); returns the library path, or None."""
    return _compile(cpu_has_avx512f(), PREFILL_ATTENTION_SOURCE, PREFILL_ATTENTION_LIBRARY, _F32_FLAGS, force)


def build_rope(force: bool = False) -> Path | None:
    """Compile the in-place float32 and bfloat16 RoPE if this CPU runs it (AVX2); returns the library path, or None."""
    return _compile(cpu_has_avx2(), ROPE_SOURCE, ROPE_LIBRARY, _NORM_FLAGS, force)


def build_decode_layers(force: bool = False) -> Path | None:
    """Compile the fused decode step (AVX2, like the kernels it calls); returns the library path, or None."""
    return _compile(cpu_has_avx2(), DECODE_SOURCE, DECODE_LIBRARY, _NORM_FLAGS, force)


@functools.cache
def decode_layers_kernel():
    """``f(model_ptr, x_ptr, N, slot_mapping_ptr, kv_slots_ptr, q_pos_ptr, max_kv, cos_ptrs, sin_ptrs,
    num_threads) -> int`` from decode_layers.c (0 = done, -1 = a kernel refused its arguments, -2 = out
    of memory), or None when unavailable. The model struct is tierlm.model.fused_decode's."""
    return _load(cpu_has_avx2(), DECODE_LIBRARY, DECODE_SOURCE, "tierlm_decode_layers",
                 [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                  ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int], ctypes.c_int)


def address(fn) -> int:
    """The C entry point behind a ctypes function (to hand one kernel to another)."""
    return ctypes.cast(fn, ctypes.c_void_p).value


# x, row_stride, N, H, D, rot, cos, sin, interleaved: both RoPE entry points (rope.c)
_ROPE_ARGTYPES = ([ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_int] * 4
                  + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int])


@functools.cache
def rope_bf16_kernel():
    """``f(x_ptr, row_stride, N, H, D, rot, cos_ptr, sin_ptr, interleaved)`` from rope.c for bfloat16 x,
    cos and sin (in place), or None when unavailable."""
    return _load(cpu_has_avx2(), ROPE_LIBRARY, ROPE_SOURCE, "tierlm_rope_bf16", _ROPE_ARGTYPES, None)


@functools.cache
def rope_kernel():
    """``f(x_ptr, row_stride, N, H, D, rot, cos_ptr, sin_ptr, interleaved)`` from rope.c (float32, in
    place), or None when unavailable."""
    return _load(cpu_has_avx2(), ROPE_LIBRARY, ROPE_SOURCE, "tierlm_rope", _ROPE_ARGTYPES, None)


@functools.cache
def decode_attention_kernel():
    """``f(dtype, q_ptr, q_stride, k_cache_ptr, v_cache_ptr, slots_ptr, q_pos_ptr, B, H, Hkv, D, max_kv,
    window, scale, out_ptr, num_threads) -> int`` from decode_attention.c (0 = done, -1 = a shape it
    does not take, -2 = out of memory), or None when unavailable."""
    return _load(cpu_has_avx2(), ATTENTION_LIBRARY, ATTENTION_SOURCE, "tierlm_decode_attention",
                 [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                  ctypes.c_void_p] + [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int],
                 ctypes.c_int)


@functools.cache
def prefill_attention_kernel():
    """``f(dtype, q_ptr, q_stride, k_cache_ptr, v_cache_ptr, slots_ptr, slots_stride, rows_ptr, num_rows, H,
    Hkv, D, window, scale, out_ptr, num_threads) -> int`` from prefill_attention.c (0 = done, -1 = a
    shape it does not take, -2 = out of memory), or None when unavailable."""
    return _load(cpu_has_avx512f(), PREFILL_ATTENTION_LIBRARY, PREFILL_ATTENTION_SOURCE, "tierlm_prefill_attention",
                 [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                  ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int] * 5 + [ctypes.c_float, ctypes.c_void_p,
                                                                            ctypes.c_int], ctypes.c_int)


@functools.cache
def rms_norm_kernel():
    """``f(x_ptr, w_ptr, y_ptr, n, d, eps, num_threads)`` from rms_norm.c (float32 rows), or None when
    unavailable (not built, older than its source, or a CPU without AVX2)."""
    return _load(cpu_has_avx2(), NORM_LIBRARY, NORM_SOURCE, "tierlm_rms_norm",
                 [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_float,
                  ctypes.c_int], None)


@functools.cache
def bf16_gemm():
    """``f(x_ptr, w_ptr, y_ptr, M, N, K, num_threads)`` from bf16_gemm.c, or None when unavailable."""
    return _load(cpu_has_avx512_bf16(), LIBRARY, SOURCE, "tierlm_bf16_gemm",
                 [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int] * 4, None)


@dataclass(frozen=True)
class QuantKernel:
    """A loaded build of quant_gemv.c, called as its entry point ``tierlm_quant_gemv`` (see quant_gemv)."""

    gemv: Callable[..., int]  # the ctypes function
    isa: str  # "avx512-vnni" or "avx2"
    row_tiles: bool  # takes row tiles (tierlm.quant.tiles); the AVX2 build returns -1 for them
    # ``dequant(fmt, codes_ptr, row_bytes, N, K, out_ptr, num_threads) -> int``: GGUF block types to
    # float32, equal to the gguf package's (0 = done, -1 = a format or shape it does not take)
    dequant: Callable[..., int]
    # ``prompt(fmt, x_ptr, M, K, codes_ptr, row_bytes, y_ptr, N, num_threads) -> int``: K-quant rows
    # decoded once per tile against any number of rows of x (prompt chunks; -1 = not taken)
    prompt: Callable[..., int]
    kx8_tiles: bool = False  # K-quants, Q4_0 in tiles of 8 rows (tierlm.quant.tiles.KX8_FORMATS): the AVX2 build

    def __call__(self, *args) -> int:
        return self.gemv(*args)


@functools.cache
def quant_q3h_split():
    """``f(choice)`` from quant_gemv.c: which q3h tile kernel runs, -1 the VBMI one where the CPU has
    it (the default), 0 the one CPUs without VBMI run; or None when the kernel is unavailable."""
    return _load(cpu_has_avx512_vnni(), QUANT_LIBRARY, QUANT_SOURCE, "tierlm_quant_q3h_split", [ctypes.c_int], None)


@functools.cache
def quant_kquant_blocks32():
    """``f(on)`` from the AVX2 build of quant_gemv.c: 1 runs K-quants (and IQ4_XS) block by block against x
    rounded per 32 values, 0 (the default) per 256-weight super-block against x rounded per 256 (the
    header says why); None where that build is unavailable."""
    return _load(cpu_is_x86_64_v3(), QUANT_AVX2_LIBRARY, QUANT_SOURCE, "tierlm_quant_kquant_blocks32",
                 [ctypes.c_int], None)


def quant_gemv(isa: str | None = None) -> QuantKernel | None:
    """``f(fmt, x_ptr, M, K, codes_ptr, steps_ptr, mins_ptr, group, row_bytes, scale_stride, y_ptr, N,
    num_threads) -> int`` from quant_gemv.c (0 = done, -1 = shape or format it does not take), as built for
    the best instructions this CPU has (AVX512-VNNI, else AVX2), or build ``isa``; None when the CPU
    cannot run it or it is missing or older than its source. Format ids: tierlm.quant.linear.KERNEL_FORMATS."""
    build = next((b for b in QUANT_BUILDS if b.isa == isa or (isa is None and b.supported())), None)
    if build is None:
        return None
    gemv = _load(build.supported(), build.library, QUANT_SOURCE, "tierlm_quant_gemv",
                 [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                  ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
                  ctypes.c_int], ctypes.c_int)
    if gemv is None:
        return None
    dequant = _load(build.supported(), build.library, QUANT_SOURCE, "tierlm_quant_dequant",
                    [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                     ctypes.c_int], ctypes.c_int)
    prompt = _load(build.supported(), build.library, QUANT_SOURCE, "tierlm_quant_prompt",
                   [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64,
                    ctypes.c_void_p, ctypes.c_int, ctypes.c_int], ctypes.c_int)
    return QuantKernel(gemv, build.isa, build.row_tiles, dequant, prompt, kx8_tiles=build.isa == "avx2")
