"""Architectures as data (Inferflow's idea): a model family is a TOML file, not a class.

A family file (``tierlm/model/specs/<family>.toml``, or any file passed to ``load_family``) has:

  name, hf_architectures, hf_model_types, gguf_architectures   -- how checkpoints are recognised
  [defaults]        ArchConfig fields that are facts of the family (norm kind, activation, ...)
  [hf_defaults]     overrides of [defaults] that hold only for HF checkpoints
  [gguf_defaults]   overrides that hold only for GGUF files (e.g. Gemma's norms already include +1)
  [hf_config]       field = config.json key path ("a.b.c"), or a list of paths (first present wins)
  [gguf_config]     field = GGUF metadata key; "{arch}" is replaced by the GGUF architecture name
  [hf_tensors]      canonical tensor name = checkpoint tensor name; "{i}" is the layer index
  [gguf_tensors]    the same for GGUF tensor names
  hf_transposed     canonical names stored (in, out) instead of (out, in) (GPT-2's Conv1D)

Canonical tensor names are global (``embed``, ``pos_embed``, ``final_norm``, ``final_norm.bias``,
``lm_head``, ``lm_head.bias``) or per layer (``layer.<name>``): attn_norm, q, k, v, qkv, o,
q_norm, k_norm, post_attn_norm, mlp_norm, gate, up, down, post_mlp_norm, each with an optional
``.bias`` twin. Which ones a family lists decides the block's shape (e.g. a family with no
``layer.mlp_norm`` under a parallel residual shares ``attn_norm`` between attention and MLP).

The resolved, per-checkpoint result is a frozen ``ArchConfig``; one generic module
(``tierlm.model.transformer``) builds any of them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib


class UnknownArchitectureError(ValueError):
    """No family file describes this checkpoint."""


class SpecError(ValueError):
    """A family file or a checkpoint config is malformed; the message names the field."""


NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
POSITIONS = ("rope", "learned", "alibi", "none")
ROPE_LAYOUTS = ("half", "interleaved")
RESIDUALS = ("sequential", "parallel")
LAYER_TYPES = ("full", "sliding")

# Names checkpoints use for activations -> the kernels tierlm has.
_ACTIVATION_ALIASES = {
    "silu": "silu", "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "relu": "relu",
}
_LAYER_TYPE_ALIASES = {
    "full_attention": "full", "full": "full", "global": "full",
    "sliding_attention": "sliding", "sliding": "sliding", "local": "sliding",
}


@dataclass(frozen=True)
class ArchConfig:
    """Everything the generic transformer needs, resolved for one checkpoint.

    Invariants: num_heads % num_kv_heads == 0; rotary_dim is even and <= head_dim;
    len(layer_types) == num_layers.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position: int
    # normalisation
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    norm_weight_offset: float = 0.0  # y = norm(x) * (offset + w); Gemma's HF weights use 1.0
    # MLP
    activation: str = "silu"
    gated_mlp: bool = True
    # positions
    position: str = "rope"
    rope_layout: str = "half"  # "half": rotate halves (HF/NeoX); "interleaved": pairs (GPT-J, llama.cpp llama)
    rope_theta: float = 10000.0
    rope_local_theta: float | None = None  # theta of sliding-window layers where it differs (Gemma 3)
    rotary_dim: int | None = None  # None means head_dim; GPT-J rotates only the first rotary_dim
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs of the HF dict
    learned_pos_offset: int = 0  # OPT's learned positions start at row 2
    # attention
    attn_scale: float | None = None  # None means head_dim ** -0.5
    query_pre_attn_scalar: float | None = None  # Gemma: scale = query_pre_attn_scalar ** -0.5
    sliding_window: int | None = None
    sliding_window_pattern: int | None = None  # every Nth layer is full, the others sliding
    layer_types: tuple[str, ...] = ()
    attn_softcap: float | None = None
    final_softcap: float | None = None
    # residual and embeddings
    residual: str = "sequential"
    tie_embeddings: bool = False
    embed_scale: float | None = None  # None: no scaling; Gemma multiplies by sqrt(hidden_size)
    scale_embeddings_by_sqrt_hidden: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    # -- derived ------------------------------------------------------------------------------
    @property
    def effective_rotary_dim(self) -> int:
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def effective_attn_scale(self) -> float:
        if self.attn_scale is not None:
            return self.attn_scale
        if self.query_pre_attn_scalar is not None:
            return self.query_pre_attn_scalar ** -0.5
        return self.head_dim ** -0.5

    @property
    def effective_embed_scale(self) -> float | None:
        if self.scale_embeddings_by_sqrt_hidden:
            return math.sqrt(self.hidden_size)
        return self.embed_scale

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    def validate(self) -> ArchConfig:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise SpecError(f"{self.family}: {msg}")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        need(self.num_heads % self.num_kv_heads == 0,
             f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        need(self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}")
        need(self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        need(self.position in POSITIONS, f"position must be one of {POSITIONS}, got {self.position!r}")
        need(self.rope_layout in ROPE_LAYOUTS, f"rope_layout must be one of {ROPE_LAYOUTS}, got {self.rope_layout!r}")
        need(self.residual in RESIDUALS, f"residual must be one of {RESIDUALS}, got {self.residual!r}")
        rd = self.effective_rotary_dim
        need(rd % 2 == 0 and 0 < rd <= self.head_dim, f"rotary_dim must be even and <= head_dim, got {rd}")
        need(len(self.layer_types) == self.num_layers,
             f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        need(all(t in LAYER_TYPES for t in self.layer_types), f"layer_types must be in {LAYER_TYPES}")
        need("sliding" not in self.layer_types or (self.sliding_window or 0) > 0,
             "sliding layers need a positive sliding_window")
        rope_type = self.rope_scaling_dict.get("rope_type", self.rope_scaling_dict.get("type", "default"))
        need(rope_type in ("default", "linear", "llama3"),
             f"rope scaling type {rope_type!r} is not supported (supported: default, linear, llama3)")
        return self

    def num_parameters(self) -> int:
        """Parameters of the layer matrices, embeddings and an untied head (norms and biases left out:
        under 0.1% for every family here); what the architecture implies, read from no weight."""
        d, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        mlp = (3 if self.gated_mlp else 2) * d * self.intermediate_size
        layer = d * (q + 2 * kv) + q * d + mlp
        return self.num_layers * layer + self.vocab_size * d * (1 if self.tie_embeddings else 2)

    def summary(self) -> str:
        return (f"{self.family}: {self.num_layers} layers, d={self.hidden_size}, heads {self.num_heads}/"
                f"{self.num_kv_heads} x {self.head_dim}, ffn {self.intermediate_size} "
                f"({'gated ' if self.gated_mlp else ''}{self.activation}), {self.norm}, {self.position}"
                f"{'/' + self.rope_layout if self.position == 'rope' else ''}, vocab {self.vocab_size}")


@dataclass(frozen=True)
class FamilySpec:
    """One family file, parsed. See the module docstring for its sections."""

    name: str
    source: str
    hf_architectures: tuple[str, ...] = ()
    hf_model_types: tuple[str, ...] = ()
    gguf_architectures: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    hf_defaults: Mapping[str, Any] = field(default_factory=dict)
    gguf_defaults: Mapping[str, Any] = field(default_factory=dict)
    hf_config: Mapping[str, Any] = field(default_factory=dict)
    gguf_config: Mapping[str, Any] = field(default_factory=dict)
    hf_tensors: Mapping[str, str] = field(default_factory=dict)
    gguf_tensors: Mapping[str, str] = field(default_factory=dict)
    hf_transposed: tuple[str, ...] = ()
    hf_ignore: tuple[str, ...] = ()  # regexes of checkpoint tensors that carry no weights (buffers)
    hf_require: Mapping[str, Any] = field(default_factory=dict)  # config path -> the only value supported

    # -- resolution ---------------------------------------------------------------------------
    def resolve_hf(self, config: Mapping[str, Any]) -> ArchConfig:
        """ArchConfig for an HF ``config.json`` dict."""
        for path, expected in self.hf_require.items():
            found = _lookup_first(config, path)
            if found is not _MISSING and found != expected:
                raise SpecError(f"{self.name}: config {path}={found!r} is not supported (only {expected!r})")
        values = dict(self.defaults)
        values.update(self.hf_defaults)
        for fname, paths in self.hf_config.items():
            found = _lookup_first(config, paths)
            if found is not _MISSING and found is not None:
                values[fname] = found
        return self._finish(values)

    def resolve_gguf(self, metadata: Mapping[str, Any], arch: str) -> ArchConfig:
        """ArchConfig for GGUF metadata (a flat dict of key -> python value)."""
        values = dict(self.defaults)
        values.update(self.gguf_defaults)
        for fname, keys in self.gguf_config.items():
            keys = [keys] if isinstance(keys, str) else list(keys)
            for key in keys:
                key = key.replace("{arch}", arch)
                if key in metadata and metadata[key] is not None:
                    values[fname] = metadata[key]
                    break
        return self._finish(values)

    def _finish(self, values: dict[str, Any]) -> ArchConfig:
        known = {f.name for f in dataclasses.fields(ArchConfig)}
        unknown = set(values) - known
        if unknown:
            raise SpecError(f"family {self.name!r} ({self.source}) sets unknown fields {sorted(unknown)}")
        for required in ("vocab_size", "hidden_size", "num_layers", "num_heads"):
            if required not in values:
                raise SpecError(f"{self.name}: the checkpoint config does not give {required}")
        values["family"] = self.name
        values.setdefault("num_kv_heads", values["num_heads"])
        values.setdefault("head_dim", values["hidden_size"] // values["num_heads"])
        values.setdefault("intermediate_size", 4 * values["hidden_size"])
        values.setdefault("max_position", 2048)
        values["activation"] = _ACTIVATION_ALIASES.get(str(values.get("activation", "silu")),
                                                       str(values.get("activation")))
        for int_field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                          "head_dim", "intermediate_size", "max_position"):
            values[int_field] = int(values[int_field])
        values["eos_token_ids"] = _as_int_tuple(values.get("eos_token_ids"))
        rs = values.get("rope_scaling")
        values["rope_scaling"] = tuple(sorted(rs.items())) if isinstance(rs, Mapping) else tuple(rs or ())
        values["layer_types"] = _layer_types(values)
        if values.get("sliding_window") is not None:
            values["sliding_window"] = int(values["sliding_window"])
        return ArchConfig(**values).validate()

    # -- tensor names -------------------------------------------------------------------------
    def tensor_names(self, source: str) -> Mapping[str, str]:
        return self.hf_tensors if source == "hf" else self.gguf_tensors


_MISSING = object()


def _lookup_first(config: Mapping[str, Any], paths: Any) -> Any:
    for path in [paths] if isinstance(paths, str) else list(paths):
        node: Any = config
        for part in path.split("."):
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            else:
                node = _MISSING
                break
        if node is not _MISSING and node is not None:
            return node
    return _MISSING


def _as_int_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _layer_types(values: dict[str, Any]) -> tuple[str, ...]:
    """Per-layer attention kind: explicit list, else a pattern, else all sliding if a window is set."""
    num_layers = int(values["num_layers"])
    explicit = values.get("layer_types") or ()
    if explicit:
        try:
            types = tuple(_LAYER_TYPE_ALIASES[str(t)] for t in explicit)
        except KeyError as err:
            raise SpecError(f"unknown layer type {err.args[0]!r}") from None
        return types[:num_layers]
    pattern = values.get("sliding_window_pattern")
    if pattern:
        return tuple("full" if (i + 1) % int(pattern) == 0 else "sliding" for i in range(num_layers))
    if values.get("sliding_window"):
        return ("sliding",) * num_layers
    return ("full",) * num_layers


# -- family registry ---------------------------------------------------------------------------

def load_family(path: str | Path) -> FamilySpec:
    """Parse one family file. Raises SpecError naming the file on malformed content."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise SpecError(f"cannot read family file {path}: {err}") from None
    return _family_from_dict(data, str(path))


def _family_from_dict(data: Mapping[str, Any], source: str) -> FamilySpec:
    if "name" not in data:
        raise SpecError(f"family file {source} has no 'name'")
    allowed = {f.name for f in dataclasses.fields(FamilySpec)} - {"source"}
    unknown = set(data) - allowed
    if unknown:
        raise SpecError(f"family file {source} has unknown keys {sorted(unknown)}")
    kwargs = dict(data)
    for key in ("hf_architectures", "hf_model_types", "gguf_architectures", "hf_transposed", "hf_ignore"):
        kwargs[key] = tuple(kwargs.get(key, ()))
    return FamilySpec(source=source, **kwargs)


def builtin_families() -> list[FamilySpec]:
    specs_dir = resources.files("tierlm.model") / "specs"
    out = []
    for entry in sorted(specs_dir.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            out.append(_family_from_dict(tomllib.loads(entry.read_text()), f"tierlm/model/specs/{entry.name}"))
    return out


def find_family(*, hf_config: Mapping[str, Any] | None = None, gguf_arch: str | None = None,
                extra_dirs: list[Path] | tuple[Path, ...] = ()) -> FamilySpec:
    """The family that claims a checkpoint. Files in ``extra_dirs`` take precedence over built-ins."""
    families: list[FamilySpec] = []
    for d in extra_dirs:
        families += [load_family(p) for p in sorted(Path(d).glob("*.toml"))]
    families += builtin_families()

    def claims(f: FamilySpec) -> bool:
        if gguf_arch is not None:
            return gguf_arch in f.gguf_architectures
        assert hf_config is not None
        archs = hf_config.get("architectures") or ()
        return any(a in f.hf_architectures for a in archs) or hf_config.get("model_type") in f.hf_model_types

    for f in families:
        if claims(f):
            return f
    what = (f"GGUF architecture {gguf_arch!r}" if gguf_arch is not None else
            f"architectures {hf_config.get('architectures')!r} / model_type {hf_config.get('model_type')!r}")
    known = sorted({f.name for f in families})
    raise UnknownArchitectureError(
        f"unknown architecture: {what}; known families: {', '.join(known)}. "
        f"Add a family file (see tierlm/model/specs/*.toml) and pass its folder as spec_dirs.")


