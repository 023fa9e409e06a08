"""OpenAI-compatible request and response schemas (the subset tierlm serves), as pydantic models.

Requests validate shape and types only; sampling values are validated once, by ``SamplingParams``,
whose error names the field. Unknown request fields are ignored, as the OpenAI API does for
optional features a server lacks; fields whose non-default value would silently change the result
(``echo``, ``best_of``, ``suffix``, ``logit_bias``, ``n`` != 1) are rejected by the server with a 400.
Extensions (vLLM's names, sent with the openai client's ``extra_body``): ``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos``.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field

from tierlm.outputs import TokenLogprob
from tierlm.sampling_params import SamplingParams

# -- requests -------------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


_OPTIONAL_SAMPLING = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                      "repetition_penalty")  # None: SamplingParams' default


class _SamplingFields(BaseModel):
    """Fields shared by both endpoints. None means "the OpenAI default"."""

    model: str | None = None  # any value is accepted; responses name the served model
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def to_sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """Raises SamplingParamsError, whose ``field`` is the SamplingParams field at fault."""
        kwargs = {name: getattr(self, name) for name in _OPTIONAL_SAMPLING if getattr(self, name) is not None}
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return SamplingParams(max_tokens=max_tokens, seed=self.seed, stop=stop, ignore_eos=self.ignore_eos,
                              logprobs=logprobs, **kwargs)

    def request_field(self, sampling_field: str) -> str | None:
        """The request field that set a SamplingParams field, or None."""
        return sampling_field if sampling_field in type(self).model_fields else None


class CompletionRequest(_SamplingFields):
    # One prompt: text or token ids. A batch (list of texts / of id lists) of length 1 is unwrapped.
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None  # the sampled token's logprob plus this many top ones
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def as_template_dict(self) -> dict:
        """The {"role", "content": str} form chat templates expect (text parts joined)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        return {"role": self.role, "content": content or ""}


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # the newer name of max_tokens; wins when both are set
    logprobs: bool = False
    top_logprobs: int | None = None

    def request_field(self, sampling_field: str) -> str | None:
        if sampling_field == "logprobs":
            return "top_logprobs"
        if sampling_field == "max_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return super().request_field(sampling_field)


# -- responses ------------------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, num_prompt_tokens: int, num_completion_tokens: int) -> Usage:
        return cls(prompt_tokens=num_prompt_tokens, completion_tokens=num_completion_tokens,
                   total_tokens=num_prompt_tokens + num_completion_tokens)


FinishReason = Literal["stop", "length"] | None


class CompletionLogprobs(BaseModel):
    """The legacy completions format: parallel lists, one entry per generated token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)

    @classmethod
    def of(cls, logprobs: list[TokenLogprob], piece, start_offset: int = 0) -> CompletionLogprobs:
        """``piece(token_id) -> str``; offsets count characters of the pieces from ``start_offset``."""
        out = cls()
        offset = start_offset
        for lp in logprobs:
            text = piece(lp.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({piece(t): v for t, v in lp.top})
            out.text_offset.append(offset)
            offset += len(text)
        return out


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason = None


class CompletionResponse(BaseModel):
    """Both the whole response (object "text_completion") and a stream chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]

    @classmethod
    def of(cls, logprobs: list[TokenLogprob], piece) -> ChatLogprobs:
        def top(token_id: int, logprob: float) -> TopLogprob:
            text = piece(token_id)
            return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

        return cls(content=[ChatTokenLogprob(**top(lp.token_id, lp.logprob).model_dump(),
                                             top_logprobs=[top(t, v) for t, v in lp.top]) for lp in logprobs])


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "tierlm"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(BaseModel):
    """``POST /tokenize``: the text as llama-server's ``content`` or vLLM's ``prompt`` (exactly one);
    special tokens (BOS) added unless ``add_special`` / ``add_special_tokens`` is false; ``with_pieces``
    (llama-server) answers each id with its text."""

    content: str | None = None
    prompt: str | None = None
    add_special: bool | None = None
    add_special_tokens: bool | None = None
    with_pieces: bool = False
    model: str | None = None


class TokenPiece(BaseModel):
    id: int
    piece: str


class TokenizeResponse(BaseModel):
    tokens: list[int] | list[TokenPiece]
    count: int  # vLLM's fields: the number of tokens and the context they must fit
    max_model_len: int


class DetokenizeRequest(BaseModel):
    """``POST /detokenize``: token ids back to text (special tokens kept, as both servers do)."""

    tokens: list[int]
    model: str | None = None


class DetokenizeResponse(BaseModel):
    content: str  # llama-server's name
    prompt: str  # vLLM's name for the same text


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
