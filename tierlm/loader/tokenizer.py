"""Tokenizers: text <-> token ids, chat templates, and streaming detokenization.

Whatever the source, tokenization runs in one engine: a `tokenizers.Tokenizer` (Rust).
 - `Tokenizer.from_hf_dir` loads a Hugging Face folder (tokenizer.json + tokenizer_config.json).
 - `Tokenizer.from_gguf` rebuilds the tokenizer from GGUF metadata so that it gives the ids
   llama.cpp gives:
     "gpt2"  (byte-level BPE): vocab + merges, pre-tokenizer regexes chosen by `tokenizer.ggml.pre`
             exactly as llama.cpp's llama-vocab.cpp chooses them.
     "llama" (SentencePiece-BPE): merges derived from the piece scores, byte fallback, " " -> "▁".

Conventions shared by both:
 - Control tokens (GGUF token_type 3) and unknown tokens are *special*: matched as whole tokens in
   the input text and dropped by `decode(skip_special_tokens=True)`. User-defined tokens (type 4,
   e.g. Gemma's "\\n\\n" or "<table>") are matched as whole tokens too but always decoded.
   Special-token text in the input is always parsed (llama.cpp's `special=True`, HF's default).
 - `encode(add_special_tokens=True)` adds only BOS, and only when the model's metadata asks for it.
   Post-processors that would append EOS are deliberately not run: this engine generates.
This module never imports torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from tierlm.cache_dir import cache_root
from tierlm.loader.gguf import GGUFError, parse_gguf

__all__ = ["Tokenizer", "TokenizerError", "IncrementalDetokenizer"]

log = logging.getLogger(__name__)


class TokenizerError(ValueError):
    """The tokenizer files/metadata are missing, unsupported, or inconsistent."""


# GGUF tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Token texts that end generation, from llama.cpp's llama-vocab.cpp (special_eog_ids). Chat models
# stop on their end-of-turn token, which is often not the metadata's eos token.
_EOG_TOKEN_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
    "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>", "<｜end▁of▁sentence｜>",
})

class _BpePreTokenizer(NamedTuple):
    """How llama.cpp (llm_tokenizer_bpe) pre-splits text for one family of `tokenizer.ggml.pre` names.

    `regexes` apply in order, each splitting every piece the previous one produced.
    `ignore_merges`: a pre-split piece that is itself in the vocab is taken whole (Llama-3).
    `add_bos`: default when the GGUF has no tokenizer.ggml.add_bos_token.
    """

    names: frozenset[str]
    regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
                 r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Copied from llama.cpp's llama-vocab.cpp; a family llama.cpp knows but this table lacks is one more row.
_BPE_PRE_TOKENIZERS = (
    _BpePreTokenizer(frozenset({"gpt-2", "phi-2", "mpt", "olmo", "jais"}), (_GPT2_REGEX,)),
    _BpePreTokenizer(frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}),
                     (r"\p{N}", _GPT2_REGEX)),
    _BpePreTokenizer(frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"}), (_LLAMA3_REGEX,),
                     ignore_merges=True, add_bos=True),
    _BpePreTokenizer(frozenset({"dbrx", "smaug-bpe"}), (_LLAMA3_REGEX,)),
    _BpePreTokenizer(frozenset({"qwen2", "deepseek-r1-qwen", "stablelm2"}), (_QWEN2_REGEX,)),
)


class Tokenizer:
    """Text <-> ids for one model, plus its chat template and end-of-generation ids.

    Invariants:
      - `decode(encode(s, add_special_tokens=False)) == s` for any text `s` the vocabulary covers
        (byte-level BPE and byte-fallback SentencePiece cover every string).
      - `eos_token_ids` is non-empty when the metadata names an eos token; its first entry is that eos.
    Thread-safety: encode/decode/apply_chat_template may be called from several threads (the Rust tokenizer
    is immutable here); set_chat_template only before the tokenizer is shared.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Iterable[int],
        add_bos: bool,
        chat_template: str | None,
    ) -> None:
        self._backend = backend
        self._bos_token_id = bos_token_id
        self._eos_token_ids = tuple(dict.fromkeys(eos_token_ids))  # dedupe, keep order
        self._add_bos = add_bos and bos_token_id is not None
        self._chat_template = chat_template
        self._compiled_template = None  # compiled lazily: most requests never use it
        self._template_note: str | None = None  # a warning owed at the first render (see set_chat_template)

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load `tokenizer.json`, with bos/eos/add_bos_token/chat_template from `tokenizer_config.json`
        (template also from `chat_template.jinja`/`.json`) and extra eos ids from `generation_config.json`."""
        root = Path(path)
        if not (root / "tokenizer.json").is_file():
            raise TokenizerError(f"{root}: no tokenizer.json (only fast tokenizers are supported)")
        backend = tokenizers.Tokenizer.from_file(str(root / "tokenizer.json"))
        config = _read_json(root / "tokenizer_config.json")

        def token_id(entry: Any) -> int | None:
            text = entry.get("content") if isinstance(entry, dict) else entry
            return backend.token_to_id(text) if isinstance(text, str) else None

        bos_id, eos_id = token_id(config.get("bos_token")), token_id(config.get("eos_token"))
        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"])
        else:  # no explicit flag: trust the tokenizer.json post-processor (how HF itself decides)
            with_special = backend.encode("", add_special_tokens=True).ids
            add_bos = bos_id is not None and with_special[:1] == [bos_id]

        eos_ids = [eos_id] if eos_id is not None else []
        gen_eos = _read_json(root / "generation_config.json").get("eos_token_id")
        eos_ids += gen_eos if isinstance(gen_eos, list) else [gen_eos] if isinstance(gen_eos, int) else []
        for added in backend.get_added_tokens_decoder().values():
            if added.special and added.content in _EOG_TOKEN_TEXTS:
                eos_ids.append(backend.token_to_id(added.content))

        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text(encoding="utf-8")
        if template is None:
            template = _read_json(root / "chat_template.json").get("chat_template")
        return cls(backend, bos_token_id=bos_id, eos_token_ids=eos_ids, add_bos=add_bos,
                   chat_template=template)

    @classmethod
    def from_gguf(cls, source: str | os.PathLike | Any) -> Tokenizer:
        """Build from a GGUF file path, its parsed metadata dict, or an open `gguf.GGUFReader`.

        A path is read by a small metadata-only parser: `gguf.GGUFReader` spends ~20 s building
        per-element views of Gemma-3's 262k-entry vocab arrays, this parser ~0.3 s.
        """
        if isinstance(source, (str, os.PathLike)):
            meta = read_gguf_metadata(source)
        elif isinstance(source, dict):
            meta = source  # metadata already parsed by tierlm.loader.gguf
        else:
            meta = _reader_metadata(source)
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if model is None or tokens is None:
            raise TokenizerError("GGUF has no tokenizer.ggml.model/tokens: no embedded tokenizer")
        types = np.asarray(meta.get("tokenizer.ggml.token_type", np.full(len(tokens), TOKEN_NORMAL)))
        if model == "gpt2":
            pre = _bpe_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
            backend = _build_byte_level_bpe(tokens, types, meta.get("tokenizer.ggml.merges") or [], pre)
            add_bos_default = pre.add_bos
        elif model == "llama":
            if "tokenizer.ggml.scores" not in meta:
                raise TokenizerError("SentencePiece GGUF without tokenizer.ggml.scores")
            backend = _build_sentencepiece_bpe(tokens, np.asarray(meta["tokenizer.ggml.scores"]), types,
                                               bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
                                               gguf_tokenizer_key(meta))
            add_bos_default = True  # llama.cpp's default for SPM vocabularies
        else:
            raise TokenizerError(f"GGUF tokenizer model {model!r} is not supported (only 'gpt2' and 'llama')")

        bos_id = meta.get("tokenizer.ggml.bos_token_id")
        eos_ids = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                     "tokenizer.ggml.eom_token_id") if k in meta]
        eos_ids += [i for i, text in enumerate(tokens)
                    if text in _EOG_TOKEN_TEXTS and types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
        return cls(backend, bos_token_id=None if bos_id is None else int(bos_id),
                   eos_token_ids=[int(i) for i in eos_ids],
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
                   chat_template=meta.get("tokenizer.chat_template"))

    # -- text <-> ids -----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS first when `add_special_tokens` and the model wants BOS.

        Text rendered by `apply_chat_template` usually contains BOS already: encode it with
        `add_special_tokens=False`.
        """
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return [self._bos_token_id, *ids] if add_special_tokens and self._add_bos else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Incomplete UTF-8 sequences come out as U+FFFD (see IncrementalDetokenizer)."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, text: str) -> int | None:
        return self._backend.token_to_id(text)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary piece (byte-level or '▁' form), not its decoded text."""
        return self._backend.id_to_token(token_id)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: eos first, then end-of-turn tokens (<|im_end|>, <end_of_turn>, ...)."""
        return self._eos_token_ids

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included. The model's embedding may be larger (padding)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (e.g. to save as tokenizer.json)."""
        return self._backend

    # -- chat ---------------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def set_chat_template(self, source: str, note: str | None = None) -> None:
        """Replace the chat template (tierlm.loader.chat_templates chooses it at load, before the tokenizer
        is shared between threads). Compiled now: raises TokenizerError if it does not compile, and then
        the tokenizer is unchanged. `note`: a warning logged once, at the first render with it."""
        self._compiled_template = _compile_chat_template(source)
        self._chat_template = source
        self._template_note = note

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's Jinja chat template.

        Rendered the way transformers renders it (sandboxed, trim_blocks/lstrip_blocks,
        `raise_exception`, `bos_token`/`eos_token`), so prompts match what the model was tuned on.
        Templates also see `add_bos_token` (whether the model wants BOS; tierlm's own, for templates
        written for any model such as the plain transcript).
        """
        if self._chat_template is None:
            raise TokenizerError(
                "this model has no chat template (base model, or none in tokenizer_config.json / "
                "GGUF tokenizer.chat_template); encode plain text instead")
        if self._compiled_template is None:
            self._compiled_template = _compile_chat_template(self._chat_template)
        note, self._template_note = self._template_note, None
        if note is not None:
            log.warning("%s", note)
        return self._compiled_template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token_text(self._bos_token_id),
            eos_token=self._token_text(self._eos_token_ids[0] if self._eos_token_ids else None),
            add_bos_token=self._add_bos,
        )

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self._backend.id_to_token(token_id) or ""


# -- GGUF -> tokenizers.Tokenizer ------------------------------------------------------------------

# The metadata a GGUF tokenizer is rebuilt from: equal values, equal tokenizer.
_GGUF_TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_space_prefix",
                        "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                        "tokenizer.ggml.merges")


def gguf_tokenizer_key(meta: dict[str, Any]) -> str:
    """A digest of the metadata the tokenizer is built from and of this module's source (a change in
    how it is built is a different tokenizer): names what is cached of the build (``_cached_merges``)."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    for key in _GGUF_TOKENIZER_KEYS:
        value = meta.get(key)
        h.update(f"\x00{key}\x00{type(value).__name__}\x00".encode())
        if isinstance(value, np.ndarray):
            h.update(f"{value.dtype}{value.shape}".encode() + np.ascontiguousarray(value).tobytes())
        elif isinstance(value, (list, tuple)):
            h.update("\x00".join(map(str, value)).encode("utf-8", "surrogatepass"))
        else:
            h.update(repr(value).encode())
    return h.hexdigest()[:20]


def _cached_merges(key: str, tokens: Sequence[str], vocab: dict[str, int],
                   derive: Callable[[], list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """``derive()``, kept as the pieces' ids (an (n, 2) int32 array) under $TIERLM_CACHE/tokenizers
    (tierlm.cache_dir) and read from there next time: deriving Gemma-3's 515k merges from its piece
    scores takes about 2 s of Python, reading them back a few milliseconds. Only the merges: a whole
    tokenizer.json of that vocabulary loads no faster than ``BPE()`` builds and parsing it lifts the
    load's peak memory by 25 MiB. An entry that does not read is derived again and replaced, with a
    warning; a cache that cannot be written is skipped."""
    path = cache_root() / "tokenizers" / f"{key}-merges.npy"
    if path.is_file():
        try:
            ids = np.load(path, allow_pickle=False)
            if ids.ndim == 2 and ids.shape[1] == 2 and ids.dtype == np.int32 and \
                    (ids.size == 0 or 0 <= ids.min() <= ids.max() < len(tokens)):
                return [(tokens[a], tokens[b]) for a, b in ids.tolist()]
            log.warning("cached merges %s do not fit this vocabulary; deriving them again", path)
        except (OSError, ValueError) as err:
            log.warning("cached merges %s do not load (%s); deriving them again", path, err)
    merges = derive()
    ids = np.array([(vocab[a], vocab[b]) for a, b in merges], dtype=np.int32).reshape(-1, 2)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp, ids)
        os.replace(tmp, path)  # whole or not at all: processes starting together never read half a file
    except OSError as err:
        with contextlib.suppress(OSError):  # no folder to write into (NotADirectoryError), or no file
            tmp.unlink()
        log.info("merges not cached (%s): the next load derives them again", err)
    return merges



def _piece_ids(tokens: Sequence[str]) -> dict[str, int]:
    """piece -> id; for a duplicated piece the last id wins, as in llama.cpp's token_to_id."""
    return {text: i for i, text in enumerate(tokens)}


def _add_whole_tokens(backend: tokenizers.Tokenizer, tokens: Sequence[str], types: np.ndarray) -> None:
    """Register control/unknown (special) and user-defined (plain) tokens as whole-match tokens.

    llama.cpp partitions the text on these before running the model's BPE; `tokenizers` does the
    same with added tokens. `normalized=False` matches them in the raw text, before " " -> "▁".
    Overlapping matches resolve differently (llama.cpp: longest token first anywhere in the text;
    tokenizers: leftmost, then longest); no real vocabulary here has such overlaps.
    """
    special, plain = [], []
    for i in np.flatnonzero(np.isin(types, (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED))):
        text = tokens[i]
        if text:
            is_special = types[i] != TOKEN_USER_DEFINED
            token = AddedToken(text, special=is_special, normalized=False)
            (special if is_special else plain).append(token)
    backend.add_special_tokens(special)
    backend.add_tokens(plain)


def _build_byte_level_bpe(tokens: Sequence[str], types: np.ndarray, merges: Sequence[str],
                          pre: _BpePreTokenizer) -> tokenizers.Tokenizer:
    """GPT-2-style BPE: bytes mapped to printable chars, merges by rank, regex pre-splitting."""
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = tokenizers.Tokenizer(BPE(vocab=_piece_ids(tokens), merges=pairs, ignore_merges=pre.ignore_merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    _add_whole_tokens(backend, tokens, types)
    return backend


def _bpe_pre_tokenizer(name: str) -> _BpePreTokenizer:
    for family in _BPE_PRE_TOKENIZERS:
        if name in family.names:
            return family
    known = sorted(n for family in _BPE_PRE_TOKENIZERS for n in family.names)
    raise TokenizerError(f"GGUF tokenizer.ggml.pre={name!r} is not supported; known: {known}")


def _build_sentencepiece_bpe(tokens: Sequence[str], scores: np.ndarray, types: np.ndarray,
                             add_space_prefix: bool, cache_key: str | None = None) -> tokenizers.Tokenizer:
    """SentencePiece-BPE as llama.cpp runs it: start from characters, repeatedly merge the adjacent
    pair whose concatenation is the highest-scoring piece, fall back to <0xXX> bytes for characters
    outside the vocabulary. A rank-ordered BPE does the same once merges are ranked by score."""
    vocab = _piece_ids(tokens)
    unk = next((tokens[i] for i in np.flatnonzero(types == TOKEN_UNKNOWN)), None)
    if cache_key is None:
        merges = _merges_from_scores(vocab, scores, types)
    else:  # cached by the metadata's digest (gguf_tokenizer_key)
        merges = _cached_merges(cache_key, tokens, vocab, lambda: _merges_from_scores(vocab, scores, types))
    model = BPE(vocab=vocab, merges=merges,
                byte_fallback=True, unk_token=unk, fuse_unk=True)
    backend = tokenizers.Tokenizer(model)
    spaces = [normalizers.Replace(" ", "▁")]
    # llama.cpp prepends the space to every text fragment between special tokens, as Prepend does.
    backend.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if add_space_prefix else []) + spaces)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    _add_whole_tokens(backend, tokens, types)
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: np.ndarray, types: np.ndarray) -> list[tuple[str, str]]:
    """Every split of a piece into two in-vocab pieces is a merge; higher piece score = earlier rank.

    As HF's SentencePieceExtractor does. Ties (several splits of one piece) are ordered by the length
    of the left half, which only matters when equal-score merges compete at different positions
    (llama.cpp then takes the leftmost) - not observed on real text.
    Cost: up to two dict lookups per character of the vocabulary (Gemma-3: 515k merges, ~1-2 s).
    """
    # Control/byte/unknown pieces are never produced by merging plain text: llama.cpp matches
    # control tokens before BPE runs, and <0xXX> pieces are only a fallback.
    can_merge = np.isin(types, (TOKEN_NORMAL, TOKEN_USER_DEFINED, TOKEN_UNUSED)).tolist()
    score_of = scores.tolist()  # Python floats: indexing a numpy array per split is ~5x slower
    lefts, rights, ranks_score, ranks_split = [], [], [], []
    for text, i in vocab.items():
        if not can_merge[i]:
            continue
        for k in range(1, len(text)):
            left, right = text[:k], text[k:]
            if left in vocab and right in vocab:
                lefts.append(left)
                rights.append(right)
                ranks_score.append(score_of[i])
                ranks_split.append(k)
    order = np.lexsort((np.asarray(ranks_split), -np.asarray(ranks_score, dtype=np.float64)))
    return [(lefts[j], rights[j]) for j in order.tolist()]


# -- GGUF metadata ---------------------------------------------------------------------------------

def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All key/value metadata of a GGUF file (tensors are not touched); see tierlm.loader.gguf."""
    try:
        return parse_gguf(path, with_tensors=False)[0]
    except GGUFError as err:
        raise TokenizerError(str(err)) from None


def _reader_metadata(reader: Any) -> dict[str, Any]:
    """The tokenizer.* fields of an already-open gguf.GGUFReader, in read_gguf_metadata's shapes."""
    if not hasattr(reader, "fields"):
        raise TokenizerError(f"expected a GGUF path or gguf.GGUFReader, got {type(reader).__name__}")
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            value = field.contents()
            numeric = isinstance(value, list) and value and not isinstance(value[0], str)
            out[key] = np.asarray(value) if numeric else value
    return out


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# -- chat templates --------------------------------------------------------------------------------


def _compile_chat_template(source: str) -> Any:
    """Compile like transformers does, so templates written for HF render identically here."""
    import jinja2  # here, not at import: only chat requests need it
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TokenizerError(f"chat template error: {message}")

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        # Jinja's own tojson escapes HTML characters, which templates written for HF do not expect.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template does not compile: {e}") from e


# -- streaming -------------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas as they arrive, never splitting a character.

    Invariant: `"".join(deltas) + flush() == tokenizer.decode(output_ids, skip_special_tokens)`,
    where `output_ids` are the ids passed to `add`, in order.

    Cost per token is O(1): each call decodes only a short window of ids:

        ids:  ... | already emitted | emitted by last call | pending (not yet emitted) |
                                    ^ prefix_offset        ^ read_offset              ^ len(ids)
        delta = decode(ids[prefix_offset:])[len(decode(ids[prefix_offset:read_offset])):]

    Decoding from `prefix_offset` (one token of context) rather than `read_offset` keeps decoders
    whose output for a token depends on its neighbour (leading-space stripping) consistent. A
    delta is held back while the window's text ends in U+FFFD: the last token ended inside a
    multi-byte UTF-8 character whose remaining bytes come in later tokens. A byte sequence that
    stays invalid is released after `_MAX_PENDING` tokens so the window cannot grow without bound.

    `prompt_ids` is accepted for vLLM-style call sites but contributes no context: decoding the
    output in the prompt's context would keep a leading space that `decode(output_ids)` strips
    (SentencePiece decoders), and the text is defined as decode(output_ids).
    """

    _MAX_PENDING = 8  # > the 4 bytes of the longest UTF-8 character, plus slack for special tokens

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None,
                 skip_special_tokens: bool = True) -> None:
        del prompt_ids  # see class docstring
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._text = ""

    def add(self, token_id: int) -> str:
        """Append one generated id; return the text it completes ("" while a character is pending)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        window_text = self._decode(self._prefix_offset, len(self._ids))
        complete = window_text.startswith(prefix_text) and not window_text.endswith("\ufffd")
        if not complete and len(self._ids) - self._read_offset < self._MAX_PENDING:
            return ""
        delta = window_text[len(prefix_text):]
        if delta:  # an empty delta (a skipped special token) must not move the context window
            self._prefix_offset = self._read_offset
            self._text += delta  # CPython appends in place: O(len(delta))
        self._read_offset = len(self._ids)
        return delta

    def flush(self) -> str:
        """End of stream: return whatever is still held back (as decode would render it, U+FFFD included)."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        delta = self._decode(self._prefix_offset, len(self._ids))[len(prefix_text):]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._text += delta
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._text

    @property
    def output_ids(self) -> list[int]:
        return list(self._ids)

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special)
