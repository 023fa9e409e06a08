"""Chat templates a user can choose (``chat_template``: a built-in NAME or a Jinja FILE), and the fallback
for models that carry none.

The built-ins are written here from each format's public description, each a few lines of Jinja rendered
by `Tokenizer.apply_chat_template` (so they see ``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token`` and ``add_bos_token``, like a model's own template):

    chatml  <|im_start|>{role}\\n{content}<|im_end|>\\n ... <|im_start|>assistant\\n
            (Qwen, SmolLM, many fine-tunes; no BOS)
    llama3  {bos}<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|> ...
            <|start_header_id|>assistant<|end_header_id|>\\n\\n
    gemma   {bos}<start_of_turn>user\\n{system}\\n\\n{content}<end_of_turn>\\n ... <start_of_turn>model\\n
            (no system role: the system message opens the first user turn; "assistant" is "model")
    plain   System: ...\\nUser: ...\\nAssistant:   (a transcript any base model can continue; BOS only
            where the model wants one)

A model with no template of its own gets ``plain``, with a warning the first time it is rendered.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

from tierlm.config import ConfigError
from tierlm.loader.tokenizer import Tokenizer, TokenizerError
from tierlm.sampling_params import SamplingParams

__all__ = ["BUILTIN_TEMPLATES", "PLAIN", "PLAIN_STOP_STRINGS", "load_chat_template", "stop_strings",
           "use_chat_template", "with_template_stops"]

PLAIN = "plain"

_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim)"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
_GEMMA = (
    "{% set system = messages[0]['content'] + '\\n\\n' if messages and messages[0]['role'] == 'system' else '' %}"
    "{{ bos_token }}{% for message in messages if message['role'] != 'system' %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n'"
    " + (system if loop.first else '') + (message['content'] | trim) + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
_PLAIN = (
    "{{ bos_token if add_bos_token else '' }}{% for message in messages %}"
    "{{ (message['role'] | capitalize) + ': ' + (message['content'] | trim) + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

BUILTIN_TEMPLATES = MappingProxyType({"chatml": _CHATML, "llama3": _LLAMA3, "gemma": _GEMMA, PLAIN: _PLAIN})
# A base model continuing a plain transcript goes on to write the next lines itself (seen: Gemma-3-270m
# answering, then writing a "System:" line).
PLAIN_STOP_STRINGS = ("\nUser:", "\nSystem:")


def load_chat_template(setting: str) -> str:
    """The Jinja source ``setting`` names: a built-in's (a built-in name wins over a file of that name in
    the working directory; write ``./chatml`` for the file), else the UTF-8 text of the file at that path.
    Raises ConfigError("chat_template") for anything else."""
    if setting in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[setting]
    path = Path(setting).expanduser()
    names = ", ".join(BUILTIN_TEMPLATES)
    if not path.exists():
        raise ConfigError("chat_template", f"{setting!r} is neither a built-in template ({names}) nor a file")
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError("chat_template", f"{setting} is not UTF-8 text") from None
    except OSError as err:
        raise ConfigError("chat_template", f"cannot read {setting}: {err.strerror or err}") from None
    if not source.strip():
        raise ConfigError("chat_template", f"{setting} is empty")
    return source


def use_chat_template(tokenizer: Tokenizer | None, setting: str | None) -> None:
    """Give ``tokenizer`` the chat template the ``chat_template`` setting asks for, before anything renders
    with it (the tokenizer is changed in place; every chat path renders through it):

    * a NAME or FILE: that template, compiled now so a broken file fails at load;
    * None: the model's own template, or ``plain`` when it has none (warned once, at the first render).

    A model without a tokenizer has nothing to render with; the setting is still checked.
    Raises ConfigError("chat_template") for an unknown name, an unreadable file or one that does not compile.
    """
    if setting is None:
        if tokenizer is not None and tokenizer.chat_template is None:
            tokenizer.set_chat_template(BUILTIN_TEMPLATES[PLAIN], note=(
                "the model has no chat template of its own (a base model?); chat prompts use the plain "
                "'User: ... Assistant:' transcript (choose another with --chat-template)"))
        return
    source = load_chat_template(setting)
    if tokenizer is None:
        return
    try:
        tokenizer.set_chat_template(source)
    except TokenizerError as err:
        raise ConfigError("chat_template", f"{setting}: {err}") from None


def with_template_stops(tokenizer: Tokenizer | None, params: SamplingParams) -> SamplingParams:
    """``params`` plus the stop strings the chat template needs (the plain transcript's next "User:"):
    for every chat prompt, in ``tierlm chat``, ``generate --chat`` and the server's chat completions."""
    extra = tuple(s for s in stop_strings(tokenizer) if s not in params.stop)
    return replace(params, stop=params.stop + extra) if extra else params


def stop_strings(tokenizer: Tokenizer | None) -> tuple[str, ...]:
    """Text that ends an answer under the tokenizer's template besides its end-of-turn tokens: with the
    plain transcript, the start of a user or system line."""
    if tokenizer is not None and tokenizer.chat_template == BUILTIN_TEMPLATES[PLAIN]:
        return PLAIN_STOP_STRINGS
    return ()
