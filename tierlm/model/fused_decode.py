"""``FusedDecode``: a decode step through every layer in one C call (kernels/decode_layers.c).

The layer-by-layer path (tierlm.model.transformer) spends about 15 small calls a layer outside the
matmuls, ~190 us a layer at batch 1: 4 of an 18 ms q2 step of the 1.1B Llama, a fixed cost that
keeps the small formats' steps from shrinking with their bytes. This path hands the whole step to C,
which calls the same kernels (quantized GEMV, float32 GEMM, RMSNorm, RoPE, decode attention) with
the glue between them (residual adds, SiLU * up, the cache writes) in plain loops.

It takes what that C loop implements and nothing else, decided once per model (``plan_fused_decode``, whose reason
for a refusal is logged at start-up) and once per step (``takes``):

* model: CPU, float32 activations, resident weights (not tiered), RMSNorm, RoPE, a gated SiLU or
  tanh-GELU MLP, sequential residual (with or without Gemma's q/k norms and post-norms), no norm
  biases, no soft-capping or ALiBi;
  every matrix quantized in a format of the quantized kernel (either build: AVX512-VNNI, or AVX2 on
  the file's rows), or plain float32 for the float32 GEMM (what StreamingLinear runs; AVX-512F);
* step: decode rows only (one new token each, one attention group stored in order), no more of them
  than the layer path sends to the same kernels (``max_rows``: 8 for the quantized kernel, 16 for the
  float32 GEMM), a plain float32 KV cache.

Everything else (prompt chunks, mixed steps, a quantized KV cache, GPT-2 and OPT's LayerNorm) runs
layer by layer as before. Results equal that path's bit for bit except for the activation, which uses
the C library's expf / tanhf here and torch's vectorised exp / tanh there: they differ by an ulp in
about 1 value in 1500 (tests/test_fused_decode.py gives the layer path the C library's activation and
compares the hidden states and every cache slot exactly). Through the kernel's int8 rounding of activations such an
ulp can move a logit of the random 1.1B Llama by a few hundredths, as much as an ulp of noise in the layer path's
own SiLU moves it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter

import torch

from tierlm.model.attention import AttentionBatch, KVCache
from tierlm.model.spec import ArchConfig


class _Part(ctypes.Structure):
    _fields_ = [("codes", ctypes.c_void_p), ("steps", ctypes.c_void_p), ("mins", ctypes.c_void_p),
                ("row_bytes", ctypes.c_int64), ("scale_stride", ctypes.c_int64), ("fmt", ctypes.c_int32),
                ("group", ctypes.c_int32), ("rows", ctypes.c_int32), ("cols", ctypes.c_int32)]


class _Matrix(ctypes.Structure):
    _fields_ = [("parts", ctypes.POINTER(_Part)), ("bias", ctypes.c_void_p), ("num_parts", ctypes.c_int32),
                ("rows", ctypes.c_int32)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("q_norm", ctypes.c_void_p),
                ("k_norm", ctypes.c_void_p), ("post_attn_norm", ctypes.c_void_p), ("post_mlp_norm", ctypes.c_void_p),
                ("qkv", _Matrix), ("o", _Matrix),
                ("up", _Matrix), ("down", _Matrix), ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p),
                ("window", ctypes.c_int32), ("rope_table", ctypes.c_int32)]


class _Model(ctypes.Structure):
    _fields_ = [("gemv", ctypes.c_void_p), ("f32_gemm", ctypes.c_void_p), ("norm", ctypes.c_void_p),
                ("rope", ctypes.c_void_p), ("attn", ctypes.c_void_p), ("layers", ctypes.POINTER(_Layer)),
                ("num_layers", ctypes.c_int32), ("hidden", ctypes.c_int32), ("num_heads", ctypes.c_int32),
                ("num_kv_heads", ctypes.c_int32), ("head_dim", ctypes.c_int32), ("rotary_dim", ctypes.c_int32),
                ("intermediate", ctypes.c_int32), ("interleaved", ctypes.c_int32), ("activation", ctypes.c_int32),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float)]


_ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}  # decode_layers.c's ACT_*


@dataclass(frozen=True)
class _PartSpec:
    """One matrix, or one part of a stacked one (tierlm.quant.FusedWeight), as decode_layers.c's Part."""

    fmt: int  # a quant_gemv.c format id (tierlm.quant.linear.KernelOperand); -1: plain float32 for f32_gemm.c
    codes: torch.Tensor  # row tiles, codes, or the float32 (rows, cols) matrix
    steps: torch.Tensor | None
    mins: torch.Tensor | None
    group: int
    row_bytes: int
    scale_stride: int
    rows: int
    cols: int


@dataclass(frozen=True, eq=False)
class FusedDecodePlan:
    """Whether decode steps run fused, and if not, why (logged at start-up), for the linear method
    and the layers' weights it was made from."""

    fused: FusedDecode | None
    reason: str  # "fused" or what the model lacks
    linear: object
    sources: tuple  # the layers' weights, held so that no other object can take their ids

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ids", tuple(map(id, self.sources)))

    def current(self, layers: list, linear) -> bool:
        """Whether the model still has that linear method and those weights (GPTQ and calibration
        swap them after start-up). Compared by id, which no other object can take while ``sources``
        holds them: once a step, so a few microseconds (not a loop of ``is`` in Python)."""
        return linear is self.linear and tuple(map(id, _sources(layers))) == self._ids


class FusedDecode:
    """The C structs describing one model's layers, built once; ``__call__`` runs a step."""

    def __init__(self, cfg: ArchConfig, layers: list, layer_types: list[str], rope_keys: list[str],
                 windows: dict[str, int | None], parts: list[list[list[_PartSpec]]], kernels: dict, max_rows: int):
        self.cfg = cfg
        self.max_rows = max_rows
        self.rope_keys = rope_keys
        self._run = kernels["step"]
        self._keep: list = []  # tensors and ctypes arrays the structs point into
        self._layers = (_Layer * len(layers))()
        for i, (lw, layer_parts) in enumerate(zip(layers, parts)):
            L = self._layers[i]
            for name in ("attn_norm", "mlp_norm", "q_norm", "k_norm", "post_attn_norm", "post_mlp_norm"):
                w = getattr(lw, name)
                setattr(L, name, None if w is None else self._ptr(w.float().contiguous()))
            for name, matrix_parts in zip(("qkv", "o", "up", "down"), layer_parts):
                setattr(L, name, self._matrix(matrix_parts, getattr(lw, f"{name}_bias")))
            L.window = windows.get(layer_types[i]) or 0
            L.rope_table = rope_keys.index(layer_types[i])
        self._model = _Model(gemv=kernels["gemv"], f32_gemm=kernels["f32_gemm"], norm=kernels["norm"],
                             rope=kernels["rope"], attn=kernels["attn"], layers=self._layers,
                             num_layers=len(layers), hidden=cfg.hidden_size, num_heads=cfg.num_heads,
                             num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                             rotary_dim=cfg.effective_rotary_dim, intermediate=cfg.intermediate_size,
                             interleaved=int(cfg.rope_layout == "interleaved"),
                             activation=_ACTIVATIONS[cfg.activation], eps=cfg.norm_eps,
                             scale=cfg.effective_attn_scale)
        self._cache: KVCache | None = None

    def _ptr(self, t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        self._keep.append(t)
        return t.data_ptr()

    def _matrix(self, parts: list[_PartSpec], bias: torch.Tensor | None) -> _Matrix:
        arr = (_Part * len(parts))()
        for p, spec in zip(arr, parts):
            p.codes, p.steps, p.mins = self._ptr(spec.codes), self._ptr(spec.steps), self._ptr(spec.mins)
            p.fmt, p.group, p.row_bytes, p.scale_stride = spec.fmt, spec.group, spec.row_bytes, spec.scale_stride
            p.rows, p.cols = spec.rows, spec.cols
        self._keep.append(arr)
        b = None if bias is None else self._ptr(bias.float().contiguous())
        return _Matrix(parts=arr, bias=b, num_parts=len(parts), rows=sum(spec.rows for spec in parts))

    def takes(self, batch: AttentionBatch, cache: KVCache) -> bool:
        """Decode rows only, in order, at most ``max_rows``, over a plain float32 cache."""
        if len(batch.groups) != 1:
            return False
        g = batch.groups[0]
        n = batch.positions.shape[0]
        return (g.max_q == 1 and not g.fresh and 1 <= n <= self.max_rows and g.rows == slice(0, n)
                and isinstance(cache.k[0], torch.Tensor) and cache.k[0].dtype == torch.float32)

    def __call__(self, x: torch.Tensor, batch: AttentionBatch, cache: KVCache,
                 rope: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """x (N, d) float32 contiguous, the first layer's input: replaced in place by the last one's
        output; writes the step's K/V into ``cache``. The caller checked ``takes``."""
        if cache is not self._cache:  # the caches' addresses, once per cache object
            for i, L in enumerate(self._layers):
                L.k_cache, L.v_cache = cache.k[i].data_ptr(), cache.v[i].data_ptr()
            self._cache = cache
        g = batch.groups[0]
        tables = [(rope[k][0].contiguous(), rope[k][1].contiguous()) for k in self.rope_keys]  # (N, 1, r/2)
        cos = (ctypes.c_void_p * len(tables))(*[c.data_ptr() for c, _ in tables])
        sin = (ctypes.c_void_p * len(tables))(*[s.data_ptr() for _, s in tables])
        q_pos = g.q_pos.contiguous()
        status = self._run(ctypes.addressof(self._model), x.data_ptr(), x.shape[0], batch.slot_mapping.data_ptr(),
                           g.kv_slots.data_ptr(), q_pos.data_ptr(), g.max_kv, cos, sin, torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"fused decode step failed (status {status}) for {x.shape[0]} rows")


def _sources(layers: list) -> tuple:
    """Every weight the fused step reads, layer by layer (None for a layer not loaded)."""
    return tuple(chain.from_iterable((None,) * len(_SOURCE_FIELDS) if lw is None else _source_fields(lw)
                                     for lw in layers))


_SOURCE_FIELDS = ("attn_norm", "mlp_norm", "q_norm", "k_norm", "post_attn_norm", "post_mlp_norm", "qkv", "o", "up",
                  "down", "qkv_bias", "o_bias", "up_bias", "down_bias")
_source_fields = attrgetter(*_SOURCE_FIELDS)


def plan_fused_decode(cfg: ArchConfig, weights, linear, dtype: torch.dtype, device: torch.device, tiered: bool,
                      layer_windows: dict[str, int | None], enabled: bool = True) -> FusedDecodePlan:
    """A FusedDecode for this model if the C step implements it (module docstring), else why not."""
    from tierlm.model import kernels as K
    from tierlm.model.linear import StreamingLinear
    from tierlm.quant import FusedWeight, QuantizedWeight
    from tierlm.quant.linear import QuantLinear, kernel_operand
    from tierlm.quant.tiles import RowTiles

    sources = _sources(weights.layers)

    def no(reason: str) -> FusedDecodePlan:
        return FusedDecodePlan(None, reason, linear, sources)

    if not enabled:
        return no("layer by layer (fused_decode=False)")
    if device.type != "cpu" or dtype != torch.float32:
        return no("float32 on CPU only")
    if tiered:
        return no("weights are tiered (streamed per layer)")
    if not weights.layers or any(lw is None for lw in weights.layers):
        return no("layers not loaded")
    if not (cfg.norm == "rmsnorm" and cfg.position == "rope" and cfg.gated_mlp and cfg.activation in _ACTIVATIONS
            and cfg.residual == "sequential" and cfg.attn_softcap is None):
        return no("not a Llama- or Gemma-shaped block (RMSNorm, RoPE, gated SiLU or tanh-GELU, sequential "
                  "residual, no soft-capping)")
    if cfg.head_dim % 8 or cfg.num_heads % cfg.num_kv_heads or cfg.num_heads // cfg.num_kv_heads * cfg.head_dim > 4096:
        return no("heads the decode attention kernel does not take")
    for lw in weights.layers:
        if ((lw.q_norm is None) != (lw.k_norm is None) or lw.mlp_norm is None or lw.attn_norm_bias is not None
                or lw.mlp_norm_bias is not None):
            return no("layers with a q norm but no k norm (or the reverse), no MLP norm, or norm biases")
    step, norm, rope, attn = K.decode_layers_kernel(), K.rms_norm_kernel(), K.rope_kernel(), K.decode_attention_kernel()
    if None in (step, norm, rope, attn):
        return no("kernels not built (make setup)")
    quant = linear if isinstance(linear, QuantLinear) else None
    dense = quant.dense if quant is not None else linear
    dense_f32 = isinstance(dense, StreamingLinear) and dense.dtype == torch.float32

    def part(w) -> _PartSpec | None:
        if isinstance(w, torch.Tensor):
            ok = (dense_f32 and w.dtype == torch.float32 and w.device.type == "cpu" and not w.is_mkldnn
                  and w.is_contiguous() and w.shape[1] % dense.k_multiple == 0)
            return _PartSpec(-1, w, None, None, 0, 0, 0, w.shape[0], w.shape[1]) if ok else None
        if not (isinstance(w, (QuantizedWeight, RowTiles)) and quant is not None and quant.kernel_takes(w)):
            return None
        if isinstance(w, QuantizedWeight) and w.codes.device.type != "cpu":
            return None
        op = kernel_operand(w)
        return _PartSpec(op.fmt, op.codes, op.steps, op.mins, op.group, op.row_bytes, op.scale_stride, w.shape[0],
                         w.shape[1])

    parts: list[list[list[_PartSpec]]] = []
    for lw in weights.layers:
        layer_parts = []
        for name in ("qkv", "o", "up", "down"):
            w = getattr(lw, name)
            ps = [part(p) for p in (w.parts if isinstance(w, FusedWeight) else (w,))]
            if None in ps:
                return no(f"a {name} matrix neither the quantized kernel nor the float32 GEMM takes")
            layer_parts.append(ps)
        parts.append(layer_parts)
    kernels = {"step": step, "gemv": K.address(quant.kernel.gemv) if quant is not None and quant.kernel else None,
               "f32_gemm": K.address(dense.kernel) if dense_f32 else None, "norm": K.address(norm),
               "rope": K.address(rope), "attn": K.address(attn)}
    rope_keys = sorted(set(cfg.layer_types))
    # the rows up to which the layer path would run these kernels: above, its prompts' paths take over
    specs = [spec for layer in parts for matrix in layer for spec in matrix]
    limits = ([dense.max_rows] if any(s.fmt < 0 for s in specs) else []) + (
        [quant.max_kernel_rows] if any(s.fmt >= 0 for s in specs) else [])
    max_rows = min(limits)
    return FusedDecodePlan(FusedDecode(cfg, weights.layers, list(cfg.layer_types), rope_keys, layer_windows, parts,
                                       kernels, max_rows), "fused", linear, sources)
