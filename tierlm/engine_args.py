"""``EngineArgs``: every engine setting as one flat, typed field, the way users type them.

``LLM(model, **kwargs)`` takes exactly these keywords, and the CLI's engine flags are generated from
them (``add_cli_args``), so the two cannot drift. Each field is one field of one group of the config
tree (tierlm.config), named by its metadata: ``EngineArgs.create_config()`` builds the tree, and a
``ConfigError`` from any group comes back naming the setting as the user spelled it.

No torch here (see tierlm.config).
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from tierlm.config import (
    AUTO,
    DTYPES,
    FORMATS,
    GROUPS,
    KV_FORMATS,
    LOCKINGS,
    METHODS,
    ORDERS,
    POLICIES,
    PROMPT_ORDERS,
    QUANTS,
    ConfigError,
    TierlmConfig,
)

# config group -> the heading of its flags in `tierlm COMMAND --help`
HEADINGS = {"model": "model", "cache": "KV cache", "scheduler": "scheduling (continuous batching)",
            "tiers": "tiered weights: models larger than RAM (tierlm.memory)",
            "quant": "quantization (tierlm.quant)", "runtime": "runtime"}


def token_budget(text: str) -> int | str:
    """A --max-num-batched-tokens value: a positive count of tokens, or "auto"."""
    if text == AUTO:
        return text
    n = int(text)  # a ValueError here becomes argparse's "invalid token_budget value"
    if n < 1:
        raise ValueError(text)
    return n


def _arg(default, group: str, help: str, *, attr: str | None = None, flag: str | None = None,
         metavar: str | None = None, choices: tuple | None = None, type=None):
    """A field of EngineArgs: ``group`` and ``attr`` (default: the field's own name) locate it in the
    config tree; the rest describes its CLI flag (default: --the-field-name)."""
    meta = dict(group=group, attr=attr, help=help, flag=flag, metavar=metavar, choices=choices, type=type)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class EngineArgs:
    """Every setting of an engine; see tierlm.config for what each group means."""

    # -- model
    model: str | None = _arg(None, "model", "HF model folder or .gguf file (default: the embedded "
                             "SmolLM2-135M-Instruct)", metavar="MODEL")
    dtype: str = _arg(AUTO, "model", "compute dtype; auto: float32, and a GGUF file keeps its own quantized blocks "
                      "(an explicit dtype expands them to it)", choices=DTYPES)
    device: str = _arg("cpu", "model", "where the model computes: cpu, cuda or cuda:N")
    max_model_len: int | None = _arg(None, "model", "context length in tokens (default: the model's)", metavar="N",
                                     type=int)
    spec_dirs: tuple[str, ...] = _arg((), "model", "folder of extra family files (*.toml); repeatable, searched "
                                      "before the built-ins", flag="--spec-dir", metavar="DIR")
    chat_template: str | None = _arg(None, "model", "chat template: a Jinja file, or a built-in name (chatml, "
                                     "llama3, gemma, plain); default: the model's own, else plain", metavar="FILE|NAME")
    # -- KV cache
    block_size: int = _arg(16, "cache", "tokens per KV cache block", metavar="N", type=int)
    kv_cache_tokens: int | None = _arg(None, "cache", "KV cache size in tokens (default: max-num-seqs sequences "
                                       "of max-model-len, at most 65,536, at least max-model-len)", metavar="N",
                                       type=int)
    kv_quant: str | None = _arg(None, "cache", "store the KV cache 8- or 4-bit (default: the compute dtype)",
                                choices=KV_FORMATS)
    # -- scheduler
    max_num_seqs: int = _arg(16, "scheduler", "sequences decoded together (batch slots)", metavar="N", type=int)
    max_num_batched_tokens: int | str = _arg(
        2048, "scheduler", "tokens per engine step, or auto: measured at start-up (splitfuse) as the largest prompt "
        "chunk whose step costs at most 2x a decode-only step", metavar="N|auto", type=token_budget)
    max_num_prefill_tokens: int | None = _arg(
        None, "scheduler", "splitfuse: tokens in a step that carries no decode (default: 2048 when the budget is "
        "auto, else the budget)", metavar="N", type=int)
    enable_chunked_prefill: bool = _arg(True, "scheduler", "split long prompts over several steps")
    scheduling_policy: str = _arg("splitfuse", "scheduler", "splitfuse: prompt chunks and decodes share each step; "
                                  "prefill_first: whole prompts first, decodes wait", attr="policy", choices=POLICIES)
    prompt_order: str = _arg("fcfs", "scheduler", "splitfuse: which prompts get the tokens the decodes leave: fcfs "
                             "(arrival order) or shortest (fewest tokens left first)", choices=PROMPT_ORDERS)
    prompt_aging_tokens_per_s: float | None = _arg(
        None, "scheduler", "with --prompt-order shortest: a waiting prompt counts A fewer tokens left per second "
        "waited, so a long one is served within (its tokens)/A s", flag="--prompt-aging", metavar="A", type=float)
    slo_tokens_per_s: float | None = _arg(
        None, "scheduler", "splitfuse with an auto budget: the rate every stream is promised; steps take more "
        "prompt tokens while every decode is ahead of it", metavar="G", type=float)
    # -- tiered weights
    weight_memory: str | None = _arg(None, "tiers", "keep at most SIZE of weights resident (e.g. 2GiB, 500MB, 25%) "
                                     "and stream the rest from a weight store on disk (default: all resident)",
                                     metavar="SIZE")
    device_memory: str | None = _arg(None, "tiers", "keep SIZE of the weights in device memory and copy the rest in "
                                     "per layer, overlapped with compute", metavar="SIZE")
    prefetch_window: int = _arg(3, "tiers", "layers read ahead of the one computing; 0: synchronous reads",
                                metavar="N", type=int)
    tier_locking: str = _arg("balanced", "tiers", "balanced: every layer keeps the same share resident; "
                             "whole_layer: whole layers resident", choices=LOCKINGS)
    tier_order: str = _arg("auto", "tiers", "which tensors of a layer hold its resident share first", choices=ORDERS)
    num_io_threads: int = _arg(4, "tiers", "threads reading the weight store", metavar="N", type=int)
    store_dir: str | None = _arg(None, "tiers", "weight store folder (default: under $TIERLM_CACHE or "
                                 "~/.cache/tierlm)", metavar="DIR")
    # -- quantization
    quant: str = _arg(AUTO, "quant", f"weight format: auto (a GGUF file's own blocks, float for an HF folder), float, "
                      f"gguf, or a tierlm format made at load: {', '.join(FORMATS)}", metavar="FORMAT", choices=QUANTS)
    quant_group: int = _arg(64, "quant", "weights per group of the tierlm formats", metavar="N", type=int)
    quant_method: str = _arg(AUTO, "quant", "how a tierlm format is made: rtn (round each group), gptq (calibrate on "
                             "Brown text); auto: gptq where its one-off cost is small (cached)",
                             choices=(AUTO, *METHODS))
    quant_importance: str | None = _arg(None, "quant", "weight rtn's range search by an importance file from "
                                        "`tierlm imatrix`", metavar="FILE")
    quant_int8_prompts: bool | None = _arg(None, "quant", "prompt chunks through the int8 kernel, as llama.cpp "
                                           "(activations rounded to int8); --no-quant-int8-prompts: float; "
                                           "default: where that is faster (GGUF K-quants on AVX2)", type=bool)
    # -- runtime
    fused_decode: bool = _arg(True, "runtime", "decode steps in one C call where the model allows")
    num_threads: int | None = _arg(None, "runtime", "compute threads (default: the cores this process may use)",
                                   metavar="N", type=int)

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineArgs:
        """``EngineArgs(**kwargs)``, with an unknown keyword a ConfigError that names it and the nearest one."""
        known = {f.name for f in fields(cls)}
        for name in kwargs:
            if name not in known:
                near = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ConfigError(name, f"not a tierlm setting{hint}")
        if kwargs.get("spec_dirs") is not None:
            kwargs["spec_dirs"] = tuple(str(d) for d in kwargs["spec_dirs"])
        return cls(**kwargs)

    def create_config(self) -> TierlmConfig:
        """The config tree (unresolved: "auto" values stay until tierlm.builder reads the checkpoint)."""
        values: dict[str, dict] = {name: {} for name in GROUPS}
        for f in fields(self):
            values[f.metadata["group"]][f.metadata["attr"] or f.name] = getattr(self, f.name)
        groups = {}
        for name, cls in GROUPS.items():
            try:
                groups[name] = cls(**values[name])
            except ConfigError as err:
                raise ConfigError(arg_name(name, err.field), err.reason) from None
        return TierlmConfig(**groups)


def arg_name(group: str, attr: str) -> str:
    """The EngineArgs field behind config field ``group.attr`` (``attr`` itself when there is none)."""
    for f in fields(EngineArgs):
        if f.metadata["group"] == group and (f.metadata["attr"] or f.name) == attr:
            return f.name
    return attr


def flag_of(name: str) -> str:
    """The CLI flag of setting ``name`` (``--max-model-len``): an EngineArgs field's own flag, MODEL for the
    positional, else the flag spelled from the name (a command's own option, a sampling value)."""
    if name == "model":
        return "MODEL"
    f = next((f for f in fields(EngineArgs) if f.name == name), None)
    return (f is not None and f.metadata["flag"]) or "--" + name.replace("_", "-")


def add_cli_args(parser: argparse.ArgumentParser, defaults: Mapping[str, object] | None = None) -> None:
    """Add every EngineArgs field as a flag (MODEL as the optional positional), grouped by config group,
    with its default (``defaults`` replaces some for one command), so that ``from_cli_args`` gets them
    all back."""
    defaults = defaults or {}
    groups = {name: parser.add_argument_group(heading) for name, heading in HEADINGS.items()}
    for f in fields(EngineArgs):
        meta = f.metadata
        default = defaults.get(f.name, f.default)
        kw = dict(help=meta["help"].replace("%", "%%"), default=default)
        if f.name == "model":
            groups["model"].add_argument("model", nargs="?", metavar=meta["metavar"], **kw)
            continue
        if isinstance(f.default, bool) or meta["type"] is bool:  # a bool, or a bool unset by default
            kw["action"] = argparse.BooleanOptionalAction if f.default is not False else "store_true"
        elif isinstance(f.default, tuple):
            kw.update(action="append", default=None, metavar=meta["metavar"])
        else:
            kw.update(metavar=meta["metavar"], choices=meta["choices"], type=meta["type"])
            if meta["choices"] is not None and meta["metavar"] is None:
                kw["metavar"] = "{" + ",".join(map(str, meta["choices"])) + "}"
        flag_like = isinstance(f.default, bool) or meta["type"] is bool
        if not flag_like and default is not None and "(default" not in kw["help"]:
            kw["help"] += f" (default: {default})"
        groups[meta["group"]].add_argument(flag_of(f.name), dest=f.name, **kw)


def from_cli_args(args: argparse.Namespace, **overrides) -> EngineArgs:
    """The EngineArgs of parsed flags; ``overrides`` replace what a command decides itself."""
    values = {f.name: getattr(args, f.name) for f in fields(EngineArgs)}
    values["spec_dirs"] = tuple(values["spec_dirs"] or ())
    values.update(overrides)
    return EngineArgs(**values)
