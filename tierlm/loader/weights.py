"""Assemble a model's weights from a checkpoint, following its family's tensor-name table.

Layout decisions made here (and relied on by ``tierlm.model.transformer``):
  * q, k, v are fused into one (q_rows + 2 * kv_rows, hidden) matrix, gate and up into one
    (2 * intermediate, hidden) matrix: one matmul instead of three (two) per layer, which matters
    at batch 1 where each call's fixed cost is a visible share of the step.
  * Linear weights are stored (out, in) in the compute dtype; F.linear reads them that way at full
    speed on CPU (see NOTES: a transposed copy is ~30% slower).
  * Biases are in the compute dtype (F.linear needs one dtype). Norm weights are kept in float32, with
    the family's norm weight offset (Gemma's ``1 + w``) already added, so the forward pass has one
    norm formula.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, fields

import torch

from tierlm.loader.checkpoint import CheckpointError, CheckpointReader
from tierlm.model.spec import ArchConfig, FamilySpec
from tierlm.quant import AnyQuantized, FusedWeight, QuantizedWeight
from tierlm.quant.gguf import SUPPORTED as GGUF_NATIVE_TYPES
from tierlm.quant.gguf import GGUFFormat

log = logging.getLogger("tierlm")


@dataclass
class LayerWeights:
    """One decoder block. Optional entries are None when the family/checkpoint lacks them."""

    attn_norm: torch.Tensor  # (hidden,) float32
    # The four matrices are tensors, or quantized matrices (tierlm.quant) when a GGUF file's blocks
    # are kept (WeightAssembler's native_quant).
    qkv: torch.Tensor  # (q_rows + 2 * kv_rows, hidden), q_rows = num_heads * head_dim
    o: torch.Tensor  # (hidden, q_rows)
    down: torch.Tensor  # (hidden, intermediate)
    up: torch.Tensor  # gated: (2 * intermediate, hidden) = [gate; up]; plain: (intermediate, hidden)
    attn_norm_bias: torch.Tensor | None = None
    qkv_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # (head_dim,)
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None
    mlp_norm: torch.Tensor | None = None  # None under a parallel residual that shares attn_norm
    mlp_norm_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    post_mlp_norm: torch.Tensor | None = None

    def nbytes(self) -> int:
        return sum(_nbytes(t) for t in vars(self).values())


@dataclass
class ModelWeights:
    # (vocab, hidden): a float table, or a GGUF file's blocks (WeightAssembler's native_quant), whose
    # lookups dequantize only the rows asked for (tierlm.model.transformer.embedding_rows).
    embed: torch.Tensor | QuantizedWeight
    final_norm: torch.Tensor | None
    lm_head: torch.Tensor | AnyQuantized  # (vocab, hidden); the same object as embed when tied
    layers: list[LayerWeights] = field(default_factory=list)
    pos_embed: torch.Tensor | None = None  # (max_position + offset, hidden)
    final_norm_bias: torch.Tensor | None = None
    lm_head_bias: torch.Tensor | None = None

    @property
    def tied(self) -> bool:
        return self.lm_head is self.embed

    def nbytes_by_group(self) -> dict[str, int]:
        nb = _nbytes

        groups = {"embedding": nb(self.embed) + nb(self.pos_embed),
                  "attention": 0, "mlp": 0, "norms": nb(self.final_norm) + nb(self.final_norm_bias),
                  "lm_head": 0 if self.tied else nb(self.lm_head) + nb(self.lm_head_bias)}
        for lw in self.layers:
            groups["attention"] += sum(nb(t) for t in (lw.qkv, lw.qkv_bias, lw.o, lw.o_bias, lw.q_norm, lw.k_norm))
            groups["mlp"] += sum(nb(t) for t in (lw.up, lw.up_bias, lw.down, lw.down_bias))
            groups["norms"] += sum(nb(t) for t in (lw.attn_norm, lw.attn_norm_bias, lw.post_attn_norm,
                                                   lw.mlp_norm, lw.mlp_norm_bias, lw.post_mlp_norm))
        return groups

    def num_parameters(self) -> int:
        total = sum(t.numel() for t in (self.pos_embed, self.final_norm, self.final_norm_bias,
                                        self.lm_head_bias) if t is not None)
        # the table and the head may be quantized matrices (a GGUF file's blocks): counted by shape
        total += self.embed.shape[0] * self.embed.shape[1]
        if not self.tied:
            total += self.lm_head.shape[0] * self.lm_head.shape[1]
        for lw in self.layers:
            total += sum(t.numel() for t in vars(lw).values() if isinstance(t, torch.Tensor))
        return total


class _Names:
    """Canonical -> checkpoint names for one reader, with used-name tracking."""

    def __init__(self, spec: FamilySpec, reader: CheckpointReader):
        self.table = spec.tensor_names(reader.source)
        self.transposed = set(spec.hf_transposed) if reader.source == "hf" else set()
        self.available = reader.names()
        self.used: set[str] = set()
        self.reader = reader

    def name(self, canonical: str, layer: int | None = None) -> str | None:
        pattern = self.table.get(canonical)
        if pattern is None:
            return None
        name = pattern.replace("{i}", str(layer)) if layer is not None else pattern
        return name if name in self.available else None

    def has(self, canonical: str, layer: int | None = None) -> bool:
        return self.name(canonical, layer) is not None

    def require(self, canonical: str, layer: int | None = None) -> str:
        name = self.name(canonical, layer)
        if name is None:
            where = f" of layer {layer}" if layer is not None else ""
            expected = self.table.get(canonical, "<not in the family's tensor table>")
            raise CheckpointError(f"checkpoint lacks tensor {canonical!r}{where} "
                                  f"(expected {expected.replace('{i}', str(layer))!r})")
        return name

    def shape(self, canonical: str, layer: int | None = None) -> tuple[int, ...]:
        name = self.require(canonical, layer)
        shape = self.reader.shape(name)
        return shape[::-1] if canonical in self.transposed else shape

    def read(self, canonical: str, dest: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        name = self.require(canonical, layer)
        self.reader.read_into(name, dest, transpose=canonical in self.transposed)
        self.used.add(name)
        return dest

    def load(self, canonical: str, dtype: torch.dtype, layer: int | None = None) -> torch.Tensor:
        return self.read(canonical, torch.empty(self.shape(canonical, layer), dtype=dtype), layer)

    def load_optional(self, canonical: str, dtype: torch.dtype, layer: int | None = None) -> torch.Tensor | None:
        return self.load(canonical, dtype, layer) if self.has(canonical, layer) else None


class WeightAssembler:
    """Reads a model's weights piece by piece: ``globals()`` then ``layer(i)`` for each layer.

    The store builder (tierlm.memory.store) uses this to hold one layer at a time; ``load_weights``
    assembles everything. ``finish()`` checks that no checkpoint tensor went unread.
    """

    def __init__(self, spec: FamilySpec, cfg: ArchConfig, reader: CheckpointReader, dtype: torch.dtype,
                 native_quant: bool = False):
        """``native_quant``: keep a GGUF file's quantized matrices as their blocks (tierlm.quant.gguf)."""
        self.spec, self.cfg, self.reader, self.dtype = spec, cfg, reader, dtype
        self.names = _Names(spec, reader)
        self.native_quant = native_quant and reader.source == "gguf"
        self._expanded: set[str] = set()  # GGUF types read as float: logged once each

    def _native(self, canonicals: list[str], i: int) -> AnyQuantized | None:
        """These GGUF tensors' blocks stacked along the rows (one matrix when their types agree, else a
        FusedWeight), or None when native execution is off or one of them is not a native type; the
        caller then reads the group as float."""
        if not self.native_quant:
            return None
        names = [self.names.require(c, i) for c in canonicals]
        types = [self.reader.quant_type(n) for n in names]
        foreign = {t for t in types if t not in GGUF_NATIVE_TYPES and t != "F32"} - self._expanded
        for t in sorted(foreign):
            log.info("GGUF type %s is not executed natively: its matrices are expanded to %s at load "
                     "(native: %s)", t, self.dtype, ", ".join(GGUF_NATIVE_TYPES))
        self._expanded |= foreign
        if any(t not in GGUF_NATIVE_TYPES for t in types):
            return None
        parts = [GGUFFormat(t).weight(self.reader.read_raw(n), self.reader.shape(n)) for n, t in zip(names, types)]
        self.names.used.update(names)
        if len(parts) == 1:
            return parts[0]
        if len(set(types)) == 1:
            rows = sum(p.shape[0] for p in parts)
            return GGUFFormat(types[0]).weight(torch.cat([p.codes for p in parts]), (rows, parts[0].shape[1]))
        return FusedWeight(tuple(parts))

    def _norm(self, canonical: str, layer: int | None = None) -> torch.Tensor | None:
        w = self.names.load_optional(canonical, torch.float32, layer)
        if w is not None and self.cfg.norm_weight_offset:
            w += self.cfg.norm_weight_offset
        return w

    def layer(self, i: int) -> LayerWeights:
        names, cfg, dtype = self.names, self.cfg, self.dtype
        d, hd = cfg.hidden_size, cfg.head_dim
        q_rows, kv_rows = cfg.num_heads * hd, cfg.num_kv_heads * hd
        qkv = self._native(["layer.qkv"] if names.has("layer.qkv", i) else ["layer.q", "layer.k", "layer.v"], i)
        if qkv is not None:
            _expect(qkv, (q_rows + 2 * kv_rows, d), f"layer {i} qkv")
        elif names.has("layer.qkv", i):
            qkv = names.read("layer.qkv", torch.empty(q_rows + 2 * kv_rows, d, dtype=dtype), i)
        else:
            qkv = torch.empty(q_rows + 2 * kv_rows, d, dtype=dtype)
            names.read("layer.q", qkv[:q_rows], i)
            names.read("layer.k", qkv[q_rows:q_rows + kv_rows], i)
            names.read("layer.v", qkv[q_rows + kv_rows:], i)
        qkv_bias = None
        if names.has("layer.qkv.bias", i):
            qkv_bias = names.load("layer.qkv.bias", dtype, i)
        elif names.has("layer.q.bias", i):
            qkv_bias = torch.empty(q_rows + 2 * kv_rows, dtype=dtype)
            names.read("layer.q.bias", qkv_bias[:q_rows], i)
            names.read("layer.k.bias", qkv_bias[q_rows:q_rows + kv_rows], i)
            names.read("layer.v.bias", qkv_bias[q_rows + kv_rows:], i)
        inter = cfg.intermediate_size
        if cfg.gated_mlp:
            up = self._native(["layer.gate", "layer.up"], i)
            if up is None:
                up = torch.empty(2 * inter, d, dtype=dtype)
                names.read("layer.gate", up[:inter], i)
                names.read("layer.up", up[inter:], i)
            _expect(up, (2 * inter, d), f"layer {i} gate/up")
            up_bias = None
            if names.has("layer.up.bias", i):
                up_bias = torch.empty(2 * inter, dtype=dtype)
                names.read("layer.gate.bias", up_bias[:inter], i)
                names.read("layer.up.bias", up_bias[inter:], i)
        else:
            up = _expect(self._native(["layer.up"], i) or names.load("layer.up", dtype, i), (inter, d), f"layer {i} up")
            up_bias = names.load_optional("layer.up.bias", dtype, i)
        names.require("layer.attn_norm", i)  # raises the clear "checkpoint lacks tensor" error
        lw = LayerWeights(
            attn_norm=self._norm("layer.attn_norm", i),
            attn_norm_bias=names.load_optional("layer.attn_norm.bias", dtype, i),
            qkv=qkv, qkv_bias=qkv_bias,
            o=_expect(self._native(["layer.o"], i) or names.load("layer.o", dtype, i), (d, q_rows), f"layer {i} o"),
            o_bias=names.load_optional("layer.o.bias", dtype, i),
            q_norm=self._norm("layer.q_norm", i), k_norm=self._norm("layer.k_norm", i),
            post_attn_norm=self._norm("layer.post_attn_norm", i),
            mlp_norm=self._norm("layer.mlp_norm", i),
            mlp_norm_bias=names.load_optional("layer.mlp_norm.bias", dtype, i),
            up=up, up_bias=up_bias,
            down=_expect(self._native(["layer.down"], i) or names.load("layer.down", dtype, i), (d, inter),
                         f"layer {i} down"),
            down_bias=names.load_optional("layer.down.bias", dtype, i),
            post_mlp_norm=self._norm("layer.post_mlp_norm", i),
        )
        if lw.mlp_norm is None and cfg.residual == "sequential":
            names.require("layer.mlp_norm", i)  # raises: a sequential block needs its own MLP norm
        return lw

    def globals(self) -> ModelWeights:
        """Everything outside the blocks; ``layers`` is left empty.

        With ``native_quant`` the embedding table stays as its blocks where its type is a native one
        (a 262144 x 640 Q8_0 table: 170 MiB instead of 671 MiB of float32), and a tied head is that
        same object: lookups dequantize the rows a step needs, the head multiplies the blocks."""
        names, cfg, dtype = self.names, self.cfg, self.dtype
        embed = self._native(["embed"], None) or names.load("embed", dtype)
        _expect(embed, (cfg.vocab_size, cfg.hidden_size), "embedding")
        # An untied GGUF head (output.weight) stays as its blocks, like the layers' matrices, where its
        # type has a compiled kernel: decoding multiplies the whole (vocab, hidden) head every token,
        # which the tiled path (a numpy dequantization per tile, e.g. Q6_K) would make far slower
        # than the float32 head it replaces.
        from tierlm.quant.linear import KERNEL_FORMATS

        lm_head = self._native(["lm_head"], None) if names.has("lm_head") else None
        if lm_head is not None and getattr(lm_head, "format", None) not in KERNEL_FORMATS:
            lm_head = None
        if lm_head is None:
            lm_head = names.load_optional("lm_head", dtype)
        if lm_head is None:
            lm_head = embed  # tied (or the checkpoint omits the duplicate)
        pos_embed = names.load("pos_embed", dtype) if cfg.position == "learned" else None
        return ModelWeights(
            embed=embed, final_norm=self._norm("final_norm"),
            final_norm_bias=names.load_optional("final_norm.bias", dtype),
            lm_head=lm_head, lm_head_bias=names.load_optional("lm_head.bias", dtype), layers=[],
            pos_embed=pos_embed,
        )

    def finish(self) -> None:
        _check_all_used(self.spec, self.reader, self.names)


def _nbytes(t: object) -> int:
    """Bytes held by a tensor or a quantized matrix (0 for None)."""
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    return t.nbytes if isinstance(t, (QuantizedWeight, FusedWeight)) else 0


def _expect(t: torch.Tensor | AnyQuantized, shape: tuple[int, ...], what: str) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise CheckpointError(f"{what} has shape {tuple(t.shape)}, the config implies {shape}")
    return t


def load_weights(spec: FamilySpec, cfg: ArchConfig, reader: CheckpointReader, dtype: torch.dtype,
                 native_quant: bool = False) -> ModelWeights:
    """Read every tensor the family names from ``reader``; fail on missing or unexplained tensors."""
    asm = WeightAssembler(spec, cfg, reader, dtype, native_quant)
    weights = asm.globals()
    weights.layers = [asm.layer(i) for i in range(cfg.num_layers)]
    asm.finish()
    return weights


def _check_all_used(spec: FamilySpec, reader: CheckpointReader, names: _Names) -> None:
    """A checkpoint tensor nobody reads means the family file describes a different block."""
    ignore = [re.compile(p) for p in spec.hf_ignore] if reader.source == "hf" else []
    unused = sorted(n for n in names.available - names.used if not any(p.search(n) for p in ignore))
    if unused:
        shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
        raise CheckpointError(f"the {spec.name} family ({spec.source}) does not describe checkpoint tensors: {shown}")


LAYER_FIELDS = [f.name for f in fields(LayerWeights)]
GLOBAL_FIELDS = ("embed", "lm_head", "final_norm", "final_norm_bias", "lm_head_bias", "pos_embed")


def store_tensors(opened, dtype: torch.dtype,
                  native_quant: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (store name, tensor) of ``opened`` (a tierlm.loader.model_loader.OpenedCheckpoint) with one
    layer in memory at a time. Tied heads are not repeated.

    The one naming of a store's tensors (``embed``, ``lm_head``, ``layers.{i}.qkv``, ...): the
    tiered loader reads these names, and ``tierlm quantize`` (tierlm.quant.store) writes them.
    ``native_quant``: a GGUF file's quantized matrices come as their blocks (QuantizedWeight)."""
    asm = WeightAssembler(opened.family, opened.config, opened.reader, dtype, native_quant)
    g = asm.globals()
    tied = g.tied
    for name in GLOBAL_FIELDS:
        t = getattr(g, name)
        if t is not None and not (name == "lm_head" and tied):
            yield name, t
    del g, t
    for i in range(opened.config.num_layers):
        lw = asm.layer(i)
        for name in LAYER_FIELDS:
            t = getattr(lw, name)
            if t is not None:
                yield f"layers.{i}.{name}", t
        del lw, t
    asm.finish()
